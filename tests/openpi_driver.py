"""Client side of the server tests and the load benchmark, run with the Python of a separate environment
that has the real ``openpi-client`` package (it pins numpy < 2, so it cannot share lwam's environment).

Imports nothing from lwam. Observations are built from the server's metadata alone (``observation_spec``),
seeded, so the caller can rebuild the same ones. Usage::

    python openpi_driver.py infer URL OUT.npz SEED N [PROMPT]   # N requests, observations + actions saved
    python openpi_driver.py bad URL OUT.json PROMPT               # the bad-input table
    python openpi_driver.py load URL OUT.json CLIENTS REQUESTS PROMPT [DEADLINE_S]

Every connection goes to the URL given (the tests and the benchmark only ever pass ws://127.0.0.1:PORT).
"""
from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy


def make_observation(spec: dict, rng: np.random.Generator, prompt: str) -> dict:
    obs = {}
    for key, s in spec.items():
        shape, dtype = tuple(s["shape"]), np.dtype(s["dtype"])
        if dtype == np.uint8:
            obs[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            obs[key] = rng.standard_normal(shape).astype(dtype)
    obs["prompt"] = prompt
    return obs


def _client(url: str) -> WebsocketClientPolicy:
    return WebsocketClientPolicy(host=url)


def cmd_infer(url: str, out: str, seed: int, n: int, prompt: str = "push the button") -> None:
    client = _client(url)
    meta = client.get_server_metadata()
    rng = np.random.default_rng(seed)
    saved: dict[str, np.ndarray] = {}
    for i in range(n):
        obs = make_observation(meta["observation_spec"], rng, prompt)
        reply = client.infer(obs)
        for k, v in obs.items():
            if k != "prompt":
                saved[f"{i}/{k}"] = v
        saved[f"{i}/actions"] = np.asarray(reply["actions"])
        saved[f"{i}/infer_ms"] = np.float64(reply["server_timing"]["infer_ms"])
    saved["metadata"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(out, **saved)


def cmd_bad(url: str, out: str, prompt: str) -> None:
    """Each bad request on one connection, then a good one on the same connection and on a second
    connection: record the error text and whether both good ones were answered."""
    bad_client, other = _client(url), _client(url)
    meta = bad_client.get_server_metadata()
    spec = meta["observation_spec"]
    rng = np.random.default_rng(0)
    good = make_observation(spec, rng, prompt)
    image_key = next(k for k in spec if k.startswith("observation.images."))
    limit = meta["implementation"]["max_message_bytes"]

    def with_(**kw):
        o = dict(good)
        for k, v in kw.items():
            if v is None:
                o.pop(k.replace("__", "."), None)
            else:
                o[k.replace("__", ".")] = v
        return o

    state = good["observation.state"]
    nan_state = state.copy()
    nan_state[1] = np.nan
    cases = {
        "missing key": ("dict", with_(observation__state=None)),
        "missing instruction": ("dict", with_(prompt=None)),
        "wrong shape": ("dict", with_(observation__state=np.zeros(state.shape[0] + 3, np.float32))),
        "wrong image shape": ("dict", {**good, image_key: good[image_key][..., :2]}),
        "wrong dtype": ("dict", with_(observation__state=state.astype(np.int64))),
        "wrong image dtype": ("dict", {**good, image_key: good[image_key].astype(np.int16)}),
        "NaN": ("dict", with_(observation__state=nan_state)),
        "unknown instruction": ("dict", with_(prompt="juggle three oranges")),
        "garbage bytes": ("raw", b"\xc1\x00garbage\xff" * 8),
        "text frame": ("raw", "hello"),
        "not a dict": ("raw", msgpack_numpy.packb([1, 2, 3])),
        "object array": ("raw", b"\x81\xa1x" + msgpack_numpy.packb({b"__ndarray__": True, b"data": b"\x00" * 8,
                                                                      b"dtype": "|O", b"shape": [1]})),
        "oversized frame": ("raw", msgpack_numpy.packb({**good, "padding": b"\x00" * (limit + 1)})),
    }
    table = []
    for name, (kind, payload) in cases.items():
        if kind == "dict":
            try:
                bad_client.infer(payload)
                error = None
            except RuntimeError as e:
                error = str(e).split("\n", 1)[-1]
        else:
            bad_client._ws.send(payload)
            reply = bad_client._ws.recv()
            error = reply if isinstance(reply, str) else None
        same = other_ok = False
        try:
            same = np.asarray(bad_client.infer(good)["actions"]).shape[0] > 0
            other_ok = np.asarray(other.infer(good)["actions"]).shape[0] > 0
        except Exception as e:  # recorded, the test fails on it
            error = f"{error} / follow-up failed: {type(e).__name__}: {e}"
        table.append({"case": name, "error": error, "same_connection_served": bool(same),
                      "other_client_served": bool(other_ok)})
    with open(out, "w") as f:
        json.dump({"metadata": meta, "table": table}, f, indent=1)


def cmd_load(url: str, out: str, clients: int, requests: int, prompt: str, deadline_s: float = 300.0) -> None:
    """``clients`` threads, each its own connection, ``requests`` sequential requests each (bounded in
    count and by ``deadline_s``). Records latency per request, errors, and a checksum per request."""
    results: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)
    t_end = time.monotonic() + deadline_s

    def run(c: int) -> None:
        try:
            client = _client(url)
        except Exception as e:
            with lock:
                results.append({"client": c, "i": -1, "error": f"connect: {e}"})
            return
        rng = np.random.default_rng(1000 + c)
        spec = client.get_server_metadata()["observation_spec"]
        obs_list = [make_observation(spec, rng, prompt) for _ in range(requests)]
        start.wait()
        for i, obs in enumerate(obs_list):
            if time.monotonic() > t_end:
                break
            t0 = time.perf_counter()
            try:
                reply = client.infer(obs)
                rec = {"client": c, "i": i, "latency_ms": (time.perf_counter() - t0) * 1e3,
                       "batch_size": int(reply["server_timing"]["batch_size"]),
                       "actions_sum": float(np.asarray(reply["actions"], dtype=np.float64).sum()),
                       "actions_first": np.asarray(reply["actions"])[0].tolist()}
            except Exception as e:
                rec = {"client": c, "i": i, "error": f"{type(e).__name__}: {e}"}
            with lock:
                results.append(rec)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array([r["latency_ms"] for r in results if "latency_ms" in r])
    summary = {"clients": clients, "requests_per_client": requests, "answered": int(lat.size),
               "errors": [r for r in results if "error" in r], "wall_s": wall,
               "throughput_rps": float(lat.size / wall) if wall > 0 else 0.0,
               "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
               "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
               "mean_batch_size": float(np.mean([r["batch_size"] for r in results if "batch_size" in r]))
               if lat.size else None,
               "results": results}
    with open(out, "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "infer":
        cmd_infer(args[0], args[1], int(args[2]), int(args[3]), *args[4:5])
    elif mode == "bad":
        cmd_bad(args[0], args[1], args[2])
    elif mode == "load":
        cmd_load(args[0], args[1], int(args[2]), int(args[3]), args[4], *(float(a) for a in args[5:6]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
