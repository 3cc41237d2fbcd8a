"""Wan2.1 causal video VAE in plain PyTorch (docs/model.md, "VAE").

The module tree reproduces the published ``Wan2.1_VAE.pth`` key layout exactly when built from the
``paper`` :class:`~lwam.config.VAEConfig` (126,892,531 parameters); the same code builds any scaled
preset (``tiny``).

Shapes (paper config, f = 4 temporal and s = 8 spatial compression)::

    video [B, 3, 1 + f*k, H, W] in [-1, 1]  --encode-->  z [B, 16, 1 + k, H/s, W/s] (normalised)
    z     [B, 16, 1 + k, h, w]              --decode-->  video [B, 3, 1 + f*k, s*h, s*w] in [-1, 1]

Causality. Every 3D convolution pads time only on the past side, the temporal downsampler keeps the
first frame on its own, and the temporal upsampler passes the first latent frame through untouched.
So latent frame j depends only on video frames 0 .. f*j, and a video can be processed either as one
sequence ("full", the fast path used for training) or in chunks -- the first frame alone, then groups
of f frames; the decoder one latent frame at a time -- with a per-convolution feature cache that
carries the last frames of the previous chunk (the published inference scheme, bounded memory).
Both give the same numbers up to floating-point rounding.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lwam.config import VAEConfig

__all__ = [
    "WanVAE",
    "VAEOutput",
    "CausalConv3d",
    "ChannelRMSNorm",
    "ResidualBlock",
    "AttentionBlock",
    "Resample",
    "Encoder3d",
    "Decoder3d",
    "FrameConv2d",
    "FrameEncoder",
    "load_wan_vae_state_dict",
    "count_parameters",
]

# Maps a cache-aware module to what it remembers from earlier chunks (see module docstring).
FeatureCache = dict


class CausalConv3d(nn.Conv3d):
    """3D convolution padded causally in time: ``2 * padding_t`` zero frames in front, none after;
    symmetric zero padding in space.

    ``forward(x [B, C, T, H, W], cache=None) -> [B, C', T', H', W']``. With a ``cache`` dict the call
    is one chunk of a longer sequence: the last ``2 * padding_t`` input frames of the earlier chunks
    stand in for (part of) the zero padding, so chunked and whole-sequence outputs agree.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        front = self.time_pad
        if cache is not None and front > 0:
            prev = cache.get(self)
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
                front -= prev.shape[2]
            cache[self] = x[:, :, -self.time_pad:]
        if front > 0 or any(self.space_pad):
            x = F.pad(x, (*self.space_pad, front, 0))
        return super().forward(x)


class ChannelRMSNorm(nn.Module):
    """RMS norm over the channel dimension with a learnable gain and no bias:
    ``y = x / ||x||_c * sqrt(C) * gamma``.

    ``x``: [B, C, T, H, W] (``images=False``, gamma [C, 1, 1, 1]) or [B, C, H, W] (gamma [C, 1, 1]).
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same as F.normalize(x, dim=1) (eps 1e-12 on the norm), but a sum of squares reduces over the
        # strided channel dim several times faster than linalg.vector_norm on CPU.
        inv = torch.rsqrt(x.float().square().sum(dim=1, keepdim=True).clamp_min(1e-24)).to(x.dtype)
        return x * inv * (self.scale * self.gamma)


class ResidualBlock(nn.Module):
    """[RMSNorm, SiLU, conv 3x3x3, RMSNorm, SiLU, Dropout, conv 3x3x3] + shortcut (1x1x1 conv when the
    width changes). ``[B, in_dim, T, H, W] -> [B, out_dim, T, H, W]``."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelRMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        # Start as (shortcut-)identity: irrelevant for loaded weights, but a VAE trained from scratch
        # (tiny preset) converges much faster in its first few hundred steps.
        nn.init.zeros_(self.residual[6].weight)
        nn.init.zeros_(self.residual[6].bias)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no mixing across time).
    ``[B, C, T, H, W] -> [B, C, T, H, W]``; residual, with the output projection zero-initialised."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = _frames_to_batch(x)                                   # [B*T, C, H, W]
        qkv = self.to_qkv(self.norm(y)).flatten(2).transpose(1, 2)  # [B*T, H*W, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)                # each [B*T, 1, H*W, C]
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return x + _batch_to_frames(self.proj(y), b)


