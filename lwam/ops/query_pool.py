"""Public fused op: multi-layer learned-query pooling core, ``lwam::query_pool``.

``query_pool(xs, A, w, eps) -> y [L, B, H, D]`` with, per layer l and batch row b,
``y[l, b, h] = sum_s c[l, b, h, s] * x_hat[l, b, s]``, ``x_hat`` the LayerNorm-normalised (no affine)
tokens and ``c[l, b, h, s] = sum_q w[l, q] * softmax_s(x_hat[l, b, s] . A[l, :, h*Q + q])``
(see :mod:`lwam.reference.query_pool`). Differentiable in xs, A and w.

Registered as ``torch.library`` custom ops (forward ``lwam::query_pool`` and ``lwam::query_pool_backward``,
with fake implementations and autograd), so torch.compile traces each as one node and CUDA graphs can
capture them. Dispatch happens inside the op: the Triton kernels of :mod:`lwam.kernels.query_pool` when
Triton imports and the input is on CUDA (or on CPU with ``TRITON_INTERPRET=1``) in fp32/fp16/bf16; the
reference otherwise, with one log line saying why. A launch that cannot run on the GPU at hand (too much
shared memory or too many registers for it, or a Triton that cannot compile the kernel) also falls back
to the reference, with one log line. Importing this module imports neither Triton nor CUDA.
Double backward is not supported.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch
from torch import Tensor

from lwam._logging import log_once
from lwam.reference.query_pool import as_layers, query_pool_folded_reference, query_pool_folded_stats

__all__ = ["query_pool", "query_pool_kernel_available"]

_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_kernel_mod = None
_kernel_err: str | None = None


def _kernel_reason(x: Tensor) -> str | None:
    """None when the Triton kernel can run on ``x``'s device/dtype, else why not (cheap; no imports)."""
    if not _TRITON_FOUND:
        return "triton is not installed"
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} is not supported by the kernel (fp32/fp16/bf16)"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "input is on CPU and TRITON_INTERPRET is not 1"
    return f"device type {x.device.type!r} has no kernel"


def query_pool_kernel_available(x: Tensor) -> bool:
    """Whether ``query_pool`` on inputs like ``x`` would run the Triton kernel (the module drop-ins use it
    to decide between the folded fused path and the plain reference module)."""
    return _kernel_reason(x) is None and _kernel_err is None


def _load_kernel():
    global _kernel_mod, _kernel_err
    if _kernel_mod is None and _kernel_err is None:
        try:
            _kernel_mod = importlib.import_module("lwam.kernels.query_pool")
        except Exception as e:  # a broken Triton install must not break the model
            _kernel_err = f"importing the Triton kernel failed ({type(e).__name__}: {e})"
    return _kernel_mod


def _kernel_or_none(x: Tensor):
    why = _kernel_reason(x)
    if why is None:
        mod = _load_kernel()
        if mod is not None:
            return mod
        why = _kernel_err
    log_once("query_pool.fallback." + why, f"query_pool: using the PyTorch reference: {why}")
    return None


def _log_launch_failure(which: str, x: Tensor, exc: Exception) -> None:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    why = f"the Triton {which} kernels cannot run on {x.device} ({type(exc).__name__}: {first})"
    log_once(f"query_pool.launch.{which}.{x.device}.{type(exc).__name__}",
             f"query_pool: using the PyTorch reference: {why}")


