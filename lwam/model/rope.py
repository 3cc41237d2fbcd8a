"""3D rotary position embedding of the Wan DiT, in real fp32 arithmetic (the complex128 reference, which
``ImplConfig.rope == "complex"`` runs, is ``lwam.reference.rope``).

head_dim d is split into frame / height / width parts of d - 4*(d//6), 2*(d//6), 2*(d//6) channels
(128 -> 44 / 42 / 42). Channels are rotated in adjacent pairs (2i, 2i+1), the pair's angle being
``pos * theta ** (-2i / part_dim)`` for the axis the pair belongs to.
"""
from __future__ import annotations

import torch

from lwam.model.layers import upcast
from lwam.reference.rope import apply_rope_complex, rope_freqs_complex, rope_split

__all__ = ["rope_split", "rope_angles", "rope_cos_sin", "rope_freqs_complex", "apply_rope", "apply_rope_complex"]


def _axis_angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """pos [N] -> angles [N, dim/2] (fp32; the exponent is formed in fp64 for accuracy)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim))
    return (pos.to(torch.float64)[:, None] * inv[None, :]).float()


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Angles for a (F, Hp, Wp) token grid in (f, h, w) row-major order -> [F*Hp*Wp, head_dim/2]."""
    f, h, w = grid
    df, dh, dw = rope_split(head_dim)
    af = _axis_angles(torch.arange(f, device=device), df, theta)
    ah = _axis_angles(torch.arange(h, device=device), dh, theta)
    aw = _axis_angles(torch.arange(w, device=device), dw, theta)
    ang = torch.cat([
        af[:, None, None, :].expand(f, h, w, -1),
        ah[None, :, None, :].expand(f, h, w, -1),
        aw[None, None, :, :].expand(f, h, w, -1),
    ], dim=-1)
    return ang.reshape(f * h * w, head_dim // 2)


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [S, head_dim/2] fp32."""
    ang = rope_angles(grid, head_dim, theta, device)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None) -> torch.Tensor:
    """x [B, S, H, d] rotated pairwise; computed in fp32, returned in x.dtype.

    ``cos``/``sin``: [S, d/2] fp32 from :func:`rope_cos_sin`. If ``cos`` is instead a complex table from
    :func:`rope_freqs_complex` (``sin`` None), the rotation runs in complex float64 (:func:`apply_rope_complex`),
    the published implementation's arithmetic (``ImplConfig.rope == "complex"``)."""
    if cos.is_complex():
        return apply_rope_complex(x, cos)
    b, s, h, d = x.shape
    xf = upcast(x).reshape(b, s, h, d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    sn = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * sn, x0 * sn + x1 * c), dim=-1)
    return out.reshape(b, s, h, d).to(x.dtype)
