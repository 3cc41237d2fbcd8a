"""The record of a training run's inputs (``<out>/run.json``), so that a resumed run trains on what the
interrupted one did.

``lwam train`` writes the record before any work: the settings it ran with (preset, dataset, VAE and
other files, batch size, learning rate, steps, seed, window stride) and a digest of every input file's
content. Re-running into the same directory resumes; a setting given on the command line that differs from
the record is refused (not ignored), one left out is taken from the record, and an input file whose
content changed since (another VAE at the same path, a re-collected dataset) is refused too, naming what
changed and how to start fresh.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from lwam._atomic import atomic_write_json
from lwam.errors import StaleStateError

RUN_FILE = "run.json"
FRESH_HINT = "pass --overwrite to discard it and start fresh, or choose another --out"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (16 hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_record(out: Path) -> dict[str, Any] | None:
    p = out / RUN_FILE
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise StaleStateError(f"{p}: unreadable run record ({e}); {FRESH_HINT}") from None
    if not isinstance(rec, dict) or "settings" not in rec:
        raise StaleStateError(f"{p}: not an lwam run record; {FRESH_HINT}")
    return rec


def merge_settings(out: Path, record: Mapping[str, Any] | None, given: Mapping[str, Any],
                   defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Effective settings: ``given`` (None = not on the command line) over the record over ``defaults``.
    A given value that differs from the record raises StaleStateError naming every such argument."""
    if record is None:
        return {k: (given.get(k) if given.get(k) is not None else defaults.get(k)) for k in set(given) | set(defaults)}
    saved = dict(record["settings"])
    conflicts = [f"--{k.replace('_', '-')} {v} (the run has {'its default' if saved.get(k) is None else saved.get(k)})"
                 for k, v in given.items() if v is not None and k in saved and _norm(k, v) != _norm(k, saved[k])]
    if conflicts:
        raise StaleStateError(f"{out}: holds a run started with other settings; conflicting: "
                              f"{', '.join(conflicts)}. Re-run without them to resume it, or {FRESH_HINT}")
    eff = {k: saved.get(k, defaults.get(k)) for k in set(saved) | set(defaults)}
    eff.update({k: v for k, v in given.items() if v is not None})
    return eff


PATH_SETTINGS = ("dataset", "vae", "dit", "text_cache")


def _norm(k: str, v: Any) -> Any:
    if k in PATH_SETTINGS and v is not None:
        return str(Path(v).resolve())
    return v


def check_digests(out: Path, record: Mapping[str, Any] | None, digests: Mapping[str, str]) -> None:
    """Refuse a resume whose input files changed content since the run started."""
    if record is None:
        return
    old = record.get("digests", {})
    changed = [f"{k} ({old[k]} -> {v})" for k, v in digests.items() if k in old and old[k] != v]
    if changed:
        raise StaleStateError(f"{out}: the run was started from other input files; changed since: "
                              f"{', '.join(changed)}. Restore them to resume, or {FRESH_HINT}")


def write_record(out: Path, settings: Mapping[str, Any], digests: Mapping[str, str]) -> None:
    atomic_write_json(out / RUN_FILE, {"version": 1, "settings": {k: _norm(k, v) for k, v in settings.items()},
                                       "digests": dict(digests)})
