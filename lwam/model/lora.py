"""Low-rank adapters (LoRA) for the DiT's linear layers.

A target linear ``y = W x + b`` becomes ``y = W x + b + scale * up(down(x))`` with
``down: in -> r`` (kaiming-uniform, a = sqrt 5) and ``up: r -> out`` (zeros), no biases, no dropout.
The LoRA pair lives beside the frozen linear (``self_attn.lora_q`` next to ``self_attn.q``), which is the
key layout of the published Light-WAM checkpoint.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRA(nn.Module):
    """The trainable low-rank delta. ``forward(x [..., in]) -> [..., out]`` already scaled."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.down_proj = nn.Linear(in_features, rank, bias=False)
        self.up_proj = nn.Linear(rank, out_features, bias=False)
        self.scale = scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(self.down_proj(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``scale * up @ down`` [out, in], in fp32."""
        return (self.up_proj.weight.float() @ self.down_proj.weight.float()) * self.scale


def linear_with_lora(linear: nn.Linear, lora: LoRA | None, x: torch.Tensor) -> torch.Tensor:
    y = linear(x)
    return y if lora is None else y + lora(x)


@torch.no_grad()
def merge_lora_(linear: nn.Linear, lora: LoRA) -> None:
    """Fold ``lora`` into ``linear.weight`` in place (W + scale * up @ down), computed in fp32."""
    w = linear.weight
    w.copy_((w.float() + lora.delta_weight().to(w.device)).to(w.dtype))
