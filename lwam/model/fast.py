"""What the fast implementation changes, and why each change is exact.

The switches are the fields of :class:`lwam.config.ImplConfig`; ``LightWAM.set_impl`` applies them (the
one place that does). ``ImplConfig.reference()`` computes the training step the published
implementation's way, ``ImplConfig.fast()`` with every change below; tests/test_fast_step.py checks loss
and every trainable gradient of one ``Trainer`` step against the reference (tolerances from
``lwam.testing``), each switch alone and all together.

``attention="split"``
    Self-attention with the first-frame-causal mask. Reference (``"masked"``): one SDPA call with a
    boolean [S, S] mask, which rules out FlashAttention-class kernels and materialises the mask. Split: the
    mask says frame-0 queries see only frame-0 keys and all other queries see every key, so the result is
    exactly two mask-free attentions, rows [0, n0) over keys [0, n0) and rows [n0, S) over all keys,
    concatenated. Each goes through ``lwam.model.attention.dense_attention`` (flash-attn, else xFormers,
    else torch SDPA; it logs its choice once). Softmax rows are independent: only the summation order moves.
``rope="real"``
    3D RoPE. Reference (``"complex"``): q and k are cast to complex128 and multiplied by a complex128
    rotation table, as in the published code. Real: the same rotation written out in fp32,
    ``(x0 c - x1 s, x0 s + x1 c)`` over channel pairs, angles formed in fp64 and rounded once to fp32.
    Rotation by a unit complex number is exactly this real 2x2 map; what differs is fp32 rounding of
    cos/sin and of two products (relative ~1e-7), and no fp64 traffic (slow on GPUs).
``rope_cache``
    The RoPE tables depend only on the token grid and the device; ``WanDiT`` keeps them per
    (rope, grid, device) instead of rebuilding them on every forward. Bit-identical tables.
``fused_pooling``
    The SFAE's learned-query pooling of the tapped layers through the fused ``lwam::query_pool`` op (all
    layers in one launch, attention folded algebraically: docs/design.md, "Fused pooling") instead of the
    plain per-layer ``nn.MultiheadAttention`` pooler. Exact up to summation order.
``fused_downsample``
    The video branch's 2x2 spatial mean through ``lwam::latent_downsample`` (lwam._C) instead of
    ``F.avg_pool3d``. Both average the same four values in fp32.
``compile_blocks``
    ``torch.compile(dynamic=False)`` of every DiT block's forward (``nn.Module.compile``, in place, so the
    state-dict keys are unchanged): inductor fuses the adaLN modulation, the fp32 LayerNorm/RMSNorm, the
    RoPE arithmetic and the gated residual adds into a few kernels, forward and backward. The graph is the
    eager block's; only rounding of fused fp32 arithmetic differs. Inside compiled blocks attention is
    torch SDPA (which on CUDA picks its own FlashAttention kernel for mask-free bf16 inputs).

Both implementations freeze the same weights (frozen DiT and VAE weights get ``requires_grad=False``, so
autograd forms no weight gradient for them; only the input gradients that flow *through* frozen linears to
LoRA, adapters, the proprio encoder and the SFAE are computed): :func:`check_frozen` verifies that set.
"""
from __future__ import annotations

from torch import nn

__all__ = ["check_frozen"]


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
