"""EagerPolicy: the plain :class:`~lwam.model.lightwam.LightWAM` behind the same interface as
:class:`lwam.inference.Policy`, for debugging (no transformation, no compilation, no static buffers).

It answers the same calls with the same inputs and outputs: ``predict(image, instruction, proprio)``,
``predict_batch``, ``predict_action_chunk(observation)``, ``select_action(observation)``, ``reset()``,
``observation_spec()``, ``executed_steps``, ``instructions``, ``can_answer``, ``warmup``. Its actions are the
reference the Policy's transformations are checked against (tests/test_inference.py).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lwam.inference import UnknownInstructionError, _make_normalizer, prepare_images

__all__ = ["EagerPolicy"]


class EagerPolicy:
    """Observation -> de-normalised action chunk with the eager model (``model.predict_actions``)."""

    def __init__(self, model: torch.nn.Module, stats: Any = None, device: str | torch.device | None = None):
        from lwam.observation import ActionQueue

        dev = torch.device(device) if device is not None else model.proprio_encoder.weight.device
        self.model = model.eval().to(dev)
        self.cfg = model.cfg
        self.normalizer = _make_normalizer(stats, self.cfg)
        self._executed_steps = self.cfg.data.executed_steps
        self._action_queue = ActionQueue()

    @property
    def device(self) -> torch.device:
        return self.model.proprio_encoder.weight.device

    @property
    def text_encoder(self):
        return self.model.text.encoder if getattr(self.model, "text", None) is not None else None

    @property
    def instructions(self) -> list[str]:
        return sorted(self.model.text.state()) if getattr(self.model, "text", None) is not None else []

    def can_answer(self, instruction: str) -> bool:
        return instruction in self.model.text or self.text_encoder is not None

    @property
    def executed_steps(self) -> int:
        return self._executed_steps

    @executed_steps.setter
    def executed_steps(self, n: int) -> None:
        from lwam.observation import check_executed_steps
        self._executed_steps = check_executed_steps(n, self.cfg.chunk_size)

    def observation_spec(self) -> dict[str, dict[str, Any]]:
        from lwam.observation import observation_spec
        return observation_spec(self.cfg.data, self.cfg.proprio_dim)

    # --- raw-array queries (as lwam.inference.Policy) -------------------------------------------
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

    def predict(self, images: Any, instruction: str, proprio: Any) -> Any:
        """images [3, H, W] float in [-1, 1] or uint8 [H, W, 3]; instruction: str; proprio [P] raw ->
        de-normalised actions [H, A] float32."""
        if not isinstance(instruction, str):
            raise TypeError(f"instruction: expected a str, got {type(instruction).__name__}")
        factor = self.cfg.vae.spatial_factor * self.cfg.dit.patch_size[1]
        prepare_images(images, False, factor)  # the unbatched shape check
        if tuple(np.shape(proprio)) != (self.cfg.proprio_dim,):
            raise ValueError(f"proprio: expected [{self.cfg.proprio_dim}], got {tuple(np.shape(proprio))}")
        return self.predict_batch(images[None], [instruction], proprio[None])[0]

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

    # --- robot-facing API (same as lwam.inference.Policy) ----------------------------------------
    def predict_action_chunk(self, observation: Mapping[str, Any]) -> Any:
        """LeRobot-style observation dict -> de-normalised actions [H, A] (or [B, H, A])."""
        from lwam.observation import parse_observation

        obs = parse_observation(observation, self.cfg.data, self.cfg.proprio_dim)
        out = self.predict_batch(obs.images, obs.instructions, obs.proprio)
        out = out if obs.batched else out[0]
        return torch.from_numpy(out) if obs.torch_out else out

    def select_action(self, observation: Mapping[str, Any]) -> Any:
        return self._action_queue.pop(lambda: self.predict_action_chunk(observation), self.executed_steps)

    def reset(self) -> None:
        self._action_queue.clear()

    def __repr__(self) -> str:
        return f"EagerPolicy(preset={self.cfg.name!r}, device={self.device})"
