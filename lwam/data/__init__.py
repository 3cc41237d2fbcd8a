"""Data: LeRobot-format datasets (``lwam.data.lerobot``), training windows, normalisation statistics and
the latent cache. Names load lazily."""
from __future__ import annotations

from lwam._lazy import lazy_getattr

_LAZY = {
    "LeRobotReader": "lwam.data.lerobot",
    "LeRobotWriter": "lwam.data.lerobot",
    "WindowDataset": "lwam.data.windows",
    "collate_windows": "lwam.data.windows",
    "Normalizer": "lwam.data.normalize",
    "dataset_stats": "lwam.data.normalize",
    "CachedWindowDataset": "lwam.data.cache",
    "build_latent_cache": "lwam.data.cache",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
