"""EagerPolicy: the plain :class:`~lwam.model.lightwam.LightWAM` behind the same interface as
:class:`lwam.policy.compiled.Policy`, for debugging (no transformation, no compilation, no static buffers).

It implements ``predict_batch`` and ``warmup``; the rest of the contract (``predict``,
``predict_action_chunk``, ``select_action``, ``reset``, ``executed_steps``, ...) is
:class:`lwam.policy.base.ModelPolicy`'s. Its actions are the reference the Policy's transformations are
checked against (tests/test_inference.py).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from lwam.policy.base import ModelPolicy
from lwam.policy.inputs import make_normalizer

__all__ = ["EagerPolicy"]


class EagerPolicy(ModelPolicy):
    """Observation -> de-normalised action chunk with the eager model (``model.predict_actions``)."""

    def __init__(self, model: torch.nn.Module, stats: Any = None, device: str | torch.device | None = None):
        dev = torch.device(device) if device is not None else model.proprio_encoder.weight.device
        self.model = model.eval().to(dev)
        self.cfg = model.cfg
        self.text = model.text
        self.normalizer = make_normalizer(stats, self.cfg)

    @property
    def device(self) -> torch.device:
        return self.model.proprio_encoder.weight.device

    @torch.no_grad()
    def predict_batch(self, images: Any, instructions: Sequence[str] | str, proprio: Any) -> Any:
        """images [B, 3, H, W] float in [-1, 1] or uint8 [B, H, W, 3]; instructions: B str (or one);
        proprio [B, P] raw -> de-normalised actions [B, H, A] float32 (numpy if proprio is numpy)."""
        x, instr, prop, is_numpy = self._inputs(images, instructions, proprio)
        out = self.model.predict_actions(x.to(self.device), prop.to(self.device), instruction=instr)
        return self._outputs(out, is_numpy)

    def warmup(self, batch_size: int = 1, image_hw: tuple[int, int] | None = None,
               instruction: str | None = None) -> float:
        """One pass at this batch size (nothing to compile). Returns the seconds it took."""
        h, w = image_hw or (self.cfg.data.image_height, self.cfg.data.image_width)
        t0 = time.perf_counter()
        with torch.no_grad():
            prop = torch.zeros(batch_size, self.cfg.proprio_dim, device=self.device)
            if instruction is None:
                ctx = torch.zeros(batch_size, self.cfg.text.max_tokens, self.cfg.text.dim, device=self.device)
                self.model.predict_actions(torch.zeros(batch_size, 3, h, w, device=self.device), prop, text_context=ctx)
            else:
                self.model.predict_actions(torch.zeros(batch_size, 3, h, w, device=self.device), prop,
                                           instruction=[instruction] * batch_size)
        return time.perf_counter() - t0

    def __repr__(self) -> str:
        return f"EagerPolicy(preset={self.cfg.name!r}, device={self.device})"
