"""The exported policy (lwam export) against the compiled Policy and the eager model, in one run on this
machine: drift on recorded observations, cold start (process start -> first action), per-query time.

* drift: ``lwam.export.check_drift`` of the exported file vs the eager model on --observations frames
  recorded in --dataset (max over observations of max |a - a_eager| / max |a_eager|);
* cold start: a fresh Python process per policy kind, timed by this script from spawn to the first action
  printed (imports, loading, compilation included); the compiled Policy and the export each get an empty
  TorchInductor cache directory, so nothing compiled earlier is reused;
* per query: median and p90 wall time of --queries predict_action_chunk calls on recorded observations,
  after one warm-up call, the kinds interleaved query by query in this process.

    python benchmarks/export_bench.py --checkpoint runs/demo/checkpoint --dataset runs/demo/dataset \\
        --out benchmarks/results/export_cpu.json [--exported runs/demo/policy.pt2] [--observations 50]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import sys, time, pickle
t0 = time.perf_counter()
kind, path, obs_file, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import torch
torch.set_num_threads(threads)
obs = pickle.load(open(obs_file, "rb"))
if kind == "exported":
    from lwam import load_exported
    policy = load_exported(path)
elif kind == "compiled":
    from lwam import Policy
    policy = Policy.from_checkpoint(path, device="cpu")
else:
    from lwam.checkpoint import load_checkpoint
    from lwam.policy.eager import EagerPolicy
    model, stats = load_checkpoint(path)
    policy = EagerPolicy(model, stats, "cpu")
t_loaded = time.perf_counter()
a = policy.predict_action_chunk(obs)
print("FIRST_ACTION", float(a[0][0]), t_loaded - t0, time.perf_counter() - t0, flush=True)
"""


def cold_start(kind: str, path: str, obs: dict, threads: int) -> dict:
    import pickle

    with tempfile.TemporaryDirectory() as tmp:
        obs_file = Path(tmp) / "obs.pkl"
        obs_file.write_bytes(pickle.dumps(obs))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, kind, path, str(obs_file), str(threads)],
                              capture_output=True, text=True, env=env, timeout=1800)
        wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FIRST_ACTION")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"cold start of {kind} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    _, _, loaded, first = line.split()
    return {"first_action_s": round(wall, 2), "in_process_load_s": round(float(loaded), 2),
            "in_process_first_action_s": round(float(first), 2)}


def per_query(policies: dict, observations, n: int) -> dict:
    """Median / p90 ms of ``n`` predict_action_chunk calls per policy, interleaved (query i of every policy
    on observation i, in rotating order) so that a change in machine load falls on all of them alike."""
    for p in policies.values():
        p.predict_action_chunk(observations[0])
    names = list(policies)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(n):
        obs = observations[i % len(observations)]
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            policies[k].predict_action_chunk(obs)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": round(float(np.median(v)), 3), "p90_ms": round(float(np.percentile(v, 90)), 3),
                "queries": n} for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--exported", help="an existing export of --checkpoint (default: export into a temp dir)")
    ap.add_argument("--observations", type=int, default=50)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from lwam._atomic import atomic_write_json
    from lwam._env import environment
    from lwam.checkpoint import load_checkpoint
    from lwam.export import check_drift, export_policy, recorded_observations
    from lwam.policy.compiled import Policy
    from lwam.policy.eager import EagerPolicy
    from lwam.policy.exported import load_exported

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    record: dict = {"benchmark": "export", "checkpoint": args.checkpoint, "dataset": args.dataset,
                    "threads": args.threads}
    exported_path = args.exported
    if exported_path is None:
        exported_path = str(Path(tmp.name) / "policy.pt2")
        record["export"] = export_policy(args.checkpoint, exported_path)
    model, stats = load_checkpoint(args.checkpoint)
    observations = recorded_observations(args.dataset, args.observations, model.cfg)
    eager = EagerPolicy(model, stats, "cpu")
    exported = load_exported(exported_path)
    record["drift"] = check_drift(exported, eager, observations, raise_on_drift=False)
    print("drift", json.dumps(record["drift"]), flush=True)
    compiled = Policy.from_checkpoint(args.checkpoint, device="cpu")
    record["per_query"] = per_query({"exported": exported, "compiled": compiled, "eager": eager}, observations,
                                    args.queries)
    print("per query", json.dumps(record["per_query"]), flush=True)
    record["cold_start"] = {kind: cold_start(kind, exported_path if kind == "exported" else args.checkpoint,
                                             observations[0], args.threads)
                            for kind in ("exported", "compiled", "eager")}
    print("cold start", json.dumps(record["cold_start"]), flush=True)
    pq, cs = record["per_query"], record["cold_start"]
    record["ratios"] = {
        "cold_start_compiled_over_exported": round(cs["compiled"]["first_action_s"] / cs["exported"]["first_action_s"], 2),
        "per_query_exported_over_compiled": round(pq["exported"]["median_ms"] / pq["compiled"]["median_ms"], 2),
        "per_query_eager_over_exported": round(pq["eager"]["median_ms"] / pq["exported"]["median_ms"], 2)}
    record["environment"] = environment("cpu")
    atomic_write_json(args.out, record)
    print(json.dumps(record["ratios"], indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
