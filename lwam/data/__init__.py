"""Data: LeRobot-format datasets (``lwam.data.lerobot``), training windows, normalisation statistics and
the latent cache. Names load lazily."""
from __future__ import annotations

from lwam._lazy import lazy_getattr, lazy_names

_LAZY = lazy_names({
    "lwam.data.lerobot": ("LeRobotReader", "LeRobotWriter"),
    "lwam.data.windows": ("WindowDataset", "collate_windows"),
    "lwam.data.normalize": ("Normalizer", "dataset_stats"),
    "lwam.data.cache": ("CachedWindowDataset", "build_latent_cache"),
})

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
