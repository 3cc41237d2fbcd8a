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
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key in _seen:
        return
    _seen.add(key)
    logger.log(level, message)
