"""Policy: the compiled single-pass action decoder (observation -> de-normalised action chunk).

One action query (docs/model.md, "Inference"): VAE-encode the current composed frame -> cached text context +
proprio token -> one backbone pass at t = 0 up to the last tapped layer -> StateFusionActionExpert ->
normalised actions [B, H, A] -> de-normalise.

:class:`Policy` chooses among the model's own exact transformations (the model owns them; this module
only chooses, copies, compiles and captures), each switchable and each checked against the eager
``LightWAM.predict_actions`` with the same weights (tests/test_inference.py):

* ``merge_lora`` (``DiTBlock.merge_lora_``): every LoRA pair is folded into its frozen linear
  (``W + scale * up @ down``, in fp32) and removed, so a LoRA target costs one GEMM;
* ``truncate`` (``WanDiT.action_copy``): the blocks after the last tapped layer and the video head are not
  copied (they cannot change the action); with ``truncate=False`` the policy keeps and runs the whole
  backbone, as the published implementation does. Both run ``WanDiT.run_blocks``, the model's loop;
* ``fold_pooling`` (``StateFusionActionExpert.inference_copy``): the folded learned-query pooling matrices
  (docs/design.md, "Fused pooling") are computed once, in fp32, from the frozen pooler weights; every query
  runs the fused ``lwam::query_pool`` op (all tapped layers in one launch) plus the small dense maps after
  it, with no per-call parameter algebra;
* ``single_frame_vae`` (``WanVAE.frame_encoder``): the current frame is one video frame, and every causal
  3D convolution of the VAE encoder sees it behind zero padding only, so each one is replaced by the 2D
  convolution with its last temporal kernel slice (a third of the encoder FLOPs for 3x3x3 kernels; exact
  up to summation order);
* text context cached per instruction (``LightWAM.context_from_embedded``): the embedded text tokens
  [Lt, D] are computed once per instruction (the embedding MLP is per token); only the proprio token is
  embedded per query. The t = 0 time modulation and the RoPE tables are constants computed once. The
  raw contexts come from the checkpoint's ``text.safetensors`` (a :class:`~lwam.model.text.TextContextCache`),
  ``text_cache=`` or the config's text encoder.

Then: weights in ``dtype`` (bf16 on CUDA by default), static input/output buffers per input shape,
``torch.compile`` of the whole observation -> action path (VAE encode included) and, on CUDA, capture of
that compiled path in a CUDA graph; ``predict`` copies into the buffers and replays. On CPU the compiled
path runs without graphs (``compile=False`` runs the transformed modules eagerly).

Inputs (``predict_batch``; ``predict`` takes the same without the batch dimension):

* ``images``: the composed camera image (``lwam.data.cameras`` layout, rotated where the dataset's
  convention says so), either float ``[B, 3, H, W]`` in [-1, 1] or uint8 ``[B, H, W, 3]`` in 0..255
  (mapped to ``x / 127.5 - 1``); torch tensors or numpy arrays;
* ``instructions``: one str per sample (a single str is broadcast); its text context must be in the
  policy's text cache unless the config has a text encoder;
* ``proprio``: raw proprioceptive state ``[B, P]`` (normalised with the checkpoint's statistics).

Output: de-normalised actions ``[B, H, A]`` float32 -- a numpy array when ``proprio`` is a numpy array,
else a CPU torch tensor. Without statistics the policy returns normalised actions (logged once).
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lwam._logging import log_once
from lwam.config import LightWAMConfig
from lwam.errors import UnknownInstructionError
from lwam.model.lightwam import context_from_embedded, embed_text
from lwam.model.text import TextContextCache
from lwam.policy.base import ModelPolicy
from lwam.policy.inputs import make_normalizer, text_cache_of

__all__ = ["Policy", "InferenceOptions"]


@dataclass(frozen=True)
class InferenceOptions:
    """Which of the model's exact transformations and which execution mode a :class:`Policy` uses. How
    the copied modules compute (attention, RoPE) is the source model's :class:`~lwam.config.ImplConfig`;
    with ``fold_pooling`` the pooling always runs the folded fused op."""

    merge_lora: bool = True
    truncate: bool = True
    fold_pooling: bool = True
    single_frame_vae: bool = True
    compile: bool = True
    cuda_graphs: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"


# ------------------------------------------------------------------------------------------------
# the transformed path (the model's own exact transformations, chosen here)
# ------------------------------------------------------------------------------------------------
class FastActionPath(nn.Module):
    """The transformed observation -> normalised-action path (an ``nn.Module`` that ``torch.compile`` and
    CUDA graphs wrap as one function).

    ``forward(images [B, 3, H, W] param dtype, proprio [B, P] fp32 normalised, text [B, Lt, D] embedded
    text tokens (param dtype), cos [S, d/2], sin [S, d/2] fp32 RoPE tables) -> actions [B, H, A] fp32``.
    The stages are exposed for the latency benchmark: :meth:`encode`, :meth:`context`, :meth:`backbone`,
    :meth:`expert_head`.
    """

    def __init__(self, model: nn.Module, options: InferenceOptions):
        super().__init__()
        cfg: LightWAMConfig = model.cfg
        self.cfg = cfg
        self.options = options
        self.taps = tuple(cfg.tap_layers)
        if model.vae is None:
            raise ValueError("model: the Policy needs a LightWAM built with its VAE (build_vae=True)")
        # Each copy is made by the model's own transformation (see WanDiT.action_copy, WanVAE.frame_encoder,
        # StateFusionActionExpert.inference_copy); the source model is not modified.
        self.dit = model.dit.action_copy(last=max(self.taps) if options.truncate else None,
                                         merge_lora=options.merge_lora)
        self.vae = model.vae.frame_encoder(single_frame=options.single_frame_vae)
        self.proprio_encoder = copy.deepcopy(model.proprio_encoder)
        self.expert, folded = model.expert.inference_copy(fold_pooling=options.fold_pooling)
        # The folded matrices stay fp32 (kept out of the module tree until finalize(), so that the
        # dtype cast of the weights does not round them).
        self.folded_pooling = None
        self._pending_fold = [] if folded is None else [folded]
        self.requires_grad_(False)
        self.eval()

    # --- after the weights reach their device/dtype --------------------------------------------
    @torch.no_grad()
    def finalize(self) -> None:
        """Precompute the t = 0 modulation input (exactly as ``WanDiT.time_embed`` on the final weights)
        and place the folded pooling matrices (fp32: a few small matrices). Call after ``.to(device, dtype)``."""
        dev = self.dit.patch_embedding.weight.device
        _, e6 = self.dit.time_embed(torch.zeros(1, 1, device=dev))
        self.register_buffer("e6", e6, persistent=False)  # [1, 1, 6, D] fp32
        if self._pending_fold:
            self.folded_pooling = self._pending_fold.pop().to(dev)

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.dit.patch_embedding.weight.device

    # --- stages ----------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> normalised latent [B, C, 1, H/8, W/8] fp32."""
        return self.vae(images[:, :, None])

    def embed_text(self, text_context: torch.Tensor) -> torch.Tensor:
        """raw text context [..., Lt, text_dim] -> embedded tokens [..., Lt, D] (param dtype)."""
        return embed_text(self.dit, text_context)

    def context(self, text: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """embedded text [B, Lt, D] + normalised proprio [B, P] -> context [B, Lt + 1, D]."""
        return context_from_embedded(self.dit, self.proprio_encoder, text, proprio)

    def backbone(self, z: torch.Tensor, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> list[torch.Tensor]:
        """z [B, C, 1, h, w], ctx [B, Lc, D] -> adapted states of the tapped layers, L x [B, S, D]."""
        x, grid = self.dit.patchify(z)
        _, tapped = self.dit.run_blocks(x, self.e6, ctx, cos, sin, grid[1] * grid[2], self.taps, max(self.taps))
        return tapped

    def pool(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """L x [B, S, D] -> pooled [B, L, D] (param dtype)."""
        if not self.options.fold_pooling:
            return self.expert.pool(states).to(self.dtype)
        return self.folded_pooling(list(states)).to(self.dtype)

    def expert_head(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """L x [B, S, D] -> normalised actions [B, H, A] fp32."""
        return self.expert.head(self.pool(states)).float()

    def forward(self, images: torch.Tensor, proprio: torch.Tensor, text: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        z = self.encode(images)
        ctx = self.context(text, proprio)
        return self.expert_head(self.backbone(z, ctx, cos, sin))


# ------------------------------------------------------------------------------------------------
# static-buffer runners
# ------------------------------------------------------------------------------------------------
# torch.compile modes that capture CUDA graphs on their own (Inductor's cudagraph trees), mapped to the
# same compilation without that capture: used while the Policy captures the whole path itself.
SELF_CAPTURING_COMPILE_MODES: dict[str, str | None] = {"reduce-overhead": None,
                                                        "max-autotune": "max-autotune-no-cudagraphs"}


def single_capture_mode(compile_mode: str | None, policy_captures: bool) -> str | None:
    """The torch.compile mode to use so that only one mechanism captures CUDA graphs: with the Policy's
    own capture on, a self-capturing mode becomes its capture-free twin (one log line says so)."""
    if compile_mode is not None and not isinstance(compile_mode, str):
        raise TypeError(f"compile_mode: expected a str or None, got {type(compile_mode).__name__}")
    if policy_captures and compile_mode in SELF_CAPTURING_COMPILE_MODES:
        twin = SELF_CAPTURING_COMPILE_MODES[compile_mode]
        log_once(f"policy.compile-mode.{compile_mode}",
                 f"Policy: compile_mode={compile_mode!r} would capture CUDA graphs inside the Policy's own "
                 f"capture; compiling with mode={twin!r} instead (the Policy's graph gives the same launch "
                 f"savings; cuda_graphs=False keeps {compile_mode!r})")
        return twin
    return compile_mode


class _Runner:
    """Static buffers + the compiled (and, on CUDA, graph-captured) path for one input shape (B, H, W)."""

    def __init__(self, policy: "Policy", b: int, h: int, w: int):
        from lwam.model.rope import rope_cos_sin

        fp = policy.fast
        cfg = policy.cfg
        dev, dt = fp.device, fp.dtype
        self.policy = policy
        self.images = torch.zeros(b, 3, h, w, device=dev, dtype=dt)
        self.proprio = torch.zeros(b, cfg.proprio_dim, device=dev, dtype=torch.float32)
        self.text = torch.zeros(b, cfg.text.max_tokens, cfg.dit.dim, device=dev, dtype=dt)
        f = cfg.vae.spatial_factor
        _, ph, pw = cfg.dit.patch_size
        cos, sin = rope_cos_sin((1, h // f // ph, w // f // pw), cfg.dit.head_dim, cfg.dit.rope_theta, device=dev)
        self.cos, self.sin = cos, sin
        self.instructions: tuple[str, ...] | None = None
        self.graph = None
        self.out: torch.Tensor | None = None
        self.warm = False

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.proprio, self.text, self.cos, self.sin

    @torch.no_grad()
    def warmup(self) -> None:
        """Compile (and capture) with the current buffer contents. Called once per shape.

        One eager pass first: it fires the one-time log lines and lazy imports outside the compiled
        region, so that the compiled graph is one graph without breaks."""
        opts = self.policy.options
        self.out = self.policy.fast(*self.args())
        if opts.compile:
            try:
                self.policy._fn(*self.args())
            except torch._dynamo.exc.Unsupported as e:  # a graph break somewhere: compile around it
                log_once("policy.graph-break", f"Policy: the action path does not compile as one graph "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}); compiling with graph breaks")
                self.policy._fn = self.policy._compile(fullgraph=False)
        fn = self.policy._fn
        if opts.cuda_graphs:
            s = torch.cuda.Stream(device=self.images.device)
            s.wait_stream(torch.cuda.current_stream(self.images.device))
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn(*self.args())
            torch.cuda.current_stream(self.images.device).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.policy._graph_pool()):
                self.out = fn(*self.args())
            self.graph = g
        else:
            self.out = fn(*self.args())
        self.warm = True

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        if not self.warm:
            self.warmup()
        if self.graph is not None:
            self.graph.replay()
            # The static output is rewritten by the next replay of this shape, and (graphs of all shapes
            # share one memory pool) may be by a replay of another shape: the caller gets its own copy
            # ([B, H, A] fp32, a few KB), so a held result never changes under it.
            return self.out.clone()
        self.out = self.policy._fn(*self.args())
        if self.policy.options.compile_mode in SELF_CAPTURING_COMPILE_MODES:
            return self.out.clone()  # Inductor's own CUDA graphs reuse their output memory the same way
        return self.out


# ------------------------------------------------------------------------------------------------
# Policy
# ------------------------------------------------------------------------------------------------
class Policy(ModelPolicy):
    """Optimised single-pass action decoder. Build with :meth:`from_model`, :meth:`from_checkpoint` or
    :meth:`from_release`; query with :meth:`predict` / :meth:`predict_batch`.

    The policy owns a transformed copy of the model (the source model is not modified). Every new input
    shape (batch size, image size) is compiled and captured once on first use (or by :meth:`warmup`);
    later calls of that shape copy into its static buffers and replay.
    """

    def __init__(self, fast: FastActionPath, cfg: LightWAMConfig, options: InferenceOptions, normalizer=None,
                 text_contexts: Mapping[str, torch.Tensor] | None = None, text_encoder=None):
        self.fast = fast
        self.cfg = cfg
        self.options = options
        self.normalizer = normalizer
        self.text = TextContextCache(cfg.text, text_encoder)  # raw contexts [Lt, text_dim], CPU
        self.text.update(text_cache_of(text_contexts, cfg))
        self._text_emb: dict[str, torch.Tensor] = {}  # embedded [Lt, D] on the device, per instruction
        self._runners: dict[tuple[int, int, int], _Runner] = {}
        self._pool = None
        if normalizer is None:
            # Logged here, not at the first query: dynamo guards on lwam._logging's set of logged keys
            # (log_once runs inside traced code), so a key first logged after warm-up would recompile.
            log_once("policy.no-stats", "Policy: no normalisation statistics; predict() returns normalised "
                     "actions and takes normalised proprio")
        self._fn = self._compile(fullgraph=True) if options.compile else fast

    def _compile(self, fullgraph: bool):
        o = self.options
        if o.cuda_graphs and o.compile_mode in SELF_CAPTURING_COMPILE_MODES:
            raise ValueError(f"compile_mode: {o.compile_mode!r} captures CUDA graphs itself, which would nest "
                             f"inside the Policy's own capture (cuda_graphs=True); use "
                             f"{SELF_CAPTURING_COMPILE_MODES[o.compile_mode]!r} or cuda_graphs=False")
        kw: dict[str, Any] = {"dynamic": False, "fullgraph": fullgraph, "backend": o.compile_backend}
        if o.compile_mode is not None:
            kw["mode"] = o.compile_mode
        elif o.compile_backend == "inductor" and self.fast.device.type == "cpu":
            # Inductor's CPU layout optimisation converts the VAE convs to channels-last on every call:
            # measured 3x slower than eager for the encoder (tiny preset); without it the encoder is faster
            # than eager and the backbone keeps its 4-5x gain.
            kw["options"] = {"layout_optimization": False}
        return torch.compile(self.fast, **kw)

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, stats: Any = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, compile: bool = True, cuda_graphs: bool | None = None,
                   merge_lora: bool = True, truncate: bool = True, fold_pooling: bool = True,
                   single_frame_vae: bool = True, compile_mode: str | None = None,
                   compile_backend: str = "inductor") -> "Policy":
        """Build a policy from a :class:`~lwam.model.lightwam.LightWAM` (left unmodified).

        ``stats``: normalisation statistics (a :class:`~lwam.data.normalize.Normalizer`, its ``to_dict()``
        or a feature -> {min, max, mean, std} dict read with the config's modes); ``device``: default the
        model's; ``dtype``: default bf16 on CUDA, fp32 elsewhere; ``cuda_graphs``: default on for CUDA.
        The transformation switches are described in the module docstring; ``compile_mode`` and
        ``compile_backend`` go to ``torch.compile`` (always ``dynamic=False``: one static graph per shape).
        One capture mechanism at a time: with the Policy's own CUDA graphs on, a mode that captures graphs
        itself is translated to its capture-free twin ("reduce-overhead" -> default, "max-autotune" ->
        "max-autotune-no-cudagraphs"), with one log line; ``cuda_graphs=False`` keeps it as given.
        Every query returns a tensor the caller owns (a copy of the graph's static output).
        """
        from lwam.validate import check_device

        cfg = model.cfg
        dev = check_device(device) if device is not None else model.proprio_encoder.weight.device
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        graphs = (dev.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if graphs and dev.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got device {dev}")
        compile_mode = single_capture_mode(compile_mode, graphs and bool(compile))
        opts = InferenceOptions(merge_lora=merge_lora, truncate=truncate, fold_pooling=fold_pooling,
                                single_frame_vae=single_frame_vae, compile=bool(compile), cuda_graphs=graphs,
                                compile_mode=compile_mode, compile_backend=compile_backend)
        fast = FastActionPath(model, opts).to(device=dev, dtype=dtype)
        fast.finalize()
        return cls(fast, cfg, opts, make_normalizer(stats, cfg), model.text, model.text.encoder)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **kwargs: Any) -> "Policy":
        """From our checkpoint directory (config.json + model.safetensors [+ text.safetensors, the text
        contexts of its training instructions, + stats.json]), or from a published Light-WAM ``.pt`` with
        ``Wan2.1_VAE.pth`` in the same directory (see :meth:`from_release`; pass
        ``vae_path``/``text_cache``/``stats``/``cfg`` through ``kwargs``). ``text_cache`` (a
        :class:`~lwam.model.text.TextContextCache`, its file or a mapping) adds instructions."""
        from lwam.validate import check_device

        if device is not None:
            check_device(device)  # before loading anything
        p = Path(path)
        if p.is_file() and p.suffix == ".pt":
            vae_path = kwargs.pop("vae_path", None) or p.with_name("Wan2.1_VAE.pth")
            return cls.from_release(p, vae_path, device=device, dtype=dtype, **kwargs)
        from lwam.checkpoint import load_checkpoint

        model, stats = load_checkpoint(p)
        stats = kwargs.pop("stats", None) or stats
        model.text.update(text_cache_of(kwargs.pop("text_cache", None), model.cfg))
        return cls.from_model(model, stats, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_release(cls, release_pt: str | os.PathLike, vae_path: str | os.PathLike, text_cache: Any = None,
                     stats: Any = None, cfg: LightWAMConfig | None = None, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, **kwargs: Any) -> "Policy":
        """From a published Light-WAM ``.pt`` (DiT incl. frozen weights, SFAE, proprio encoder) and the
        Wan2.1 VAE file. ``text_cache``: instruction -> umT5 context [128, 4096] (a TextContextCache, its
        file or a mapping);
        ``stats``: the dataset's normalisation statistics; ``cfg``: default the paper preset (LIBERO)."""
        from lwam.config import get_preset
        from lwam.model.lightwam import LightWAM
        from lwam.model.weights import load_lightwam_release

        if not Path(vae_path).is_file():
            raise FileNotFoundError(f"Wan2.1 VAE file not found: {vae_path}")
        cfg = cfg if cfg is not None else get_preset("paper")
        model = LightWAM(cfg)
        load_lightwam_release(model, release_pt)
        model.vae.load_pretrained(vae_path)
        model.text.update(text_cache_of(text_cache, cfg))
        return cls.from_model(model, stats, device=device, dtype=dtype, **kwargs)

    # --- text ------------------------------------------------------------------------------------
    def add_instruction(self, instruction: str, text_context: torch.Tensor) -> None:
        """Register the raw text context [Lt, text_dim] of ``instruction`` (e.g. from a umT5 cache)."""
        self.text.add(instruction, text_context)
        self._text_emb.pop(instruction, None)

    def _resolve_text(self, instructions: Sequence[str]) -> None:
        """Make sure every instruction has a raw context (encoding missing ones if an encoder exists)."""
        missing = [s for s in dict.fromkeys(instructions) if s not in self.text]
        if not missing:
            return
        if self.text.encoder is None:
            raise UnknownInstructionError(
                f"instruction: no cached text context for {missing[:3]} and no text encoder configured "
                f"(text.encoder={self.cfg.text.encoder!r}); add it with Policy.add_instruction() or pass "
                f"text_cache=")
        self.text.encode(missing)

    @torch.no_grad()
    def text_embedding(self, instruction: str) -> torch.Tensor:
        """Embedded text tokens [Lt, D] of a known instruction, on the policy's device (cached)."""
        emb = self._text_emb.get(instruction)
        if emb is None:
            self._resolve_text([instruction])
            emb = self.fast.embed_text(self.text.get([instruction])[0].to(self.fast.device))
            self._text_emb[instruction] = emb
        return emb

    # --- queries ---------------------------------------------------------------------------------
    def _runner(self, b: int, h: int, w: int) -> _Runner:
        key = (b, h, w)
        r = self._runners.get(key)
        if r is None:
            r = self._runners[key] = _Runner(self, b, h, w)
        return r

    def _graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    @torch.no_grad()
    def predict_normalized(self, images: Any, instructions: Sequence[str] | str, proprio_normalized: torch.Tensor
                           ) -> torch.Tensor:
        """Low-level query: images as in :meth:`predict_batch`, proprio already normalised [B, P] ->
        normalised actions [B, H, A] fp32 on the policy's device (the caller's own tensor: a later query
        does not change it)."""
        x, instr, _, _ = self._inputs(images, instructions, proprio_normalized)
        return self._run(x, instr, proprio_normalized.detach().float().cpu())

    def _run(self, x: torch.Tensor, instructions: list[str], prop: torch.Tensor) -> torch.Tensor:
        r = self._runner(x.shape[0], x.shape[2], x.shape[3])
        r.images.copy_(x, non_blocking=False)
        r.proprio.copy_(prop)
        key = tuple(instructions)
        if r.instructions != key:
            for i, s in enumerate(instructions):
                r.text[i].copy_(self.text_embedding(s))
            r.instructions = key
        return r.run()

    @torch.no_grad()
    def predict_batch(self, images: Any, instructions: Sequence[str] | str, proprio: Any) -> Any:
        """images [B, 3, H, W] float in [-1, 1] or uint8 [B, H, W, 3]; instructions: B str (or one str);
        proprio [B, P] raw -> de-normalised actions [B, H, A] float32 (numpy if proprio is numpy)."""
        x, instr, prop, is_numpy = self._inputs(images, instructions, proprio)
        return self._outputs(self._run(x, instr, prop), is_numpy)

    def warmup(self, batch_size: int = 1, image_hw: tuple[int, int] | None = None,
               instruction: str | None = None) -> float:
        """Compile and capture the path for one input shape (default: the config's image size).
        Returns the seconds it took."""
        h, w = image_hw or (self.cfg.data.image_height, self.cfg.data.image_width)
        t0 = time.perf_counter()
        r = self._runner(batch_size, h, w)
        if instruction is not None:
            self._run(torch.zeros(batch_size, 3, h, w), [instruction] * batch_size,
                      torch.zeros(batch_size, self.cfg.proprio_dim))
        else:
            r.run()
        if self.fast.device.type == "cuda":
            torch.cuda.synchronize(self.fast.device)
        return time.perf_counter() - t0

    @property
    def device(self) -> torch.device:
        return self.fast.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fast.dtype

    def __repr__(self) -> str:
        o = self.options
        return (f"Policy(preset={self.cfg.name!r}, device={self.device}, dtype={self.dtype}, "
                f"compile={o.compile}, cuda_graphs={o.cuda_graphs}, merge_lora={o.merge_lora}, "
                f"truncate={o.truncate}, fold_pooling={o.fold_pooling}, single_frame_vae={o.single_frame_vae})")
