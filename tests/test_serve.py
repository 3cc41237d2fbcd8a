"""lwam serve: the openpi-protocol policy server, against the real ``openpi-client`` package (run from its own
environment in a subprocess, see .ci/openpi_client_env.sh) and lwam's own RemotePolicy. Loopback only."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("websockets")
pytest.importorskip("msgpack")

from lwam.config import get_preset  # noqa: E402
from lwam.policy.compiled import Policy  # noqa: E402
from lwam.model.lightwam import LightWAM  # noqa: E402
from lwam.policy.remote import RemotePolicy, RemotePolicyError  # noqa: E402
from lwam.serving.server import PolicyServer, batch_sizes_for  # noqa: E402
from lwam.testing import assert_close, perturb_zero_inits_  # noqa: E402
from lwam.serving.codec import WireError, packb, unpackb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "openpi_driver.py"
INSTRUCTIONS = ["push the button", "press the button from the top"]  # the 2nd: Meta-World's
STATS = {"observation.state": {"min": [-2.0] * 4, "max": [3.0] * 4, "mean": [0.0] * 4, "std": [1.0] * 4},
         "action": {"min": [-0.5] * 4, "max": [1.5] * 4, "mean": [0.0] * 4, "std": [1.0] * 4}}
METADATA_KEYS = {"observation_spec", "instruction_keys", "chunk_size", "action_dim", "executed_steps",
                 "instructions", "text_encoder", "implementation"}


def openpi_python() -> str:
    p = os.environ.get("LWAM_OPENPI_PYTHON") or str(REPO / ".venv-openpi" / "bin" / "python")
    if Path(p).is_file():
        return p
    msg = (f"no openpi-client environment at {p}: `source .ci/openpi_client_env.sh` creates it "
           f"(or set LWAM_OPENPI_PYTHON)")
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def run_driver(*args, timeout=300):
    r = subprocess.run([openpi_python(), str(DRIVER), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"openpi driver failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def model():
    """Tiny model with a text cache only (no text encoder), so that an unknown instruction is an error."""
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(**{"text.encoder": "cache"})
    m = LightWAM(cfg).eval()
    g = torch.Generator().manual_seed(2)
    perturb_zero_inits_(m, g)
    with torch.no_grad():
        for s in INSTRUCTIONS:
            m.text.add(s, torch.randn(cfg.text.max_tokens, cfg.text.dim, generator=g))
    return m


@pytest.fixture(scope="module")
def policy(model):
    return Policy.from_model(model, stats=STATS, compile=False)


@contextmanager
def running(server):
    """Serve in a background thread (its own event loop) on a free loopback port; drain and join after."""
    ready, result = threading.Event(), {}

    def run():
        try:
            result["rc"] = asyncio.run(server.serve(ready=lambda port: ready.set(), handle_signals=False))
        except BaseException as e:  # surfaced below
            result["error"] = e
            ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(120) and "error" not in result, result.get("error")
    try:
        yield f"ws://127.0.0.1:{server.port}"
    finally:
        server.request_shutdown()
        t.join(60)
    assert not t.is_alive() and result.get("rc") == 0, result


def make_observation(spec, rng, prompt):
    """The observation openpi_driver.make_observation builds (same draws)."""
    obs = {}
    for key, s in spec.items():
        if s["dtype"] == "uint8":
            obs[key] = rng.integers(0, 256, tuple(s["shape"]), dtype=np.uint8)
        else:
            obs[key] = rng.standard_normal(tuple(s["shape"])).astype(s["dtype"])
    obs["prompt"] = prompt
    return obs


# --- wire format ---------------------------------------------------------------------------------------
def test_wire_roundtrip_and_rejections():
    obj = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros((2, 0), np.uint8),
           "s": np.float64(2.5), "t": "text", "n": [1, 2]}
    back = unpackb(packb(obj))
    assert back["a"].dtype == np.float32 and np.array_equal(back["a"], obj["a"]) and back["b"].shape == (2, 0)
    assert back["s"] == 2.5 and back["t"] == "text" and back["n"] == [1, 2]
    with pytest.raises(TypeError, match="dtype object"):
        packb({"x": np.array([object()])})
    arr = {b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]}
    import msgpack
    for bad, match in [(b"\xc1garbage", "not valid msgpack"), (b"", "not valid msgpack"),
                       (msgpack.packb({"x": arr}), r"'\|O' not accepted"),
                       (msgpack.packb({"x": {**arr, b"dtype": "<f4", b"shape": [3]}}), "needs 12 bytes, got 8"),
                       (msgpack.packb({"x": {**arr, b"dtype": "<f4", b"shape": [-2]}}), "non-negative ints"),
                       (msgpack.packb({"x": {**arr, b"dtype": "nonsense"}}), "is not a numpy dtype")]:
        with pytest.raises(WireError, match=match):
            unpackb(bad)
    with pytest.raises(WireError, match="exceeds the limit of 10 bytes"):
        unpackb(packb({"x": np.zeros(8)}), max_bytes=10)


def test_wire_bytes_identical_to_openpi_codec():
    obj_src = "{'x': np.arange(6, dtype=np.float32).reshape(2, 3), 'i': np.int64(7), 'p': 'go', 'u': np.ones((2, 2), np.uint8)}"
    code = ("import sys, numpy as np\nfrom openpi_client import msgpack_numpy as m\n"
            f"sys.stdout.buffer.write(m.packb({obj_src}))")
    r = subprocess.run([openpi_python(), "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == packb(eval(obj_src))
    decoded = unpackb(r.stdout)
    assert decoded["u"].dtype == np.uint8 and decoded["i"] == 7 and isinstance(decoded["i"], np.int64)


# --- the openpi client -----------------------------------------------------------------------------------
def test_openpi_client_gets_policy_actions(policy, tmp_path):
    """Unmodified WebsocketClientPolicy: metadata on connect, and actions equal to predict_action_chunk."""
    with running(PolicyServer(policy, port=0, max_batch=2)) as url:
        run_driver("infer", url, tmp_path / "out.npz", 7, 3, INSTRUCTIONS[0])
    data = np.load(tmp_path / "out.npz")
    meta = json.loads(bytes(data["metadata"]).decode())
    assert set(meta) == METADATA_KEYS
    assert meta["observation_spec"] == policy.observation_spec()
    assert (meta["chunk_size"], meta["action_dim"], meta["executed_steps"]) == (32, 4, 8)
    assert meta["instructions"] == sorted(INSTRUCTIONS) and meta["text_encoder"] is False
    assert meta["implementation"]["cameras"] == ["corner", "gripper"]
    rng = np.random.default_rng(7)
    for i in range(3):
        obs = {k[len(f"{i}/"):]: data[k] for k in data.files if k.startswith(f"{i}/observation")}
        obs["prompt"] = INSTRUCTIONS[0]
        rebuilt = make_observation(meta["observation_spec"], rng, INSTRUCTIONS[0])
        assert all(np.array_equal(rebuilt[k], obs[k]) for k in obs if k != "prompt")  # same draws (used below)
        actions = data[f"{i}/actions"]
        assert actions.dtype == np.float32 and actions.shape == (32, 4)
        assert np.array_equal(actions, policy.predict_action_chunk(obs))


def test_bad_input_table(policy, tmp_path):
    """Every bad request is answered with an error naming the key, the expected and the received value; the
    same connection and another client are served right after."""
    server = PolicyServer(policy, port=0, max_batch=2, max_message_bytes=64 * 1024)
    with running(server) as url:
        run_driver("bad", url, tmp_path / "bad.json", INSTRUCTIONS[0])
    table = {row["case"]: row for row in json.loads((tmp_path / "bad.json").read_text())["table"]}
    expected = {
        "missing key": ["missing key 'observation.state'"],
        "missing instruction": ["expected key 'task' (LeRobot) or 'prompt'"],
        "wrong shape": ["observation.state: expected shape [4]", "got [7]"],
        "wrong image shape": ["observation.images.corner: expected uint8 [h, w, 3]", "got shape [64, 64, 2]"],
        "wrong dtype": ["observation.state: expected dtype float32, got int64"],
        "wrong image dtype": ["observation.images.corner: expected dtype uint8", "got int16"],
        "NaN": ["observation.state: expected finite values, got nan at index [1]"],
        "unknown instruction": ["unknown instruction 'juggle three oranges'", "this server answers"],
        "garbage bytes": ["not valid msgpack"],
        "text frame": ["expected a binary msgpack message", "got a text frame"],
        "not a dict": ["observation: expected a dict, got list"],
        "object array": ["array dtype: '|O' not accepted"],
        "oversized frame": ["exceeds the server's limit of 65536 bytes"],
    }
    assert set(table) == set(expected)
    for case, fragments in expected.items():
        row = table[case]
        assert row["error"] is not None and row["error"].startswith("error: "), (case, row)
        for f in fragments:
            assert f in row["error"], (case, f, row["error"])
        assert row["same_connection_served"] and row["other_client_served"], row
    for case in expected:
        print(f"{case:20s} | {table[case]['error']}")


def test_small_load_concurrent_clients(policy, tmp_path):
    """4 openpi clients x 5 requests at once: no errors, each answer right for its own observation."""
    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    server = PolicyServer(policy, port=0, max_batch=4)
    with running(server) as url:
        run_driver("load", url, tmp_path / "load.json", 4, 5, INSTRUCTIONS[1], 240)
        stats = dict(server.stats)
    res = json.loads((tmp_path / "load.json").read_text())
    assert res["errors"] == [] and res["answered"] == 20
    spec = policy.observation_spec()
    for c in range(4):
        rng = np.random.default_rng(1000 + c)
        obs = [make_observation(spec, rng, INSTRUCTIONS[1]) for _ in range(5)]
        got = sorted((r for r in res["results"] if r["client"] == c), key=lambda r: r["i"])
        for r in got:
            ref = policy.predict_action_chunk(obs[r["i"]])
            assert_close(torch.tensor(r["actions_first"]), torch.from_numpy(ref[0]), dtype=torch.float32)
    assert stats["batches"] <= 20 and stats["batched_rows"] == 20
    print(f"load: p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, mean batch {res['mean_batch_size']:.2f}, "
          f"{stats['batches']} batches, max RSS {rss0 / 1024:.0f} -> "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def test_batches_fill_warmed_sizes_without_padding(policy):
    """Of 5 waiting single requests, 4 go now (a warmed-up size) and 1 waits; padding only when nothing fits."""
    from collections import deque
    from types import SimpleNamespace

    server = PolicyServer(policy, port=0, max_batch=8)
    assert server.batch_sizes == [1, 2, 4, 8]

    def reqs(*rows):
        return deque(SimpleNamespace(rows=r) for r in rows)

    for rows, taken, left in [((1,) * 5, 4, 1), ((1,) * 3, 2, 1), ((1,) * 9, 8, 1), ((3,), 3, 0), ((2, 1, 1, 3), 4, 1), ((3, 3), 6, 0)]:
        pending = reqs(*rows)
        batch, n = server._take(pending)
        assert (n, len(pending)) == (taken, left), rows
    assert server.batch_sizes == [1, 2, 4, 8] and batch_sizes_for(6) == [1, 2, 4, 6]


# --- queue, shutdown, auth (lwam's own client) -------------------------------------------------------------
class Gated:
    """The policy, with predict_batch held until ``gate`` opens (to control what is in flight)."""

    def __init__(self, policy):
        self._policy, self.gate, self.entered = policy, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def predict_batch(self, *args):
        self.entered.set()
        assert self.gate.wait(60)
        return self._policy.predict_batch(*args)


def test_remote_policy_async_execution_through_the_server(policy):
    """RemotePolicy.start_async: chunks are requested from `lwam serve` on a worker thread while the robot
    executes; the lead comes from the measured round trip; every action is action t - s of the chunk of an
    earlier observation s (the server's answer for it)."""
    rng = np.random.default_rng(7)
    with running(PolicyServer(policy, port=0, max_batch=1)) as url:
        with RemotePolicy(url) as rp:
            obs = [make_observation(rp.observation_spec(), rng, INSTRUCTIONS[0]) for _ in range(30)]
            chunks = [rp.predict_action_chunk(o) for o in obs]
            rp.start_async(lead_steps=None, control_hz=100.0, blend="none")
            rp.reset()
            got = []
            for o in obs:
                got.append(rp.select_action(o))
                time.sleep(0.01)  # a 100 Hz control loop
            stats = rp.async_stats
        assert rp.async_stats is None  # close() stopped the worker
    assert stats["requests"] >= 3
    for t, a in enumerate(got):
        assert any(np.array_equal(a, chunks[s][t - s]) for s in range(t + 1)), t


def _request_in_thread(url, obs, out, key):
    def run():
        try:
            with RemotePolicy(url) as rp:
                out[key] = rp.predict_action_chunk(obs)
        except Exception as e:
            out[key] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait(cond, timeout=30):
    t_end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t_end, "timed out"
        time.sleep(0.01)


def test_busy_past_the_queue_bound(policy):
    gated = Gated(policy)
    server = PolicyServer(gated, port=0, max_batch=1, max_queue=1)
    spec, rng, out = policy.observation_spec(), np.random.default_rng(0), {}
    obs = [make_observation(spec, rng, INSTRUCTIONS[0]) for _ in range(3)]
    gated.gate.set()  # warm-up passes
    with running(server) as url:
        gated.gate.clear()
        gated.entered.clear()
        t1 = _request_in_thread(url, obs[0], out, 0)
        assert gated.entered.wait(30)  # request 0 is in the policy
        t2 = _request_in_thread(url, obs[1], out, 1)
        _wait(lambda: server._queue.qsize() == 1)  # request 1 waits in the queue
        with RemotePolicy(url) as rp, pytest.raises(RemotePolicyError, match=r"error: busy: 1 requests already queued"):
            rp.predict_action_chunk(obs[2])
        gated.gate.set()
        t1.join(30), t2.join(30)
    for i in (0, 1):
        assert np.array_equal(out[i], policy.predict_action_chunk(obs[i])), out[i]
    assert server.stats["busy"] == 1


def test_shutdown_drains_in_flight(policy):
    gated = Gated(policy)
    server = PolicyServer(gated, port=0, max_batch=1)
    obs = make_observation(policy.observation_spec(), np.random.default_rng(1), INSTRUCTIONS[1])
    gated.gate.set()
    out, ready, result = {}, threading.Event(), {}
    th = threading.Thread(target=lambda: result.update(
        rc=asyncio.run(server.serve(ready=lambda p: ready.set(), handle_signals=False))), daemon=True)
    th.start()
    assert ready.wait(120)
    url = f"ws://127.0.0.1:{server.port}"
    gated.gate.clear()
    gated.entered.clear()
    t = _request_in_thread(url, obs, out, 0)
    assert gated.entered.wait(30)
    server.request_shutdown()  # what SIGTERM does
    _wait(lambda: server.draining)
    with pytest.raises(OSError):  # no new connections while draining
        RemotePolicy(url, timeout=5)
    assert th.is_alive()  # still waiting for the request in flight
    gated.gate.set()
    t.join(30)
    th.join(30)
    assert np.array_equal(out[0], policy.predict_action_chunk(obs)) and result["rc"] == 0


def test_api_key_and_healthz(policy):
    import urllib.request

    from websockets.exceptions import InvalidStatus

    obs = make_observation(policy.observation_spec(), np.random.default_rng(2), INSTRUCTIONS[0])
    with running(PolicyServer(policy, port=0, max_batch=1, api_key="s3cret")) as url:
        with pytest.raises(InvalidStatus, match="401"):
            RemotePolicy(url)
        with pytest.raises(InvalidStatus, match="401"):
            RemotePolicy(url, api_key="wrong")
        with RemotePolicy(url, api_key="s3cret") as rp:
            assert rp.predict_action_chunk(obs).shape == (32, 4)
        port = url.rsplit(":", 1)[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200


# --- closed loop through the server --------------------------------------------------------------------
class Recording:
    def __init__(self, inner):
        self.inner, self.chunks = inner, []

    def predict_action_chunk(self, obs):
        a = np.asarray(self.inner.predict_action_chunk(obs))
        self.chunks.append(a)
        return a


def test_eval_through_server_equals_in_process(policy):
    pytest.importorskip("metaworld")
    from lwam.envs.evaluate import evaluate

    task = "button-press-topdown-v3"
    local = Recording(policy)
    kw = dict(executed_steps=8, max_steps=24, progress=False, cameras=("corner", "gripper"), size=64)
    with running(PolicyServer(policy, port=0, max_batch=1)) as url:
        with RemotePolicy(url) as rp:
            remote = Recording(rp)
            res_remote = evaluate(remote, [task], 1, **kw)
    res_local = evaluate(local, [task], 1, **kw)
    # 3 queries per episode of 24 steps, plus evaluate's one warm-up query
    assert res_local["episodes"] == res_remote["episodes"] and len(local.chunks) == len(remote.chunks) == 4
    assert all(np.array_equal(a, b) for a, b in zip(local.chunks, remote.chunks))


@contextmanager
def serve_process(*args, output: list[str] | None = None):
    """`lwam serve ARGS --port 0` as a process; yields its ws:// URL, then SIGTERM and a zero exit (its
    whole output appended to ``output``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lwam.cli", "serve", *map(str, args), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, lines = None, []
        t_end = time.monotonic() + 180
        while url is None and time.monotonic() < t_end:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on ws://127.0.0.1:" in line:
                url = line.split("listening on ", 1)[1].split()[0]
        assert url is not None, "".join(lines)
        yield url
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        if output is not None:
            output.extend([*lines, rest])
        assert proc.returncode == 0, "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_sigterm_exits_zero_and_eval_server(model, tmp_path):
    """`lwam serve` as a process on a free port: `lwam eval --server` through it, then SIGTERM -> exit 0."""
    pytest.importorskip("metaworld")
    from lwam.checkpoint import save_checkpoint
    from lwam.cli import main

    save_checkpoint(model, tmp_path / "ckpt", stats=STATS)
    model.text.subset(INSTRUCTIONS).save(tmp_path / "text.safetensors")  # the one text-cache format
    output: list[str] = []
    with serve_process("--checkpoint", tmp_path / "ckpt", "--no-compile", "--max-batch", "1", "--device", "cpu",
                       "--text-cache", tmp_path / "text.safetensors", output=output) as url:
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["eval", "--server", url, "--tasks", "button-press-topdown-v3", "--episodes", "1",
                       "--max-steps", "8", "--no-progress"])
        assert rc == 0
        res = json.loads(buf.getvalue())["policy"]
        assert res["num_queries"] == 1 and res["episodes"]["button-press-topdown-v3"][0]["steps"] == 8
    assert "stopped after 2 requests (0 errors" in "".join(output)  # evaluate's warm-up query + 1


def test_cli_serve_eager_with_text_cache_answers_a_client(model, tmp_path, capsys):
    """`lwam serve --eager --text-cache F`: the checkpoint knows one instruction, F the other; a client asking
    with F's instruction gets the eager model's actions, and a server-side refusal reaches `lwam eval --server`
    as its own message (exit 2), not as an internal error."""
    from lwam.checkpoint import save_checkpoint
    from lwam.cli import main
    from lwam.policy.eager import EagerPolicy

    save_checkpoint(model, tmp_path / "ckpt", stats=STATS)
    model.text.subset(INSTRUCTIONS[:1]).save(tmp_path / "ckpt" / "text.safetensors")
    model.text.subset(INSTRUCTIONS[1:]).save(tmp_path / "extra.safetensors")
    with serve_process("--checkpoint", tmp_path / "ckpt", "--eager", "--text-cache", tmp_path / "extra.safetensors",
                       "--device", "cpu", "--max-batch", "1") as url:
        with RemotePolicy(url) as rp:
            assert rp.metadata["implementation"]["policy"] == "lwam.policy.eager.EagerPolicy"
            assert sorted(rp.metadata["instructions"]) == sorted(INSTRUCTIONS)
            obs = make_observation(rp.observation_spec(), np.random.default_rng(3), INSTRUCTIONS[1])
            got = rp.predict_action_chunk(obs)
        want = EagerPolicy(model, STATS, "cpu").predict_action_chunk(obs)
        assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-6)
        pytest.importorskip("metaworld")
        rc = main(["eval", "--server", url, "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "8",
                   "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "unknown instruction" in err and "internal error" not in err, err


def test_eval_needs_one_of_checkpoint_and_server(model, capsys, tmp_path):
    from lwam.checkpoint import save_checkpoint
    from lwam.cli import main

    save_checkpoint(model, tmp_path / "ckpt", stats=STATS)
    assert main(["eval"]) == 2
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--server", "ws://127.0.0.1:1"]) == 2
    assert "exactly one of --checkpoint DIR and --server ws://HOST:PORT" in capsys.readouterr().err
