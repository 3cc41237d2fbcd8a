"""The LeRobot dataset layout: feature keys, path templates, the meta-file (JSON lines) helpers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from lwam._atomic import atomic_write_text

CODEBASE_VERSION = "v2.1"
DEFAULT_CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
IMAGE_PREFIX = "observation.images."


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"LeRobot meta file missing: {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
