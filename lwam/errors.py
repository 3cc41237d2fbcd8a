"""Every exception lwam raises on purpose: failures a user can act on (bad files or observations, diverging
runs, busy or stale output directories, a server's refusal).

Every class here derives from :class:`LwamError`; the ``lwam`` command turns them (and ValueError /
TypeError / OSError) into one line and exit status 2, and ``lwam serve`` sends their message to the client.
Each also derives from the built-in class a caller would catch without knowing this module (ValueError for
bad input, FloatingPointError for divergence, RuntimeError for a held lock or a remote failure). This
module imports nothing from lwam, so every layer (model/ included) may raise from it.
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


class CheckpointMismatchError(LwamError, ValueError):
    """A weight file does not fit the model: lists missing, unexpected and mis-shaped tensors
    (lwam.model.weights.check_state_dict)."""


class VideoDecodeError(LwamError, RuntimeError):
    """A video file exists but cannot be decoded (truncated, garbage, wrong frame count)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        super().__init__(f"cannot decode video file {self.path}: {reason}")


class UnknownInstructionError(LwamError, ValueError, KeyError):
    """An instruction has no cached text context and no text encoder is configured."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ObservationError(LwamError, ValueError):
    """An observation dict lacks a key or holds a value of the wrong shape / dtype (lwam.policy.observation)."""


class WireError(LwamError, ValueError):
    """A message is not valid msgpack in the openpi codec's format (lwam.serving.codec)."""


class RemotePolicyError(LwamError, RuntimeError):
    """A policy server answered a request with an error message (lwam.policy.remote)."""


class DriftError(LwamError, ValueError):
    """An exported policy's actions differ from the eager model's by more than the tolerance (lwam export --check)."""
