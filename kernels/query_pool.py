"""Triton kernels of the fused multi-layer learned-query pooling op (``lwam::query_pool``).

Import as ``lwam.kernels.query_pool``. The math (DESIGN.md, "The fused ops", 1), per layer l and batch
row b, with ``x_hat = (X - mean) * rstd`` (LayerNorm without affine) over the S tokens of ``X [S, D]``::

    Z   = x_hat @ A[l]                 [S, H*Q]   folded attention logits, column h*Q + q
    P   = softmax over s of Z          [S, H*Q]
    c   = sum_q w[l, q] * P[:, h*Q+q]  [S, H]     merge folded into per-head token weights
    y   = c^T @ x_hat                  [H, D]

Forward, three launches, each serving all L layers:
  1. ``_fwd_logits``  grid (L*B, S/BS): row mean/rstd (two passes over D) and Z, accumulated over D chunks
     (the [BS, H*Q] accumulator stays in registers; an [H*Q, D] one would not fit a program at D = 1536).
  2. ``_fwd_softmax`` grid (L*B,): online max/sum over the tokens, log-sum-exp per column, then c.
  3. ``_fwd_pool``    grid (L*B, D/BD): y = c^T x_hat, D split over programs.
Saved for backward: row statistics ``stats [2, L, B, S]`` and ``lse [L, B, H*Q]`` (fp32); Z is recomputed.

Backward, four launches:
  1. ``_bwd_probs``   grid (L*B, S/BS): recompute Z, P = exp(Z - lse); g_c = x_hat @ gy^T.
  2. ``_bwd_softmax`` grid (L*B,): r = sum_s P * g_c (gives grad w), g_Z = w * P * (g_c - r), c.
  3. ``_bwd_dx``      grid (L*B, S/BS): g_xhat = c @ gy + g_Z @ A^T, then the LayerNorm backward (row sums
     in a first pass over D, the gradient in a second; g_xhat is recomputed, never stored).
  4. ``_bwd_dA``      grid (L, D/BD, splits): g_A = sum_b x_hat^T g_Z, split over b, partials summed after.

Layer inputs: up to ``MAX_LAYERS_PER_LAUNCH`` separate layer tensors are passed as separate pointers (a
[L, B, S, D] tap buffer is passed as its L views); nothing is stacked or copied. Strides are honoured when
all layers share one stride pattern (e.g. slices of a tap buffer, or any equally-strided views); when their
strides differ, the layers that are not contiguous are made contiguous (a copy of those layers only).

Inputs may be fp32, fp16 or bf16; everything is computed in fp32. For half inputs the folded matrix A is
read in the inputs' dtype (every token block reads it: half the bytes) and the large matmuls use TF32
(its 10-bit mantissa is finer than the inputs'); fp32 inputs use IEEE fp32. y is fp32.

Tile sizes and launch options are a :class:`TileConfig`, a parameter of both launchers: by default
:func:`cuda_config` for the GPU's compute capability (from its shared-memory limit) on CUDA tensors, and
:func:`interpreter_config` on CPU tensors under ``TRITON_INTERPRET=1``; tests pass the CUDA one to the
interpreter, and tests/test_aot_compile.py compiles the CUDA ones for sm_80/86/89/90 without a GPU.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["query_pool_forward", "query_pool_backward", "launch_count", "reset_launch_count",
           "set_poison", "MAX_LAYERS_PER_LAUNCH", "TileConfig", "cuda_config", "interpreter_config",
           "default_config", "shared_memory_limit", "LAUNCH_ERRORS"]

MAX_LAYERS_PER_LAUNCH = 8

_launches = 0
_poison = False

# What a launch raises when the kernel cannot run on this GPU (too much shared memory or too many registers
# for the device, or a Triton that cannot compile it); ``lwam.ops.query_pool`` then uses the reference.
LAUNCH_ERRORS = (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError)


def launch_count() -> int:
    """Number of Triton kernel launches made by this module since the last reset (benchmarks count them)."""
    return _launches


def reset_launch_count() -> None:
    global _launches
    _launches = 0


def set_poison(enabled: bool) -> None:
    """Test hook: fill every output and intermediate buffer with NaN before the kernels write it."""
    global _poison
    _poison = bool(enabled)


# --------------------------------------------------------------------------------------------------------
# device helpers

@triton.jit
def _layer_ptr(l, X0, X1, X2, X3, X4, X5, X6, X7, NL: tl.constexpr):
    p = X0
    if NL > 1:
        if l == 1:
            p = X1
    if NL > 2:
        if l == 2:
            p = X2
    if NL > 3:
        if l == 3:
            p = X3
    if NL > 4:
        if l == 4:
            p = X4
    if NL > 5:
        if l == 5:
            p = X5
    if NL > 6:
        if l == 6:
            p = X6
    if NL > 7:
        if l == 7:
            p = X7
    return p


@triton.jit
def _columns(H, Q, QP: tl.constexpr, NC: tl.constexpr):
    # Padded column j <-> (head j // QP, query j % QP); A's column is h*Q + q.
    j = tl.arange(0, NC)
    h = j // QP
    q = j % QP
    valid = (h < H) & (q < Q)
    return h, q, valid, h * Q + q


# --------------------------------------------------------------------------------------------------------
# forward

@triton.jit
def _fwd_logits(X0, X1, X2, X3, X4, X5, X6, X7, A, Z, STATS,
                LOFF, L, B, S, D, H, Q, eps,
                sxb, sxs, sxd, sal, sad, sac,
                NL: tl.constexpr, QP: tl.constexpr, NC: tl.constexpr,
                BS: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    l = pid // B
    b = pid % B
    lg = LOFF + l
    xp = _layer_ptr(l, X0, X1, X2, X3, X4, X5, X6, X7, NL) + b.to(tl.int64) * sxb
    offs_s = tl.program_id(1) * BS + tl.arange(0, BS)
    ms = offs_s < S
    _h, _q, mc, acol = _columns(H, Q, QP, NC)

    acc = tl.zeros([BS], dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        m2 = ms[:, None] & (offs_d < D)[None, :]
        x = tl.load(xp + offs_s[:, None] * sxs + offs_d[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=1)
    mean = acc / D

    var = tl.zeros([BS], dtype=tl.float32)
    z = tl.zeros([BS, NC], dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        md = offs_d < D
        m2 = ms[:, None] & md[None, :]
        x = tl.load(xp + offs_s[:, None] * sxs + offs_d[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
        xc = tl.where(m2, x - mean[:, None], 0.0)
        var += tl.sum(xc * xc, axis=1)
        a = tl.load(A + lg * sal + offs_d[:, None] * sad + acol[None, :] * sac,
                    mask=md[:, None] & mc[None, :], other=0.0).to(tl.float32)
        z = tl.dot(xc, a, z, input_precision=PREC)
    rstd = 1.0 / tl.sqrt(var / D + eps)
    z = z * rstd[:, None]

    row = (lg * B + b).to(tl.int64) * S + offs_s
    tl.store(Z + row[:, None] * NC + tl.arange(0, NC)[None, :], z, mask=ms[:, None])
    tl.store(STATS + row, mean, mask=ms)
    tl.store(STATS + L * B * S + row, rstd, mask=ms)


@triton.jit
def _fwd_softmax(Z, W, LSE, C, LOFF, B, S, H, Q, swl, swq,
                 QP: tl.constexpr, NC: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr):
    pid = tl.program_id(0)
    l = pid // B
    b = pid % B
    lg = LOFF + l
    h, q, mc, acol = _columns(H, Q, QP, NC)
    cols = tl.arange(0, NC)
    base = (lg * B + b).to(tl.int64) * S

    m = tl.full([NC], float("-inf"), dtype=tl.float32)
    ssum = tl.zeros([NC], dtype=tl.float32)
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        ms = offs_s < S
        z = tl.load(Z + (base + offs_s)[:, None] * NC + cols[None, :], mask=ms[:, None], other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        ssum = ssum * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[None, :]), axis=0)
        m = m_new
    lse = m + tl.log(ssum)
    tl.store(LSE + (lg * B + b).to(tl.int64) * (H * Q) + acol, lse, mask=mc)

    wv = tl.load(W + lg * swl + q * swq, mask=mc, other=0.0).to(tl.float32)
    hh = tl.arange(0, HD)
    merge = tl.where(h[:, None] == hh[None, :], wv[:, None], 0.0)           # [NC, HD]
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        ms = offs_s < S
        z = tl.load(Z + (base + offs_s)[:, None] * NC + cols[None, :], mask=ms[:, None], other=float("-inf"))
        p = tl.exp(z - lse[None, :])
        c = tl.dot(p, merge, input_precision="ieee")
        tl.store(C + (base + offs_s)[:, None] * HD + hh[None, :], c, mask=ms[:, None])


@triton.jit
def _fwd_pool(X0, X1, X2, X3, X4, X5, X6, X7, STATS, C, Y,
              LOFF, L, B, S, D, H, sxb, sxs, sxd,
              NL: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    l = pid // B
    b = pid % B
    lg = LOFF + l
    xp = _layer_ptr(l, X0, X1, X2, X3, X4, X5, X6, X7, NL) + b.to(tl.int64) * sxb
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = offs_d < D
    hh = tl.arange(0, HD)
    base = (lg * B + b).to(tl.int64) * S

    acc = tl.zeros([HD, BD], dtype=tl.float32)
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        ms = offs_s < S
        m2 = ms[:, None] & md[None, :]
        x = tl.load(xp + offs_s[:, None] * sxs + offs_d[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(STATS + base + offs_s, mask=ms, other=0.0)
        rstd = tl.load(STATS + L * B * S + base + offs_s, mask=ms, other=0.0)
        xh = (x - mean[:, None]) * rstd[:, None]
        c = tl.load(C + (base + offs_s)[:, None] * HD + hh[None, :], mask=ms[:, None], other=0.0)
        acc = tl.dot(tl.trans(c), xh, acc, input_precision=PREC)
    yrow = (lg * B + b).to(tl.int64) * H + hh
    tl.store(Y + yrow[:, None] * D + offs_d[None, :], acc, mask=(hh < H)[:, None] & md[None, :])


# --------------------------------------------------------------------------------------------------------
# backward

@triton.jit
def _bwd_probs(X0, X1, X2, X3, X4, X5, X6, X7, A, STATS, LSE, GY, P, GC,
               LOFF, L, B, S, D, H, Q,
               sxb, sxs, sxd, sal, sad, sac,
               NL: tl.constexpr, QP: tl.constexpr, NC: tl.constexpr, HD: tl.constexpr,
               BS: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    l = pid // B
    b = pid % B
    lg = LOFF + l
    xp = _layer_ptr(l, X0, X1, X2, X3, X4, X5, X6, X7, NL) + b.to(tl.int64) * sxb
    offs_s = tl.program_id(1) * BS + tl.arange(0, BS)
    ms = offs_s < S
    _h, _q, mc, acol = _columns(H, Q, QP, NC)
    hh = tl.arange(0, HD)
    base = (lg * B + b).to(tl.int64) * S
    mean = tl.load(STATS + base + offs_s, mask=ms, other=0.0)
    rstd = tl.load(STATS + L * B * S + base + offs_s, mask=ms, other=0.0)
    gyrow = (lg * B + b).to(tl.int64) * H + hh

    z = tl.zeros([BS, NC], dtype=tl.float32)
    gc = tl.zeros([BS, HD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        md = offs_d < D
        m2 = ms[:, None] & md[None, :]
        x = tl.load(xp + offs_s[:, None] * sxs + offs_d[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
        xh = (x - mean[:, None]) * rstd[:, None]
        a = tl.load(A + lg * sal + offs_d[:, None] * sad + acol[None, :] * sac,
                    mask=md[:, None] & mc[None, :], other=0.0).to(tl.float32)
        gy = tl.load(GY + gyrow[None, :] * D + offs_d[:, None], mask=md[:, None] & (hh < H)[None, :], other=0.0)
        z = tl.dot(xh, a, z, input_precision=PREC)
        gc = tl.dot(xh, gy, gc, input_precision=PREC)
    lse = tl.load(LSE + (lg * B + b).to(tl.int64) * (H * Q) + acol, mask=mc, other=0.0)
    p = tl.where(ms[:, None] & mc[None, :], tl.exp(z - lse[None, :]), 0.0)
    tl.store(P + (base + offs_s)[:, None] * NC + tl.arange(0, NC)[None, :], p, mask=ms[:, None])
    tl.store(GC + (base + offs_s)[:, None] * HD + hh[None, :], gc, mask=ms[:, None])


@triton.jit
def _bwd_softmax(P, GC, W, R, LOFF, B, S, H, Q, swl, swq,
                 QP: tl.constexpr, NC: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr):
    # In place: P becomes g_Z, GC becomes c (same elements, same program, read before written).
    pid = tl.program_id(0)
    l = pid // B
    b = pid % B
    lg = LOFF + l
    h, q, mc, acol = _columns(H, Q, QP, NC)
    cols = tl.arange(0, NC)
    hh = tl.arange(0, HD)
    base = (lg * B + b).to(tl.int64) * S
    wv = tl.load(W + lg * swl + q * swq, mask=mc, other=0.0).to(tl.float32)
    merge = tl.where(h[:, None] == hh[None, :], wv[:, None], 0.0)           # [NC, HD]
    hcol = tl.minimum(h, HD - 1)

    r = tl.zeros([NC], dtype=tl.float32)
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        ms = offs_s < S
        p = tl.load(P + (base + offs_s)[:, None] * NC + cols[None, :], mask=ms[:, None], other=0.0)
        gce = tl.load(GC + (base + offs_s)[:, None] * HD + hcol[None, :], mask=ms[:, None], other=0.0)
        r += tl.sum(p * gce, axis=0)
    tl.store(R + (lg * B + b).to(tl.int64) * (H * Q) + acol, r, mask=mc)

    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        ms = offs_s < S
        p = tl.load(P + (base + offs_s)[:, None] * NC + cols[None, :], mask=ms[:, None], other=0.0)
        gce = tl.load(GC + (base + offs_s)[:, None] * HD + hcol[None, :], mask=ms[:, None], other=0.0)
        gz = wv[None, :] * p * (gce - r[None, :])
        c = tl.dot(p, merge, input_precision="ieee")
        tl.debug_barrier()
        tl.store(P + (base + offs_s)[:, None] * NC + cols[None, :], gz, mask=ms[:, None])
        tl.store(GC + (base + offs_s)[:, None] * HD + hh[None, :], c, mask=ms[:, None])


@triton.jit
def _bwd_dx(X0, X1, X2, X3, X4, X5, X6, X7, A, STATS, GY, GZ, C, GX,
            LOFF, L, B, S, D, H, Q,
            sxb, sxs, sxd, sal, sad, sac,
            NL: tl.constexpr, QP: tl.constexpr, NC: tl.constexpr, HD: tl.constexpr,
            BS: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    l = pid // B
    b = pid % B
    lg = LOFF + l
    xp = _layer_ptr(l, X0, X1, X2, X3, X4, X5, X6, X7, NL) + b.to(tl.int64) * sxb
    offs_s = tl.program_id(1) * BS + tl.arange(0, BS)
    ms = offs_s < S
    _h, _q, mc, acol = _columns(H, Q, QP, NC)
    hh = tl.arange(0, HD)
    base = (lg * B + b).to(tl.int64) * S
    mean = tl.load(STATS + base + offs_s, mask=ms, other=0.0)
    rstd = tl.load(STATS + L * B * S + base + offs_s, mask=ms, other=0.0)
    gz = tl.load(GZ + (base + offs_s)[:, None] * NC + tl.arange(0, NC)[None, :], mask=ms[:, None], other=0.0)
    c = tl.load(C + (base + offs_s)[:, None] * HD + hh[None, :], mask=ms[:, None], other=0.0)
    gyrow = (lg * B + b).to(tl.int64) * H + hh

    s1 = tl.zeros([BS], dtype=tl.float32)
    s2 = tl.zeros([BS], dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        md = offs_d < D
        m2 = ms[:, None] & md[None, :]
        x = tl.load(xp + offs_s[:, None] * sxs + offs_d[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
        xh = (x - mean[:, None]) * rstd[:, None]
        at = tl.load(A + lg * sal + offs_d[None, :] * sad + acol[:, None] * sac,
                     mask=md[None, :] & mc[:, None], other=0.0).to(tl.float32)       # [NC, BD]
        gy = tl.load(GY + gyrow[:, None] * D + offs_d[None, :], mask=(hh < H)[:, None] & md[None, :], other=0.0)
        g = tl.dot(c, gy, input_precision=PREC)
        g = tl.dot(gz, at, g, input_precision=PREC)
        s1 += tl.sum(g, axis=1)
        s2 += tl.sum(g * xh, axis=1)
    s1 = s1 / D
    s2 = s2 / D

    gxp = GX + (lg * B + b).to(tl.int64) * S * D
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        md = offs_d < D
        m2 = ms[:, None] & md[None, :]
        x = tl.load(xp + offs_s[:, None] * sxs + offs_d[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
        xh = (x - mean[:, None]) * rstd[:, None]
        at = tl.load(A + lg * sal + offs_d[None, :] * sad + acol[:, None] * sac,
                     mask=md[None, :] & mc[:, None], other=0.0).to(tl.float32)
        gy = tl.load(GY + gyrow[:, None] * D + offs_d[None, :], mask=(hh < H)[:, None] & md[None, :], other=0.0)
        g = tl.dot(c, gy, input_precision=PREC)
        g = tl.dot(gz, at, g, input_precision=PREC)
        gx = rstd[:, None] * (g - s1[:, None] - xh * s2[:, None])
        tl.store(gxp + offs_s[:, None] * D + offs_d[None, :], gx.to(GX.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_dA(X0, X1, X2, X3, X4, X5, X6, X7, STATS, GZ, GA,
            LOFF, L, B, S, D, H, Q, NSPLIT,
            sxb, sxs, sxd,
            NL: tl.constexpr, QP: tl.constexpr, NC: tl.constexpr,
            BS: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    l = tl.program_id(0)
    lg = LOFF + l
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = offs_d < D
    split = tl.program_id(2)
    _h, _q, mc, acol = _columns(H, Q, QP, NC)
    cols = tl.arange(0, NC)
    xl = _layer_ptr(l, X0, X1, X2, X3, X4, X5, X6, X7, NL)

    acc = tl.zeros([BD, NC], dtype=tl.float32)
    for b0 in range(0, B, NSPLIT):
        b = (b0 + split).to(tl.int64)
        xp = xl + b * sxb
        base = (lg * B + b) * S
        if b < B:
            for s0 in range(0, S, BS):
                offs_s = s0 + tl.arange(0, BS)
                ms = offs_s < S
                m2 = ms[:, None] & md[None, :]
                x = tl.load(xp + offs_s[:, None] * sxs + offs_d[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
                mean = tl.load(STATS + base + offs_s, mask=ms, other=0.0)
                rstd = tl.load(STATS + L * B * S + base + offs_s, mask=ms, other=0.0)
                xh = (x - mean[:, None]) * rstd[:, None]
                gz = tl.load(GZ + (base + offs_s)[:, None] * NC + cols[None, :], mask=ms[:, None], other=0.0)
                acc = tl.dot(tl.trans(xh), gz, acc, input_precision=PREC)
    gap = GA + (lg * NSPLIT + split).to(tl.int64) * D * (H * Q)
    tl.store(gap + offs_d[:, None] * (H * Q) + acol[None, :], acc, mask=md[:, None] & mc[None, :])


# --------------------------------------------------------------------------------------------------------
# launchers

def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _layout(H: int, Q: int) -> tuple[int, int, int]:
    QP = _next_pow2(Q)
    NC = max(16, _next_pow2(H) * QP)      # tl.dot needs every dimension >= 16
    HD = max(16, _next_pow2(H))
    return QP, NC, HD


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of every kernel of this module (one launch set per op call).

    BS, BD: token block and D chunk of ``_fwd_logits``, ``_bwd_probs`` and ``_bwd_dx`` (the folded matrix
    A of a layer is read once per token block, so a larger BS reads it fewer times);
    BS_SM: token block of the two softmax kernels; BS_POOL, BD_POOL: ``_fwd_pool``; BS_A, BD_A: ``_bwd_dA``;
    nsplit: batch split of ``_bwd_dA`` (0: min(B, 8)); warps, warps_SM, warps_POOL, warps_A: num_warps of
    the token-block kernels, the softmax kernels, ``_fwd_pool`` and ``_bwd_dA``; stages / stages_SM:
    num_stages of the loop kernels / of the softmax kernels (each stage buffers one loaded tile in shared
    memory).
    """

    BS: int = 64
    BD: int = 64
    BS_SM: int = 64
    BS_POOL: int = 32
    BD_POOL: int = 128
    BS_A: int = 32
    BD_A: int = 64
    nsplit: int = 0
    warps: int = 8
    warps_SM: int = 8
    warps_POOL: int = 8
    warps_A: int = 8
    stages: int = 2
    stages_SM: int = 2

    def batch_split(self, B: int) -> int:
        return max(1, min(B, 8)) if self.nsplit == 0 else max(1, min(B, self.nsplit))


