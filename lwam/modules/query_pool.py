"""Drop-in learned-query poolers built on the fused op ``lwam::query_pool``.

* :class:`LearnedQueryPooler` -- one layer, ``[B, S, D] -> [B, D]``, the same parameters and state-dict
  keys as :class:`lwam.reference.query_pool.ReferenceQueryPooler` (it subclasses it).
* :func:`pool_layers` -- L poolers over L layers' tokens with ONE launch of the fused op, ``-> [B, L, D]``.
* :class:`MultiLayerQueryPooler` -- a ModuleList of poolers whose forward is :func:`pool_layers`.
* :func:`fold_for_inference` -- precomputes the folded matrices once for a frozen policy
  (:class:`FoldedQueryPooling`).
* :func:`apply_fused_pooling` -- swaps :class:`LearnedQueryPooler` into a foreign model tree in place
  (every module with the learned-query pooler's structure, e.g. the published Light-WAM poolers), keeping
  its parameter objects, and returns the names it replaced.

The fused path folds the attention (docs/design.md, "Fused pooling"): the parameter-side algebra (query
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

from lwam._logging import logger
from lwam.ops.query_pool import query_pool, query_pool_kernel_available
from lwam.reference.query_pool import (
    FoldedPoolerParams,
    ReferenceQueryPooler,
    as_layers,
    fold_pooler_params,
    folded_pooler_post,
    pooler_shape,
)

__all__ = ["LearnedQueryPooler", "MultiLayerQueryPooler", "FoldedQueryPooling", "pool_layers",
           "fold_for_inference", "apply_fused_pooling", "is_learned_query_pooler"]


class LearnedQueryPooler(ReferenceQueryPooler):
    """Learned-query attention pooling, ``forward(x [B, S, D]) -> [B, D]``, fused when possible.

    Same parameters, initialisation and state-dict keys as :class:`ReferenceQueryPooler`
    (``token_norm.{weight,bias}``, ``query_tokens``, ``attn.in_proj_weight``, ``attn.in_proj_bias``,
    ``attn.out_proj.{weight,bias}``, ``query_merge_logits``, ``output_norm.{weight,bias}``).
    ``fused=False`` (or no usable kernel) computes exactly the reference forward. The constructor takes
    the published Light-WAM pooler's arguments (``embed_dim, num_queries, num_heads, merge_dim,
    merge_num_slots``) plus the keywords ``eps`` and ``fused``.
    """

    def __init__(self, embed_dim: int, num_queries: int = 16, num_heads: int = 8, merge_dim: int | None = None,
                 merge_num_slots: int = 2, *, eps: float = 1e-5, fused: bool = True) -> None:
        super().__init__(embed_dim, num_queries, num_heads, merge_dim, merge_num_slots, eps=eps)
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

    poolers: L modules with the learned-query pooler's parameters (lwam's, or the published Light-WAM
    ``LearnedQueryPooler`` with ``merge_dim=None``) sharing dim, heads, queries and eps; xs: L tensors
    [B, S, D] or a tap buffer [L, B, S, D] (read in place).
    With ``fused`` and a usable kernel, all L layers go through one launch of ``lwam::query_pool``;
    otherwise each layer runs the reference forward.
    """
    layers = as_layers(xs)
    poolers = list(poolers)
    if len(poolers) != len(layers) or not layers:
        raise ValueError(f"pool_layers: expected one pooler per layer, got {len(poolers)} poolers "
                         f"for {len(layers)} layers")
    p0 = poolers[0]
    shape0 = (*pooler_shape(p0), p0.token_norm.eps)
    for i, p in enumerate(poolers):
        if getattr(p, "query_merge_projector", None) is not None:
            raise ValueError(f"poolers[{i}]: a slot-merge pooler (merge_dim set) cannot be fused")
        shape = (*pooler_shape(p), p.token_norm.eps)
        if shape != shape0:
            raise ValueError(f"poolers[{i}]: (dim, heads, queries, eps) = {shape} differs from poolers[0]'s {shape0}")
    dim = shape0[0]
    for i, x in enumerate(layers):
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"xs[{i}]: expected [B, S, {dim}], got {list(x.shape)}")
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


