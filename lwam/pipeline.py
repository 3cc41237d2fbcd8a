"""THE stage sequence from a LeRobot dataset to an evaluated policy, called by ``lwam train``, ``lwam demo``
and ``lwam experiment`` (each runs the stages it needs, in this order, timed by one :class:`StageTimer`):

dataset -> :func:`make_windows` (normalised) -> :func:`train_vae_stage` (presets without a released VAE)
-> :func:`cache_latents_stage` -> :func:`train_stage` (Trainer) -> checkpoint -> :func:`sim_policy` (the
warmed-up Policy) -> :func:`evaluate_stage` (closed loop, with the image controls).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lwam._logging import logger
from lwam.config import LightWAMConfig


class StageTimer:
    """THE stage timing: ``with timer("train"): ...`` logs the stage's start and end and records its seconds
    in :attr:`times` (pass a dict to continue one, e.g. a resumed experiment's). ``keep_first=True``: a stage
    that ran before keeps its first time (a rerun that only reuses a cache is not the stage's cost)."""

    def __init__(self, label: str = "pipeline", times: dict[str, float] | None = None, log: bool = True):
        self.label, self.log = label, log
        self.times: dict[str, float] = {} if times is None else times

    @contextmanager
    def __call__(self, name: str, keep_first: bool = False) -> Iterator[None]:
        if self.log:
            logger.info(f"{self.label}: {name} ...")
        t0 = time.perf_counter()
        yield
        seconds = round(time.perf_counter() - t0, 2)
        if not (keep_first and name in self.times):
            self.times[name] = seconds
        if self.log:
            logger.info(f"{self.label}: {name} done in {seconds:.1f}s")


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (CPU stages; None leaves it)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class VideoClips(Dataset):
    """The ``video`` [3, F, H, W] of windows, for VAE training (a strided subset of the windows)."""

    def __init__(self, windows, max_clips: int | None = None, seed: int = 0):
        n = len(windows)
        idx = np.arange(n)
        if max_clips is not None and n > max_clips:
            idx = np.sort(np.random.default_rng(seed).choice(n, max_clips, replace=False))
        self.windows, self.idx = windows, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.windows.get(int(self.idx[i]), video=True)["video"]


class LatentWindows(Dataset):
    """Cached-latent windows as the Trainer wants them: float32 latents, instruction strings."""

    def __init__(self, cached):
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, i: int) -> dict[str, Any]:
        d = self.cached[i]
        return {"latents": torch.as_tensor(d["latents"]).float(), "instruction": d["instruction"],
                "proprio": d["proprio"], "actions": d["actions"], "actions_is_pad": d["actions_is_pad"],
                "frames_is_pad": d["frames_is_pad"]}


def make_windows(dataset_path: str | os.PathLike, cfg: LightWAMConfig, window_stride: int = 1,
                 progress: bool = True):
    """-> (WindowDataset with its frame cache prepared, normaliser stats dict)."""
    from lwam.data.windows import WindowDataset

    windows = WindowDataset(dataset_path, cfg.data, window_stride=window_stride)
    windows.prepare(progress=progress)
    return windows, windows.normalizer.to_dict()


def train_vae_stage(model, windows, out_dir: Path, steps: int, batch_size: int = 8, max_clips: int = 512,
                    progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Train the model's VAE on the windows' clips (presets without released VAE weights)."""
    from lwam.vae_train import train_vae

    clips = VideoClips(windows, max_clips=max_clips, seed=seed)
    model.vae.requires_grad_(True)
    metrics = train_vae(model.vae, clips, steps=steps, batch_size=batch_size, out_dir=out_dir, progress=progress,
                        seed=seed, clip_frames=5)
    model.vae.requires_grad_(model.cfg.train_vae)
    model.vae.eval()
    # The estimated latent statistics now live in vae.cfg; keep the model config in step.
    model.cfg.vae = model.vae.cfg
    return metrics


def cache_latents_stage(model, windows, path: Path, batch_size: int = 16, progress: bool = True):
    """Encode every window once (resumable) -> LatentWindows over the memory-mapped cache."""
    from lwam.data.cache import CachedWindowDataset, build_latent_cache, state_digest

    model.vae.eval()
    depends = {"vae": state_digest(model.vae)}  # other VAE weights or statistics give other latents
    build_latent_cache(windows, model.encode_video, path, batch_size=batch_size, progress=progress,
                       dtype="float32", depends_on=depends)
    return LatentWindows(CachedWindowDataset(windows, path, depends_on=depends))


def train_stage(model, train_set, out_dir: Path, stats: dict | None, steps: int | None = None,
                device: str | torch.device | None = None, progress: bool = True, impl=None,
                max_nonfinite_skips: int = 0):
    """Train ``model`` on the cached windows into ``out_dir`` (resumable; ``device`` and ``impl`` as the
    Trainer's defaults when None) -> (the Trainer, its result)."""
    from lwam.train import Trainer

    trainer = Trainer(model, train_set, out_dir, stats=stats, device=device, progress=progress, impl=impl,
                      max_nonfinite_skips=max_nonfinite_skips)
    return trainer, trainer.train(steps)


def sim_policy(model, stats: dict, task: str, device: str | torch.device = "cpu"):
    """The model's Policy (:func:`lwam.policy.loading.load_policy`), warmed up (compiled) on a real observation of
    Meta-World ``task``, so that an evaluation's query latency is the steady-state one."""
    from lwam.envs.metaworld import MetaWorldTask
    from lwam.policy.loading import load_policy
    from lwam.policy.observation import from_sim_observation

    policy = load_policy(model, stats, device=device)
    cfg = model.cfg.data
    with MetaWorldTask(task, cameras=cfg.cameras, size=cfg.image_height) as env:
        policy.predict_action_chunk(from_sim_observation(env.reset(seed=0)))
    return policy


def evaluate_stage(policy, tasks: Sequence[str], episodes: int, timer: StageTimer, *, executed_steps: int,
                   max_steps: int, cameras: Sequence[str], size: int, controls: Sequence[str] = (),
                   control_episodes: int | None = None, video_dir: Path | None = None,
                   progress: bool = True) -> dict[str, dict[str, Any]]:
    """Closed-loop evaluation (stage ``eval``), then each image control (stage ``eval_<control>``, on
    ``control_episodes`` per task, default ``episodes``) -> {"policy": result, control: result, ...}
    (lwam.envs.evaluate results)."""
    from lwam.envs.evaluate import evaluate

    common = dict(executed_steps=executed_steps, max_steps=max_steps, progress=progress, cameras=cameras, size=size)
    results: dict[str, dict[str, Any]] = {}
    with timer("eval"):
        results["policy"] = evaluate(policy, list(tasks), episodes, video_dir=video_dir, **common)
    for control in controls:
        with timer(f"eval_{control}"):
            results[control] = evaluate(policy, list(tasks), control_episodes or episodes, image_control=control,
                                        **common)
    return results