class _Upsample2x(nn.Module):
    """Nearest-neighbour 2x spatial upsampling of [N, C, H, W] (computed in fp32 for bf16 inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Per-frame 2x spatial resampling, optionally with 2x temporal resampling.

    ``mode``:
      * ``"downsample2d"``: zero-pad right/bottom by one, 3x3 conv stride 2. [B, C, T, H, W] -> [B, C, T, H/2, W/2]
      * ``"downsample3d"``: the same, then ``time_conv`` (kernel (3,1,1), stride (2,1,1), no padding) over
        frames 1.., with frame 0 kept alone: T = 1 + 2k -> 1 + k.
      * ``"upsample2d"``: nearest 2x, 3x3 conv to C/2 channels. [B, C, T, H, W] -> [B, C/2, T, 2H, 2W]
      * ``"upsample3d"``: first ``time_conv`` (kernel (3,1,1), causal, C -> 2C) on frames 1.., whose two
        channel halves become two consecutive frames; frame 0 passes through: T = 1 + k -> 1 + 2k. Then
        as ``upsample2d``.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)
        elif mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            raise ValueError(f"mode: expected one of downsample2d/3d, upsample2d/3d, got {mode!r}")

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        b = x.shape[0]
        x = _batch_to_frames(self.resample(_frames_to_batch(x)), b)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _downsample_time(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        prev = cache.get(self) if cache is not None else None
        if cache is not None:
            cache[self] = x[:, :, -1:]
        if prev is not None:
            # A later chunk: the last frame of the previous chunk opens the first window.
            if x.shape[2] % 2:
                raise ValueError(f"x: expected an even number of frames in a later chunk, got {x.shape[2]}")
            return self.time_conv(torch.cat([prev, x], dim=2))
        if x.shape[2] % 2 == 0:
            raise ValueError(f"x: expected an odd number of frames (1 + 2k), got {x.shape[2]}")
        if x.shape[2] == 1:
            return x
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)

    def _upsample_time(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        first_seen = cache is not None and cache.get(self) is not None
        if cache is not None:
            cache[self] = True
        head, rest = (x[:, :, :0], x) if first_seen else (x[:, :, :1], x[:, :, 1:])
        if rest.shape[2] == 0:
            return head
        b, c, t, h, w = rest.shape
        y = self.time_conv(rest, cache).view(b, 2, c, t, h, w)
        y = torch.stack([y[:, 0], y[:, 1]], dim=3).reshape(b, c, 2 * t, h, w)  # interleave the two halves
        return torch.cat([head, y], dim=2)


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]."""
    bt, c, h, w = x.shape
    return x.view(b, bt // b, c, h, w).transpose(1, 2)


def _call(layer: nn.Module, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)):
        return layer(x, cache)
    return layer(x)


