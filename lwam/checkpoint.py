"""Our checkpoint format: a directory with ``config.json`` + ``model.safetensors`` (+ ``stats.json``
normalisation statistics, + ``trainer.pt`` optimiser/scheduler/RNG/data-position state for resume).

Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written checkpoint. Loading never unpickles code: safetensors for weights, JSON for config and
stats, ``torch.load(weights_only=True)`` for trainer state.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lwam._safe_load import read_safetensors, torch_load_plain

from lwam._atomic import atomic_path
from lwam.config import LightWAMConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "stats.json"
TRAINER_FILE = "trainer.pt"


def atomic_write_dir(path: str | os.PathLike, fill) -> Path:
    """Create directory ``path`` atomically: ``fill(tmpdir)`` writes into a temp dir, then it is renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_checkpoint(model, path: str | os.PathLike, *, stats: dict | None = None,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a LightWAM) to directory ``path``. ``stats``: normalisation statistics (JSON-able);
    ``trainer_state``: optimiser/scheduler/RNG/data position for resume (tensors and plain containers)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        from lwam.errors import NonFiniteError
        raise NonFiniteError(f"checkpoint {path}: not written, tensor {bad!r} holds non-finite values "
                             f"(the run diverged)", metric=bad)

    def fill(d: Path) -> None:
        (d / CONFIG_FILE).write_text(model.cfg.to_json())
        save_file(state, str(d / WEIGHTS_FILE), metadata={"format": "lwam", "preset": model.cfg.name})
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


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """-> (LightWAM, stats dict or None). Strict: every tensor must match the config's model."""
    from lwam.model.lightwam import LightWAM
    from lwam.model.weights import load_into

    cfg = load_config(path)
    model = LightWAM(cfg)
    state = read_safetensors(Path(path) / WEIGHTS_FILE, "checkpoint weights")
    load_into(model, state, f"checkpoint {path}")
    stats_file = Path(path) / STATS_FILE
    stats = _read_json(stats_file, "normalisation statistics") if stats_file.is_file() else None
    return model.to(device), stats


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any] | None:
    f = Path(path) / TRAINER_FILE
    return torch_load_plain(f, "trainer state") if f.is_file() else None
