"""Closed-loop evaluation on Meta-World with chunked execution.

Robot-facing policies (``select_action`` / ``reset``: lwam.policy.compiled.Policy, lwam.policy.eager.EagerPolicy,
lwam.policy.remote.RemotePolicy) run the episode through that contract: ``reset()`` at the start of every episode,
then one ``select_action(observation)`` per control step on the LeRobot-style observation; the policy keeps
its own queue of ``executed_steps`` actions (set to this function's ``executed_steps`` for the evaluation, its
own value restored afterwards) and queries a new chunk when the queue is empty. Plain callables (sim obs ->
chunk [H, 4]) are queried here and the first ``executed_steps`` actions of each chunk are executed open-loop.
Both execute the same actions. An episode ends at the first success or after ``max_steps`` steps.

Latency: a *query* is a call that computed a chunk. For a plain callable that is every call; for a
``select_action`` policy it is a call during which the policy's ``predict_action_chunk`` ran (detected by
wrapping that method on the instance for the duration of the evaluation), and its latency is the whole
``select_action`` call (observation parsing, the chunk, the pop); the other calls only pop the queue and are
reported apart (``pop_latency_ms``). Before the first episode the policy is queried once on the first
observation (``predict_action_chunk``, or the callable), untimed in the latency figures: that call compiles
(``lwam.Policy``) and warms caches; its time is reported separately as ``warmup_ms``.

Seeds: episode e of a task uses seed ``seed_start + e``; the default ``seed_start``
(:data:`lwam.envs.metaworld.EVAL_SEED_START`) lies far above the seeds demo collection uses, so evaluation
always runs on unseen object positions.

Image controls (``image_control``): ``"blind"`` zeroes every image (a black frame, far outside the training
distribution: a policy that fails on it may only be thrown by the unusual input); ``"shuffled"`` feeds the
images of *another* evaluation episode of the same task: a second copy of the task is reset to the layout of
episode ``(e + 1) mod n`` (seed ``seed_start + 1`` when n = 1) and stepped with the same actions, so the arm
in its images moves as the real one does and the images stay in distribution, but the objects sit where
that other episode put them. The proprioception is always the real episode's.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from lwam.envs.metaworld import EVAL_SEED_START, MetaWorldTask

IMAGE_CONTROLS = ("blind", "shuffled")


def _zero_images(obs: dict[str, Any]) -> dict[str, Any]:
    return {**obs, "images": {k: np.zeros_like(v) for k, v in obs["images"].items()}}


def to_lerobot_observation(obs: dict[str, Any]) -> dict[str, Any]:
    """The simulator's observation dict -> the LeRobot-style one robot-facing policies take
    (lwam.policy.observation.from_sim_observation)."""
    from lwam.policy.observation import from_sim_observation
    return from_sim_observation(obs)


def _robot_facing(policy: Any) -> bool:
    return hasattr(policy, "predict_action_chunk")


def _query(policy: Any, obs: dict[str, Any]) -> np.ndarray:
    """One chunk: robot-facing policies get the LeRobot-style observation, plain callables the simulator's."""
    if _robot_facing(policy):
        return policy.predict_action_chunk(to_lerobot_observation(obs))
    return policy(obs)


def shuffled_image_seed(e: int, episodes_per_task: int, seed_start: int) -> int:
    """The seed whose layout the ``"shuffled"`` control shows in episode ``e``: the next episode's, cyclically
    (a permutation of the evaluation seeds without fixed points; ``seed_start + 1`` when there is one episode)."""
    if episodes_per_task == 1:
        return seed_start + 1
    return seed_start + (e + 1) % episodes_per_task


