"""Data: LeRobot-format datasets (``lwam.data.lerobot``), training windows, normalisation statistics and
the latent cache. Names load lazily."""
from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lwam.data' has no attribute {name!r}")
