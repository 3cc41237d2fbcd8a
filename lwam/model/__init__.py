"""The Light-WAM model: backbone (DiT + LoRA + adapters + taps), VAE, text, action expert, flow, the whole
model. Names load lazily (``import lwam.model`` imports no submodule until one is used)."""
from __future__ import annotations

from lwam._lazy import lazy_getattr

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

__getattr__ = lazy_getattr(__name__, _LAZY)
