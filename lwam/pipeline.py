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

from lwam._logging import logger
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


class ModelPolicy:
    """Raw observation -> de-normalised action chunk [H, A] with an eager LightWAM.

    obs: {"images": {camera: uint8 [h, w, 3]}, "proprio": [P], "instruction": str}."""

    def __init__(self, model, stats: dict, device: str | torch.device = "cpu"):
        from lwam.data.normalize import Normalizer

        self.model = model.eval().to(device)
        self.norm = Normalizer.from_dict(stats)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, obs: dict[str, Any]) -> np.ndarray:
        from lwam.data.cameras import compose_observation

        img = compose_observation(obs["images"], self.model.cfg.data)[None].to(self.device)
        prop = self.norm.apply("observation.state", np.asarray(obs["proprio"], dtype=np.float32))
        prop = torch.from_numpy(np.asarray(prop, dtype=np.float32))[None].to(self.device)
        a = self.model.predict_actions(img, prop, instruction=obs["instruction"])[0].float().cpu().numpy()
        return self.norm.invert("action", a)


class ObservationPolicy:
    """Adapts :class:`lwam.inference.Policy` to simulator observations (composes the cameras first)."""

    def __init__(self, policy, data_cfg):
        self.policy, self.data_cfg = policy, data_cfg

    def __call__(self, obs: dict[str, Any]) -> np.ndarray:
        from lwam.data.cameras import compose_observation

        img = compose_observation(obs["images"], self.data_cfg)
        return self.policy.predict(img, obs["instruction"], np.asarray(obs["proprio"], dtype=np.float32))


def make_policy(model, stats: dict, device: str | torch.device = "cpu", compiled: bool = True):
    """An observation -> actions [H, A] callable: the optimised :class:`lwam.inference.Policy` when it can
    be built, else the eager adapter (with one warning that says why)."""
    if compiled:
        try:
            from lwam.inference import Policy
            return ObservationPolicy(Policy.from_model(model, stats=stats, device=device), model.cfg.data)
        except Exception as e:  # the eager path is always correct; say why the fast one was not used
            logger.warning(f"optimised Policy unavailable ({type(e).__name__}: {e}); using the eager model")
    return ModelPolicy(model, stats, device)
