"""The robot-facing policy contract, held once.

:class:`RobotPolicy` is what a robot loop talks to (as openpi's ``BasePolicy`` and LeRobot's
``PreTrainedPolicy`` are): ``predict_action_chunk(observation)`` -> actions ``[H, A]`` (``[B, H, A]`` for a
batched observation), ``select_action(observation)`` -> the next action ``[A]`` from a queue refilled with
the first :attr:`~RobotPolicy.executed_steps` actions of a chunk, ``reset()`` at every episode start. The
observation is a LeRobot-style dict (lwam.policy.observation).

:class:`ModelPolicy` is the base of the in-process policies (compiled :class:`lwam.policy.compiled.Policy`,
eager :class:`lwam.policy.eager.EagerPolicy`): they implement only ``predict_batch(images, instructions,
proprio)``; parsing the observation, the unbatched ``predict`` and the text-cache questions live here.
:class:`lwam.policy.remote.RemotePolicy` implements ``predict_action_chunk`` itself (one request to a server).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lwam.policy.observation import ActionQueue, check_executed_steps

__all__ = ["RobotPolicy", "ModelPolicy"]


class RobotPolicy(ABC):
    """Observation -> action chunk, with the action queue a robot loop consumes one action per control step.

    Subclasses give :attr:`chunk_size`, :attr:`default_executed_steps` and :meth:`predict_action_chunk`."""

    _executed_steps: int | None = None
    _queue: ActionQueue | None = None
    _scheduler: Any = None  # a ChunkScheduler while asynchronous execution is on

    @property
    @abstractmethod
    def chunk_size(self) -> int:
        """H: actions per chunk."""

    @property
    @abstractmethod
    def default_executed_steps(self) -> int:
        """The executed steps the policy was trained and evaluated with (a checkpoint's, a server's)."""

    @abstractmethod
    def predict_action_chunk(self, observation: Mapping[str, Any]) -> Any:
        """LeRobot-style observation -> de-normalised actions [H, A] float32 (or [B, H, A] batched)."""

    @property
    def executed_steps(self) -> int:
        """Actions :meth:`select_action` executes from each chunk before the next query (1 .. H); assignable."""
        return self._executed_steps or self.default_executed_steps

    @executed_steps.setter
    def executed_steps(self, n: int) -> None:
        self._executed_steps = check_executed_steps(n, self.chunk_size)

    def select_action(self, observation: Mapping[str, Any]) -> Any:
        """The next action [A] (or [B, A]). Synchronous (default): every :attr:`executed_steps` calls one
        :meth:`predict_action_chunk` refills the queue; the calls between only pop it. Asynchronous
        (:meth:`start_async`): the next chunk is computed on a worker thread while the robot executes, and
        aligned to the actions executed meanwhile (lwam.policy.chunking)."""
        if self._scheduler is not None:
            return self._scheduler.step(observation, block=True)
        if self._queue is None:
            self._queue = ActionQueue()
        return self._queue.pop(lambda: self.predict_action_chunk(observation), self.executed_steps)

    def start_async(self, lead_steps: int | None = None, control_hz: float | None = None,
                    blend: str = "none") -> None:
        """Asynchronous chunk execution from now on: the next chunk is requested when ``lead_steps`` actions
        of the :attr:`executed_steps` horizon remain (None: ``ceil(measured latency x control_hz)``), its
        stale prefix is dropped on arrival, ``blend="linear"`` mixes the overlap. :attr:`async_stats` counts
        requests, waits, dropped actions."""
        from lwam.policy.chunking import ChunkScheduler, ThreadedRequests

        self.stop_async()
        self._scheduler = ChunkScheduler(ThreadedRequests(self.predict_action_chunk), lambda: self.executed_steps,
                                         self.chunk_size, lead_steps=lead_steps, control_hz=control_hz,
                                         past_horizon=True, blend=blend)

    def stop_async(self) -> None:
        """Back to synchronous execution (a pending request finishes first; its answer is dropped)."""
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    @property
    def async_stats(self) -> dict[str, Any] | None:
        """The asynchronous scheduler's counts since the last :meth:`reset` (None when synchronous)."""
        return self._scheduler.stats.as_dict() if self._scheduler is not None else None

    def reset(self) -> None:
        """Forget the queued actions (call at the start of every episode)."""
        if self._queue is not None:
            self._queue.clear()
        if self._scheduler is not None:
            self._scheduler.reset()

    def close(self) -> None:
        """Release what the policy holds (worker threads here; subclasses add connections)."""
        self.stop_async()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ModelPolicy(RobotPolicy):
    """An in-process policy over a model config ``cfg`` and a text-context cache ``text``
    (:class:`~lwam.model.text.TextContextCache`). Subclasses implement :meth:`predict_batch`."""

    cfg: Any
    text: Any
    normalizer: Any = None

    @abstractmethod
    def predict_batch(self, images: Any, instructions: Sequence[str] | str, proprio: Any) -> Any:
        """images [B, 3, H, W] float in [-1, 1] or uint8 [B, H, W, 3]; instructions: B str (or one str);
        proprio [B, P] raw -> de-normalised actions [B, H, A] float32 (numpy if proprio is numpy)."""

    @property
    def chunk_size(self) -> int:
        return int(self.cfg.chunk_size)

    @property
    def default_executed_steps(self) -> int:
        return int(self.cfg.data.executed_steps)

    def _resolve_text(self, instructions: Sequence[str]) -> None:
        """Refuse instructions the policy cannot answer (the compiled Policy encodes missing ones when it
        has a text encoder)."""
        unknown = [s for s in dict.fromkeys(instructions) if not self.can_answer(s)]
        if unknown:
            from lwam.errors import UnknownInstructionError
            raise UnknownInstructionError(f"instruction: no cached text context for {unknown[:3]} and no text "
                                          f"encoder configured")

    def _inputs(self, images: Any, instructions: Any, proprio: Any
                ) -> tuple[torch.Tensor, list[str], torch.Tensor, bool]:
        """Check a batch and bring it to the model's form: images float [B, 3, H, W] in [-1, 1] (CPU),
        the B instructions, proprio [B, P] fp32 normalised, whether the caller gave numpy."""
        from lwam.policy.inputs import prepare_images
        from lwam.validate import check_finite, check_image_size, check_unit_range

        cfg = self.cfg
        x = prepare_images(images, True, cfg.vae.spatial_factor * cfg.dit.patch_size[1])
        check_image_size(x.shape[2], x.shape[3], cfg)
        check_unit_range(x, "images")
        b = x.shape[0]
        is_numpy = isinstance(proprio, np.ndarray)
        if is_numpy:
            proprio = torch.from_numpy(np.asarray(proprio))
        if not isinstance(proprio, torch.Tensor):
            raise TypeError(f"proprio: expected a torch.Tensor or numpy array, got {type(proprio).__name__}")
        p = cfg.proprio_dim
        if proprio.dim() != 2 or proprio.shape[0] != b or proprio.shape[1] != p:
            raise ValueError(f"proprio: expected [B={b}, {p}], got {tuple(proprio.shape)}")
        if not (proprio.is_floating_point() or proprio.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"proprio: expected a float tensor, got {proprio.dtype}")
        check_finite(proprio, "proprio")
        if isinstance(instructions, str):
            instructions = [instructions] * b
        if not isinstance(instructions, Sequence) or not all(isinstance(s, str) for s in instructions):
            raise TypeError(f"instructions: expected a str or a list of {b} str, got {type(instructions).__name__}")
        instructions = list(instructions)
        if len(instructions) != b:
            raise ValueError(f"instructions: expected {b} (one per image), got {len(instructions)}")
        self._resolve_text(instructions)
        prop = proprio.detach().cpu().float()
        if self.normalizer is not None:
            from lwam.data.lerobot import STATE_KEY
            prop = self.normalizer.apply(STATE_KEY, prop).float()
        return x, instructions, prop, is_numpy

    def _outputs(self, out: torch.Tensor, is_numpy: bool) -> Any:
        """Normalised actions [B, H, A] (any device/dtype) -> de-normalised fp32 on the CPU, numpy if asked."""
        out = out.to("cpu", torch.float32, copy=True)
        if self.normalizer is not None:
            from lwam.data.lerobot import ACTION_KEY
            out = self.normalizer.invert(ACTION_KEY, out)
        return out.numpy() if is_numpy else out

    def predict(self, images: Any, instruction: str, proprio: Any) -> Any:
        """images [3, H, W] float in [-1, 1] or uint8 [H, W, 3]; instruction: str; proprio [P] raw ->
        de-normalised actions [H, A] float32 (numpy if proprio is numpy)."""
        from lwam.policy.inputs import prepare_images

        if not isinstance(instruction, str):
            raise TypeError(f"instruction: expected a str, got {type(instruction).__name__}")
        factor = self.cfg.vae.spatial_factor * self.cfg.dit.patch_size[1]
        prepare_images(images, False, factor)  # the unbatched shape check, with its own message
        if not isinstance(proprio, (np.ndarray, torch.Tensor)):
            raise TypeError(f"proprio: expected a torch.Tensor or numpy array, got {type(proprio).__name__}")
        p = self.cfg.proprio_dim
        if tuple(proprio.shape) != (p,):
            raise ValueError(f"proprio: expected [{p}], got {tuple(proprio.shape)}")
        return self.predict_batch(images[None], [instruction], proprio[None])[0]

    def predict_action_chunk(self, observation: Mapping[str, Any]) -> Any:
        """LeRobot-style observation dict (``observation.images.<camera>``, ``observation.state``, ``task``
        or ``prompt``) -> de-normalised actions [H, A] float32, or [B, H, A] for a batched observation (numpy,
        or a torch tensor when ``observation.state`` is one). The cameras are composed and rotated as in
        training, then :meth:`predict_batch` answers."""
        from lwam.policy.observation import parse_observation

        obs = parse_observation(observation, self.cfg.data, self.cfg.proprio_dim)
        out = self.predict_batch(obs.images, obs.instructions, obs.proprio)
        out = out if obs.batched else out[0]
        return torch.from_numpy(out) if obs.torch_out else out

    def observation_spec(self) -> dict[str, dict[str, Any]]:
        """``{key: {"shape", "dtype"}}`` of every array of an observation (see lwam.policy.observation)."""
        from lwam.policy.observation import observation_spec
        return observation_spec(self.cfg.data, self.cfg.proprio_dim)

    @property
    def instructions(self) -> list[str]:
        """The instructions with a cached text context (any other needs the config's text encoder)."""
        return sorted(self.text.instructions)

    @property
    def text_encoder(self):
        """The config's text encoder (None: only cached instructions are answered)."""
        return self.text.encoder

    def can_answer(self, instruction: str) -> bool:
        return instruction in self.text or self.text.encoder is not None