def is_learned_query_pooler(module: nn.Module) -> bool:
    """Whether ``module`` has the structure of a learned-query pooler that :class:`LearnedQueryPooler`
    computes exactly: ``query_tokens`` [Q, D]; ``token_norm`` and ``output_norm`` affine LayerNorm(D);
    ``attn`` a batch-first ``nn.MultiheadAttention(D, H)`` with biases, no bias_k/zero-attention, no dropout;
    ``query_merge_logits`` [Q]; no slot-merge projector. Parameter names, not class names, decide."""
    qt, attn = getattr(module, "query_tokens", None), getattr(module, "attn", None)
    if not (isinstance(qt, nn.Parameter) and qt.dim() == 2 and isinstance(attn, nn.MultiheadAttention)):
        return False
    q, d = qt.shape
    norms_ok = all(isinstance(n, nn.LayerNorm) and tuple(n.normalized_shape) == (d,) and n.elementwise_affine
                   and n.bias is not None
                   for n in (getattr(module, "token_norm", None), getattr(module, "output_norm", None)))
    logits = getattr(module, "query_merge_logits", None)
    return (norms_ok and attn.batch_first and attn.embed_dim == d and attn._qkv_same_embed_dim
            and attn.in_proj_bias is not None and attn.bias_k is None and not attn.add_zero_attn
            and attn.dropout == 0.0 and isinstance(logits, nn.Parameter) and tuple(logits.shape) == (q,)
            and getattr(module, "query_merge_projector", None) is None)


def _fused_twin(old: nn.Module, fused: bool) -> LearnedQueryPooler | None:
    """A :class:`LearnedQueryPooler` that holds ``old``'s own parameter objects, or None when ``old`` has
    parameters or buffers beyond the pooler's (its forward might use them)."""
    dim, heads, queries = pooler_shape(old)
    with torch.device("meta"):
        new = LearnedQueryPooler(dim, queries, heads, eps=old.token_norm.eps, fused=fused)
    new.output_norm.eps = old.output_norm.eps
    old_params = dict(old.named_parameters())
    new_params = dict(new.named_parameters())
    if set(old_params) != set(new_params) or any(True for _ in old.buffers()):
        return None
    if any(old_params[k].shape != v.shape for k, v in new_params.items()):
        return None
    for name, p in old_params.items():
        owner, _, attr = name.rpartition(".")
        setattr(new.get_submodule(owner) if owner else new, attr, p)
    return new.train(old.training)


def apply_fused_pooling(model: nn.Module, fused: bool = True) -> list[str]:
    """Replace, in place, every learned-query pooler under ``model`` (found by structure with
    :func:`is_learned_query_pooler`, e.g. the published Light-WAM ``LearnedQueryPooler`` modules under
    ``layer_poolers.{l}.adapted``) by a :class:`LearnedQueryPooler` that computes the same function
    through the fused op. The new modules hold the old parameter objects (optimisers, hooks on
    parameters and tied weights stay valid); state-dict keys are unchanged. Returns the qualified names of
    the replaced modules and logs one line saying what was replaced. ``model`` itself is never replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    replaced: list[str] = []
    skipped: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, LearnedQueryPooler) or not is_learned_query_pooler(module):
            continue
        if any(name.startswith(r + ".") for r in replaced):
            continue
        new = _fused_twin(module, fused)
        if new is None:
            skipped.append(name)
            continue
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, new)
        replaced.append(name)
    logger.info(f"apply_fused_pooling: replaced {len(replaced)} learned-query pooler(s)"
                + (f" ({', '.join(replaced)})" if replaced else "")
                + (f"; left {len(skipped)} with extra parameters or buffers ({', '.join(skipped)})" if skipped else ""))
    return replaced
