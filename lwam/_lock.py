"""An exclusive lock on an output directory (a training run, a dataset being collected).

The lock is ``<dir>/.lwam.lock``: a file locked with ``fcntl.flock`` that holds the holder's pid, host,
command and start time as JSON. The kernel drops a ``flock`` when its process dies, even on ``kill -9``,
so a lock left by a dead process is never mistaken for a live one: the next process takes it over and
logs that it replaced a stale lock. A second live process is refused with a :class:`LockHeldError`
naming the holder. The file is never deleted (deleting a flocked file lets two processes lock two
different inodes); it is emptied on release.

Locks are re-entrant within a process (the CLI locks the run directory, the Trainer inside it asks again).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lwam._logging import logger
from lwam.errors import LockHeldError

LOCK_NAME = ".lwam.lock"

_held: dict[str, list] = {}  # resolved lock path -> [fd, depth]


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    if not h:
        return "an unknown process"
    return (f"pid {h.get('pid')} on host {h.get('host')} ({h.get('command', '?')}, since "
            f"{h.get('started', '?')})")


def acquire(directory: str | os.PathLike, command: str | None = None) -> Path:
    """Lock ``directory`` (created if missing) for this process. Raises LockHeldError if another holds it."""
    import fcntl

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeldError(f"{d}: in use by {_describe(_holder(path))}; wait for it to finish, or use another "
                            f"output directory") from None
    previous = _holder(path)
    if previous.get("pid") and previous.get("pid") != os.getpid():
        logger.warning(f"{d}: replacing a stale lock of {_describe(previous)} (that process is gone)")
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    _held[key] = [fd, 1]
    return path


def release(directory: str | os.PathLike) -> None:
    """Release one level of this process's lock on ``directory`` (a no-op if it holds none)."""
    import fcntl

    key = str((Path(directory) / LOCK_NAME).resolve())
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    fd = entry[0]
    del _held[key]
    try:
        os.ftruncate(fd, 0)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def locked(directory: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """``with locked(out_dir): ...`` holds the directory's lock for the block."""
    path = acquire(directory, command)
    try:
        yield path
    finally:
        release(directory)
