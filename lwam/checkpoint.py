"""Our checkpoint format: a directory with ``config.json`` + ``model.safetensors``, plus

* ``impl.json``: the :class:`~lwam.config.ImplConfig` the model computed with (what trained it);
* ``text.safetensors``: the text contexts of its instructions (:class:`~lwam.model.text.TextContextCache`
  file), so that a policy built from the directory alone answers every training instruction;
* ``stats.json``: normalisation statistics;
* ``trainer.pt``: optimiser/scheduler/RNG/data-position state for resume.

Writes go to a temporary sibling directory that is renamed into place (``lwam._atomic.atomic_write_dir``),
so a crash never leaves a half-written checkpoint. Loading never unpickles code: safetensors for weights
and text, JSON for config, impl and stats, ``torch.load(weights_only=True)`` for trainer state.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lwam._safe_load import read_safetensors, torch_load_plain

from lwam._atomic import atomic_write_bytes, atomic_write_dir
from lwam.config import ImplConfig, LightWAMConfig

__all__ = ["save_checkpoint", "load_checkpoint", "load_config", "load_impl", "load_trainer_state",
           "atomic_write_bytes", "atomic_write_dir", "CONFIG_FILE", "WEIGHTS_FILE", "IMPL_FILE", "TEXT_FILE",
           "STATS_FILE", "TRAINER_FILE"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
IMPL_FILE = "impl.json"
TEXT_FILE = "text.safetensors"
STATS_FILE = "stats.json"
TRAINER_FILE = "trainer.pt"


def save_checkpoint(model, path: str | os.PathLike, *, stats: dict | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a LightWAM) to directory ``path``: its config, weights, ``model.impl`` and the
    text contexts its cache holds. ``stats``: normalisation statistics (JSON-able); ``trainer_state``:
    optimiser/scheduler/RNG/data position for resume (tensors and plain containers)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        from lwam.errors import NonFiniteError
        raise NonFiniteError(f"checkpoint {path}: not written, tensor {bad!r} holds non-finite values "
                             f"(the run diverged)", metric=bad)

    def fill(d: Path) -> None:
        (d / CONFIG_FILE).write_text(model.cfg.to_json())
        (d / IMPL_FILE).write_text(json.dumps(model.impl.to_dict(), indent=2) + "\n")
        save_file(state, str(d / WEIGHTS_FILE), metadata={"format": "lwam", "preset": model.cfg.name})
        if len(model.text):
            model.text.save(d / TEXT_FILE)
        if stats is not None:
            (d / STATS_FILE).write_text(json.dumps(stats, indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, d / TRAINER_FILE)

    return atomic_write_dir(path, fill)


def load_config(path: str | os.PathLike) -> LightWAMConfig:
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"not an lwam checkpoint (no {CONFIG_FILE}): {path}")
    d = _read_json(p, "checkpoint config")
    try:
        return LightWAMConfig.from_dict(d)
    except (TypeError, AttributeError, KeyError) as e:
        from lwam.errors import WeightFileError
        raise WeightFileError(f"checkpoint config {p}: not an lwam model config ({type(e).__name__}: {e})") from None


def _read_json(p: Path, what: str) -> Any:
    from lwam.errors import WeightFileError

    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightFileError(f"{what} {p}: not valid JSON ({e})") from None


def load_impl(path: str | os.PathLike) -> ImplConfig | None:
    """The :class:`ImplConfig` recorded in a checkpoint directory (None for checkpoints older than it)."""
    p = Path(path) / IMPL_FILE
    if not p.is_file():
        return None
    d = _read_json(p, "implementation config")
    try:
        return ImplConfig.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        from lwam.errors import WeightFileError
        raise WeightFileError(f"implementation config {p}: not an ImplConfig ({type(e).__name__}: {e})") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """-> (LightWAM, stats dict or None). Strict: every tensor must match the config's model. The text
    contexts the checkpoint carries are in ``model.text``; the model computes with the recorded impl
    except ``compile_blocks`` (compiling is the caller's choice: ``model.set_impl``)."""
    from lwam.model.lightwam import LightWAM
    from lwam.model.text import TextContextCache
    from lwam.model.weights import load_into

    cfg = load_config(path)
    impl = load_impl(path)
    model = LightWAM(cfg, impl=None if impl is None else impl.replace(compile_blocks=False))
    state = read_safetensors(Path(path) / WEIGHTS_FILE, "checkpoint weights")
    load_into(model, state, f"checkpoint {path}")
    text_file = Path(path) / TEXT_FILE
    if text_file.is_file():
        model.text.update(TextContextCache.load(text_file, cfg.text))
    stats_file = Path(path) / STATS_FILE
    stats = _read_json(stats_file, "normalisation statistics") if stats_file.is_file() else None
    return model.to(device), stats


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any] | None:
    f = Path(path) / TRAINER_FILE
    return torch_load_plain(f, "trainer state") if f.is_file() else None
