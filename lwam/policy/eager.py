"""EagerPolicy: the plain :class:`~lwam.model.lightwam.LightWAM` behind the same interface as
:class:`lwam.policy.compiled.Policy`, for debugging (no transformation, no compilation, no static buffers).

It implements ``predict_batch`` and ``warmup``; the rest of the contract (``predict``,
``predict_action_chunk``, ``select_action``, ``reset``, ``executed_steps``, ...) is
:class:`lwam.policy.base.ModelPolicy`'s. Its actions are the reference the Policy's transformations are
checked against (tests/test_inference.py).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lwam.errors import UnknownInstructionError
from lwam.policy.base import ModelPolicy
from lwam.policy.inputs import make_normalizer, prepare_images

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
        from lwam.data.lerobot import ACTION_KEY, STATE_KEY

        factor = self.cfg.vae.spatial_factor * self.cfg.dit.patch_size[1]
        x = prepare_images(images, True, factor)
        is_numpy = isinstance(proprio, np.ndarray)
        p = torch.as_tensor(np.asarray(proprio)) if is_numpy else proprio
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"proprio: expected a torch.Tensor or numpy array, got {type(proprio).__name__}")
        if p.dim() != 2 or p.shape != (x.shape[0], self.cfg.proprio_dim):
            raise ValueError(f"proprio: expected [B={x.shape[0]}, {self.cfg.proprio_dim}], got {tuple(p.shape)}")
        instr = [instructions] * x.shape[0] if isinstance(instructions, str) else list(instructions)
        unknown = [s for s in instr if not self.can_answer(s)]
        if unknown:
            raise UnknownInstructionError(f"instruction: no cached text context for {unknown[:3]} and no text "
                                          f"encoder configured")
        p = p.detach().float().cpu()
        if self.normalizer is not None:
            p = self.normalizer.apply(STATE_KEY, p).float()
        out = self.model.predict_actions(x.to(self.device), p.to(self.device), instruction=instr).float().cpu()
        if self.normalizer is not None:
            out = self.normalizer.invert(ACTION_KEY, out)
        return out.numpy() if is_numpy else out

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
