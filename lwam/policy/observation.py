"""Robot-facing observations: LeRobot-style dicts -> the composed frame, proprio and instruction a policy takes.

An observation is a dict with

* ``observation.images.<camera>`` for every camera of the training dataset (``cfg.data.cameras``, in that
  order): uint8 ``[h, w, 3]`` (or ``[3, h, w]``) in 0..255, or float ``[3, h, w]`` in [0, 1] (LeRobot's
  convention); any h x w is resized into the camera's slot exactly as training composed the dataset's
  videos (``lwam.data.cameras.compose_uint8``: rotation, placement, bilinear antialiased resize, rounding
  to uint8), so the slot size itself (``observation_spec``) is composed without resampling;
* ``observation.state``: float ``[P]`` raw proprioceptive state;
* the instruction as ``task`` (LeRobot) or ``prompt`` (openpi): a str.

A leading batch dimension on every array (``observation.state`` ``[B, P]``, images ``[B, ...]``, the
instruction a str or a list of B str) makes the observation batched. Values may be numpy arrays or torch
tensors. Bad input raises :class:`ObservationError` (a ValueError) naming the key, the expected and the
received shape/dtype, before any work starts.

:class:`ActionQueue` holds the executed part of a chunk for ``select_action``: refilled by one
``predict_action_chunk`` call every ``executed_steps`` actions.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from lwam.errors import ObservationError

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
INSTRUCTION_KEYS = ("task", "prompt")

__all__ = ["IMAGE_PREFIX", "STATE_KEY", "INSTRUCTION_KEYS", "ObservationError", "Observation",
           "observation_spec", "parse_observation", "from_sim_observation", "ActionQueue", "check_executed_steps"]


@dataclass
class Observation:
    """A checked observation, ready for ``predict_batch``.

    images: uint8 [B, H, W, 3], composed as in training; proprio: float32 [B, P] raw; instructions: B str;
    batched: whether the input had a batch dimension; torch_out: whether the state came as a torch tensor."""

    images: np.ndarray
    proprio: np.ndarray
    instructions: list[str]
    batched: bool
    torch_out: bool = False


def _image_keys(data_cfg) -> list[str]:
    return [IMAGE_PREFIX + c for c in data_cfg.cameras]


def observation_spec(data_cfg, proprio_dim: int) -> dict[str, dict[str, Any]]:
    """For every array key of an (unbatched) observation: ``{"shape": [...], "dtype": str}``.

    The image shape is the camera's slot in the composed frame (composed without resampling)."""
    from lwam.data.cameras import layout_slots

    slots = layout_slots(data_cfg.camera_layout, len(data_cfg.cameras), data_cfg.image_height, data_cfg.image_width)
    spec: dict[str, dict[str, Any]] = {}
    for key, (_, _, h, w) in zip(_image_keys(data_cfg), slots):
        spec[key] = {"shape": [h, w, 3], "dtype": "uint8"}
    spec[STATE_KEY] = {"shape": [int(proprio_dim)], "dtype": "float32"}
    return spec


def _as_numpy(key: str, value: Any) -> tuple[np.ndarray, bool]:
    if isinstance(value, np.ndarray):
        return value, False
    if isinstance(value, np.generic):
        return np.asarray(value), False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy(), True
    raise ObservationError(f"{key}: expected a numpy array or torch tensor, got {type(value).__name__}")


