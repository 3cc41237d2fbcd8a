"""The openpi wire format: msgpack with numpy arrays, as the ``openpi-client`` package sends and reads them.

A numpy array travels as a msgpack map with binary (bytes) keys
``{b"__ndarray__": True, b"data": <raw C-order bytes>, b"dtype": <numpy dtype.str, e.g. "<f4">, b"shape": [..]}``;
a numpy scalar as ``{b"__npgeneric__": True, b"data": <its Python value>, b"dtype": <dtype.str>}``. Everything
else is plain msgpack (str as str, bytes as bin).

Decoding never executes or unpickles anything: only boolean, integer, unsigned and float dtypes are
accepted, the byte count must equal ``prod(shape) * itemsize``, and the result is a read-only view of the
received bytes. Any violation raises :class:`WireError` (a ValueError) that says what was wrong.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from lwam.errors import WireError

__all__ = ["WireError", "packb", "unpackb", "ALLOWED_KINDS"]

ALLOWED_KINDS = frozenset("biuf")  # bool, int, uint, float: no objects, no void/structured, no strings
_MAX_RANK = 8


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in ALLOWED_KINDS:
            raise TypeError(f"cannot send an array of dtype {obj.dtype} (allowed kinds: bool, int, uint, float)")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in ALLOWED_KINDS:
            raise TypeError(f"cannot send a numpy scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """Python/numpy object -> msgpack bytes in the openpi format."""
    import msgpack

    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def _dtype(desc: Any) -> np.dtype:
    if not isinstance(desc, (str, bytes)) or len(desc) > 16:
        raise WireError(f"array dtype: expected a numpy dtype string such as '<f4', got {desc!r}")
    try:
        dt = np.dtype(desc.decode() if isinstance(desc, bytes) else desc)
    except (TypeError, ValueError) as e:
        raise WireError(f"array dtype: {desc!r} is not a numpy dtype ({e})") from None
    if dt.kind not in ALLOWED_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise WireError(f"array dtype: {desc!r} not accepted (bool, int, uint or float only)")
    return dt


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dt = _dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        if (not isinstance(shape, (list, tuple)) or len(shape) > _MAX_RANK
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise WireError(f"array shape: expected a list of at most {_MAX_RANK} non-negative ints, got {shape!r}")
        data = obj.get(b"data")
        if not isinstance(data, bytes):
            raise WireError(f"array data: expected bytes, got {type(data).__name__}")
        expected = math.prod(shape) * dt.itemsize
        if len(data) != expected:
            raise WireError(f"array data: shape {list(shape)} of {dt.str} needs {expected} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dt).reshape(shape)
    if b"__npgeneric__" in obj:
        dt = _dtype(obj.get(b"dtype"))
        value = obj.get(b"data")
        if not isinstance(value, (bool, int, float)):
            raise WireError(f"numpy scalar: expected a bool, int or float value, got {type(value).__name__}")
        try:
            return dt.type(value)
        except (OverflowError, ValueError) as e:
            raise WireError(f"numpy scalar: {value!r} does not fit {dt.str} ({e})") from None
    return obj


def unpackb(data: bytes, max_bytes: int | None = None) -> Any:
    """msgpack bytes in the openpi format -> Python/numpy object. Raises :class:`WireError` on anything
    else (not msgpack, trailing bytes, a bad array description, more than ``max_bytes``)."""
    import msgpack

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"message: expected bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False)
    except WireError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        head = bytes(data[:16])
        raise WireError(f"message: not valid msgpack ({type(e).__name__}: {e}); received {len(data)} bytes "
                        f"starting {head!r}") from None
