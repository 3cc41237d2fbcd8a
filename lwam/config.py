"""Typed configuration for Light-WAM and its named presets.

Configuration is kept apart from modelling code: every module takes the sub-config it needs.
``get_preset(name)`` returns a fresh :class:`LightWAMConfig`; ``paper`` is exactly the published model (docs/model.md),
``tiny`` is the same architecture scaled down to train on two CPU cores in minutes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

# The ten LoRA targets of every DiT block (docs/model.md, "What trains").
LORA_TARGETS: tuple[str, ...] = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)

WAN_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass
class DiTConfig:
    """Wan2.1 video DiT. ``patch_size`` is (t, h, w) over latent frames."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_layers: int = 30
    num_heads: int = 12
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class LoRAConfig:
    rank: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] = LORA_TARGETS
    enabled: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class AdapterConfig:
    """Residual adapters h' = h + Up(GELU(Down(LN(h)))) after the tapped blocks (0-indexed)."""

    layers: tuple[int, ...] = (8, 16, 24)
    hidden: int = 256
    eps: float = 1e-6


@dataclass
class ActionExpertConfig:
    """StateFusionActionExpert sizes (which pooling arithmetic runs is :class:`ImplConfig`'s)."""

    num_queries: int = 16
    num_heads: int = 8
    compress_dim: int = 4608
    hidden_dim: int = 6144
    step_embed_dim: int = 256


