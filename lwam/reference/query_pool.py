"""Plain PyTorch reference of learned-query pooling and of its folded core (fp32 math, no Triton).

Two references live here:

* :class:`ReferenceQueryPooler` -- the pooler exactly as the model defines it: LayerNorm over the tokens,
  ``nn.MultiheadAttention`` of ``Q`` learned query tokens over them, a softmax-weighted merge of the
  ``Q`` outputs and a final LayerNorm. ``[B, S, D] -> [B, D]``.
* :func:`query_pool_folded_reference` -- the folded core that the fused op ``lwam::query_pool``
  computes, taking the same inputs as the op:
  ``y[l, b, h] = sum_s c[l, b, h, s] * x_hat[l, b, s]`` with ``x_hat = (X - mean) * rstd`` and
  ``c[l, b, h, s] = sum_q w[l, q] * softmax_s(x_hat[l, b, s] . A[l, :, h*Q + q])``.

:func:`fold_pooler_params` turns one pooler's parameters into the folded matrix ``A_l``, the merge
weights ``w_l`` and the dense maps applied after pooling, and :func:`folded_pooler_post` applies those
maps, so that ``folded_pooler_post(query_pool_folded_reference(...))`` equals the pooler exactly (in exact
arithmetic; tests check it to fp64 rounding). The algebra is derived in docs/design.md, "Fused pooling".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ReferenceQueryPooler",
    "pooler_shape",
    "FoldedPoolerParams",
    "fold_pooler_params",
    "folded_pooler_post",
    "query_pool_folded_reference",
    "query_pool_folded_stats",
]


def pooler_shape(pooler: nn.Module) -> tuple[int, int, int]:
    """(D, H, Q) of any module with the learned-query pooler's parameters (``query_tokens`` [Q, D], ``attn``
    an ``nn.MultiheadAttention`` with H heads), read from the parameters so that foreign poolers with the
    same parameters but other attribute names work too."""
    q, d = pooler.query_tokens.shape
    return int(d), int(pooler.attn.num_heads), int(q)


class ReferenceQueryPooler(nn.Module):
    """Learned-query attention pooling over tokens, the plain way.

    ``forward(x [B, S, D]) -> [B, D]``:
    ``out = MHA(query_tokens, LN(x), LN(x))`` gives ``[B, Q, D]``; the ``Q`` outputs are merged with
    weights ``softmax(query_merge_logits)`` and the merged vector goes through ``output_norm``.

    Parameters (state-dict keys): ``token_norm.{weight,bias}`` [D], ``query_tokens`` [Q, D],
    ``attn.in_proj_weight`` [3D, D], ``attn.in_proj_bias`` [3D], ``attn.out_proj.{weight,bias}`` [D, D] / [D],
    ``query_merge_logits`` [Q], ``output_norm.{weight,bias}`` [D].

    The constructor takes the published Light-WAM pooler's arguments (``embed_dim``, ``num_queries``,
    ``num_heads``, ``merge_dim``, ``merge_num_slots``, in that order) plus the keyword ``eps``. Only the
    learned softmax merge (``merge_dim=None``, what the released configuration uses) exists here;
    ``merge_num_slots`` is read by the published code only when ``merge_dim`` is set.
    """

    def __init__(self, embed_dim: int, num_queries: int = 16, num_heads: int = 8, merge_dim: int | None = None,
                 merge_num_slots: int = 2, *, eps: float = 1e-5) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_queries", num_queries), ("num_heads", num_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if merge_dim is not None:
            raise ValueError(f"merge_dim: only the learned softmax merge (merge_dim=None) is implemented, "
                             f"got merge_dim={merge_dim!r}")
        dim = embed_dim
        self.dim = self.embed_dim = self.output_dim = dim
        self.merge_dim = None
        self.merge_num_slots = merge_num_slots
        self.num_queries = num_queries
        self.num_heads = num_heads
        self.eps = eps
        self.token_norm = nn.LayerNorm(dim, eps=eps)
        self.query_tokens = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.query_merge_logits = nn.Parameter(torch.zeros(num_queries))
        self.output_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, S, D] -> [B, D]."""
        dim = pooler_shape(self)[0]
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"x: expected [B, S, {dim}], got {list(x.shape)}")
        kv = self.token_norm(x)
        q = self.query_tokens.to(kv.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)  # [B, Q, D]
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        w = torch.softmax(self.query_merge_logits.to(acc), dim=0).to(out.dtype)
        merged = torch.einsum("q,bqd->bd", w, out)
        return self.output_norm(merged)


@dataclass
class FoldedPoolerParams:
    """One pooler's parameters in folded form (all tensors keep autograd links to the parameters).

    A:      [D, H*Q]  folded logit matrix, column ``h*Q + q`` is ``g * (W_k,h^T q_h) / sqrt(d)``
    w:      [Q]       merge weights, ``softmax(query_merge_logits)``
    v_weight: [H, d, D] per-head value map with the token-norm gain folded in (``W_v,h * g``)
    out_weight: [D, D] ``attn.out_proj.weight``
    out_bias: [D]     every constant term: ``W_o (W_v beta + b_v) + b_o``
    norm_weight, norm_bias: [D] ``output_norm`` affine; ``norm_eps`` its eps
    """

    A: Tensor
    w: Tensor
    v_weight: Tensor
    out_weight: Tensor
    out_bias: Tensor
    norm_weight: Tensor
    norm_bias: Tensor
    norm_eps: float
    num_heads: int
    num_queries: int


