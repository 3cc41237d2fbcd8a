"""Reference latent downsampling: the mean over factor x factor spatial blocks, time untouched."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean of ``x`` [B, C, T, H, W] over ``factor`` x ``factor`` blocks of (H, W) -> [B, C, T, H/f, W/f].

    Computed with ``F.avg_pool3d(kernel_size=(1, f, f))`` in fp32 (fp64 stays fp64) and cast back to
    ``x.dtype``. Any strides. H and W must be divisible by ``factor``; differentiable through autograd.
    """
    check_args(x, factor)
    compute = x if x.dtype == torch.float64 else x.float()
    return F.avg_pool3d(compute, kernel_size=(1, factor, factor)).to(x.dtype)


def check_args(x: torch.Tensor, factor: int) -> None:
    """Shape checks shared by the reference and the op; messages name the shape and the factor."""
    if x.dim() != 5:
        raise ValueError(f"latent_downsample: expected x of rank 5 [B, C, T, H, W], got shape {list(x.shape)} "
                         f"(rank {x.dim()}) with factor {factor}")
    if factor <= 0:
        raise ValueError(f"latent_downsample: factor must be a positive integer, got factor {factor} "
                         f"for x of shape {list(x.shape)}")
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"latent_downsample: H and W of x must be divisible by factor {factor}, got x of shape "
                         f"{list(x.shape)} (H={x.shape[-2]}, W={x.shape[-1]})")