def _camera_uint8(key: str, value: Any, batched: bool, batch: int) -> np.ndarray:
    """One camera -> uint8 [B, h, w, 3]."""
    a, _ = _as_numpy(key, value)
    rank = 4 if batched else 3
    lead = f"B={batch}, " if batched else ""
    if a.ndim != rank:
        raise ObservationError(f"{key}: expected uint8 [{lead}h, w, 3] or float [{lead}3, h, w], got shape "
                               f"{list(a.shape)} ({a.dtype})")
    orig = list(a.shape)
    if not batched:
        a = a[None]
    if a.shape[0] != batch:
        raise ObservationError(f"{key}: expected a batch of {batch} (as {STATE_KEY}), got shape {list(a.shape)}")
    if a.dtype == np.uint8:
        if a.shape[-1] == 3:
            hwc = a
        elif a.shape[1] == 3:
            hwc = a.transpose(0, 2, 3, 1)
        else:
            raise ObservationError(f"{key}: expected uint8 [{lead}h, w, 3], got shape {orig}")
    elif a.dtype.kind == "f":
        if a.shape[1] != 3:
            raise ObservationError(f"{key}: expected float [{lead}3, h, w] in [0, 1], got shape {orig}")
        if not np.isfinite(a).all():
            raise ObservationError(f"{key}: expected finite values, got NaN or inf")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ObservationError(f"{key}: expected float values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        hwc = np.rint(a.astype(np.float32) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
    else:
        raise ObservationError(f"{key}: expected dtype uint8 (or float in [0, 1]), got {a.dtype}")
    if hwc.shape[1] < 1 or hwc.shape[2] < 1:
        raise ObservationError(f"{key}: expected a non-empty image, got shape {orig}")
    # a copy when the buffer is read-only (arrays decoded from a message are views of its bytes)
    return np.ascontiguousarray(hwc) if hwc.flags.writeable else np.array(hwc, order="C")


def _instructions(obs: Mapping[str, Any], batched: bool, batch: int) -> list[str]:
    present = [k for k in INSTRUCTION_KEYS if k in obs]
    if not present:
        raise ObservationError(f"observation: missing the instruction: expected key 'task' (LeRobot) or 'prompt' "
                               f"(openpi) holding a str, got keys {sorted(map(str, obs))}")
    values = [obs[k] for k in present]
    if len(values) == 2 and values[0] != values[1]:
        raise ObservationError(f"observation: 'task' ({values[0]!r}) and 'prompt' ({values[1]!r}) differ; send one")
    v, key = values[0], present[0]
    if isinstance(v, str):
        return [v] * batch
    if batched and isinstance(v, Sequence) and all(isinstance(s, str) for s in v):
        if len(v) != batch:
            raise ObservationError(f"{key}: expected {batch} str (one per sample), got {len(v)}")
        return list(v)
    raise ObservationError(f"{key}: expected a str{' or a list of str' if batched else ''}, got {type(v).__name__}")


def parse_observation(obs: Any, data_cfg, proprio_dim: int) -> Observation:
    """Check a LeRobot-style observation dict and compose its cameras as training did (see module doc)."""
    from lwam.data.cameras import compose_uint8

    if not isinstance(obs, Mapping):
        raise ObservationError(f"observation: expected a dict, got {type(obs).__name__}")
    keys = _image_keys(data_cfg)
    missing = [k for k in (*keys, STATE_KEY) if k not in obs]
    if missing:
        raise ObservationError(f"observation: missing key {missing[0]!r} (expected {keys + [STATE_KEY]} and "
                               f"'task' or 'prompt'; got {sorted(map(str, obs))})")
    state, torch_out = _as_numpy(STATE_KEY, obs[STATE_KEY])
    if state.ndim not in (1, 2) or state.shape[-1] != proprio_dim:
        raise ObservationError(f"{STATE_KEY}: expected shape [{proprio_dim}] (or [B, {proprio_dim}]), got "
                               f"{list(state.shape)}")
    if state.dtype.kind != "f":
        raise ObservationError(f"{STATE_KEY}: expected dtype float32, got {state.dtype}")
    if not np.isfinite(state).all():
        idx = np.argwhere(~np.isfinite(state))[0].tolist()
        raise ObservationError(f"{STATE_KEY}: expected finite values, got {state[tuple(idx)]} at index {idx}")
    batched = state.ndim == 2
    proprio = np.ascontiguousarray(state.reshape(-1, proprio_dim), dtype=np.float32)
    b = proprio.shape[0]
    if b < 1:
        raise ObservationError(f"{STATE_KEY}: expected at least one sample, got shape {list(state.shape)}")
    instructions = _instructions(obs, batched, b)
    frames = [_camera_uint8(k, obs[k], batched, b) for k in keys]
    images = compose_uint8(frames, data_cfg.camera_layout, data_cfg.image_height, data_cfg.image_width,
                           data_cfg.rotate_180)
    return Observation(images, proprio, instructions, batched, torch_out)


def from_sim_observation(obs: Mapping[str, Any]) -> dict[str, Any]:
    """A simulator observation ``{"images": {camera: uint8 [h, w, 3]}, "proprio": [P], "instruction": str}``
    (lwam.envs) -> the LeRobot-style dict."""
    out: dict[str, Any] = {IMAGE_PREFIX + c: im for c, im in obs["images"].items()}
    out[STATE_KEY] = np.asarray(obs["proprio"], dtype=np.float32)
    out["task"] = obs["instruction"]
    return out


def check_executed_steps(n: Any, chunk_size: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= chunk_size:
        raise ValueError(f"executed_steps: expected an int in [1, {chunk_size}] (the chunk size), got {n!r}")
    return int(n)


class ActionQueue:
    """The not yet executed actions of the last chunk, for ``select_action``.

    ``pop(refill, executed_steps)``: when empty, calls ``refill()`` -> chunk [H, A] or [B, H, A], keeps its first
    ``executed_steps`` actions; returns the next action ([A] or [B, A])."""

    def __init__(self) -> None:
        self._chunk: Any = None
        self._next = 0

    def __len__(self) -> int:
        if self._chunk is None:
            return 0
        return self._chunk.shape[-2] - self._next

    def clear(self) -> None:
        self._chunk, self._next = None, 0

    def pop(self, refill: Callable[[], Any], executed_steps: int) -> Any:
        if len(self) == 0:
            chunk = refill()
            self._chunk, self._next = chunk[..., :executed_steps, :], 0
        a = self._chunk[..., self._next, :]
        self._next += 1
        return a
