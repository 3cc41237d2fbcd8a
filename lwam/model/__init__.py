"""The Light-WAM model: backbone (DiT + LoRA + adapters + taps), VAE, text, action expert, flow, the whole
model. Names load lazily (``import lwam.model`` imports no submodule until one is used)."""
from __future__ import annotations

from lwam._lazy import lazy_getattr, lazy_names

_LAZY = lazy_names({
    "lwam.model.lightwam": ("LightWAM",),
    "lwam.model.dit": ("WanDiT", "DiTBlock"),
    "lwam.model.vae": ("WanVAE", "FrameEncoder"),
    "lwam.model.action_expert": ("StateFusionActionExpert",),
    "lwam.model.flow": ("FlowMatching",),
    "lwam.model.text": ("TextContextCache", "build_text_cache", "make_text_encoder"),
    "lwam.model.fast": ("check_frozen",),
})

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
