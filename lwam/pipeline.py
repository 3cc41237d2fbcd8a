"""The stages that turn a LeRobot dataset into a trained policy, shared by ``lwam train`` and ``lwam demo``.

dataset -> windows (normalised) -> [train the VAE when the preset has no released one] -> latent cache
-> Trainer -> checkpoint -> closed-loop policy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lwam.config import LightWAMConfig


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
