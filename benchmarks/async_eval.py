"""Synchronous vs asynchronous chunk execution under a simulated inference latency, closed-loop in Meta-World.

For each latency L (control steps) the same checkpoint, tasks and unseen episode seeds run twice: synchronous
(the robot holds still L steps for every chunk) and asynchronous (the next chunk is asked for L actions
before the horizon ends, its stale prefix dropped on arrival; lwam.policy.chunking). L = 0 is the reference
run. Writes report.json (every episode's success, steps, waits) and report.md (the table) into --out.

    python benchmarks/async_eval.py --checkpoint runs/demo/checkpoint --out docs/experiments/async_latency \\
        [--episodes 20] [--latencies 1 2 4] [--max-steps 200]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", nargs="+", default=["button-press-topdown-v3", "drawer-open-v3"])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--latencies", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from lwam._atomic import atomic_write_json, atomic_write_text
    from lwam._env import environment
    from lwam.checkpoint import load_checkpoint
    from lwam.envs.evaluate import evaluate
    from lwam.policy.loading import load_policy

    torch.set_num_threads(args.threads)
    model, stats = load_checkpoint(args.checkpoint)
    policy = load_policy(model, stats, device="cpu")
    cfg = model.cfg.data
    runs = []
    t_start = time.perf_counter()
    plan = [(0, False)] + [(lat, mode) for lat in args.latencies for mode in (False, True)]
    for lat, asynchronous in plan:
        res = evaluate(policy, args.tasks, args.episodes, executed_steps=cfg.executed_steps,
                       max_steps=args.max_steps, progress=False, cameras=cfg.cameras, size=cfg.image_height,
                       latency_steps=lat, asynchronous=asynchronous)
        episodes = [e for v in res["episodes"].values() for e in v]
        run = {"latency_steps": lat, "mode": "async" if asynchronous else "sync",
               "success": res["success"], "success_rate": res["success_rate"],
               "mean_steps": res["mean_steps"], "waits": res["waits"],
               "mean_waits_per_episode": float(np.mean([e.get("waits", 0) for e in episodes])),
               "dropped_actions": res["dropped_actions"], "queries": res["num_queries"],
               "episodes": res["episodes"], "wall_time_s": round(res["wall_time_s"], 1)}
        runs.append(run)
        print(f"L={lat} {run['mode']}: success {run['success_rate']:.3f}, mean steps {run['mean_steps']:.1f}, "
              f"waits {run['waits']}, queries {run['queries']}", flush=True)
    out = Path(args.out)
    report = {"checkpoint": args.checkpoint, "tasks": args.tasks, "episodes_per_task": args.episodes,
              "max_steps": args.max_steps, "executed_steps": cfg.executed_steps, "runs": runs,
              "wall_time_s": round(time.perf_counter() - t_start, 1), "environment": environment("cpu")}
    atomic_write_json(out / "report.json", report)
    lines = ["# Synchronous vs asynchronous chunk execution under simulated latency", "",
             f"Checkpoint `{args.checkpoint}`, tasks {', '.join(args.tasks)}, {args.episodes} unseen episodes per "
             f"task (the same seeds in every row), {cfg.executed_steps} of 32 actions per chunk, step limit "
             f"{args.max_steps}. A wait is a control step with no action (the arm held still); it counts "
             f"towards the step limit.", "",
             "| latency (steps) | mode | success | mean steps / episode | waits / episode | queries |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['latency_steps']} | {r['mode']} | {100 * r['success_rate']:.0f} % | {r['mean_steps']:.1f} "
                     f"| {r['mean_waits_per_episode']:.1f} | {r['queries']} |")
    env = report["environment"]
    lines += ["", f"Measured on {env['device_name']}, torch {env['torch']}, commit {env['commit']}, "
              f"{report['wall_time_s']:.0f} s in all."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
