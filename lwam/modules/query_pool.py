"""Drop-in learned-query poolers built on the fused op ``lwam::query_pool``.

* :class:`LearnedQueryPooler` -- one layer, ``[B, S, D] -> [B, D]``, the same parameters and state-dict
  keys as :class:`lwam.reference.query_pool.ReferenceQueryPooler` (it subclasses it).
* :func:`pool_layers` -- L poolers over L layers' tokens with ONE launch of the fused op, ``-> [B, L, D]``.
* :class:`MultiLayerQueryPooler` -- a ModuleList of poolers whose forward is :func:`pool_layers`.
* :func:`fold_for_inference` -- precomputes the folded matrices once for a frozen policy
  (:class:`FoldedQueryPooling`).

The fused path folds the attention (DESIGN.md, "The fused ops", 1): the parameter-side algebra (query
projection through W_q and W_k, the token-norm gain, the value projection, W_o, the constant bias terms,
the output LayerNorm) runs as ordinary differentiable torch ops on small tensors; only the token-side work
([L, B, S, D] -> [L, B, H, D]) is the fused op. When the kernel cannot run (no Triton, CPU without
``TRITON_INTERPRET=1``, fp64) or ``fused=False``, the modules compute exactly the reference module.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lwam.ops.query_pool import query_pool, query_pool_kernel_available
from lwam.reference.query_pool import (
    FoldedPoolerParams,
    ReferenceQueryPooler,
    as_layers,
    fold_pooler_params,
    folded_pooler_post,
)

__all__ = ["LearnedQueryPooler", "MultiLayerQueryPooler", "FoldedQueryPooling", "pool_layers",
           "fold_for_inference"]


class LearnedQueryPooler(ReferenceQueryPooler):
    """Learned-query attention pooling, ``forward(x [B, S, D]) -> [B, D]``, fused when possible.

    Same parameters, initialisation and state-dict keys as :class:`ReferenceQueryPooler`
    (``token_norm.{weight,bias}``, ``query_tokens``, ``attn.in_proj_weight``, ``attn.in_proj_bias``,
    ``attn.out_proj.{weight,bias}``, ``query_merge_logits``, ``output_norm.{weight,bias}``).
    ``fused=False`` (or no usable kernel) computes exactly the reference forward.
    """

    def __init__(self, dim: int, num_queries: int = 16, num_heads: int = 8, eps: float = 1e-5,
                 fused: bool = True) -> None:
        super().__init__(dim, num_queries=num_queries, num_heads=num_heads, eps=eps)
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, S, D] -> [B, D]."""
        return pool_layers([self], [x], fused=self.fused)[:, 0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_queries={self.num_queries}, num_heads={self.num_heads}, fused={self.fused}"


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pool_layers(poolers: Sequence[nn.Module], xs: Sequence[Tensor] | Tensor, fused: bool = True) -> Tensor:
    """Pool L layers with their own poolers: ``poolers[l](xs[l])`` for every l, stacked to [B, L, D].

    poolers: L :class:`LearnedQueryPooler` (or :class:`ReferenceQueryPooler`) sharing dim, heads, queries
    and eps; xs: L tensors [B, S, D] or a tap buffer [L, B, S, D] (read in place).
    With ``fused`` and a usable kernel, all L layers go through one launch of ``lwam::query_pool``;
    otherwise each layer runs the reference forward.
    """
    layers = as_layers(xs)
    poolers = list(poolers)
    if len(poolers) != len(layers) or not layers:
        raise ValueError(f"pool_layers: expected one pooler per layer, got {len(poolers)} poolers "
                         f"for {len(layers)} layers")
    p0 = poolers[0]
    for i, p in enumerate(poolers):
        if (p.dim, p.num_heads, p.num_queries, p.token_norm.eps) != (p0.dim, p0.num_heads, p0.num_queries,
                                                                     p0.token_norm.eps):
            raise ValueError(f"poolers[{i}]: (dim, heads, queries, eps) = "
                             f"{(p.dim, p.num_heads, p.num_queries, p.token_norm.eps)} differs from poolers[0]'s "
                             f"{(p0.dim, p0.num_heads, p0.num_queries, p0.token_norm.eps)}")
    for i, x in enumerate(layers):
        if x.dim() != 3 or x.shape[-1] != p0.dim:
            raise ValueError(f"xs[{i}]: expected [B, S, {p0.dim}], got {list(x.shape)}")
    if not (fused and query_pool_kernel_available(layers[0])):
        return torch.stack([ReferenceQueryPooler.forward(p, x) for p, x in zip(poolers, layers)], dim=1)

    acc = _acc_dtype(p0.query_tokens)
    folded = [fold_pooler_params(p, dtype=acc) for p in poolers]
    A = torch.stack([f.A for f in folded])                     # [L, D, H*Q]
    w = torch.stack([f.w for f in folded])                     # [L, Q]
    y = query_pool(layers, A, w, p0.token_norm.eps)            # [L, B, H, D]
    out = torch.stack([folded_pooler_post(y[l], f) for l, f in enumerate(folded)], dim=1)
    return out.to(layers[0].dtype)


class MultiLayerQueryPooler(nn.Module):
    """L learned-query poolers, one per tapped layer: ``forward(xs) -> [B, L, D]`` with one fused launch.

    xs: L tensors [B, S, D] or a tap buffer [L, B, S, D]. State-dict keys ``poolers.{l}.<pooler keys>``.
    """

    def __init__(self, num_layers: int, dim: int, num_queries: int = 16, num_heads: int = 8,
                 eps: float = 1e-5, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        self.poolers = nn.ModuleList(
            LearnedQueryPooler(dim, num_queries, num_heads, eps=eps, fused=fused) for _ in range(num_layers))

    def forward(self, xs: Sequence[Tensor] | Tensor) -> Tensor:
        return pool_layers(list(self.poolers), xs, fused=self.fused)


class FoldedQueryPooling(nn.Module):
    """Frozen, precomputed form of L poolers for inference (built by :func:`fold_for_inference`).

    Buffers (fp32, or fp64 for fp64 poolers; move/cast with ``.to()``): ``A`` [L, D, H*Q], ``w`` [L, Q],
    ``v_weight`` [L, H, d, D], ``out_weight`` [L, D, D], ``out_bias`` [L, D], ``norm_weight`` and
    ``norm_bias`` [L, D]. ``forward(xs) -> [B, L, D]`` equals ``pool_layers(poolers, xs)`` for the poolers'
    parameters at folding time; parameter updates afterwards are not seen (fold again).
    Always uses the folded op (the kernel, or its reference where no kernel runs).
    """

    def __init__(self, folded: Sequence[FoldedPoolerParams], eps: float) -> None:
        super().__init__()
        f0 = folded[0]
        self.num_heads, self.num_queries, self.eps, self.norm_eps = f0.num_heads, f0.num_queries, eps, f0.norm_eps
        for name in ("A", "w", "v_weight", "out_weight", "out_bias", "norm_weight", "norm_bias"):
            self.register_buffer(name, torch.stack([getattr(f, name).detach() for f in folded]).contiguous())

    def forward(self, xs: Sequence[Tensor] | Tensor) -> Tensor:
        """xs: L tensors [B, S, D] or [L, B, S, D] -> [B, L, D] (dtype of xs)."""
        layers = as_layers(xs)
        y = query_pool(layers, self.A, self.w, self.eps)                                    # [L, B, H, D]
        z = torch.einsum("lbhi,lhei->lbhe", y.to(self.v_weight.dtype), self.v_weight).flatten(2)  # [L, B, D]
        merged = torch.baddbmm(self.out_bias.unsqueeze(1), z, self.out_weight.transpose(1, 2))
        out = F.layer_norm(merged, (merged.shape[-1],), eps=self.norm_eps)
        out = out * self.norm_weight.unsqueeze(1) + self.norm_bias.unsqueeze(1)
        return out.transpose(0, 1).to(layers[0].dtype)


@torch.no_grad()
def fold_for_inference(poolers: Sequence[nn.Module] | MultiLayerQueryPooler) -> FoldedQueryPooling:
    """Fold L poolers' parameters once (for a frozen inference policy) into a :class:`FoldedQueryPooling`
    whose forward skips all per-call parameter algebra: only the fused op, one batched value/output
    projection and the output LayerNorm remain."""
    if isinstance(poolers, MultiLayerQueryPooler):
        poolers = list(poolers.poolers)
    poolers = list(poolers)
    acc = _acc_dtype(poolers[0].query_tokens)
    return FoldedQueryPooling([fold_pooler_params(p, dtype=acc) for p in poolers], poolers[0].token_norm.eps)
