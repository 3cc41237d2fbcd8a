"""Latent downsampling as one PyTorch operator: ``torch.ops.lwam.latent_downsample``.

The operator schemas, the CPU kernel and the CUDA kernel come from the compiled extension ``lwam._C``
(csrc/). This module adds what PyTorch needs to trace and differentiate them (a fake/meta kernel and the
autograd formulas, for both the op and its backward so double backward works) and the public function.
When the extension cannot be used, the same schemas are defined here with the PyTorch reference
(``lwam.reference.latent_downsample``) as their kernel, and the first call logs one line saying why;
likewise for CUDA tensors when the extension was built without CUDA kernels. Either way
``torch.compile(fullgraph=True)`` sees one opaque node and CUDA graphs can capture it.

Importing this module loads ``lwam._C`` (registering the ops) and never initialises CUDA.
"""
from __future__ import annotations

import torch

from lwam._logging import log_once
from lwam.ops import _extension
from lwam.reference import latent_downsample as _reference
from lwam.reference.latent_downsample import latent_downsample as reference_latent_downsample

__all__ = ["latent_downsample", "implementation"]

_SCHEMAS = {
    "latent_downsample": "latent_downsample(Tensor x, int factor) -> Tensor",
    "latent_downsample_backward": "latent_downsample_backward(Tensor grad, int factor) -> Tensor",
}
_DEVICES = ("cpu", "cuda")


def _check(x: torch.Tensor, factor: int) -> None:
    """The op's argument checks, in Python (the C++ kernels repeat them for direct torch.ops calls)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"latent_downsample: expected x to be a torch.Tensor, got {type(x).__name__}")
    if isinstance(factor, bool) or not isinstance(factor, int):
        raise TypeError(f"latent_downsample: expected factor to be an int, got {type(factor).__name__} "
                        f"({factor!r})")
    _reference.check_args(x, factor)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"latent_downsample: expected x of dtype float32, float16, bfloat16 or float64, "
                        f"got {x.dtype}")


# ---- reference kernels (used when lwam._C cannot serve a device) --------------------------------

def _reference_backward(grad: torch.Tensor, factor: int) -> torch.Tensor:
    """grad [B, C, T, h, w] -> [B, C, T, h*f, w*f]: each value / f^2 spread over its f x f block, in fp32."""
    g = grad if grad.dtype == torch.float64 else grad.float()
    g = g / (factor * factor)
    B, C, T, h, w = g.shape
    g = g[:, :, :, :, None, :, None].expand(B, C, T, h, factor, w, factor)
    return g.reshape(B, C, T, h * factor, w * factor).to(grad.dtype)


def _fallback_reason(device_type: str) -> str | None:
    st = _extension.status()
    if not st.available:
        return st.reason
    if device_type == "cuda" and not st.with_cuda:
        return (f"lwam._C was built without CUDA kernels (build: {st.build_info.get('kind', '?')}, "
                f"{st.build_info.get('reason', 'no build record')})")
    if device_type not in _DEVICES:
        return f"lwam._C has no kernel for device type {device_type!r}"
    return None


def _note_fallback(device_type: str) -> None:
    reason = _fallback_reason(device_type)
    log_once(f"latent_downsample:{device_type}",
             f"latent_downsample on {device_type} uses the PyTorch reference: {reason}")


def _reference_forward_kernel(x: torch.Tensor, factor: int) -> torch.Tensor:
    _note_fallback(x.device.type)
    return reference_latent_downsample(x, factor)


def _reference_backward_kernel(grad: torch.Tensor, factor: int) -> torch.Tensor:
    _note_fallback(grad.device.type)
    return _reference_backward(grad, factor)


_lib = torch.library.Library("lwam", "FRAGMENT")  # noqa: TOR901  (kept alive for the process)
_STATUS = _extension.status()
if not _STATUS.available:
    for _name, _schema in _SCHEMAS.items():
        _lib.define(_schema)
    _reference_devices: tuple[str, ...] = ("CPU", "CUDA")
elif not _STATUS.with_cuda:
    _reference_devices = ("CUDA",)
else:
    _reference_devices = ()
for _key in _reference_devices:
    _lib.impl("latent_downsample", _reference_forward_kernel, _key)
    _lib.impl("latent_downsample_backward", _reference_backward_kernel, _key)


# ---- fake kernels and autograd -----------------------------------------------------------------

@torch.library.register_fake("lwam::latent_downsample")
def _latent_downsample_fake(x: torch.Tensor, factor: int) -> torch.Tensor:
    _check(x, factor)
    B, C, T, H, W = x.shape
    return x.new_empty((B, C, T, H // factor, W // factor))


@torch.library.register_fake("lwam::latent_downsample_backward")
def _latent_downsample_backward_fake(grad: torch.Tensor, factor: int) -> torch.Tensor:
    if grad.dim() != 5 or factor <= 0:
        raise ValueError(f"latent_downsample_backward: expected grad of rank 5 and factor > 0, got shape "
                         f"{list(grad.shape)} with factor {factor}")
    B, C, T, h, w = grad.shape
    return grad.new_empty((B, C, T, h * factor, w * factor))


def _setup_context(ctx, inputs, output) -> None:
    ctx.factor = inputs[1]


def _latent_downsample_grad(ctx, grad_out):
    return torch.ops.lwam.latent_downsample_backward(grad_out, ctx.factor), None


def _latent_downsample_backward_grad(ctx, grad_out):
    # The backward is linear with adjoint latent_downsample: d<B(g), v>/dg = latent_downsample(v).
    return torch.ops.lwam.latent_downsample(grad_out, ctx.factor), None


torch.library.register_autograd("lwam::latent_downsample", _latent_downsample_grad, setup_context=_setup_context)
torch.library.register_autograd("lwam::latent_downsample_backward", _latent_downsample_backward_grad,
                                setup_context=_setup_context)


# ---- public API --------------------------------------------------------------------------------

def implementation(device: torch.device | str = "cpu") -> str:
    """Which kernel ``latent_downsample`` runs on ``device``: "lwam._C" or "reference (<why>)"."""
    reason = _fallback_reason(torch.device(device).type)
    return "lwam._C" if reason is None else f"reference ({reason})"


def latent_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean over ``factor`` x ``factor`` spatial blocks, time untouched.

    Args:
        x: [B, C, T, H, W] latents, float32 / float16 / bfloat16 / float64, on CPU or CUDA. H and W must be
            divisible by ``factor``. Any strides are accepted: the kernels read the contiguous (row-major
            B, C, T, H, W) layout and make a contiguous copy first when ``x`` is not in it (e.g. a
            channels-last or sliced view). The CUDA kernel uses 16-byte vector accesses when W and the
            data pointer allow, else a scalar path.
        factor: positive int, the block edge f (1 returns a copy).

    Returns:
        [B, C, T, H/f, W/f], contiguous, ``x.dtype``; accumulated in fp32 (fp64 for fp64 input).
        Differentiable (the backward spreads grad / f^2 over each block; twice differentiable).

    Raises:
        ValueError: x is not rank 5, factor <= 0, or H / W not divisible by factor (the message names
            the shape and the factor). TypeError: x not a tensor, factor not an int, unsupported dtype.
    """
    _check(x, factor)
    if x.device.type not in _DEVICES:
        _note_fallback(x.device.type)
        return reference_latent_downsample(x, factor)
    return torch.ops.lwam.latent_downsample(x, factor)
