"""The two elementwise definitions every part of the published Light-WAM shares.

* :func:`gelu` / :class:`GELU`: the model has one GELU, the tanh approximation, everywhere (DiT FFN and
  text embedding, residual adapters, SFAE compressors, trunk, step-position projection, output MLP).
  An exact GELU in any of them changes the actions predicted from published weights.
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


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos [...] (any dtype) -> float64 [..., dim] = [cos | sin] of pos * 10000^(-i/half), i < half = dim // 2."""
    if dim % 2:
        raise ValueError(f"dim: expected an even sinusoid width, got {dim}")
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    ang = pos.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)