def fold_pooler_params(pooler: nn.Module, dtype: torch.dtype | None = None) -> FoldedPoolerParams:
    """Fold a :class:`ReferenceQueryPooler` (or a drop-in with the same parameters) into
    :class:`FoldedPoolerParams`, with ordinary differentiable torch ops on the small parameter tensors,
    computed in ``dtype`` (default: the parameters' dtype).

    Why it is exact: with ``x_ln = x_hat * g + beta`` the attention logit of head h, query q, token s is
    ``x_hat_s . (g * W_k,h^T q_h) / sqrt(d)`` plus terms constant over s (they cancel in the softmax);
    softmax weights sum to 1, so pooling commutes with the affine value map; the merge weights sum to 1
    and the merge is linear, so it commutes with the value and output projections.
    """
    D, H, Q = pooler_shape(pooler)
    d = D // H
    dt = dtype or pooler.query_tokens.dtype

    def cast(t: Tensor) -> Tensor:
        return t.to(dt)

    g, beta = cast(pooler.token_norm.weight), cast(pooler.token_norm.bias)
    W_q, W_k, W_v = cast(pooler.attn.in_proj_weight).chunk(3, dim=0)
    b_q, _b_k, b_v = cast(pooler.attn.in_proj_bias).chunk(3, dim=0)
    q_proj = (cast(pooler.query_tokens) @ W_q.t() + b_q).view(Q, H, d)       # [Q, H, d]
    k_fold = torch.einsum("qhe,hei->hqi", q_proj, W_k.reshape(H, d, D))        # [H, Q, D]
    A = (k_fold * (g / math.sqrt(d))).reshape(H * Q, D).t()                    # [D, H*Q]
    w = torch.softmax(cast(pooler.query_merge_logits), dim=0)
    v_weight = (W_v * g).reshape(H, d, D)
    W_o, b_o = cast(pooler.attn.out_proj.weight), cast(pooler.attn.out_proj.bias)
    out_bias = W_o @ (W_v @ beta + b_v) + b_o
    return FoldedPoolerParams(A=A, w=w, v_weight=v_weight, out_weight=W_o, out_bias=out_bias,
                              norm_weight=cast(pooler.output_norm.weight), norm_bias=cast(pooler.output_norm.bias),
                              norm_eps=pooler.output_norm.eps, num_heads=H, num_queries=Q)


def folded_pooler_post(y: Tensor, p: FoldedPoolerParams) -> Tensor:
    """Dense maps after pooling: y [B, H, D] (pooled normalised tokens per head) -> [B, D]."""
    dt = p.v_weight.dtype
    z = torch.einsum("bhi,hei->bhe", y.to(dt), p.v_weight).flatten(1)          # [B, D]
    merged = F.linear(z, p.out_weight, p.out_bias)
    return F.layer_norm(merged, (merged.shape[-1],), p.norm_weight, p.norm_bias, p.norm_eps)


def as_layers(xs: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """A tap buffer [L, B, S, D] (viewed, never copied) or a sequence of L tensors [B, S, D] -> list of L
    tensors [B, S, D]; the one place every pooling entry point reads its layers."""
    if isinstance(xs, Tensor):
        if xs.dim() != 4:
            raise ValueError(f"xs: expected a [L, B, S, D] tensor or a list of [B, S, D], got {list(xs.shape)}")
        return list(xs.unbind(0))
    return list(xs)


def query_pool_folded_stats(xs: Sequence[Tensor] | Tensor, A: Tensor, w: Tensor, eps: float
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """The folded core with its side outputs, fp32 math (fp64 for fp64 inputs).

    xs: L tensors [B, S, D] (or [L, B, S, D]); A: [L, D, H*Q]; w: [L, Q].
    Returns ``y`` [L, B, H, D] (dtype of xs), ``stats`` [2, L, B, S] fp32 (row mean, rstd) and
    ``lse`` [L, B, H*Q] fp32 (log-sum-exp over tokens of every logit column).
    """
    layers = as_layers(xs)
    L = len(layers)
    Q = w.shape[-1]
    HQ = A.shape[-1]
    H = HQ // Q
    ys, means, rstds, lses = [], [], [], []
    acc = torch.float64 if layers[0].dtype == torch.float64 else torch.float32
    for l in range(L):
        x = layers[l].to(acc)
        B, S, D = x.shape
        var, mean = torch.var_mean(x, dim=-1, correction=0)
        rstd = torch.rsqrt(var + eps)
        xh = (x - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
        z = xh @ A[l].to(acc)                                                  # [B, S, H*Q]
        lse = torch.logsumexp(z, dim=1)                                         # [B, H*Q]
        p = torch.exp(z - lse.unsqueeze(1))
        c = (p.view(B, S, H, Q) * w[l].to(acc)).sum(-1)                          # [B, S, H]
        ys.append(torch.einsum("bsh,bsd->bhd", c, xh))
        means.append(mean)
        rstds.append(rstd)
        lses.append(lse)
    y = torch.stack(ys).to(layers[0].dtype)
    stats = torch.stack([torch.stack(means), torch.stack(rstds)]).float()
    return y, stats, torch.stack(lses).float()


def query_pool_folded_reference(xs: Sequence[Tensor] | Tensor, A: Tensor, w: Tensor, eps: float) -> Tensor:
    """Folded learned-query pooling core, fp32 math (the fused op's reference).

    xs: L tensors [B, S, D] or one [L, B, S, D] tensor; A: [L, D, H*Q] folded logit matrices (column
    ``h*Q + q``); w: [L, Q] merge weights; eps: LayerNorm eps. Returns y [L, B, H, D] in the dtype of xs.
    Differentiable with ordinary autograd.
    """
    return query_pool_folded_stats(xs, A, w, eps)[0]
