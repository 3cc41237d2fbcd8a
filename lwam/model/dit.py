"""The Wan2.1 video DiT with LoRA, residual adapters and layer taps (plain PyTorch).

State-dict keys follow the published files: the native Wan2.1 keys (``blocks.N.self_attn.q.weight``, ...)
for the pretrained weights, plus ``blocks.N.self_attn.lora_q.{down,up}_proj.weight``,
``blocks.N.ffn_lora_{in,out}.*`` and ``wam_adapters.{8,16,24}.*`` as in a Light-WAM release ('mot' entry,
prefix ``mixtures.video.`` stripped).

Shapes: B batch, F latent frames, S = F * Hp * Wp tokens, D = ``cfg.dim``, Lc context tokens.
Timesteps are per latent frame ([B, F]): every token of a frame carries its frame's t, and the
conditioning frame 0 always has t = 0.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from lwam.config import AdapterConfig, DiTConfig, ImplConfig, LoRAConfig
from lwam.model.attention import first_frame_causal_attention, dense_attention
from lwam.model.layers import GELU, gelu, sinusoid, upcast, upcast_dtype
from lwam.model.lora import LoRA, linear_with_lora, merge_lora_
from lwam.model.rope import apply_rope, rope_cos_sin, rope_freqs_complex


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learnable gain, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class _Attention(nn.Module):
    """q, k, v, o projections (with their LoRA pairs) and q/k RMSNorm over D, shared by both attentions."""

    lora_prefix = ""

    def __init__(self, cfg: DiTConfig, lora: LoRAConfig | None):
        super().__init__()
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps)
        self.norm_k = RMSNorm(d, cfg.eps)
        _add_lora(self, self.lora_prefix, d, d, lora)


class SelfAttention(_Attention):
    """Self-attention with q/k RMSNorm over D, 3D RoPE and the first-frame-causal mask."""

    lora_prefix = "self_attn"

    def __init__(self, cfg: DiTConfig, lora: LoRAConfig | None):
        super().__init__(cfg, lora)
        self.attention = ImplConfig().attention  # set by WanDiT.set_impl

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n0: int) -> torch.Tensor:
        b, s, d = x.shape
        h = self.num_heads
        q = self.norm_q(linear_with_lora(self.q, getattr(self, "lora_q", None), x)).view(b, s, h, d // h)
        k = self.norm_k(linear_with_lora(self.k, getattr(self, "lora_k", None), x)).view(b, s, h, d // h)
        v = linear_with_lora(self.v, getattr(self, "lora_v", None), x).view(b, s, h, d // h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = first_frame_causal_attention(q, k, v, n0, impl=self.attention).reshape(b, s, d)
        return linear_with_lora(self.o, getattr(self, "lora_o", None), y)


class CrossAttention(_Attention):
    """Cross-attention from tokens [B, S, D] to the embedded context [B, Lc, D]."""

    lora_prefix = "cross_attn"

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        lc = context.shape[1]
        h = self.num_heads
        q = self.norm_q(linear_with_lora(self.q, getattr(self, "lora_q", None), x)).view(b, s, h, d // h)
        k = self.norm_k(linear_with_lora(self.k, getattr(self, "lora_k", None), context)).view(b, lc, h, d // h)
        v = linear_with_lora(self.v, getattr(self, "lora_v", None), context).view(b, lc, h, d // h)
        y = dense_attention(q, k, v).reshape(b, s, d)
        return linear_with_lora(self.o, getattr(self, "lora_o", None), y)


def _add_lora(module: nn.Module, prefix: str, d_in: int, d_out: int, lora: LoRAConfig | None) -> None:
    if lora is None or not lora.enabled:
        return
    for name in ("q", "k", "v", "o"):
        if f"{prefix}.{name}" in lora.targets:
            setattr(module, f"lora_{name}", LoRA(d_in, d_out, lora.rank, lora.scale))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int) -> torch.Tensor:
    """x [B, S, D] (S = F * n), shift/scale [B, F, D] fp32 -> x * (1 + scale) + shift per frame."""
    b, s, d = x.shape
    xf = upcast(x).view(b, frames, s // frames, d)
    return (xf * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, s, d).to(x.dtype)


def _gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, frames: int) -> torch.Tensor:
    b, s, d = x.shape
    out = upcast(x).view(b, frames, s // frames, d) + upcast(y).view(b, frames, s // frames, d) * gate[:, :, None]
    return out.view(b, s, d).to(x.dtype)


class DiTBlock(nn.Module):
    """adaLN-modulated self-attn -> cross-attn -> FFN, each with a residual."""

    def __init__(self, cfg: DiTConfig, lora: LoRAConfig | None):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg, lora)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg, lora)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), GELU(), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)
        if lora is not None and lora.enabled:
            if "ffn.0" in lora.targets:
                self.ffn_lora_in = LoRA(d, cfg.ffn_dim, lora.rank, lora.scale)
            if "ffn.2" in lora.targets:
                self.ffn_lora_out = LoRA(cfg.ffn_dim, d, lora.rank, lora.scale)

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, n0: int) -> torch.Tensor:
        """x [B, S, D]; e [B, F, 6, D] fp32 time projection; context [B, Lc, D]."""
        frames = e.shape[1]
        mod = upcast(self.modulation)[:, None] + e  # [B, F, 6, D]
        sh1, sc1, g1, sh2, sc2, g2 = mod.unbind(2)
        y = self.self_attn(_modulate(self.norm1(x), sh1, sc1, frames), cos, sin, n0)
        x = _gated_add(x, y, g1, frames)
        x = x + self.cross_attn(self.norm3(x), context)
        h = _modulate(self.norm2(x), sh2, sc2, frames)
        h = linear_with_lora(self.ffn[0], getattr(self, "ffn_lora_in", None), h)
        h = self.ffn[1](h)
        y = linear_with_lora(self.ffn[2], getattr(self, "ffn_lora_out", None), h)
        return _gated_add(x, y, g2, frames)

    def lora_pairs(self) -> list[tuple[nn.Module, str, nn.Linear]]:
        """(owner, LoRA attribute name, frozen linear) for every LoRA this block holds."""
        pairs = []
        for attn in (self.self_attn, self.cross_attn):
            for name in ("q", "k", "v", "o"):
                if hasattr(attn, f"lora_{name}"):
                    pairs.append((attn, f"lora_{name}", getattr(attn, name)))
        for name, idx in (("ffn_lora_in", 0), ("ffn_lora_out", 2)):
            if hasattr(self, name):
                pairs.append((self, name, self.ffn[idx]))
        return pairs

    @torch.no_grad()
    def merge_lora_(self) -> int:
        """Fold every LoRA into its frozen linear (``W + scale * up @ down`` in fp32) and remove it; the
        block then computes the same function with one GEMM per target. Returns the number merged."""
        pairs = self.lora_pairs()
        for owner, name, linear in pairs:
            merge_lora_(linear, getattr(owner, name))
            delattr(owner, name)
        return len(pairs)


class ResidualAdapter(nn.Module):
    """h' = h + Up(GELU_tanh(Down(LN(h)))), Up zero-initialised so that a new adapter is the identity."""

    def __init__(self, dim: int, cfg: AdapterConfig):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=cfg.eps)
        self.down_proj = nn.Linear(dim, cfg.hidden)
        self.up_proj = nn.Linear(cfg.hidden, dim)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up_proj(gelu(self.down_proj(self.norm(h))))