def _check(xs: Sequence[Tensor], A: Tensor, w: Tensor) -> None:
    if len(xs) == 0:
        raise ValueError("xs: expected at least one layer tensor [B, S, D], got an empty list")
    x0 = xs[0]
    if x0.dim() != 3:
        raise ValueError(f"xs[0]: expected [B, S, D], got shape {list(x0.shape)}")
    B, S, D = x0.shape
    if S == 0 or D == 0:
        raise ValueError(f"xs: expected S >= 1 and D >= 1, got [B, S, D] = {list(x0.shape)}")
    for i, x in enumerate(xs):
        if x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(f"xs[{i}]: expected shape {list(x0.shape)}, dtype {x0.dtype}, device {x0.device}; "
                             f"got {list(x.shape)}, {x.dtype}, {x.device}")
        if not x.is_floating_point():
            raise TypeError(f"xs[{i}]: expected a floating-point tensor, got {x.dtype}")
    L = len(xs)
    if w.dim() != 2 or w.shape[0] != L or w.shape[1] < 1:
        raise ValueError(f"w: expected [L={L}, Q], got shape {list(w.shape)}")
    Q = w.shape[1]
    if A.dim() != 3 or A.shape[0] != L or A.shape[1] != D or A.shape[2] % Q != 0 or A.shape[2] == 0:
        raise ValueError(f"A: expected [L={L}, D={D}, H*Q] with H*Q a positive multiple of Q={Q}, "
                         f"got shape {list(A.shape)}")
    for name, t in (("A", A), ("w", w)):
        if t.device != x0.device:
            raise ValueError(f"{name}: expected device {x0.device}, got {t.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def _y_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("lwam::query_pool", mutates_args=())
def _query_pool_op(xs: list[Tensor], A: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """xs: L x [B, S, D]; A: [L, D, H*Q]; w: [L, Q] -> (y [L, B, H, D] fp32 (fp64 for fp64 xs),
    stats [2, L, B, S] fp32, lse [L, B, H*Q] fp32)."""
    kern = _kernel_or_none(xs[0])
    if kern is not None:
        try:
            return kern.query_pool_forward(xs, A, w, eps)
        except kern.LAUNCH_ERRORS as exc:
            _log_launch_failure("forward", xs[0], exc)
    y, stats, lse = query_pool_folded_stats([x.detach() for x in xs], A.detach(), w.detach(), eps)
    return y.to(_y_dtype(xs[0])), stats, lse


@_query_pool_op.register_fake
def _query_pool_fake(xs, A, w, eps):
    L = len(xs)
    B, S, D = xs[0].shape
    y = xs[0].new_empty((L, B, A.shape[2] // w.shape[1], D), dtype=_y_dtype(xs[0]))
    stats = xs[0].new_empty((2, L, B, S), dtype=torch.float32)
    lse = xs[0].new_empty((L, B, A.shape[2]), dtype=torch.float32)
    return y, stats, lse


@torch.library.custom_op("lwam::query_pool_backward", mutates_args=())
def _query_pool_backward_op(gy: Tensor, xs: list[Tensor], A: Tensor, w: Tensor, stats: Tensor, lse: Tensor,
                            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """gy: [L, B, H, D] -> (gX [L, B, S, D] in the dtype of xs, gA like A, gw like w)."""
    kern = _kernel_or_none(xs[0])
    if kern is not None:
        try:
            return kern.query_pool_backward(gy, xs, A, w, stats, lse, eps)
        except kern.LAUNCH_ERRORS as exc:
            _log_launch_failure("backward", xs[0], exc)
    return _reference_backward(gy, xs, A, w, eps)


def _reference_backward(gy: Tensor, xs: Sequence[Tensor], A: Tensor, w: Tensor, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The folded core's backward in closed form (fp32 math, fp64 for fp64 inputs), the kernels' formulas.

    An op implementation runs below autograd, so the reference cannot be differentiated here. Per layer,
    with x_hat, P = softmax_s(x_hat A), c = P merged by w:  g_c = x_hat gy^T;  r = sum_s P g_c (grad w);
    g_Z = w P (g_c - r);  g_xhat = c gy + g_Z A^T;  gA = sum_b x_hat^T g_Z;  then the LayerNorm backward.
    Returns gX [L, B, S, D] (dtype of xs), gA like A, gw like w.
    """
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    Q = w.shape[1]
    H = A.shape[2] // Q
    gxs, gAs, gws = [], [], []
    for l, x in enumerate(xs):
        x = x.detach().to(acc)
        B, S, D = x.shape
        var, mean = torch.var_mean(x, dim=-1, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        xh = (x - mean) * rstd
        a = A[l].detach().to(acc)
        wl = w[l].detach().to(acc)
        p = torch.softmax(xh @ a, dim=1).view(B, S, H, Q)
        c = (p * wl).sum(-1)                                                    # [B, S, H]
        g = gy[l].to(acc)                                                       # [B, H, D]
        gc = torch.einsum("bsd,bhd->bsh", xh, g)
        r = (p * gc.unsqueeze(-1)).sum(1)                                       # [B, H, Q]
        gz = (wl * p * (gc.unsqueeze(-1) - r.unsqueeze(1))).reshape(B, S, H * Q)
        gxh = torch.einsum("bsh,bhd->bsd", c, g) + gz @ a.t()
        gx = rstd * (gxh - gxh.mean(-1, keepdim=True) - xh * (gxh * xh).mean(-1, keepdim=True))
        gxs.append(gx.to(xs[0].dtype))
        gAs.append(torch.einsum("bsd,bsc->dc", xh, gz))
        gws.append(r.sum(dim=(0, 1)))
    return torch.stack(gxs), torch.stack(gAs).to(A.dtype), torch.stack(gws).to(w.dtype)


@_query_pool_backward_op.register_fake
def _query_pool_backward_fake(gy, xs, A, w, stats, lse, eps):
    L = len(xs)
    gx = xs[0].new_empty((L, *xs[0].shape))
    return gx, A.new_empty(A.shape), w.new_empty(w.shape)  # contiguous, like the real outputs


def _setup_context(ctx, inputs, output):
    xs, A, w, eps = inputs
    _y, stats, lse = output
    ctx.num_layers = len(xs)
    ctx.eps = eps
    ctx.save_for_backward(*xs, A, w, stats, lse)


def _backward(ctx, gy, _gstats, _glse):
    saved = ctx.saved_tensors
    L = ctx.num_layers
    xs, (A, w, stats, lse) = list(saved[:L]), saved[L:]
    if gy is None:
        gy = torch.zeros((L, xs[0].shape[0], A.shape[2] // w.shape[1], xs[0].shape[2]),
                         dtype=_y_dtype(xs[0]), device=xs[0].device)
    gx, gA, gw = torch.ops.lwam.query_pool_backward(gy, xs, A, w, stats, lse, ctx.eps)
    return list(gx.unbind(0)), gA, gw, None


_query_pool_op.register_autograd(_backward, setup_context=_setup_context)


def query_pool(xs: Sequence[Tensor] | Tensor, A: Tensor, w: Tensor, eps: float = 1e-5) -> Tensor:
    """Fused learned-query pooling core over L layers in one launch.

    xs: a tap buffer [L, B, S, D] or a sequence of L tensors [B, S, D] (read in place, never stacked);
    A: [L, D, H*Q] folded logit matrices (column ``h*Q + q``); w: [L, Q] merge weights (already
    softmax-normalised); eps: the token LayerNorm eps.
    Returns y [L, B, H, D], fp32 (fp64 for fp64 inputs). Differentiable in xs, A and w.
    """
    layers = as_layers(xs)
    _check(layers, A, w)
    return torch.ops.lwam.query_pool(layers, A, w, float(eps))[0]
