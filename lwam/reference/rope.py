"""Reference 3D RoPE in complex float64, as the published implementation computes it.
Used by tests to check the real-fp32 path in ``lwam.model.rope``."""
from __future__ import annotations

import torch

from lwam.model.rope import rope_split


def rope_apply_complex(x: torch.Tensor, grid: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """x [B, S, H, d] with S = F*Hp*Wp -> rotated x, via complex128 multiplication."""
    b, s, h, d = x.shape
    f, hh, ww = grid
    parts = rope_split(d)

    def freqs(n: int, dim: int) -> torch.Tensor:
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return torch.polar(torch.ones(n, dim // 2, dtype=torch.float64), torch.outer(torch.arange(n, dtype=torch.float64), inv))

    ff, fh, fw = freqs(f, parts[0]), freqs(hh, parts[1]), freqs(ww, parts[2])
    fr = torch.cat([
        ff[:, None, None].expand(f, hh, ww, -1),
        fh[None, :, None].expand(f, hh, ww, -1),
        fw[None, None, :].expand(f, hh, ww, -1),
    ], dim=-1).reshape(s, 1, d // 2)
    xc = torch.view_as_complex(x.double().reshape(b, s, h, d // 2, 2))
    return torch.view_as_real(xc * fr).reshape(b, s, h, d).to(x.dtype)