class Head(nn.Module):
    """Output head: LN (no affine) + modulation (1, 2, D) + Linear(D, C_out * pt * ph * pw)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(d, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], e [B, F, D] fp32 time embedding -> [B, S, C_out * prod(patch)]."""
        mod = upcast(self.modulation)[:, None] + e[:, :, None]  # [B, F, 2, D]
        shift, scale = mod.unbind(2)
        return self.head(_modulate(self.norm(x), shift, scale, e.shape[1]))


def dit_param_group(name: str) -> str:
    """Which part of the DiT a state-dict key belongs to: "lora", "adapters", "video_head" or "base"
    (the pretrained Wan2.1 weights other than the head)."""
    if ".lora_" in name or ".ffn_lora_" in name:
        return "lora"
    if name.startswith("wam_adapters."):
        return "adapters"
    if name.startswith("head."):
        return "video_head"
    return "base"


@dataclass
class DiTOutput:
    video: torch.Tensor | None       # [B, C_out, F, H, W] (flow prediction), None when not asked for
    taps: list[torch.Tensor]         # adapted states [B, S, D] of the tapped layers, in tap order


class WanDiT(nn.Module):
    """Wan2.1 text-to-video DiT + LoRA + residual adapters + layer taps."""

    def __init__(self, cfg: DiTConfig, lora: LoRAConfig | None = None, adapter: AdapterConfig | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), GELU(), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(DiTBlock(cfg, lora) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.adapter_layers: tuple[int, ...] = tuple(adapter.layers) if adapter is not None else ()
        self.wam_adapters = nn.ModuleDict({str(l): ResidualAdapter(d, adapter) for l in self.adapter_layers})
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.impl = ImplConfig()
        self.set_impl(self.impl)
        self._init_weights()

    def set_impl(self, impl: ImplConfig) -> None:
        """Compute attention and RoPE as ``impl`` says (see :class:`~lwam.config.ImplConfig`); the weights
        are untouched. Block compilation is the owner's (``LightWAM.set_impl``)."""
        self.impl = impl
        for block in self.blocks:
            block.self_attn.attention = impl.attention
        self._rope_tables.clear()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and "lora" not in name and "wam_adapters" not in name:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in list(self.text_embedding) + list(self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # --- pieces ------------------------------------------------------------------------------
    def rope_tables(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RoPE tables for a (F, Hp, Wp) grid: (cos, sin) [S, head_dim/2] fp32 (``impl.rope == "real"``) or
        (freqs [S, head_dim/2] complex128, None) (``"complex"``); cached when ``impl.rope_cache``."""
        impl = self.impl
        key = (impl.rope, tuple(grid), str(device))
        if impl.rope_cache and key in self._rope_tables:
            return self._rope_tables[key]
        c = self.cfg
        if impl.rope == "real":
            tables = rope_cos_sin(grid, c.head_dim, c.rope_theta, device=device)
        else:
            tables = (rope_freqs_complex(grid, c.head_dim, c.rope_theta, device=device), None)
        if impl.rope_cache and not torch.is_inference_mode_enabled():  # inference tensors cannot serve autograd
            self._rope_tables[key] = tables
        return tables

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """context [B, Lc, text_dim] -> [B, Lc, D]."""
        return self.text_embedding(context)

    def time_embed(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timesteps [B, F] -> (e [B, F, D], e6 [B, F, 6, D]), fp32 (fp64 for an fp64 model)."""
        w = self.time_embedding[0].weight
        e = upcast(self.time_embedding(sinusoid(timesteps, self.cfg.freq_dim).to(upcast_dtype(w.dtype)).to(w.dtype)))
        e6 = upcast(self.time_projection(e.to(self.time_projection[1].weight.dtype)))
        return e, e6.unflatten(-1, (6, self.cfg.dim))

    def patchify(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """latents [B, C, F, H, W] -> (tokens [B, S, D], grid (F, Hp, Wp))."""
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid  # type: ignore[return-value]

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """x [B, S, pt*ph*pw*C] -> [B, C, F*pt, Hp*ph, Wp*pw]."""
        b = x.shape[0]
        pt, ph, pw = self.cfg.patch_size
        f, h, w = grid
        c = self.cfg.out_channels
        x = x.view(b, f, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, f * pt, h * ph, w * pw)

    def check_latents(self, latents: torch.Tensor, timesteps: torch.Tensor) -> None:
        c = self.cfg
        if latents.dim() != 5 or latents.shape[1] != c.in_channels:
            raise ValueError(f"latents: expected [B, {c.in_channels}, F, H, W], got {tuple(latents.shape)}")
        pt, ph, pw = c.patch_size
        if latents.shape[2] % pt or latents.shape[3] % ph or latents.shape[4] % pw:
            raise ValueError(f"latents: F, H, W must be divisible by patch {c.patch_size}, got {tuple(latents.shape)}")
        if timesteps.shape != (latents.shape[0], latents.shape[2] // pt):
            raise ValueError(f"timesteps: expected [B, F] = {(latents.shape[0], latents.shape[2] // pt)}, "
                             f"got {tuple(timesteps.shape)}")

    # --- forward -----------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, *,
                taps: tuple[int, ...] = (), stop_after: int | None = None, return_video: bool = True,
                context_embedded: bool = False) -> DiTOutput:
        """latents [B, C, F, H, W]; timesteps [B, F] (per latent frame); context [B, Lc, text_dim]
        (or [B, Lc, D] with ``context_embedded``). ``taps``: block indices whose (adapted) output states
        are returned; ``stop_after``: last block to run (the video head then cannot run)."""
        self.check_latents(latents, timesteps)
        x, grid = self.patchify(latents)
        n0 = grid[1] * grid[2]  # tokens of latent frame 0
        cos, sin = self.rope_tables(grid, x.device)
        e, e6 = self.time_embed(timesteps)
        ctx = context if context_embedded else self.embed_context(context.to(self.text_embedding[0].weight.dtype))
        last = len(self.blocks) - 1 if stop_after is None else stop_after
        if return_video and last != len(self.blocks) - 1:
            raise ValueError("return_video=True needs all blocks; pass stop_after=None")
        missing = [t for t in taps if t > last]
        if missing:
            raise ValueError(f"taps {missing} lie after stop_after={last}")
        x, tapped = self.run_blocks(x, e6, ctx, cos, sin, n0, taps, last)
        video = self.unpatchify(self.head(x, e), grid) if return_video else None
        return DiTOutput(video=video, taps=tapped)

    def run_blocks(self, x: torch.Tensor, e6: torch.Tensor, ctx: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor | None, n0: int, taps: tuple[int, ...] = (), last: int | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks loop (each block, then its adapter where one sits): tokens x [B, S, D], e6
        [B, F, 6, D] fp32, embedded context [B, Lc, D], RoPE tables -> (x after block ``last`` (default:
        the last block), the states of ``taps`` in tap order, each [B, S, D])."""
        last = len(self.blocks) - 1 if last is None else last
        tapped: dict[int, torch.Tensor] = {}
        for i in range(last + 1):
            x = self.blocks[i](x, e6, ctx, cos, sin, n0)
            if str(i) in self.wam_adapters:
                x = self.wam_adapters[str(i)](x)
            if i in taps:
                tapped[i] = x
        return x, [tapped[t] for t in taps]

    def action_copy(self, last: int | None = None, merge_lora: bool = True) -> "WanDiT":
        """A copy for the action pass, which never needs the video head nor the blocks after ``last``
        (default: keep all): those are not copied at all. With ``merge_lora`` every block's LoRA is folded
        into its frozen weights (:meth:`DiTBlock.merge_lora_`). The source is not modified."""
        keep = len(self.blocks) if last is None else last + 1
        if not 0 < keep <= len(self.blocks):
            raise ValueError(f"last: expected a block index in [0, {len(self.blocks)}), got {last}")
        # deepcopy's memo maps an object to its copy: mapping the dropped modules to None skips them.
        memo = {id(self.head): None, **{id(b): None for b in list(self.blocks)[keep:]}}
        out = copy.deepcopy(self, memo)
        out.blocks = nn.ModuleList(list(out.blocks)[:keep])
        del out.head
        for block in out.blocks:  # a compiled forward (nn.Module.compile) would still call the source's
            block._compiled_call_impl = None
        if merge_lora:
            for block in out.blocks:
                block.merge_lora_()
        return out