# Opt-in shared memory per block (bytes) by compute capability (CUDA programming guide, "Technical
# Specifications per Compute Capability"); an unknown GPU gets the smallest of these.
SHARED_MEMORY_PER_BLOCK = {(8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376,
                           (9, 0): 232_448, (10, 0): 232_448, (12, 0): 101_376}
REGISTERS_PER_SM = 65_536
REGISTERS_PER_THREAD = 255

# The CUDA configurations, checked by tests/test_aot_compile.py to fit every target's shared memory and
# registers without spilling (bf16/fp16; measurements in benchmarks/README.md). Token blocks of 64 rows
# read each layer's folded matrix half as often as 32 would and give every token-block dot a full
# warpgroup tile, so Hopper runs them on wgmma; 8 warps keep the [64, H*Q] fp32 accumulators in
# registers. GPUs with large shared memory (A100, H100/H200) buffer one more stage of every loop.
_CUDA_SMALL_SMEM = TileConfig()
_CUDA_LARGE_SMEM = TileConfig(stages=3, stages_SM=3)


def shared_memory_limit(cc: tuple[int, int]) -> int:
    """Opt-in shared memory per block (bytes) of compute capability ``cc`` (the smallest known if unknown)."""
    return SHARED_MEMORY_PER_BLOCK.get(tuple(cc), min(SHARED_MEMORY_PER_BLOCK.values()))


def cuda_config(cc: tuple[int, int], S: int, D: int, H: int, Q: int) -> TileConfig:
    """The launch configuration the CUDA launchers use on a GPU of compute capability ``cc`` for layers
    [B, S, D] with H heads and Q queries (more logit columns than the paper's 8 x 16 get shorter token
    blocks, so the [BS, H*Q] accumulator stays the same size)."""
    base = _CUDA_LARGE_SMEM if shared_memory_limit(cc) >= 160_000 else _CUDA_SMALL_SMEM
    _qp, nc, _hd = _layout(H, Q)
    if nc > 128:
        bs = max(16, base.BS * 128 // nc)
        base = dataclasses.replace(base, BS=bs, BS_SM=max(16, base.BS_SM * 128 // nc),
                                   BS_A=max(16, min(base.BS_A, bs)))
    return base


def interpreter_config(S: int, D: int) -> TileConfig:
    """The configuration used under TRITON_INTERPRET=1 (big tiles: the interpreter pays per element)."""
    bs = min(512, max(16, _next_pow2(S)))
    bd = min(512, max(16, _next_pow2(D)))
    return TileConfig(BS=bs, BD=bd, BS_SM=bs, BS_POOL=bs, BD_POOL=bd, BS_A=bs, BD_A=bd, nsplit=1,
                      warps=4, warps_SM=4, warps_POOL=4, warps_A=4, stages=1, stages_SM=1)


_CC_CACHE: dict[int, tuple[int, int]] = {}


def default_config(device: torch.device, S: int, D: int, H: int, Q: int) -> TileConfig:
    """What the launchers use when no configuration is passed: the interpreter's on CPU tensors under
    TRITON_INTERPRET=1, else the CUDA one for the device's compute capability."""
    if device.type != "cuda":
        return interpreter_config(S, D)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CC_CACHE:
        _CC_CACHE[idx] = tuple(torch.cuda.get_device_capability(idx))
    return cuda_config(_CC_CACHE[idx], S, D, H, Q)


# A test hook: when set, launches go to it as (kernel, grid, args, kwargs) instead of to the GPU
# (tests/test_aot_compile.py records them and compiles each for real GPU targets).
_launch_hook = None


def _launch(kernel, grid, *args, **kwargs) -> None:
    if _launch_hook is not None:
        _launch_hook(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan"))
    return t


def _prepare_layers(xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
    """Layers sharing one stride pattern are used in place; otherwise non-contiguous ones are copied."""
    layers = list(xs)
    strides = {tuple(x.stride()) for x in layers}
    if len(strides) > 1:
        layers = [x.contiguous() for x in layers]
    return layers, tuple(layers[0].stride())


def _groups(L: int):
    for l0 in range(0, L, MAX_LAYERS_PER_LAUNCH):
        yield l0, min(MAX_LAYERS_PER_LAUNCH, L - l0)


def _ptrs(layers: list[torch.Tensor], l0: int, nl: int) -> list[torch.Tensor]:
    group = layers[l0:l0 + nl]
    return group + [group[0]] * (MAX_LAYERS_PER_LAUNCH - nl)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _count(n: int) -> None:
    global _launches
    _launches += n


def _operand_matrix(A: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """A as the kernels read it: in the inputs' half dtype when they are fp16/bf16 (half the bytes of the
    matrix that every token block reads; the kernels compute in fp32 either way), else as given."""
    if x_dtype in (torch.float16, torch.bfloat16) and A.dtype != x_dtype:
        return A.to(x_dtype)
    return A


def _resolve_config(config: TileConfig | None, device: torch.device, S: int, D: int, H: int,
                    Q: int) -> TileConfig:
    if config is None:
        return default_config(device, S, D, H, Q)
    if not isinstance(config, TileConfig):
        raise TypeError(f"config: expected a TileConfig or None, got {type(config).__name__}")
    return config


def query_pool_forward(xs: Sequence[torch.Tensor], A: torch.Tensor, w: torch.Tensor, eps: float,
                       config: TileConfig | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward. xs: L tensors [B, S, D] (same shape, dtype, device); A: [L, D, H*Q]; w: [L, Q];
    config: tile sizes (default :func:`default_config` for the device).

    Returns y [L, B, H, D] fp32, stats [2, L, B, S] fp32 (row mean, rstd), lse [L, B, H*Q] fp32.
    Inputs are assumed validated by ``lwam.ops.query_pool``.
    """
    layers, (sxb, sxs, sxd) = _prepare_layers(xs)
    L = len(layers)
    B, S, D = layers[0].shape
    Q = w.shape[1]
    H = A.shape[2] // Q
    QP, NC, HD = _layout(H, Q)
    dev = layers[0].device
    cfg = _resolve_config(config, dev, S, D, H, Q)
    prec = _prec(layers[0].dtype)
    A = _operand_matrix(A, layers[0].dtype)
    z = _empty((L, B, S, NC), torch.float32, dev)
    stats = _empty((2, L, B, S), torch.float32, dev)
    lse = _empty((L, B, H * Q), torch.float32, dev)
    c = _empty((L, B, S, HD), torch.float32, dev)
    y = _empty((L, B, H, D), torch.float32, dev)
    sal, sad, sac = A.stride()
    swl, swq = w.stride()
    for l0, nl in _groups(L):
        ptrs = _ptrs(layers, l0, nl)
        _launch(_fwd_logits, (nl * B, triton.cdiv(S, cfg.BS)),
                *ptrs, A, z, stats, l0, L, B, S, D, H, Q, float(eps), sxb, sxs, sxd, sal, sad, sac,
                NL=nl, QP=QP, NC=NC, BS=cfg.BS, BD=cfg.BD, PREC=prec, num_warps=cfg.warps, num_stages=cfg.stages)
        _launch(_fwd_softmax, (nl * B,),
                z, w, lse, c, l0, B, S, H, Q, swl, swq,
                QP=QP, NC=NC, HD=HD, BS=cfg.BS_SM, num_warps=cfg.warps_SM, num_stages=cfg.stages_SM)
        _launch(_fwd_pool, (nl * B, triton.cdiv(D, cfg.BD_POOL)),
                *ptrs, stats, c, y, l0, L, B, S, D, H, sxb, sxs, sxd,
                NL=nl, HD=HD, BS=cfg.BS_POOL, BD=cfg.BD_POOL, PREC=prec, num_warps=cfg.warps_POOL,
                num_stages=cfg.stages)
        _count(3)
    return y, stats, lse


def query_pool_backward(gy: torch.Tensor, xs: Sequence[torch.Tensor], A: torch.Tensor, w: torch.Tensor,
                        stats: torch.Tensor, lse: torch.Tensor, eps: float, config: TileConfig | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward. gy: [L, B, H, D]; xs, A, w, config as in :func:`query_pool_forward`; stats, lse: its
    side outputs. Returns gX [L, B, S, D] (dtype of xs), gA [L, D, H*Q] (dtype of A), gw [L, Q] (dtype of w).
    """
    layers, (sxb, sxs, sxd) = _prepare_layers(xs)
    L = len(layers)
    B, S, D = layers[0].shape
    Q = w.shape[1]
    H = A.shape[2] // Q
    QP, NC, HD = _layout(H, Q)
    dev = layers[0].device
    cfg = _resolve_config(config, dev, S, D, H, Q)
    prec = _prec(layers[0].dtype)
    a_dtype = A.dtype
    A = _operand_matrix(A, layers[0].dtype)
    gy = gy.to(torch.float32).contiguous()
    stats = stats.contiguous()
    lse = lse.contiguous()
    p = _empty((L, B, S, NC), torch.float32, dev)      # P, then g_Z
    gc = _empty((L, B, S, HD), torch.float32, dev)     # g_c, then c
    r = _empty((L, B, H * Q), torch.float32, dev)
    gx = _empty((L, B, S, D), layers[0].dtype, dev)
    # Enough programs to fill a GPU at training shapes; partials over b are summed afterwards.
    nsplit = cfg.batch_split(B)
    ga = _empty((L, nsplit, D, H * Q), torch.float32, dev)
    sal, sad, sac = A.stride()
    swl, swq = w.stride()
    for l0, nl in _groups(L):
        ptrs = _ptrs(layers, l0, nl)
        grid_rows = (nl * B, triton.cdiv(S, cfg.BS))
        _launch(_bwd_probs, grid_rows,
                *ptrs, A, stats, lse, gy, p, gc, l0, L, B, S, D, H, Q, sxb, sxs, sxd, sal, sad, sac,
                NL=nl, QP=QP, NC=NC, HD=HD, BS=cfg.BS, BD=cfg.BD, PREC=prec, num_warps=cfg.warps,
                num_stages=cfg.stages)
        _launch(_bwd_softmax, (nl * B,),
                p, gc, w, r, l0, B, S, H, Q, swl, swq,
                QP=QP, NC=NC, HD=HD, BS=cfg.BS_SM, num_warps=cfg.warps_SM, num_stages=cfg.stages_SM)
        _launch(_bwd_dx, grid_rows,
                *ptrs, A, stats, gy, p, gc, gx, l0, L, B, S, D, H, Q, sxb, sxs, sxd, sal, sad, sac,
                NL=nl, QP=QP, NC=NC, HD=HD, BS=cfg.BS, BD=cfg.BD, PREC=prec, num_warps=cfg.warps,
                num_stages=cfg.stages)
        _launch(_bwd_dA, (nl, triton.cdiv(D, cfg.BD_A), nsplit),
                *ptrs, stats, p, ga, l0, L, B, S, D, H, Q, nsplit, sxb, sxs, sxd,
                NL=nl, QP=QP, NC=NC, BS=cfg.BS_A, BD=cfg.BD_A, PREC=prec, num_warps=cfg.warps_A,
                num_stages=cfg.stages)
        _count(4)
    gA = (ga[:, 0] if nsplit == 1 else ga.sum(dim=1)).to(a_dtype)
    gw = r.view(L, B, H, Q).sum(dim=(1, 2)).to(w.dtype)
    return gx, gA, gw


# --------------------------------------------------------------------------------------------------------
# memory traffic (benchmarks report it beside the time)

def modelled_bytes(L: int, B: int, S: int, D: int, H: int, Q: int, x_dtype: torch.dtype, config: TileConfig,
                   backward: bool) -> dict[str, int]:
    """Bytes each kernel loads and stores with ``config`` (every tile a program loads counted once per
    program, no reuse between programs through L2: an upper bound on DRAM traffic). Forward kernels, plus
    the backward ones when ``backward``."""
    ex = torch.empty((), dtype=x_dtype).element_size()
    ea = ex if x_dtype in (torch.float16, torch.bfloat16) else 4      # A as the kernels read it
    _qp, nc, hd = _layout(H, Q)
    rows, blocks = L * B * S, L * B * triton.cdiv(S, config.BS)
    x, f4 = rows * D * ex, 4
    out = {
        "_fwd_logits": 2 * x + blocks * D * H * Q * ea + rows * (nc + 2) * f4,
        "_fwd_softmax": rows * (2 * nc + hd) * f4 + L * B * H * Q * f4,
        "_fwd_pool": x + L * B * triton.cdiv(D, config.BD_POOL) * S * (hd + 2) * f4 + L * B * H * D * f4,
    }
    if backward:
        gy_block = blocks * H * D * f4
        nsplit = config.batch_split(B)
        out.update({
            "_bwd_probs": x + blocks * D * H * Q * ea + gy_block + rows * (2 + 2 * H * Q + nc + hd) * f4,
            "_bwd_softmax": rows * 2 * (2 * nc + 2 * hd) * f4,
            "_bwd_dx": 2 * (x + blocks * D * H * Q * ea + gy_block) + rows * (2 + nc + hd) * f4 + rows * D * ex,
            "_bwd_dA": x + L * B * triton.cdiv(D, config.BD_A) * S * (2 + nc) * f4 + L * nsplit * D * H * Q * f4,
        })
    return out


def floor_bytes(L: int, B: int, S: int, D: int, H: int, Q: int, x_dtype: torch.dtype, backward: bool) -> int:
    """The least any implementation must move: forward reads X and A once and writes y; forward+backward
    also reads X, A and gy again and writes gX and gA (X is too large to stay on chip in between)."""
    ex = torch.empty((), dtype=x_dtype).element_size()
    ea = ex if x_dtype in (torch.float16, torch.bfloat16) else 4
    x, a, y = L * B * S * D * ex, L * D * H * Q * ea, L * B * H * D * 4
    fwd = x + a + y
    return fwd + (x + a + y + x + L * D * H * Q * 4 if backward else 0)