class _Stepper:
    """Runs one policy step by step and keeps the latency books (see the module doc). With a simulated
    latency (``latency_steps`` > 0 or ``asynchronous``) chunks come through a
    :class:`~lwam.policy.chunking.ChunkScheduler` instead, and :meth:`action` returns None for a control step
    the robot spends waiting."""

    def __init__(self, policy: Any, executed_steps: int, action_dim: int, latency_steps: int = 0,
                 asynchronous: bool = False, lead_steps: int | None = None, blend: str = "none",
                 chunk_size: int | None = None):
        self.policy, self.executed_steps, self.action_dim = policy, executed_steps, action_dim
        self.scheduler = None
        if latency_steps or asynchronous:
            from lwam.policy.chunking import ChunkScheduler, SimulatedLatency

            def timed(obs):
                t0 = time.perf_counter()
                chunk = np.asarray(_query(policy, obs), dtype=np.float32)
                self.latencies.append((time.perf_counter() - t0) * 1000.0)
                if chunk.ndim != 2 or chunk.shape[1] != action_dim or chunk.shape[0] < 1:
                    raise ValueError(f"policy: expected actions [H, {action_dim}], got {tuple(chunk.shape)}")
                return chunk

            h = chunk_size or getattr(policy, "chunk_size", None) or 32
            lead = (latency_steps if lead_steps is None else lead_steps) if asynchronous else 0
            self.scheduler = ChunkScheduler(SimulatedLatency(timed, latency_steps), min(executed_steps, h), h,
                                            lead_steps=min(lead, h - 1), past_horizon=asynchronous, blend=blend)
        self.select = self.scheduler is None and _robot_facing(policy) and hasattr(policy, "select_action")
        self.latencies: list[float] = []      # calls that computed a chunk (ms)
        self.pops: list[float] = []           # select_action calls that only popped the queue (ms)
        self._chunk: np.ndarray | None = None
        self._next = 0
        self._ran = False

    @contextmanager
    def attached(self) -> Iterator["_Stepper"]:
        """For a select_action policy: its executed_steps set (capped at its chunk size) and its
        predict_action_chunk wrapped to flag a query; both undone on exit."""
        if not self.select:
            yield self
            return
        pol = self.policy
        old_steps = pol.executed_steps
        chunk = getattr(pol, "chunk_size", None) or getattr(getattr(pol, "cfg", None), "chunk_size", None)
        pol.executed_steps = min(self.executed_steps, int(chunk)) if chunk else self.executed_steps
        inner = pol.predict_action_chunk
        had_own = "predict_action_chunk" in vars(pol)

        def flagged(observation):
            self._ran = True
            return inner(observation)

        pol.predict_action_chunk = flagged
        try:
            yield self
        finally:
            if had_own:
                pol.predict_action_chunk = inner
            else:
                del pol.predict_action_chunk
            pol.executed_steps = old_steps

    def reset(self) -> None:
        self._chunk, self._next = None, 0
        if self.scheduler is not None:
            self.scheduler.reset()
        if hasattr(self.policy, "reset"):
            self.policy.reset()

    def action(self, obs: dict[str, Any]) -> np.ndarray | None:
        """The action [action_dim] to execute on ``obs`` (the simulator's observation dict); None: wait."""
        if self.scheduler is not None:
            return self.scheduler.step(obs, block=False)
        if self.select:
            self._ran = False
            t0 = time.perf_counter()
            a = self.policy.select_action(to_lerobot_observation(obs))
            (self.latencies if self._ran else self.pops).append((time.perf_counter() - t0) * 1000.0)
            a = np.asarray(a, dtype=np.float32)
            if a.shape != (self.action_dim,):
                raise ValueError(f"policy: expected select_action to return an action [{self.action_dim}], got "
                                 f"{tuple(a.shape)}")
            return a
        if self._chunk is None or self._next >= len(self._chunk):
            t0 = time.perf_counter()
            chunk = np.asarray(_query(self.policy, obs), dtype=np.float32)
            self.latencies.append((time.perf_counter() - t0) * 1000.0)
            if chunk.ndim != 2 or chunk.shape[1] != self.action_dim or chunk.shape[0] < 1:
                raise ValueError(f"policy: expected actions [H, {self.action_dim}], got {tuple(chunk.shape)}")
            self._chunk, self._next = chunk[:self.executed_steps], 0
        a = self._chunk[self._next]
        self._next += 1
        return a


