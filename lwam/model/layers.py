"""The two elementwise definitions every part of the published Light-WAM shares.

* :func:`gelu` / :class:`GELU`: the model has one GELU, the tanh approximation, everywhere (DiT FFN and
  text embedding, residual adapters, SFAE compressors, trunk, step-position projection, output MLP).
  An exact GELU in any of them changes the actions predicted from published weights.
* :func:`upcast`: the fp32 compute islands (norms, modulation, gated residuals, RoPE, losses) cast to
  fp32, except that float64 stays float64, so that an fp64 model is fp64 throughout (as the published
  code behaves when its ``.float()`` casts leave fp64 alone).
* :func:`sinusoid`: the ``[cos | sin]`` code of ``pos * 10000^(-i/half)``, ``i < half``, in float64. It
  serves the DiT timestep embedding and the SFAE step-position code; callers cast the result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The published model's GELU: tanh approximation."""
    return F.gelu(x, approximate="tanh")


class GELU(nn.GELU):
    """``nn.GELU(approximate="tanh")``; a module so that ``nn.Sequential`` indices (state-dict keys) keep
    the published layout."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of an fp32 island for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32: bf16/fp16/fp32 -> fp32, fp64 unchanged."""
    return x.to(upcast_dtype(x.dtype))


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos [...] (any dtype) -> float64 [..., dim] = [cos | sin] of pos * 10000^(-i/half), i < half = dim // 2."""
    if dim % 2:
        raise ValueError(f"dim: expected an even sinusoid width, got {dim}")
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    ang = pos.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)
