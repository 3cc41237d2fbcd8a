"""Switchable training step: the published implementation's way (reference) or the fast way.

:func:`configure_reference` and :func:`configure_fast` set the same :class:`LightWAM` (same weights, same
state-dict keys) to one of two ways of computing the *same* training loss; :func:`configure` takes a
:class:`StepFlags` so that every change can be switched (and measured, and checked) on its own.
:func:`training_step` is one forward + backward + optimizer step, as the benchmark times it.

The changes, and why each is exact (tests/test_fast_step.py checks loss and every trainable gradient
against the reference configuration; tolerances from ``lwam.testing``):

``split_attention``
    Self-attention with the first-frame-causal mask. Reference: one SDPA call with a boolean [S, S] mask
    (``SelfAttention.attn_impl = "masked"``), which rules out FlashAttention-class kernels and
    materialises the mask. Fast (``"split"``): the mask says frame-0 queries see only frame-0 keys and all
    other queries see every key, so the result is exactly two mask-free attentions, rows [0, n0) over keys
    [0, n0) and rows [n0, S) over all keys, concatenated. Each goes through
    ``lwam.model.attention.dense_attention`` (flash-attn, else xFormers, else torch SDPA; it logs its
    choice once). Softmax rows are independent, so the split changes only the summation order.
``real_rope``
    3D RoPE. Reference (``WanDiT.rope_impl = "complex"``): q and k are cast to complex128 and multiplied by
    a complex128 rotation table, as in the published code. Fast (``"real"``): the same rotation written
    out in real fp32, ``(x0 c - x1 s, x0 s + x1 c)`` over channel pairs, with the angles formed in fp64 and
    rounded once to fp32. Rotation by a unit complex number is exactly this real 2x2 map; the only
    difference is fp32 rounding of cos/sin and of two products (relative ~1e-7, far below the fp32 and
    bf16 tolerances), and no fp64 traffic (slow on GPUs).
``rope_cache``
    The RoPE tables depend only on the token grid and the device; ``WanDiT.rope_cache`` keeps them per
    (impl, grid, device) instead of rebuilding them on every forward. Bit-identical tables.
``fused_pooling``
    The SFAE's learned-query pooling of the tapped layers through the fused ``lwam::query_pool`` op (all
    layers in one launch, attention folded algebraically: docs/design.md, "Fused pooling") instead of the
    plain per-layer ``nn.MultiheadAttention`` pooler. Exact up to summation order.
``fused_downsample``
    The video branch's 2x2 spatial mean through ``lwam::latent_downsample`` (lwam._C) instead of
    ``F.avg_pool3d`` (``LightWAM.reference_downsample``). Both average the same four values in fp32.
``compile_blocks``
    ``torch.compile(dynamic=False)`` of every DiT block's forward (``nn.Module.compile``, in place, so the
    state-dict keys are unchanged): inductor fuses the adaLN modulation, the fp32 LayerNorm/RMSNorm, the
    RoPE arithmetic and the gated residual adds into a few kernels, forward and backward. The graph is
    the eager block's; only rounding of fused fp32 arithmetic differs. Inside compiled blocks attention is
    torch SDPA (which on CUDA picks its own FlashAttention kernel for mask-free bf16 inputs).
``enforce_frozen``
    No gradient work for frozen weights beyond what LoRA needs: the model's freezing is (re)applied
    (frozen DiT and VAE weights get ``requires_grad=False``, so autograd never forms a weight gradient for
    them and keeps no activations for one; only the input gradients that flow *through* frozen linears to
    LoRA, adapters, the proprio encoder and the SFAE are computed), and :func:`check_frozen` verifies the
    trainable set. The published implementation freezes the same way, so both configurations keep it on;
    the flag exists so that the check can be switched off for experiments that unfreeze on purpose.

Shapes are those of ``LightWAM.training_loss``: latents [B, 16, F, h, w], proprio [B, P], actions [B, H, A].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lwam._logging import log_once

__all__ = ["StepFlags", "configure", "configure_reference", "configure_fast", "current_flags", "check_frozen",
           "training_step"]


@dataclass(frozen=True)
class StepFlags:
    """Which fast changes are on (True) or in their reference form (False). See the module docstring."""

    split_attention: bool = True
    real_rope: bool = True
    rope_cache: bool = True
    fused_pooling: bool = True
    fused_downsample: bool = True
    compile_blocks: bool = True
    enforce_frozen: bool = True

    @classmethod
    def reference(cls) -> "StepFlags":
        """The published implementation's way (frozen weights frozen as there)."""
        return cls(split_attention=False, real_rope=False, rope_cache=False, fused_pooling=False,
                   fused_downsample=False, compile_blocks=False, enforce_frozen=True)

    @classmethod
    def fast(cls, compile_blocks: bool = True) -> "StepFlags":
        return cls(compile_blocks=compile_blocks)

    def replace(self, **changes: bool) -> "StepFlags":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={'on' if getattr(self, f.name) else 'off'}" for f in dataclasses.fields(self))


