"""Reference 3D RoPE of the Wan DiT in complex float64, as the published implementation computes it
(``ImplConfig.rope == "complex"`` runs exactly this; the fp32 real form is ``lwam.model.rope``).

head_dim d is split into frame / height / width parts of d - 4*(d//6), 2*(d//6), 2*(d//6) channels
(128 -> 44 / 42 / 42). Channels are rotated in adjacent pairs (2i, 2i+1), the pair's angle being
``pos * theta ** (-2i / part_dim)`` for the axis the pair belongs to.
"""
from __future__ import annotations

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of the frame, height and width parts of a head."""
    s = head_dim // 6
    return head_dim - 4 * s, 2 * s, 2 * s


def rope_freqs_complex(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Unit complex128 rotations for a (F, Hp, Wp) token grid in (f, h, w) row-major order ->
    [F*Hp*Wp, head_dim/2] (``torch.polar`` of fp64 angles)."""
    f, h, w = grid
    parts = rope_split(head_dim)

    def axis(n: int, dim: int) -> torch.Tensor:
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        ang = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)
        return torch.polar(torch.ones_like(ang), ang)

    ff, fh, fw = axis(f, parts[0]), axis(h, parts[1]), axis(w, parts[2])
    return torch.cat([
        ff[:, None, None].expand(f, h, w, -1),
        fh[None, :, None].expand(f, h, w, -1),
        fw[None, None, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, head_dim // 2)


def apply_rope_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, d] rotated by ``freqs`` [S, d/2] complex128 in complex float64; returned in x.dtype."""
    b, s, h, d = x.shape
    xc = torch.view_as_complex(x.double().reshape(b, s, h, d // 2, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).reshape(b, s, h, d).to(x.dtype)


def rope_apply_complex(x: torch.Tensor, grid: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """x [B, S, H, d] with S = F*Hp*Wp -> rotated x, via complex128 multiplication."""
    return apply_rope_complex(x, rope_freqs_complex(grid, x.shape[-1], theta, device=x.device))