class Encoder3d(nn.Module):
    """``[B, 3, 1 + f*k, H, W] -> [B, out_dim, 1 + k, H/s, W/s]``.

    conv1, then per level ``num_res_blocks`` residual blocks and (except after the last level) a
    downsampler, then middle = residual, attention, residual, then head = RMSNorm, SiLU, conv to
    ``out_dim`` (2 * z_dim: mean and log-variance before ``WanVAE.conv1``).
    """

    def __init__(self, cfg: VAEConfig, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, dim, dropout))
                in_dim = dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        d = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(d, d, dropout), AttentionBlock(d), ResidualBlock(d, d, dropout))
        self.head = nn.Sequential(ChannelRMSNorm(d), nn.SiLU(), CausalConv3d(d, out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for stage in (self.downsamples, self.middle, self.head):
            for layer in stage:
                x = _call(layer, x, cache)
        return x


class Decoder3d(nn.Module):
    """``[B, z_dim, 1 + k, h, w] -> [B, 3, 1 + f*k, s*h, s*w]`` (unclamped).

    conv1, middle = residual, attention, residual, then per level (widest first)
    ``num_res_blocks + 1`` residual blocks and (except after the last level) an upsampler that halves
    the width, then head = RMSNorm, SiLU, conv to 3 channels.
    """

    def __init__(self, cfg: VAEConfig, dropout: float = 0.0) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        d = dims[0]
        self.middle = nn.Sequential(ResidualBlock(d, d, dropout), AttentionBlock(d), ResidualBlock(d, d, dropout))
        layers: list[nn.Module] = []
        for i, (in_dim, dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous level's upsampler halved the width
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, dim, dropout))
                in_dim = dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(ChannelRMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for stage in (self.middle, self.upsamples, self.head):
            for layer in stage:
                x = _call(layer, x, cache)
        return x


class FrameConv2d(nn.Module):
    """A :class:`CausalConv3d` applied to a single frame [B, C, 1, H, W].

    Causal padding puts ``time_pad`` zero frames before the only real frame, so only the last temporal
    slice of the kernel touches data: the result is a 2D convolution with ``weight[:, :, -1]`` (same
    spatial padding and stride). ``forward(x [B, C, 1, H, W], cache=None) -> [B, C', 1, H', W']``.
    """

    def __init__(self, conv: CausalConv3d):
        super().__init__()
        kt = conv.kernel_size[0]
        if conv.time_pad != kt - 1 or conv.stride[0] != 1 or conv.dilation[0] != 1:
            raise ValueError(f"FrameConv2d: unsupported causal conv (kernel {conv.kernel_size}, "
                             f"time_pad {conv.time_pad}, stride {conv.stride})")
        self.weight = nn.Parameter(conv.weight.detach()[:, :, -1].clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.space_pad = tuple(conv.space_pad)
        self.stride = tuple(conv.stride[1:])

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        y = x[:, :, 0]
        if any(self.space_pad):
            y = F.pad(y, self.space_pad)
        return F.conv2d(y, self.weight, self.bias, stride=self.stride)[:, :, None]


def _frame_convs_(module: nn.Module) -> int:
    """Replace every causal 3D conv under ``module`` by :class:`FrameConv2d`, in place. A
    :class:`Resample` is left as it is: its spatial convs are 2D already and its temporal conv never runs
    on a lone frame. Returns the number replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, Resample):
            continue
        if isinstance(child, CausalConv3d):
            setattr(module, name, FrameConv2d(child))
            n += 1
        else:
            n += _frame_convs_(child)
    return n


class FrameEncoder(nn.Module):
    """The encoder half of a :class:`WanVAE` for one frame: ``frame [B, 3, 1, H, W] in [-1, 1] -> z
    [B, z_dim, 1, H/s, W/s]`` fp32, the normalised posterior mean as ``WanVAE.encode``.

    ``single_frame=True`` replaces every causal 3D conv by its last temporal kernel slice
    (:class:`FrameConv2d`; a third of the encoder FLOPs for 3x3x3 kernels, exact up to summation order).
    Built by :meth:`WanVAE.frame_encoder`; the source VAE is not modified."""

    def __init__(self, vae: "WanVAE", single_frame: bool = True):
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder)
        self.conv1 = copy.deepcopy(vae.conv1)
        self.z_dim = vae.z_dim
        self.register_buffer("latent_mean", vae.latent_mean.detach().clone().float(), persistent=False)
        self.register_buffer("latent_std", vae.latent_std.detach().clone().float(), persistent=False)
        self.replaced = 0
        if single_frame:
            self.replaced = _frame_convs_(self)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        x = frame.to(self.conv1.weight.dtype)
        mean = self.conv1(self.encoder(x))[:, : self.z_dim]
        return _normalize_latent(mean, self.latent_mean, self.latent_std).float()


def _normalize_latent(mu: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(mu - mean) / std per channel; mu [B, C, ...], mean/std [C]."""
    view = (1, mu.shape[1]) + (1,) * (mu.dim() - 2)
    return (mu - mean.view(view).to(mu.dtype)) / std.view(view).to(mu.dtype)


class VAEOutput(NamedTuple):
    """``recon`` [B, 3, T, H, W] (unclamped, for losses); ``mean``/``logvar`` [B, z_dim, T', h, w]
    (the raw, un-normalised posterior)."""

    recon: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor


class _HybridMethod:
    """Descriptor: ``obj.f(...)`` binds the instance, ``Cls.f(...)`` binds the class."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj: Any, owner: type) -> Any:
        target = owner if obj is None else obj
        return lambda *args, **kwargs: self.fn(target, *args, **kwargs)


class WanVAE(nn.Module):
    """The Wan2.1 causal video VAE built from ``cfg`` (see the module docstring for shapes).

    State-dict keys: ``encoder.*``, ``conv1.*`` (1x1x1, 2z -> 2z: mean, log-variance), ``conv2.*``
    (1x1x1, z -> z, before the decoder), ``decoder.*``. The per-channel latent statistics are
    non-persistent buffers (``latent_mean``, ``latent_std`` [z_dim]) initialised from
    ``cfg.latent_mean/std``, so the state dict matches the published file.
    """

    def __init__(self, cfg: VAEConfig | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else VAEConfig()
        n_levels = len(cfg.dim_mult)
        if n_levels < 1 or len(cfg.temporal_downsample) != n_levels - 1:
            raise ValueError(f"cfg.temporal_downsample: expected {n_levels - 1} entries (len(dim_mult) - 1), "
                             f"got {len(cfg.temporal_downsample)}")
        if len(cfg.latent_mean) != cfg.z_dim or len(cfg.latent_std) != cfg.z_dim:
            raise ValueError(f"cfg.latent_mean/std: expected {cfg.z_dim} values each, "
                             f"got {len(cfg.latent_mean)} and {len(cfg.latent_std)}")
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        self.spatial_factor = cfg.spatial_factor
        self.temporal_factor = cfg.temporal_factor
        self.encoder = Encoder3d(cfg, cfg.z_dim * 2, dropout)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg, dropout)
        self.register_buffer("latent_mean", torch.tensor(cfg.latent_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latent_std", torch.tensor(cfg.latent_std, dtype=torch.float32), persistent=False)

    # ----------------------------------------------------------------------------------- checks
    def _param_dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def check_video(self, video: torch.Tensor, name: str = "video") -> None:
        """Raise ValueError/TypeError unless ``video`` is [B, 3, 1 + f*k, H, W] float with H, W divisible
        by the spatial factor."""
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor [B, 3, T, H, W], got {type(video).__name__}")
        if not video.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {video.dtype}")
        f, s = self.temporal_factor, self.spatial_factor
        shape = tuple(video.shape)
        if video.dim() != 5:
            raise ValueError(f"{name}: expected rank 5 [B, 3, T, H, W], got shape {shape}")
        if shape[1] != 3:
            raise ValueError(f"{name}: expected 3 channels [B, 3, T, H, W], got shape {shape}")
        if shape[2] < 1 or (shape[2] - 1) % f:
            raise ValueError(f"{name}: expected T = 1 + {f}*k frames, got T = {shape[2]} (shape {shape})")
        if shape[0] < 1 or shape[3] < s or shape[4] < s or shape[3] % s or shape[4] % s:
            raise ValueError(f"{name}: expected H and W to be positive multiples of {s}, "
                             f"got {shape[3]}x{shape[4]} (shape {shape})")

    def check_latent(self, z: torch.Tensor, name: str = "z") -> None:
        """Raise ValueError/TypeError unless ``z`` is a float [B, z_dim, T', h, w]."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor [B, {self.z_dim}, T, h, w], got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {z.dtype}")
        shape = tuple(z.shape)
        if z.dim() != 5 or shape[1] != self.z_dim or min(shape) < 1:
            raise ValueError(f"{name}: expected shape [B, {self.z_dim}, T, h, w] (rank 5, all sizes >= 1), "
                             f"got {shape}")

    # ------------------------------------------------------------------------------ core passes
    def _encode_features(self, video: torch.Tensor, chunked: bool) -> torch.Tensor:
        """video [B, 3, 1 + f*k, H, W] -> encoder output [B, 2*z_dim, 1 + k, H/s, W/s]."""
        if not chunked:
            return self.encoder(video)
        cache: FeatureCache = {}
        f = self.temporal_factor
        chunks = [self.encoder(video[:, :, :1], cache)]
        for start in range(1, video.shape[2], f):
            chunks.append(self.encoder(video[:, :, start:start + f], cache))
        return torch.cat(chunks, dim=2)

    def encode_moments(self, video: torch.Tensor, chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of ``video`` [B, 3, 1 + f*k, H, W] in [-1, 1]: raw (un-normalised) ``mean`` and
        ``logvar``, each [B, z_dim, 1 + k, H/s, W/s]."""
        self.check_video(video)
        x = video.to(self._param_dtype())
        mean, logvar = self.conv1(self._encode_features(x, chunked)).chunk(2, dim=1)
        return mean, logvar

    def normalize_latent(self, mu: torch.Tensor) -> torch.Tensor:
        """(mu - latent_mean) / latent_std per channel; [B, z_dim, ...] -> same shape."""
        return _normalize_latent(mu, self.latent_mean, self.latent_std)

    def denormalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_latent`."""
        view = (1, self.z_dim) + (1,) * (z.dim() - 2)
        return z * self.latent_std.view(view).to(z.dtype) + self.latent_mean.view(view).to(z.dtype)

    def frame_encoder(self, single_frame: bool = True) -> FrameEncoder:
        """A copy of the encoder half for one frame at a time (:class:`FrameEncoder`)."""
        return FrameEncoder(self, single_frame)

    def encode(self, video: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """video [B, 3, 1 + f*k, H, W] in [-1, 1] -> normalised latent z [B, z_dim, 1 + k, H/s, W/s].

        Deterministic (the posterior mean). ``chunked=True`` runs the published chunked scheme (first
        frame alone, then groups of f frames, with the feature cache); ``False`` runs the whole clip in
        one pass (same result up to rounding, faster, more memory).
        """
        mean, _ = self.encode_moments(video, chunked)
        return self.normalize_latent(mean)

    def _decode_raw(self, mu: torch.Tensor, chunked: bool) -> torch.Tensor:
        """Raw latent [B, z_dim, 1 + k, h, w] -> unclamped video [B, 3, 1 + f*k, s*h, s*w]."""
        x = self.conv2(mu)
        if not chunked:
            return self.decoder(x)
        cache: FeatureCache = {}
        return torch.cat([self.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])], dim=2)

    def decode(self, z: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """Normalised latent z [B, z_dim, 1 + k, h, w] -> video [B, 3, 1 + f*k, s*h, s*w] clamped to [-1, 1].

        ``chunked=True`` decodes one latent frame at a time with the feature cache (published scheme).
        """
        self.check_latent(z)
        mu = self.denormalize_latent(z.to(self._param_dtype()))
        return self._decode_raw(mu, chunked).clamp(-1.0, 1.0)

    def forward(self, video: torch.Tensor, sample_posterior: bool = False, chunked: bool = False,
                generator: torch.Generator | None = None) -> VAEOutput:
        """Training pass: video [B, 3, 1 + f*k, H, W] -> :class:`VAEOutput` (unclamped recon of the same
        shape, raw posterior mean/logvar [B, z_dim, 1 + k, H/s, W/s]). With ``sample_posterior`` the
        decoder sees mean + exp(logvar / 2) * eps instead of the mean."""
        mean, logvar = self.encode_moments(video, chunked)
        z = mean
        if sample_posterior:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        return VAEOutput(self._decode_raw(z, chunked), mean, logvar)

    # --------------------------------------------------------------------------- latent stats
    @torch.no_grad()
    def set_latent_stats(self, mean: torch.Tensor | Any, std: torch.Tensor | Any) -> None:
        """Set the per-channel normalisation (z = (mu - mean) / std), both [z_dim], std > 0.

        Writes the buffers and ``self.cfg.latent_mean/std`` (tuples of floats): the buffers are not in
        the state dict (it must match the published file), so the config -- saved with any checkpoint --
        is what carries them.
        """
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten().cpu()
        std = torch.as_tensor(std, dtype=torch.float32).flatten().cpu()
        if mean.numel() != self.z_dim or std.numel() != self.z_dim:
            raise ValueError(f"mean/std: expected [{self.z_dim}] each, got {list(mean.shape)} and {list(std.shape)}")
        if not torch.isfinite(mean).all() or not (std > 0).all() or not torch.isfinite(std).all():
            raise ValueError("mean/std: expected finite values and std > 0")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.cfg.latent_mean = tuple(float(v) for v in mean)
        self.cfg.latent_std = tuple(float(v) for v in std)

    # ------------------------------------------------------------------------------- loading
    @_HybridMethod
    def load_pretrained(target: Any, path: str | os.PathLike, strict: bool = True,
                        cfg: VAEConfig | None = None) -> "WanVAE":
        """Load a weight file (``Wan2.1_VAE.pth``, or a ``.safetensors`` written by ``lwam.vae_train``).

        ``vae.load_pretrained(path)`` loads into an existing model (one built on the meta device is
        materialised); ``WanVAE.load_pretrained(path, cfg=None)`` first builds ``WanVAE(cfg)`` (default:
        the paper config). Returns the model. Any missing, unexpected (``strict=True`` only) or
        mis-shaped tensor raises ValueError naming it. Latent statistics stored in a safetensors file's
        metadata are applied.
        """
        vae = target(cfg) if isinstance(target, type) else target
        state, meta = _read_weights(path)
        vae._load_checked(state, strict=strict, source=str(path))
        if "latent_mean" in meta and "latent_std" in meta:
            vae.set_latent_stats(json.loads(meta["latent_mean"]), json.loads(meta["latent_std"]))
        return vae

    def _load_checked(self, state: dict[str, torch.Tensor], strict: bool = True, source: str = "state") -> None:
        from lwam.model.weights import check_state_dict  # the one strict check (CheckpointMismatchError)

        own = self.state_dict()
        expected = {k: tuple(v.shape) for k, v in own.items()}
        found = state
        if not strict:  # missing and unexpected tensors allowed; a shape mismatch never is
            expected = {k: v for k, v in expected.items() if k in state}
            found = {k: v for k, v in state.items() if k in own}
        check_state_dict(expected, found, f"{source}: does not match the WanVAE layout")
        dtype = self._param_dtype()
        on_meta = any(p.is_meta for p in self.parameters())
        if on_meta:
            device = torch.device("cpu")
            for name, buf in list(self.named_buffers()):
                if buf.is_meta:  # latent stats: rebuild from the config on the CPU
                    mod_name, _, attr = name.rpartition(".")
                    mod = self.get_submodule(mod_name) if mod_name else self
                    src = self.cfg.latent_mean if attr == "latent_mean" else self.cfg.latent_std
                    mod.register_buffer(attr, torch.tensor(src, dtype=torch.float32, device=device), persistent=False)
        else:
            device = self.conv1.weight.device
        loadable = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                    for k, v in state.items() if k in own}
        self.load_state_dict(loadable, strict=strict, assign=on_meta)


def _read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from lwam._safe_load import read_safetensors_with_metadata

        return read_safetensors_with_metadata(path, "VAE weight file")
    return load_wan_vae_state_dict(path), {}


def load_wan_vae_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Wan2.1 VAE ``.pth`` as ``{name: tensor}`` without executing code from the file
    (``torch.load(weights_only=True)``, CPU). A state dict nested under ``'model_state'`` is unwrapped.
    Raises FileNotFoundError for a missing file and ValueError for anything but a flat tensor dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no VAE weight file at {str(path)!r}")
    from lwam._safe_load import torch_load_plain

    obj = torch_load_plain(path, "VAE weight file")
    if isinstance(obj, dict) and "model_state" in obj and isinstance(obj["model_state"], dict):
        obj = obj["model_state"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path}: expected only tensors in the state dict, these entries are not: "
                         + ", ".join(not_tensors[:10]))
    return dict(obj)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(math.prod(p.shape) for p in module.parameters())