def _is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


def _set_compiled(block: nn.Module, on: bool) -> None:
    if on and not _is_compiled(block):
        block.compile(dynamic=False)
    elif not on and _is_compiled(block):
        block._compiled_call_impl = None  # back to the eager forward (what nn.Module.compile replaced)


def configure(model: nn.Module, flags: StepFlags) -> nn.Module:
    """Set ``model`` (a :class:`~lwam.model.lightwam.LightWAM`) to compute its training step as ``flags``
    say. In place; returns the model. Parameters, buffers and state-dict keys are untouched.

    ``fused_pooling`` is a runtime switch: it replaces ``model.expert.cfg`` with a copy (so that models
    built from one shared config object do not switch each other) and sets each pooler's ``fused``;
    ``model.cfg`` keeps what the model was built with."""
    dit = model.dit
    for block in dit.blocks:
        block.self_attn.attn_impl = "split" if flags.split_attention else "masked"
        _set_compiled(block, flags.compile_blocks)
    dit.rope_impl = "real" if flags.real_rope else "complex"
    dit.rope_cache = flags.rope_cache
    dit._rope_tables.clear()
    model.expert.cfg = dataclasses.replace(model.expert.cfg, fused_pooling=flags.fused_pooling)
    for pooler in model.expert.poolers:
        pooler.fused = flags.fused_pooling
    model.reference_downsample = not flags.fused_downsample
    if flags.enforce_frozen:
        model.apply_freezing()
        check_frozen(model)
    if flags.compile_blocks:
        log_once("fast-compile", "fast step: DiT blocks compiled with torch.compile (attention inside them "
                                 "runs through torch SDPA; flash-attn/xFormers are not traced)")
    model._step_flags = flags
    return model


def configure_reference(model: nn.Module) -> nn.Module:
    """The published implementation's way: boolean-mask attention, complex-float64 RoPE rebuilt every
    forward, the plain pooler, ``F.avg_pool3d`` downsampling, everything eager."""
    return configure(model, StepFlags.reference())


def configure_fast(model: nn.Module, compile_blocks: bool = True) -> nn.Module:
    """Every fast change on (``compile_blocks=False`` keeps the blocks eager, e.g. to skip compile time)."""
    return configure(model, StepFlags.fast(compile_blocks=compile_blocks))


def current_flags(model: nn.Module) -> StepFlags:
    """The flags the model is set to now (read back from the model, not remembered)."""
    dit = model.dit
    blocks = list(dit.blocks)
    return StepFlags(
        split_attention=all(b.self_attn.attn_impl == "split" for b in blocks),
        real_rope=dit.rope_impl == "real",
        rope_cache=bool(dit.rope_cache),
        fused_pooling=bool(model.expert.cfg.fused_pooling),
        fused_downsample=not model.reference_downsample,
        compile_blocks=bool(blocks) and all(_is_compiled(b) for b in blocks),
        enforce_frozen=getattr(model, "_step_flags", StepFlags()).enforce_frozen,
    )


def check_frozen(model: nn.Module, after_backward: bool = False) -> None:
    """Raise if a parameter outside the model's trainable set requires grad (or, ``after_backward``, holds
    a gradient), or if a trainable one does not require grad. The trainable set is what
    ``LightWAM.apply_freezing`` defines (LoRA, adapters, video head, proprio encoder, SFAE when the backbone
    is frozen)."""
    from lwam.model.lightwam import _is_trainable_dit_param

    cfg = model.cfg
    bad: list[str] = []
    for name, p in model.named_parameters():
        if name.startswith("dit."):
            want = not cfg.freeze_backbone or _is_trainable_dit_param(name[4:])
        elif name.startswith("vae."):
            want = cfg.train_vae
        else:
            want = True
        if p.requires_grad != want:
            bad.append(f"{name} (requires_grad={p.requires_grad}, expected {want})")
        elif after_backward and not want and p.grad is not None:
            bad.append(f"{name} (frozen but has a gradient)")
    if bad:
        raise RuntimeError(f"frozen/trainable set violated for {len(bad)} parameters, e.g. {bad[:5]}")


def training_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer | None = None, *,
                  autocast_dtype: torch.dtype | None = None, grad_clip: float | None = None) -> torch.Tensor:
    """One training step: ``model.training_loss(batch)`` (under ``torch.autocast`` of the model's device
    type with ``autocast_dtype`` when given), backward, optional grad clipping, ``optimizer.step()``.

    batch: as ``LightWAM.training_loss`` (pass 'flow_eps' [B, 16, F, h/2, w/2] and 'flow_u' [B] for
    reproducible noise). Gradients are zeroed (set to None) first. Returns the detached loss (0-dim fp32).
    Without an optimizer the gradients are left in ``.grad`` for inspection."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        for p in params:
            p.grad = None
    device_type = model.proprio_encoder.weight.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss, _ = model.training_loss(batch)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if optimizer is not None:
        optimizer.step()
    return loss.detach().float()