def evaluate(policy: Callable[[dict[str, Any]], np.ndarray], tasks: Sequence[str], episodes_per_task: int,
             seed_start: int = EVAL_SEED_START, executed_steps: int = 8, max_steps: int = 200,
             blind: bool = False, video_dir: str | os.PathLike | None = None, progress: bool = True,
             cameras: Sequence[str] = ("corner", "gripper"), size: int = 64,
             videos_per_task: int = 1, image_control: str | None = None, latency_steps: int = 0,
             asynchronous: bool = False, lead_steps: int | None = None, blend: str = "none") -> dict[str, Any]:
    """Run ``policy`` closed-loop.

    Args:
        policy: an object with ``predict_action_chunk(observation)`` (LeRobot-style dict, lwam.policy.observation), run
            through ``select_action`` / ``reset`` when it has them (module doc), or a callable obs dict
            {"images": {camera: uint8 [S, S, 3]}, "proprio": float32 [4], "instruction": str} -> actions [H, 4]
            numpy (de-normalised). If it has a ``reset()`` method, it is called at the start of every episode.
        tasks: Meta-World v3 task names.
        episodes_per_task: episodes per task (seeds ``seed_start .. seed_start + episodes_per_task - 1``).
        executed_steps: actions executed from each chunk before the next query (capped at H).
        max_steps: step limit per episode.
        blind: the same as ``image_control="blind"`` (kept for its callers).
        video_dir: if given, rollout mp4s (cameras side by side, the real episode's images) of the first
            ``videos_per_task`` episodes of every task are written there.
        cameras, size: rendered cameras and image side, as in the training data.
        image_control: None (the episode's own images), "blind" or "shuffled" (module doc).
        latency_steps: simulated inference latency in control steps: a chunk asked for at step t is there at
            step t + latency_steps (lwam.policy.chunking.SimulatedLatency). While the robot has no action it
            waits: the arm is held (zero motion, the last gripper command) and the step counts towards
            ``max_steps``, as time does on a robot.
        asynchronous: request the next chunk ``lead_steps`` (default ``latency_steps``) actions before the
            horizon ends and drop the stale prefix of a late chunk (lwam.policy.chunking); False: synchronous,
            the robot waits ``latency_steps`` for every chunk. ``blend``: "none" or "linear" (asynchronous).
    Returns:
        {"success": {task: rate}, "success_rate": mean over tasks, "mean_steps": float,
         "mean_steps_per_task": {task: float}, "query_latency_ms": mean time of the calls that computed a chunk
         (warm-up excluded), "pop_latency_ms": mean time of the select_action calls that only popped the queue
         (None for a plain callable), "warmup_ms": the warm-up call, "num_queries": int (calls that computed a
         chunk), "episodes": {task: [{"seed", "success", "steps"} (+ "image_seed" for "shuffled")]},
         "blind": bool, "image_control": str or None, "videos": [paths], "seed_start": int,
         "wall_time_s": float, "latency_steps", "asynchronous", "lead_steps", "waits" (control steps spent
         waiting, all episodes; each episode's own under "episodes"), "dropped_actions" (stale actions
         dropped at alignment)}
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
    if blind:
        if image_control not in (None, "blind"):
            raise ValueError(f"blind=True contradicts image_control={image_control!r}")
        image_control = "blind"
    if image_control is not None and image_control not in IMAGE_CONTROLS:
        raise ValueError(f"image_control: expected None or one of {IMAGE_CONTROLS}, got {image_control!r}")
    t_start = time.perf_counter()
    warmup_ms: float | None = None
    results: dict[str, list[dict[str, Any]]] = {}
    videos: list[str] = []
    vdir = Path(video_dir) if video_dir is not None else None
    bar = tqdm(total=len(tasks) * episodes_per_task, desc="evaluate" + (f" ({image_control})" if image_control else ""),
               unit="ep", disable=not progress)
    if isinstance(latency_steps, bool) or not isinstance(latency_steps, int) or latency_steps < 0:
        raise ValueError(f"latency_steps: expected an int >= 0, got {latency_steps!r}")
    stepper = _Stepper(policy, executed_steps, MetaWorldTask.action_dim, latency_steps=latency_steps,
                       asynchronous=asynchronous, lead_steps=lead_steps, blend=blend)
    waits_total, dropped_total = 0, 0
    try:
        with stepper.attached():
            for name in tasks:
                results[name] = []
                donor = (MetaWorldTask(name, cameras=cameras, size=size, max_steps=max_steps)
                         if image_control == "shuffled" else None)
                try:
                    with MetaWorldTask(name, cameras=cameras, size=size, max_steps=max_steps) as task:
                        for e in range(episodes_per_task):
                            seed = seed_start + e
                            record = vdir is not None and e < videos_per_task
                            frames: list[np.ndarray] = []
                            stepper.reset()
                            obs = task.reset(seed)
                            image_seed = None
                            if donor is not None:
                                image_seed = shuffled_image_seed(e, episodes_per_task, seed_start)
                                donor_obs = donor.reset(image_seed)

                            def shown(o):
                                if image_control == "blind":
                                    return _zero_images(o)
                                if donor is not None:
                                    return {**o, "images": donor_obs["images"]}
                                return o

                            if warmup_ms is None:  # compile / first-call costs stay out of the latency
                                t0 = time.perf_counter()
                                _query(policy, shown(obs))
                                warmup_ms = (time.perf_counter() - t0) * 1000.0
                                stepper.reset()
                            success, steps, waits = False, 0, 0
                            hold = np.zeros(MetaWorldTask.action_dim, np.float32)  # no motion, gripper command 0
                            while not success and steps < max_steps:
                                a = stepper.action(shown(obs))
                                if a is None:  # no action yet: hold the arm, keep the last gripper command
                                    a, waits = hold, waits + 1
                                else:
                                    hold = np.concatenate([np.zeros(3, np.float32), np.asarray(a[3:], np.float32)])
                                if record:
                                    frames.append(np.concatenate([obs["images"][c] for c in cameras], axis=1))
                                obs, _, success, done = task.step(a)
                                if donor is not None:
                                    donor_obs = donor.step(a)[0]
                                steps += 1
                                if done:
                                    break
                            if record:
                                frames.append(np.concatenate([obs["images"][c] for c in cameras], axis=1))
                                vdir.mkdir(parents=True, exist_ok=True)
                                tag = image_control or "vision"
                                path = vdir / f"{name}_{tag}_seed{seed}_{'success' if success else 'fail'}.mp4"
                                encode_video(np.stack(frames), path, fps=20)
                                videos.append(str(path))
                            ep = {"seed": seed, "success": bool(success), "steps": steps}
                            if stepper.scheduler is not None:
                                ep["waits"] = waits
                                ep["dropped_actions"] = stepper.scheduler.stats.dropped_actions
                                waits_total += waits
                                dropped_total += ep["dropped_actions"]
                            if image_seed is not None:
                                ep["image_seed"] = image_seed
                            results[name].append(ep)
                            bar.update(1)
                            rate = np.mean([r["success"] for r in results[name]])
                            bar.set_postfix(task=name, success=f"{rate:.2f}")
                finally:
                    if donor is not None:
                        donor.close()
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
        "query_latency_ms": float(np.mean(stepper.latencies)) if stepper.latencies else 0.0,
        "pop_latency_ms": (float(np.mean(stepper.pops)) if stepper.pops else 0.0) if stepper.select else None,
        "warmup_ms": warmup_ms,
        "num_queries": len(stepper.latencies),
        "episodes": results,
        "blind": image_control == "blind",
        "image_control": image_control,
        "videos": videos,
        "seed_start": int(seed_start),
        "wall_time_s": time.perf_counter() - t_start,
        "latency_steps": int(latency_steps),
        "asynchronous": bool(asynchronous),
        "lead_steps": stepper.scheduler.lead_steps if stepper.scheduler is not None else None,
        "waits": waits_total,
        "dropped_actions": dropped_total,
    }