@dataclass
class VAEConfig:
    """Wan2.1 causal video VAE (8x space, 4x time)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN_LATENT_STD

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


@dataclass
class TextConfig:
    """Text conditioning. ``encoder``: "cache" (precomputed umT5 embeddings), "umt5" (transformers, weights
    on disk) or "builtin" (a deterministic hashed-token embedding for presets without a pretrained encoder)."""

    dim: int = 4096
    max_tokens: int = 128
    encoder: str = "cache"
    prompt_template: str = "The robot arm performs the task: {instruction}"


@dataclass
class DataConfig:
    """Window and image conventions (docs/model.md, "Training objective" / "Data conventions")."""

    image_height: int = 224
    image_width: int = 448
    chunk_size: int = 32          # H: actions per window
    num_frames: int = 9           # video frames per window (every ``frame_stride`` steps)
    frame_stride: int = 4
    action_dim: int = 7
    proprio_dim: int = 8
    action_norm: str = "minmax"   # "minmax" -> [-1, 1] or "zscore"
    proprio_norm: str = "minmax"
    norm_clip: float = 5.0
    camera_layout: str = "libero"  # "libero" | "robotwin" | "row"
    cameras: tuple[str, ...] = ("agentview", "wrist")
    rotate_180: bool = True
    executed_steps: int = 10


@dataclass
class FlowConfig:
    shift: float = 5.0
    num_train_timesteps: int = 1000
    weight_center: float = 500.0
    weight_grid: int = 1000


@dataclass
class TrainConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.01
    max_steps: int = 100_000
    grad_clip: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    video_loss_weight: float = 1.0
    action_loss_weight: float = 1.0
    action_loss_steps: int = 8     # weight 1 on the first steps of the chunk, 0 on the rest
    video_downsample: int = 2
    mixed_precision: str = "bf16"  # used on CUDA; CPU trains in fp32
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000


def _validate_train(t: "TrainConfig") -> None:
    """Positive, finite training numbers (a zero or negative value is an error, never a default)."""
    import math

    for name in ("max_steps", "batch_size", "grad_accum", "log_every", "save_every"):
        v = getattr(t, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"train.{name}: expected an int >= 1, got {v!r}")
    if not isinstance(t.warmup_steps, int) or t.warmup_steps < 0:
        raise ValueError(f"train.warmup_steps: expected an int >= 0, got {t.warmup_steps!r}")
    for name in ("lr", "grad_clip"):
        v = getattr(t, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"train.{name}: expected a finite number > 0, got {v!r}")
    for name in ("weight_decay", "video_loss_weight", "action_loss_weight"):
        v = getattr(t, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"train.{name}: expected a finite number >= 0, got {v!r}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ValueError(f"train.min_lr_ratio: expected a number in [0, 1], got {t.min_lr_ratio!r}")


ATTENTION_IMPLS = ("split", "masked")
ROPE_IMPLS = ("real", "complex")


@dataclass(frozen=True)
class ImplConfig:
    """How the model computes (never *what*): the one switchboard between the published implementation's
    arithmetic and the fast one. Every field keeps the same weights, state-dict keys and result (up to
    summation order and fp32 rounding; tests/test_fast_step.py checks loss and every gradient).

    ``attention``: "masked" (one SDPA with a boolean first-frame-causal mask, as published) or "split"
    (two mask-free attentions through ``lwam.model.attention.dense_attention``: flash-attn, xFormers or
    SDPA). ``rope``: "complex" (complex128 tables and products, as published) or "real" (fp32 cos/sin
    pairs). ``rope_cache``: keep the RoPE tables per (rope, grid, device). ``fused_pooling``: the SFAE's
    learned-query pooling through the fused ``lwam::query_pool`` op (all tapped layers, one launch).
    ``fused_downsample``: the video branch's 2x2 mean through ``lwam::latent_downsample`` instead of
    ``F.avg_pool3d``. ``compile_blocks``: ``torch.compile(dynamic=False)`` of every DiT block (in place,
    state-dict keys unchanged).

    Read by the modules through ``LightWAM.set_impl`` (the one place that sets them), recorded in
    checkpoints (``impl.json``) and benchmark records. ``ImplConfig.reference()`` and ``ImplConfig.fast()``
    are the two named values; the default instance is the fast arithmetic kept eager (no compile).
    """

    attention: str = "split"
    rope: str = "real"
    rope_cache: bool = True
    fused_pooling: bool = True
    fused_downsample: bool = True
    compile_blocks: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"ImplConfig.attention: expected one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.rope not in ROPE_IMPLS:
            raise ValueError(f"ImplConfig.rope: expected one of {ROPE_IMPLS}, got {self.rope!r}")
        for f in dataclasses.fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"ImplConfig.{f.name}: expected a bool, got {getattr(self, f.name)!r}")

    @classmethod
    def reference(cls) -> "ImplConfig":
        """The published implementation's way: masked attention, complex128 RoPE rebuilt every forward,
        the plain per-layer pooler, ``F.avg_pool3d``, everything eager."""
        return cls(attention="masked", rope="complex", rope_cache=False, fused_pooling=False,
                   fused_downsample=False, compile_blocks=False)

    @classmethod
    def fast(cls, **changes: Any) -> "ImplConfig":
        """Every fast change on, compiled blocks included (``changes`` override single fields)."""
        return dataclasses.replace(cls(compile_blocks=True), **changes)

    @classmethod
    def named(cls, name: str) -> "ImplConfig":
        """"reference" or "fast"."""
        if name not in IMPLS:
            raise ValueError(f"impl: expected one of {sorted(IMPLS)}, got {name!r}")
        return IMPLS[name]()

    def replace(self, **changes: Any) -> "ImplConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImplConfig":
        return _from_dict(cls, d)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items())


IMPLS = {"reference": ImplConfig.reference, "fast": ImplConfig.fast}


@dataclass
class LightWAMConfig:
    name: str = "paper"
    dit: DiTConfig = field(default_factory=DiTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    expert: ActionExpertConfig = field(default_factory=ActionExpertConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # What trains: the paper freezes the pretrained DiT (LoRA + adapters + head train) and the VAE.
    freeze_backbone: bool = True
    train_vae: bool = False

    @property
    def action_dim(self) -> int:
        return self.data.action_dim

    @property
    def proprio_dim(self) -> int:
        return self.data.proprio_dim

    @property
    def chunk_size(self) -> int:
        return self.data.chunk_size

    @property
    def tap_layers(self) -> tuple[int, ...]:
        return self.adapter.layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LightWAMConfig":
        return _from_dict(cls, d)

    def replace(self, **overrides: Any) -> "LightWAMConfig":
        """Copy with dotted overrides, e.g. ``cfg.replace(**{"train.lr": 2e-4})``."""
        out = copy.deepcopy(self)
        for key, value in overrides.items():
            set_by_path(out, key, value)
        return out

    def validate(self) -> None:
        d = self.dit
        if d.dim % d.num_heads:
            raise ValueError(f"dit.dim={d.dim} must be divisible by dit.num_heads={d.num_heads}")
        if d.head_dim % 2:
            raise ValueError(f"dit head_dim={d.head_dim} must be even for RoPE")
        if any(not 0 <= l < d.num_layers for l in self.adapter.layers):
            raise ValueError(f"adapter.layers={self.adapter.layers} must lie in [0, {d.num_layers})")
        if list(self.adapter.layers) != sorted(set(self.adapter.layers)):
            raise ValueError(f"adapter.layers={self.adapter.layers} must be strictly increasing")
        if d.dim % self.expert.num_heads:
            raise ValueError(f"dit.dim={d.dim} must be divisible by expert.num_heads={self.expert.num_heads}")
        f = self.vae.spatial_factor * d.patch_size[1]
        fv = f * self.train.video_downsample
        for name, v in (("data.image_height", self.data.image_height), ("data.image_width", self.data.image_width)):
            if v % f:
                raise ValueError(f"{name}={v} must be divisible by {f} (VAE factor x patch size)")
            if v % fv:
                raise ValueError(f"{name}={v} must be divisible by {fv} (VAE factor x video downsample x patch size)")
        if (self.data.num_frames - 1) % self.vae.temporal_factor:
            raise ValueError(f"data.num_frames={self.data.num_frames} must be 1 + k*{self.vae.temporal_factor}")
        if self.data.num_frames < 1 + self.vae.temporal_factor:
            raise ValueError("data.num_frames must give at least one future latent frame")
        if (self.data.num_frames - 1) * self.data.frame_stride != self.data.chunk_size:
            raise ValueError(
                f"(num_frames-1)*frame_stride={(self.data.num_frames - 1) * self.data.frame_stride} "
                f"must equal chunk_size={self.data.chunk_size}")
        if not 0 < self.train.action_loss_steps <= self.data.chunk_size:
            raise ValueError("train.action_loss_steps must be in (0, chunk_size]")
        if len(self.vae.latent_mean) != self.vae.z_dim or len(self.vae.latent_std) != self.vae.z_dim:
            raise ValueError("vae.latent_mean/latent_std must have z_dim entries")
        if self.vae.z_dim != d.in_channels:
            raise ValueError(f"vae.z_dim={self.vae.z_dim} must equal dit.in_channels={d.in_channels}")
        _validate_train(self.train)


    # --- derived token counts -------------------------------------------------------------
    def latent_hw(self) -> tuple[int, int]:
        f = self.vae.spatial_factor
        return self.data.image_height // f, self.data.image_width // f

    def latent_frames(self) -> int:
        return 1 + (self.data.num_frames - 1) // self.vae.temporal_factor

    def action_tokens(self) -> int:
        """Tokens of the action pass: the current frame at full latent resolution."""
        h, w = self.latent_hw()
        return (h // self.dit.patch_size[1]) * (w // self.dit.patch_size[2])

    def video_tokens(self) -> int:
        """Tokens of the video pass: all latent frames, 2x2-downsampled, patchified."""
        h, w = self.latent_hw()
        f = self.train.video_downsample
        return self.latent_frames() * (h // f // self.dit.patch_size[1]) * (w // f // self.dit.patch_size[2])

    def context_tokens(self) -> int:
        return self.text.max_tokens + 1


def set_by_path(obj: Any, path: str, value: Any) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        if not hasattr(obj, p):
            raise KeyError(f"unknown config field {path!r}")
        obj = getattr(obj, p)
    if not hasattr(obj, parts[-1]):
        raise KeyError(f"unknown config field {path!r}")
    old = getattr(obj, parts[-1])
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    setattr(obj, parts[-1], value)


# Fields that older checkpoints' config.json hold and that moved elsewhere (ignored when read).
_MOVED_FIELDS = {("ActionExpertConfig", "fused_pooling")}  # -> ImplConfig.fused_pooling


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    kwargs = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if (cls.__name__, key) in _MOVED_FIELDS:
            continue
        if key not in names:
            raise KeyError(f"unknown config field {key!r} for {cls.__name__}")
        f = names[key]
        sub = _SUBCONFIGS.get((cls.__name__, key))
        if sub is not None:
            value = _from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[key] = value
    return cls(**kwargs)


_SUBCONFIGS = {
    ("LightWAMConfig", "dit"): DiTConfig,
    ("LightWAMConfig", "lora"): LoRAConfig,
    ("LightWAMConfig", "adapter"): AdapterConfig,
    ("LightWAMConfig", "expert"): ActionExpertConfig,
    ("LightWAMConfig", "vae"): VAEConfig,
    ("LightWAMConfig", "text"): TextConfig,
    ("LightWAMConfig", "data"): DataConfig,
    ("LightWAMConfig", "flow"): FlowConfig,
    ("LightWAMConfig", "train"): TrainConfig,
}


def paper() -> LightWAMConfig:
    """Exactly the published model (docs/model.md): Wan2.1-T2V-1.3B frozen, LIBERO data conventions."""
    return LightWAMConfig(name="paper")


def robotwin() -> LightWAMConfig:
    """The paper model with RoboTwin 2.0 conventions (three cameras, 14-d joints, z-score)."""
    cfg = LightWAMConfig(name="robotwin")
    cfg.data = DataConfig(image_height=384, image_width=320, action_dim=14, proprio_dim=14,
                          action_norm="zscore", proprio_norm="zscore", camera_layout="robotwin",
                          cameras=("head", "left_wrist", "right_wrist"), rotate_180=False, executed_steps=24)
    cfg.train.action_loss_steps = 24
    return cfg


def tiny() -> LightWAMConfig:
    """Same architecture, scaled down to train from scratch on 2 CPU cores in minutes.

    No pretrained weights exist at this size, so the backbone trains too (``freeze_backbone=False``),
    and the VAE is trained on the dataset's frames first (``lwam train vae``). Text comes from the
    deterministic built-in encoder.
    """
    cfg = LightWAMConfig(name="tiny")
    cfg.dit = DiTConfig(dim=64, ffn_dim=128, num_layers=4, num_heads=4, text_dim=32, freq_dim=32)
    cfg.lora = LoRAConfig(rank=4, alpha=8.0)
    cfg.adapter = AdapterConfig(layers=(1, 2, 3), hidden=32)
    cfg.expert = ActionExpertConfig(num_queries=4, num_heads=4, compress_dim=64, hidden_dim=128, step_embed_dim=32)
    cfg.vae = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                        latent_mean=(0.0,) * 16, latent_std=(1.0,) * 16)
    cfg.text = TextConfig(dim=32, max_tokens=8, encoder="builtin")
    cfg.data = DataConfig(image_height=64, image_width=128, action_dim=4, proprio_dim=4,
                          camera_layout="row", cameras=("corner", "gripper"), rotate_180=False,
                          executed_steps=8)
    cfg.train = TrainConfig(lr=1e-3, warmup_steps=20, max_steps=400, batch_size=8, mixed_precision="fp32",
                            log_every=10, save_every=200)
    cfg.freeze_backbone = False
    return cfg


PRESETS = {"paper": paper, "robotwin": robotwin, "tiny": tiny}


def get_preset(name: str) -> LightWAMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.validate()
    return cfg
