"""The Light-WAM model: backbone (DiT + LoRA + adapters + taps), VAE, text, action expert, flow, the whole
model. Names load lazily (``import lwam.model`` imports no submodule until one is used)."""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LightWAM": "lwam.model.lightwam",
    "WanDiT": "lwam.model.dit",
    "DiTBlock": "lwam.model.dit",
    "WanVAE": "lwam.model.vae",
    "FrameEncoder": "lwam.model.vae",
    "StateFusionActionExpert": "lwam.model.action_expert",
    "FlowMatching": "lwam.model.flow",
    "TextContextCache": "lwam.model.text",
    "build_text_cache": "lwam.model.text",
    "make_text_encoder": "lwam.model.text",
    "check_frozen": "lwam.model.fast",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lwam.model' has no attribute {name!r}")
