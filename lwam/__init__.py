"""lwam: Light-WAM, a lightweight World Action Model, with fused Triton / C++ / CUDA kernels.

Importing this package never initialises CUDA; heavy submodules load lazily. The public names:
configs (``LightWAMConfig``, ``ImplConfig``, ``get_preset``), the model (``LightWAM``), training
(``Trainer``), inference (``Policy``), checkpoint I/O (``save_checkpoint``, ``load_checkpoint``) and text
contexts (``TextContextCache``, ``build_text_cache``). The fused ops are ``lwam.ops``, their modules
``lwam.modules``; docs/layout.md maps the package.
"""
from __future__ import annotations

__version__ = "0.1.0"

from lwam._lazy import lazy_getattr, lazy_names  # noqa: E402
from lwam.config import ImplConfig, LightWAMConfig, get_preset  # noqa: E402  (light, no torch work)

_LAZY = lazy_names({
    "lwam.model.lightwam": ("LightWAM",),
    "lwam.policy.compiled": ("Policy",),
    "lwam.policy.loading": ("load_policy",),
    "lwam.policy.exported": ("load_exported",),
    "lwam.train": ("Trainer",),
    "lwam.checkpoint": ("save_checkpoint", "load_checkpoint"),
    "lwam.model.text": ("TextContextCache", "build_text_cache"),
})

__all__ = ["ImplConfig", "LightWAMConfig", "get_preset", "__version__", *_LAZY]

__getattr__ = lazy_getattr(__name__, _LAZY)
