"""Attention for the DiT, with the first-frame-causal mask done exactly but mask-free.

Tokens of latent frame 0 (the first ``n0`` tokens) see only frame 0; later tokens see every token.
That is two dense attentions: frame-0 queries over frame-0 keys, the other queries over all keys.
``impl="masked"`` is the plain boolean-mask form kept as the reference.

Backends for the dense attentions, chosen once per process and logged: FlashAttention
(``flash_attn``, CUDA, fp16/bf16), xFormers (CUDA), else ``torch.nn.functional.scaled_dot_product_attention``.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from lwam._logging import log_once

_FLASH = importlib.util.find_spec("flash_attn") is not None
_XFORMERS = importlib.util.find_spec("xformers") is not None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Sq, H, d], k/v [B, Sk, H, d] -> [B, Sq, H, d], softmax(q k^T / sqrt d) v."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not torch.compiler.is_compiling():
        if _FLASH:
            from flash_attn import flash_attn_func
            log_once("attn-backend", "attention backend: flash-attn")
            return flash_attn_func(q, k, v)
        if _XFORMERS:
            from xformers.ops import memory_efficient_attention
            log_once("attn-backend", "attention backend: xformers")
            return memory_efficient_attention(q, k, v)
    if not torch.compiler.is_compiling():  # (inside a compiled block the choice is always SDPA; no graph break)
        log_once("attn-backend", "attention backend: torch SDPA"
                 + ("" if q.is_cuda else " (CPU)")
                 + ("" if (_FLASH or _XFORMERS) else "; flash-attn/xformers not installed"))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def first_frame_causal_mask(seq_len: int, n0: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [S, S], True where query i may attend key j: j < n0 or i >= n0."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j < n0) | (i >= n0)


def first_frame_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n0: int,
                                 impl: str = "split") -> torch.Tensor:
    """q, k, v [B, S, H, d]; the first ``n0`` tokens are latent frame 0. Returns [B, S, H, d]."""
    s = q.shape[1]
    if n0 >= s or n0 <= 0:
        return dense_attention(q, k, v)
    if impl == "masked":
        mask = first_frame_causal_mask(s, n0, q.device)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    if impl != "split":
        raise ValueError(f"attention impl must be 'split' or 'masked', got {impl!r}")
    head = dense_attention(q[:, :n0], k[:, :n0], v[:, :n0])
    rest = dense_attention(q[:, n0:], k, v)
    return torch.cat([head, rest], dim=1)
