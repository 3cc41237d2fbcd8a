"""Closed-loop evaluation on Meta-World with chunked execution.

The policy is queried with the raw observation, returns a chunk of H de-normalised actions, the first
``executed_steps`` are executed open-loop, then it is queried again. An episode ends at the first success
or after ``max_steps`` steps. Before the first episode the policy is queried once on the first
observation, untimed in the latency figures: that call compiles (``lwam.Policy``) and warms caches; its
time is reported separately as ``warmup_ms``. Episode e of a task uses seed ``seed_start + e``; the default
``seed_start`` (:data:`lwam.envs.metaworld.EVAL_SEED_START`) lies far above the seeds demo collection
uses, so evaluation always runs on unseen object positions.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lwam.envs.metaworld import EVAL_SEED_START, MetaWorldTask


def _zero_images(obs: dict[str, Any]) -> dict[str, Any]:
    return {**obs, "images": {k: np.zeros_like(v) for k, v in obs["images"].items()}}


def _query(policy: Any, obs: dict[str, Any]) -> np.ndarray:
    """One chunk: robot-facing policies (``predict_action_chunk``: lwam.inference.Policy, lwam.eager.EagerPolicy,
    lwam.remote.RemotePolicy) get the LeRobot-style observation, plain callables the simulator's."""
    if hasattr(policy, "predict_action_chunk"):
        from lwam.observation import from_sim_observation
        return policy.predict_action_chunk(from_sim_observation(obs))
    return policy(obs)


def evaluate(policy: Callable[[dict[str, Any]], np.ndarray], tasks: Sequence[str], episodes_per_task: int,
             seed_start: int = EVAL_SEED_START, executed_steps: int = 8, max_steps: int = 200,
             blind: bool = False, video_dir: str | os.PathLike | None = None, progress: bool = True,
             cameras: Sequence[str] = ("corner", "gripper"), size: int = 64,
             videos_per_task: int = 1) -> dict[str, Any]:
    """Run ``policy`` closed-loop.

    Args:
        policy: an object with ``predict_action_chunk(observation)`` (LeRobot-style dict, lwam.observation),
            or a callable obs dict {"images": {camera: uint8 [S, S, 3]}, "proprio": float32 [4],
            "instruction": str} -> actions [H, 4] numpy (de-normalised). If it has a ``reset()`` method, it is called at the
            start of every episode.
        tasks: Meta-World v3 task names.
        episodes_per_task: episodes per task (seeds ``seed_start .. seed_start + episodes_per_task - 1``).
        executed_steps: actions executed from each chunk before the next query (capped at H).
        max_steps: step limit per episode.
        blind: zero every image before it reaches the policy (vision-ablation control).
        video_dir: if given, rollout mp4s (cameras side by side) of the first ``videos_per_task``
            episodes of every task are written there.
        cameras, size: rendered cameras and image side, as in the training data.
    Returns:
        {"success": {task: rate}, "success_rate": mean over tasks, "mean_steps": float,
         "mean_steps_per_task": {task: float}, "query_latency_ms": mean policy-call time (warm-up
         excluded), "warmup_ms": the warm-up call, "num_queries": int (timed calls), "episodes": {task: [{"seed", "success", "steps"}]}, "blind": bool,
         "videos": [paths], "seed_start": int, "wall_time_s": float}
    """
    from tqdm.auto import tqdm

    from lwam.data.lerobot import encode_video

    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task: expected >= 1, got {episodes_per_task}")
    if executed_steps < 1:
        raise ValueError(f"executed_steps: expected >= 1, got {executed_steps}")
    if max_steps < 1:
        raise ValueError(f"max_steps: expected >= 1, got {max_steps}")
    if not tasks:
        raise ValueError("tasks: expected at least one task name")
    t_start = time.perf_counter()
    latencies: list[float] = []
    warmup_ms: float | None = None
    results: dict[str, list[dict[str, Any]]] = {}
    videos: list[str] = []
    vdir = Path(video_dir) if video_dir is not None else None
    bar = tqdm(total=len(tasks) * episodes_per_task, desc="evaluate" + (" (blind)" if blind else ""),
               unit="ep", disable=not progress)
    try:
        for name in tasks:
            results[name] = []
            with MetaWorldTask(name, cameras=cameras, size=size, max_steps=max_steps) as task:
                for e in range(episodes_per_task):
                    seed = seed_start + e
                    record = vdir is not None and e < videos_per_task
                    frames: list[np.ndarray] = []
                    if hasattr(policy, "reset"):
                        policy.reset()
                    obs = task.reset(seed)
                    if warmup_ms is None:  # compile / first-call costs stay out of the latency
                        t0 = time.perf_counter()
                        _query(policy, _zero_images(obs) if blind else obs)
                        warmup_ms = (time.perf_counter() - t0) * 1000.0
                        if hasattr(policy, "reset"):
                            policy.reset()
                    success, steps = False, 0
                    while not success and steps < max_steps:
                        query = _zero_images(obs) if blind else obs
                        t0 = time.perf_counter()
                        chunk = np.asarray(_query(policy, query), dtype=np.float32)
                        latencies.append((time.perf_counter() - t0) * 1000.0)
                        if chunk.ndim != 2 or chunk.shape[1] != task.action_dim or chunk.shape[0] < 1:
                            raise ValueError(f"policy: expected actions [H, {task.action_dim}], got "
                                             f"{tuple(chunk.shape)}")
                        for a in chunk[:executed_steps]:
                            if record:
                                frames.append(np.concatenate([obs["images"][c] for c in cameras], axis=1))
                            obs, _, success, done = task.step(a)
                            steps += 1
                            if success or done:
                                break
                    if record:
                        frames.append(np.concatenate([obs["images"][c] for c in cameras], axis=1))
                        vdir.mkdir(parents=True, exist_ok=True)
                        tag = "blind" if blind else "vision"
                        path = vdir / f"{name}_{tag}_seed{seed}_{'success' if success else 'fail'}.mp4"
                        encode_video(np.stack(frames), path, fps=20)
                        videos.append(str(path))
                    results[name].append({"seed": seed, "success": bool(success), "steps": steps})
                    bar.update(1)
                    rate = np.mean([r["success"] for r in results[name]])
                    bar.set_postfix(task=name, success=f"{rate:.2f}")
    finally:
        bar.close()
    success = {k: float(np.mean([r["success"] for r in v])) for k, v in results.items()}
    steps_per_task = {k: float(np.mean([r["steps"] for r in v])) for k, v in results.items()}
    all_steps = [r["steps"] for v in results.values() for r in v]
    return {
        "success": success,
        "success_rate": float(np.mean(list(success.values()))),
        "mean_steps": float(np.mean(all_steps)),
        "mean_steps_per_task": steps_per_task,
        "query_latency_ms": float(np.mean(latencies)) if latencies else 0.0,
        "warmup_ms": warmup_ms,
        "num_queries": len(latencies),
        "episodes": results,
        "blind": bool(blind),
        "videos": videos,
        "seed_start": int(seed_start),
        "wall_time_s": time.perf_counter() - t_start,
    }
