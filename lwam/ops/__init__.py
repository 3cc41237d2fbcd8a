"""The fused ops: ``torch.library`` custom ops with fake impls and autograd, a reference fallback where no
kernel can run (docs/design.md).

``query_pool(xs, A, w, eps)``: multi-layer learned-query pooling core (Triton), ``[L, B, S, D] -> [L, B, H, D]``;
``latent_downsample(x, factor)``: spatial mean over f x f blocks (lwam._C), ``[B, C, T, H, W] -> [B, C, T, H/f, W/f]``.
"""
from __future__ import annotations

# The functions are bound after their modules are imported, so ``lwam.ops.query_pool`` is the op (the
# module stays importable as ``lwam.ops.query_pool`` through sys.modules for ``from ... import``).
from lwam.ops.latent_downsample import latent_downsample
from lwam.ops.query_pool import query_pool, query_pool_kernel_available

__all__ = ["query_pool", "query_pool_kernel_available", "latent_downsample"]
