"""Exceptions for failures a user can act on (bad files, diverging runs, busy or stale output directories).

Every class here derives from :class:`LwamError`; the ``lwam`` command turns them (and ValueError /
TypeError / OSError) into one line and exit status 2. Each also derives from the built-in class a caller
would catch without knowing this module (ValueError for bad files, FloatingPointError for divergence,
RuntimeError for a held lock).
"""
from __future__ import annotations


class LwamError(Exception):
    """Base class: an anticipated failure whose message says what happened and what to do."""


class WeightFileError(LwamError, ValueError):
    """A weight / checkpoint / cache file cannot be read (truncated, not that format, holds code)."""


class NonFiniteError(LwamError, FloatingPointError):
    """Training produced a non-finite loss or gradient norm (or the data holds a non-finite value)."""

    def __init__(self, message: str, step: int | None = None, metric: str | None = None):
        super().__init__(message)
        self.step, self.metric = step, metric


class StaleStateError(LwamError, ValueError):
    """Saved state (a cache, a run to resume) was made from other inputs than the ones given now."""


class LockHeldError(LwamError, RuntimeError):
    """Another process holds the lock of an output directory."""


class NothingWrittenError(LwamError, RuntimeError):
    """A command finished without producing what it should have written."""
