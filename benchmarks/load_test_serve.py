"""Bounded load test of ``lwam serve`` on loopback: C clients x N requests, once per --max-batch setting.

For every setting it starts ``lwam serve --port 0`` (127.0.0.1 only), waits until the port is open (warm-up and
compilation happen before), records the server's resident memory, lets ``--clients`` clients (each its own
connection, threads of one process) send ``--requests`` observations each, back to back, bounded by
``--deadline`` seconds, records the memory again, sends SIGTERM and checks the exit code is 0. It reports p50/p99
request latency (client side, round trip), throughput, the mean batch the server formed, errors, and the
throughput gain of batching (max-batch > 1 over max-batch 1).

The clients are the real ``openpi-client`` (tests/openpi_driver.py run with --openpi-python, default
$LWAM_OPENPI_PYTHON or .venv-openpi) when that environment exists, else lwam.policy.remote.RemotePolicy.

    python benchmarks/load_test_serve.py [--checkpoint DIR] [--clients 8] [--requests 100] [--max-batch 1 8]
                                         [--no-compile] [--json benchmarks/results/serve_load.json]

Without --checkpoint a randomly initialised tiny checkpoint is written to a temp dir (same compute as a
trained one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "openpi_driver.py"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def tiny_checkpoint(path: Path) -> Path:
    import torch

    from lwam.checkpoint import save_checkpoint
    from lwam.config import get_preset
    from lwam.model.lightwam import LightWAM

    torch.manual_seed(0)
    stats = {"observation.state": {"min": [-2.0] * 4, "max": [3.0] * 4, "mean": [0.0] * 4, "std": [1.0] * 4},
             "action": {"min": [-1.0] * 4, "max": [1.0] * 4, "mean": [0.0] * 4, "std": [1.0] * 4}}
    return save_checkpoint(LightWAM(get_preset("tiny")).eval(), path, stats=stats)


def start_server(checkpoint: str, max_batch: int, compile: bool, threads: int | None):
    cmd = [sys.executable, "-m", "lwam.cli", "serve", "--checkpoint", checkpoint, "--host", "127.0.0.1",
           "--port", "0", "--max-batch", str(max_batch), "--max-queue", "256", "--device", "cpu"]
    if not compile:
        cmd.append("--no-compile")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    t0 = time.perf_counter()
    for line in proc.stdout:
        log.append(line)
        if "listening on ws://127.0.0.1:" in line:
            url = line.split("listening on ", 1)[1].split()[0]
            return proc, url, time.perf_counter() - t0, log
    raise RuntimeError("server did not start:\n" + "".join(log))


def own_clients(url: str, clients: int, requests: int, prompt: str, deadline: float) -> dict:
    """The same load with lwam.policy.remote.RemotePolicy (when no openpi-client environment exists)."""
    from lwam.policy.remote import RemotePolicy

    results, lock, barrier = [], threading.Lock(), threading.Barrier(clients)
    t_end = time.monotonic() + deadline

    def run(c):
        rp = RemotePolicy(url)
        rng = np.random.default_rng(1000 + c)
        spec = rp.metadata["observation_spec"]
        obs = [{**{k: (rng.integers(0, 256, tuple(s["shape"]), dtype=np.uint8) if s["dtype"] == "uint8"
                       else rng.standard_normal(tuple(s["shape"])).astype(s["dtype"])) for k, s in spec.items()},
                "prompt": prompt} for _ in range(requests)]
        barrier.wait()
        for i, o in enumerate(obs):
            if time.monotonic() > t_end:
                break
            t0 = time.perf_counter()
            try:
                reply = rp.infer(o)
                rec = {"latency_ms": (time.perf_counter() - t0) * 1e3, "batch_size": reply["server_timing"]["batch_size"]}
            except Exception as e:
                rec = {"error": f"{type(e).__name__}: {e}"}
            with lock:
                results.append(rec)
        rp.close()

    t0 = time.perf_counter()
    ths = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    wall = time.perf_counter() - t0
    lat = np.array([r["latency_ms"] for r in results if "latency_ms" in r])
    return {"answered": int(lat.size), "errors": [r for r in results if "error" in r], "wall_s": wall,
            "throughput_rps": lat.size / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "mean_batch_size": float(np.mean([r["batch_size"] for r in results if "batch_size" in r]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", default="press the button from the top")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds per setting, at most")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads of the server (lwam serve --threads)")
    ap.add_argument("--openpi-python", default=os.environ.get("LWAM_OPENPI_PYTHON") or str(REPO / ".venv-openpi/bin/python"))
    ap.add_argument("--json", help="write the record here")
    args = ap.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 10_000):
        raise SystemExit("--clients must be in 1..64 and --requests in 1..10000 (a bounded test)")
    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or str(tiny_checkpoint(Path(tmp.name) / "ckpt"))
    use_openpi = Path(args.openpi_python).is_file()
    runs = []
    for mb in args.max_batch:
        proc, url, startup_s, log = start_server(ckpt, mb, not args.no_compile, args.threads)
        try:
            rss0 = rss_mib(proc.pid)
            if use_openpi:
                out = Path(tmp.name) / f"load{mb}.json"
                subprocess.run([args.openpi_python, str(DRIVER), "load", url, str(out), str(args.clients),
                                str(args.requests), args.prompt, str(args.deadline)], check=True,
                               timeout=args.deadline + 120)
                res = json.loads(out.read_text())
                res.pop("results")
            else:
                res = own_clients(url, args.clients, args.requests, args.prompt, args.deadline)
            rss1 = rss_mib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            tail, _ = proc.communicate(timeout=120)
        run = {"max_batch": mb, "startup_s": round(startup_s, 1), "server_rss_mib_before": round(rss0, 1),
               "server_rss_mib_after": round(rss1, 1), "exit_code": proc.returncode,
               "client": "openpi-client" if use_openpi else "lwam.policy.remote", **res}
        runs.append(run)
        print(f"max-batch {mb}: {res['answered']}/{args.clients * args.requests} answered, "
              f"{len(res['errors'])} errors, p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, "
              f"{res['throughput_rps']:.1f} req/s, mean batch {res['mean_batch_size']:.2f}, "
              f"server RSS {rss0:.0f} -> {rss1:.0f} MiB, startup {startup_s:.0f} s, exit {proc.returncode}",
              flush=True)
    base = next((r for r in runs if r["max_batch"] == 1), None)
    record = {"host": platform.node(), "cpu_count": os.cpu_count(), "checkpoint": ckpt, "threads": args.threads,
              "compile": not args.no_compile, "clients": args.clients, "requests_per_client": args.requests,
              "runs": runs}
    if base is not None:
        record["batching_gain"] = {str(r["max_batch"]): r["throughput_rps"] / base["throughput_rps"]
                                   for r in runs if r["max_batch"] != 1}
        print("throughput gain of batching:", {k: round(v, 2) for k, v in record["batching_gain"].items()})
    if args.json:
        from lwam._atomic import atomic_path
        with atomic_path(args.json) as p:
            Path(p).write_text(json.dumps(record, indent=2))
    ok = all(r["exit_code"] == 0 and not r["errors"] for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
