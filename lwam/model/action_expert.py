"""StateFusionActionExpert (SFAE): pools the adapted states of the tapped DiT layers with learned
queries, fuses them and regresses a whole action chunk in one forward pass.

Per tapped layer l: LearnedQueryPooler (LN -> 16 learned queries x 8-head attention -> softmax-weighted
merge -> LN) [B, S, D] -> [B, D], then a compressor LN -> Linear(D, C) -> GELU(tanh) -> Linear(C, C).
The L compressed vectors are concatenated [B, L*C] -> LN -> Linear(L*C, W) -> residual MLP block ->
+ step-position embedding per chunk step -> LN -> Linear(W, W) -> GELU -> Linear(W, A) => [B, H, A].
Every GELU is the tanh approximation (:mod:`lwam.model.layers`), and the step-position code is
``[cos | sin]`` computed in float64, then cast, as in the published model.
Key names match the published checkpoint's ``state_fusion_action_expert`` entry.
"""
from __future__ import annotations

from collections.abc import Sequence

import copy

import torch
from torch import nn

from lwam.config import ActionExpertConfig
from lwam.model.layers import GELU, gelu, sinusoid
from lwam.modules.query_pool import FoldedQueryPooling, LearnedQueryPooler, fold_for_inference, pool_layers


class _PoolerSlot(nn.Module):
    """Holds a layer's pooler under the name ``adapted`` (the published key layout)."""

    def __init__(self, pooler: LearnedQueryPooler):
        super().__init__()
        self.adapted = pooler


class Compressor(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """x + fc2(GELU_tanh(fc1(LN(x))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(gelu(self.fc1(self.norm(x))))


def step_sinusoid(num_steps: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Position code of chunk steps 0..num_steps-1 -> float64 [num_steps, dim], laid out [cos | sin]."""
    return sinusoid(torch.arange(num_steps, dtype=torch.float64, device=device), dim)


class StateFusionActionExpert(nn.Module):
    """Adapted tapped states (L tensors [B, S, D]) -> normalised action chunk [B, H, A]."""

    def __init__(self, cfg: ActionExpertConfig, dim: int, num_layers: int, chunk_size: int, action_dim: int):
        super().__init__()
        self.cfg = cfg
        self.chunk_size = chunk_size
        self.action_dim = action_dim
        # Which pooling arithmetic runs is ImplConfig.fused_pooling, set through LightWAM.set_impl.
        self.fused_pooling = True
        self.layer_poolers = nn.ModuleList(
            _PoolerSlot(LearnedQueryPooler(dim, cfg.num_queries, cfg.num_heads)) for _ in range(num_layers))
        self.layer_compressors = nn.ModuleList(Compressor(dim, cfg.compress_dim) for _ in range(num_layers))
        fused = num_layers * cfg.compress_dim
        w = cfg.hidden_dim
        self.fused_norm = nn.LayerNorm(fused)
        self.fused_proj = nn.Linear(fused, w)
        self.trunk = nn.ModuleList([ResidualMLP(w)])
        self.step_pos_proj = nn.Sequential(nn.LayerNorm(cfg.step_embed_dim), nn.Linear(cfg.step_embed_dim, w),
                                           GELU(), nn.Linear(w, w))
        self.output_norm = nn.LayerNorm(w)
        self.output = nn.Sequential(nn.Linear(w, w), GELU(), nn.Linear(w, action_dim))

    @property
    def poolers(self) -> list[LearnedQueryPooler]:
        return [slot.adapted for slot in self.layer_poolers]

    def pool(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """L tensors [B, S, D] -> [B, L, D], all layers in one fused launch when enabled."""
        return pool_layers(self.poolers, states, fused=self.fused_pooling)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, L, D] -> actions [B, H, A]."""
        z = torch.cat([c(pooled[:, i]) for i, c in enumerate(self.layer_compressors)], dim=-1)
        z = self.fused_proj(self.fused_norm(z))
        for block in self.trunk:
            z = block(z)
        # Built per call in float64 (a buffer would be rounded by model.to(dtype)); compile folds it.
        code = step_sinusoid(self.chunk_size, self.cfg.step_embed_dim, device=z.device)
        steps = self.step_pos_proj(code.to(z.dtype))  # [H, W]
        h = z[:, None, :] + steps[None]
        return self.output(self.output_norm(h))

    def inference_copy(self, fold_pooling: bool = True) -> tuple["StateFusionActionExpert", FoldedQueryPooling | None]:
        """A copy for a frozen policy. With ``fold_pooling``: (the copy without its poolers, which are not
        copied, and the poolers' folded matrices computed once in fp32, :func:`fold_for_inference`);
        otherwise (a full copy, None). Pool with the folded module, then call the copy's :meth:`head`."""
        if not fold_pooling:
            return copy.deepcopy(self), None
        folded = fold_for_inference(self.poolers)
        out = copy.deepcopy(self, {id(self.layer_poolers): None})
        del out.layer_poolers
        return out, folded

    def forward(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(states) != len(self.layer_poolers):
            raise ValueError(f"states: expected {len(self.layer_poolers)} tapped layers, got {len(states)}")
        return self.head(self.pool(states))
