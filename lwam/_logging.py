"""Package logger and one-time messages (fallback notices say why, once)."""
from __future__ import annotations

import logging

logger = logging.getLogger("lwam")
if not logger.handlers:
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("[lwam] %(levelname)s %(message)s"))
    logger.addHandler(_h)
    logger.setLevel(logging.INFO)
    logger.propagate = False

_seen: set[str] = set()


def log_once(key: str, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time ``key`` is seen in this process. Silent while torch.compile traces:
    the set of seen keys would otherwise become a guard, and a key first seen later would recompile."""
    import torch

    if key in _seen or torch.compiler.is_compiling():
        return
    _seen.add(key)
    logger.log(level, message)
