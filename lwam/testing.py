"""Shared test helpers: the one per-dtype tolerance table and comparison utilities.

Tests of every tier and the benchmarks' correctness checks import from here.
"""
from __future__ import annotations

import torch

# (rtol, atol) per dtype, for fused-vs-reference comparisons of outputs and gradients.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 name: str = "") -> None:
    """Compare with the table's tolerance for ``dtype`` (default: ``actual.dtype``), scaled to the
    magnitude of ``expected`` so that large-valued outputs are judged relatively."""
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=rtol,
                               atol=atol * scale, msg=lambda m: f"{name}: {m}" if name else m)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a float tensor with NaN so that memory a kernel forgot to write fails the comparison."""
    return t.fill_(float("nan"))


@torch.no_grad()
def perturb_zero_inits_(model: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> torch.nn.Module:
    """Give every zero-initialised up projection (LoRA, adapters) values drawn from ``generator`` * ``std``,
    so that tests of a fresh model exercise every path (a zero up projection hides its branch)."""
    for name, p in model.named_parameters():
        if "up_proj" in name:
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model
