"""lwam: Light-WAM, a lightweight World Action Model, with fused Triton / C++ / CUDA kernels.

Importing this package never initialises CUDA; heavy submodules load lazily.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from lwam.config import LightWAMConfig, get_preset  # noqa: E402  (light, no torch work)

_LAZY = {
    "LightWAM": "lwam.model.lightwam",
    "Policy": "lwam.inference",
    "Trainer": "lwam.train",
}

__all__ = ["LightWAMConfig", "get_preset", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lwam' has no attribute {name!r}")
