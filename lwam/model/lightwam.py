"""LightWAM: the whole model (DiT + LoRA + adapters + SFAE + proprio token + VAE + flow schedule).

Two passes per training sample (docs/model.md, "Training objective"):
- video: latents 2x2-downsampled in space, frames 1.. noised by flow matching (frame 0 clean, t = 0),
  the DiT predicts v = eps - x0; per sample the MSE is a masked mean over the future latent steps that
  are not padding (:func:`latent_steps_is_pad`), weighted by w(t), then averaged over the batch;
- action: the clean current frame at full latent resolution, t = 0, one pass up to the last tapped
  layer; the SFAE regresses the action chunk; MSE on the first ``action_loss_steps`` steps, padding masked.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lwam.config import ImplConfig, LightWAMConfig
from lwam.model.action_expert import StateFusionActionExpert
from lwam.model.dit import WanDiT, dit_param_group
from lwam.model.flow import FlowMatching
from lwam.model.text import TextContextCache, make_text_encoder
from lwam.model.vae import WanVAE
from lwam.ops.latent_downsample import latent_downsample
from lwam.reference.latent_downsample import latent_downsample as reference_latent_downsample
from lwam.validate import check_finite, check_image_size, check_unit_range

def latent_steps_is_pad(frames_is_pad: torch.Tensor, temporal_factor: int) -> torch.Tensor:
    """frames_is_pad bool [B, T] (raw frames past the episode end) -> bool [B, 1 + (T-1)/tf].

    Latent step 0 is raw frame 0; step k >= 1 covers raw frames (k-1)*tf+1 .. k*tf and is padding only
    when every one of them is (a partly padded step still counts in the loss)."""
    if frames_is_pad.dim() != 2 or (frames_is_pad.shape[1] - 1) % temporal_factor:
        raise ValueError(f"frames_is_pad: expected [B, 1 + k*{temporal_factor}], got {tuple(frames_is_pad.shape)}")
    b = frames_is_pad.shape[0]
    future = frames_is_pad[:, 1:].bool().reshape(b, -1, temporal_factor).all(-1)
    return torch.cat([frames_is_pad[:, :1].bool(), future], dim=1)


def embed_text(dit: WanDiT, text_context: torch.Tensor) -> torch.Tensor:
    """Raw text context [..., Lt, text_dim] -> embedded tokens [..., Lt, D] in the DiT's dtype."""
    return dit.text_embedding(text_context.to(dit.text_embedding[0].weight.dtype))


def context_from_embedded(dit: WanDiT, proprio_encoder: nn.Linear, text: torch.Tensor,
                          proprio: torch.Tensor) -> torch.Tensor:
    """Embedded text [B, Lt, D] + normalised proprio [B, P] -> context [B, Lt + 1, D]: the proprio token
    through ``proprio_encoder`` and the DiT's text embedding, appended to the text tokens."""
    tok = proprio_encoder(proprio.to(proprio_encoder.weight.dtype))[:, None]
    return torch.cat([text, embed_text(dit, tok)], dim=1)


def _is_trainable_dit_param(name: str) -> bool:
    """LoRA, adapters and the future-video head train when the pretrained DiT is frozen."""
    return dit_param_group(name) != "base"


class LightWAM(nn.Module):
    def __init__(self, cfg: LightWAMConfig, build_vae: bool = True, impl: ImplConfig | None = None):
        """``impl``: how to compute (default ``ImplConfig()``: the fast arithmetic, eager); change it later
        with :meth:`set_impl`."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.dit = WanDiT(cfg.dit, cfg.lora, cfg.adapter)
        self.expert = StateFusionActionExpert(cfg.expert, cfg.dit.dim, len(cfg.tap_layers), cfg.chunk_size,
                                              cfg.action_dim)
        self.proprio_encoder = nn.Linear(cfg.proprio_dim, cfg.dit.text_dim)
        self.vae = WanVAE(cfg.vae) if build_vae else None
        self.flow = FlowMatching(cfg.flow)
        self.text = TextContextCache(cfg.text, make_text_encoder(cfg.text))
        self.impl = impl if impl is not None else ImplConfig()
        self.set_impl(self.impl)
        self.apply_freezing()

    # --- how it computes -----------------------------------------------------------------------
    def set_impl(self, impl: ImplConfig) -> "LightWAM":
        """Compute as ``impl`` says (:class:`~lwam.config.ImplConfig`): the one place where the reference
        or fast arithmetic is chosen. In place; parameters, buffers and state-dict keys are untouched.
        ``compile_blocks`` compiles every DiT block's forward in place (``nn.Module.compile``), and
        switching it off restores the eager forward. Returns the model."""
        if not isinstance(impl, ImplConfig):
            raise TypeError(f"impl: expected an ImplConfig, got {type(impl).__name__}")
        self.impl = impl
        self.dit.set_impl(impl)
        self.expert.fused_pooling = impl.fused_pooling
        for block in self.dit.blocks:
            compiled = getattr(block, "_compiled_call_impl", None) is not None
            if impl.compile_blocks and not compiled:
                block.compile(dynamic=False)
            elif not impl.compile_blocks and compiled:
                block._compiled_call_impl = None  # back to the eager forward that nn.Module.compile wrapped
        return self

    # --- what trains ---------------------------------------------------------------------------
    def apply_freezing(self) -> None:
        for name, p in self.dit.named_parameters():
            p.requires_grad_(not self.cfg.freeze_backbone or _is_trainable_dit_param(name))
        if self.vae is not None:
            self.vae.requires_grad_(self.cfg.train_vae)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # --- inputs --------------------------------------------------------------------------------
    def text_context(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """-> [B, Lt, text_dim] from ``batch['text_context']`` or ``batch['instruction']`` (list[str])."""
        if "text_context" in batch:
            ctx = batch["text_context"]
            t = self.cfg.text
            if ctx.dim() != 3 or ctx.shape[1:] != (t.max_tokens, t.dim):
                raise ValueError(f"text_context: expected [B, {t.max_tokens}, {t.dim}], got {tuple(ctx.shape)}")
            return ctx.to(device)
        if "instruction" in batch:
            instr = batch["instruction"]
            if isinstance(instr, str):
                instr = [instr]
            return self.text.get(list(instr)).to(device)
        raise ValueError("batch needs 'text_context' [B, Lt, text_dim] or 'instruction' (list of str)")

    def context(self, text_context: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """text [B, Lt, text_dim] + proprio [B, P] -> embedded context [B, Lt+1, D]."""
        p = self.cfg.proprio_dim
        if proprio.dim() != 2 or proprio.shape[1] != p or proprio.shape[0] != text_context.shape[0]:
            raise ValueError(f"proprio: expected [B={text_context.shape[0]}, {p}], got {tuple(proprio.shape)}")
        w = self.proprio_encoder.weight
        tok = self.proprio_encoder(proprio.to(w.dtype))[:, None]
        return self.dit.embed_context(torch.cat([text_context.to(w.dtype), tok], dim=1))

    def embed_text(self, text_context: torch.Tensor) -> torch.Tensor:
        """Raw text context [..., Lt, text_dim] -> embedded tokens [..., Lt, D] (param dtype): what
        :meth:`context_from_embedded` takes, so a policy embeds each instruction once."""
        return embed_text(self.dit, text_context)

    def context_from_embedded(self, text: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """Embedded text [B, Lt, D] + normalised proprio [B, P] -> context [B, Lt + 1, D]. Equals
        :meth:`context` because the text embedding is a per-token MLP (only the proprio token is new)."""
        return context_from_embedded(self.dit, self.proprio_encoder, text, proprio)

    def check_images(self, images: torch.Tensor, name: str = "images") -> None:
        f = self.cfg.vae.spatial_factor * self.cfg.dit.patch_size[1]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}: expected [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"{name}: H and W must be divisible by {f}, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"{name}: expected a float tensor in [-1, 1], got {images.dtype}")
        check_image_size(images.shape[2], images.shape[3], self.cfg, name)
        check_unit_range(images, name)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, C, 1+(T-1)/4, H/8, W/8]."""
        if self.vae is None:
            raise RuntimeError("this LightWAM was built without a VAE; pass cached 'latents'")
        w = next(self.vae.parameters())
        return self.vae.encode(video.to(w.dtype)).float()

    # --- the two passes ------------------------------------------------------------------------
    def action_pass(self, frame_latent: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """frame_latent [B, C, 1, h, w], ctx [B, Lc, D] -> normalised actions [B, H, A]."""
        b = frame_latent.shape[0]
        t0 = torch.zeros(b, 1, device=frame_latent.device)
        taps = self.cfg.tap_layers
        out = self.dit(frame_latent, t0, ctx, taps=taps, stop_after=max(taps), return_video=False,
                       context_embedded=True)
        return self.expert(out.taps)

    def video_pass(self, latents: torch.Tensor, ctx: torch.Tensor,
                   noise: tuple[torch.Tensor, torch.Tensor] | None = None,
                   steps_is_pad: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """latents [B, C, F, h, w] (full resolution) -> (weighted flow loss, metrics). ``noise``: optional
        (eps [B, C, F, h/f, w/f], u [B]) so that a trainer can draw noise per sample, independent of sharding.
        ``steps_is_pad``: optional bool [B, F] (:func:`latent_steps_is_pad`); padded future steps are left
        out of each sample's mean, and a sample without a valid future step contributes 0."""
        b = latents.shape[0]
        downsample = latent_downsample if self.impl.fused_downsample else reference_latent_downsample
        x0 = downsample(latents, self.cfg.train.video_downsample)
        if noise is None:
            eps = torch.randn_like(x0)
            sigma, t = self.flow.sample(b, device=x0.device)
        else:
            eps, u = noise
            if eps.shape != x0.shape or u.shape != (b,):
                raise ValueError(f"flow noise: expected eps {tuple(x0.shape)} and u ({b},), "
                                 f"got {tuple(eps.shape)} and {tuple(u.shape)}")
            eps = eps.to(x0.device, x0.dtype)
            sigma = self.flow.shift_sigma(u.to(x0.device).float())
            t = sigma * self.flow.T
        xt = self.flow.add_noise(x0, eps, sigma)
        xt[:, :, 0] = x0[:, :, 0]  # the conditioning frame stays clean
        frames = x0.shape[2]
        timesteps = torch.cat([torch.zeros(b, 1, device=x0.device), t[:, None].expand(b, frames - 1)], dim=1)
        pred = self.dit(xt, timesteps, ctx, context_embedded=True).video
        target = self.flow.target(x0, eps)
        per_step = (pred[:, :, 1:].float() - target[:, :, 1:].float()).pow(2).mean(dim=(1, 3, 4))  # [B, F-1]
        if steps_is_pad is None:
            per_sample = per_step.mean(1)
        else:
            if steps_is_pad.shape != (b, frames):
                raise ValueError(f"steps_is_pad: expected [{b}, {frames}], got {tuple(steps_is_pad.shape)}")
            valid = (~steps_is_pad[:, 1:].to(per_step.device).bool()).float()
            per_sample = (per_step * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        w = self.flow.weight(t)
        return (per_sample * w).mean(), {"video_mse": per_sample.mean().detach(), "t_mean": t.mean().detach()}

    def action_loss(self, pred: torch.Tensor, actions: torch.Tensor, is_pad: torch.Tensor | None) -> torch.Tensor:
        """MSE on normalised actions, weight 1 on the first ``action_loss_steps`` steps, padding masked."""
        h = pred.shape[1]
        w = torch.zeros(h, device=pred.device)
        w[: self.cfg.train.action_loss_steps] = 1.0
        w = w[None].expand(pred.shape[0], h)
        if is_pad is not None:
            w = w * (~is_pad.bool()).float()
        se = (pred.float() - actions.float()).pow(2).mean(-1)
        # Per-sample masked mean, then the batch mean: data-parallel shards average to the same value.
        return ((se * w).sum(1) / w.sum(1).clamp_min(1.0)).mean()

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """batch: 'latents' [B, C, F, h, w] or 'video' [B, 3, T, H, W]; 'text_context' or 'instruction';
        'proprio' [B, P]; 'actions' [B, H, A]; optional 'actions_is_pad' [B, H]; optional 'frames_is_pad'
        [B, T] (raw frames past the episode end: fully padded latent steps leave the video loss); optional
        'flow_eps' and 'flow_u' (the video branch's noise, see ``video_pass``).
        With w_v = ``train.video_loss_weight`` = 0 the video pass is skipped (its metrics are 0).
        Returns (loss, metrics) with loss = w_v * video + w_a * action; the metrics are detached 0-dim
        tensors on the model's device (reading them is the caller's choice: each read syncs the host)."""
        device = self.proprio_encoder.weight.device
        if "latents" in batch:
            latents = batch["latents"].to(device).float()
        elif "video" in batch:
            video = batch["video"].to(device)
            if video.dim() != 5 or video.shape[1] != 3:
                raise ValueError(f"video: expected [B, 3, T, H, W], got {tuple(video.shape)}")
            if not video.is_floating_point():
                raise TypeError(f"video: expected float values in [-1, 1], got {video.dtype} (uint8 frames: "
                                f"x / 127.5 - 1)")
            check_unit_range(video, "video")
            latents = self.encode_video(video)
        else:
            raise ValueError("batch needs 'latents' or 'video'")
        actions = batch["actions"].to(device)
        b = latents.shape[0]
        if actions.shape != (b, self.cfg.chunk_size, self.cfg.action_dim):
            raise ValueError(f"actions: expected [{b}, {self.cfg.chunk_size}, {self.cfg.action_dim}], "
                             f"got {tuple(actions.shape)}")
        if latents.shape[2] < 2:
            raise ValueError(f"latents: need >= 2 latent frames (1 conditioning + future), got {tuple(latents.shape)}")
        ctx = self.context(self.text_context(batch, device), batch["proprio"].to(device))
        tr = self.cfg.train
        noise = (batch["flow_eps"], batch["flow_u"]) if "flow_eps" in batch else None
        steps_is_pad = None
        if "frames_is_pad" in batch:
            steps_is_pad = latent_steps_is_pad(batch["frames_is_pad"].to(device), self.cfg.vae.temporal_factor)
            if steps_is_pad.shape[1] != latents.shape[2]:
                raise ValueError(f"frames_is_pad: {tuple(batch['frames_is_pad'].shape)} covers "
                                 f"{steps_is_pad.shape[1]} latent steps, latents have {latents.shape[2]}")
        if tr.video_loss_weight == 0:
            # No video co-training: the video pass would contribute nothing, so it is not run at all (its
            # head gets no gradient, the backbone learns from the action loss alone).
            zero = latents.new_zeros(())
            video_loss, vm = zero, {"video_mse": zero, "t_mean": zero}
        else:
            video_loss, vm = self.video_pass(latents, ctx, noise, steps_is_pad)
        pred = self.action_pass(latents[:, :, :1], ctx)
        is_pad = batch.get("actions_is_pad")
        act_loss = self.action_loss(pred, actions, None if is_pad is None else is_pad.to(device))
        loss = tr.video_loss_weight * video_loss + tr.action_loss_weight * act_loss
        metrics = {"loss": loss.detach(), "video_loss": video_loss.detach(), "action_loss": act_loss.detach(), **vm}
        return loss, metrics

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as :meth:`training_loss` (so that DDP/FSDP wrappers see a forward call)."""
        return self.training_loss(batch)

    def predict_actions(self, images: torch.Tensor, proprio: torch.Tensor, text_context: torch.Tensor | None = None,
                        instruction: Sequence[str] | str | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] (camera layout composed); proprio [B, P] normalised;
        text_context [B, Lt, text_dim] or instruction(s) -> normalised actions [B, H, A]."""
        self.check_images(images)
        device = self.proprio_encoder.weight.device
        batch: dict[str, Any] = {}
        if text_context is not None:
            batch["text_context"] = text_context
        elif instruction is not None:
            batch["instruction"] = [instruction] * images.shape[0] if isinstance(instruction, str) else list(instruction)
        if proprio.dim() != 2 or proprio.shape[0] != images.shape[0]:
            raise ValueError(f"proprio: expected [B={images.shape[0]}, {self.cfg.proprio_dim}], got {tuple(proprio.shape)}")
        check_finite(proprio, "proprio")
        if "instruction" in batch and len(batch["instruction"]) != images.shape[0]:
            raise ValueError(f"instruction: expected one str or {images.shape[0]} (one per image), got "
                             f"{len(batch['instruction'])}")
        if text_context is not None and (text_context.dim() != 3 or text_context.shape[0] != images.shape[0]):
            raise ValueError(f"text_context: expected [B={images.shape[0]}, {self.cfg.text.max_tokens}, "
                             f"{self.cfg.text.dim}], got {tuple(text_context.shape)}")
        ctx = self.context(self.text_context(batch, device), proprio.to(device))
        z = self.encode_video(images.to(device)[:, :, None])
        return self.action_pass(z, ctx)

    @torch.no_grad()
    def generate_future(self, latents: torch.Tensor, proprio: torch.Tensor, text_context: torch.Tensor | None = None,
                        instruction: Sequence[str] | str | None = None, steps: int = 20,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample the future latent frames with the video branch (Euler on the shifted sigma grid).

        latents [B, C, F, h, w] (full resolution; only frame 0 is read) -> predicted low-resolution
        latents [B, C, F, h/f, w/f] with frame 0 = the clean downsampled conditioning frame. Decode with
        ``self.vae.decode`` to look at them next to the real frames."""
        device = self.proprio_encoder.weight.device
        batch: dict[str, Any] = {"text_context": text_context} if text_context is not None else {
            "instruction": [instruction] * latents.shape[0] if isinstance(instruction, str) else list(instruction)}
        ctx = self.context(self.text_context(batch, device), proprio.to(device))
        x0 = latent_downsample(latents.to(device).float(), self.cfg.train.video_downsample)
        b, frames = x0.shape[0], x0.shape[2]
        x = torch.randn(x0.shape, generator=generator, device=generator.device if generator else device).to(device)
        x[:, :, 0] = x0[:, :, 0]
        u = torch.linspace(1.0, 0.0, steps + 1, device=device)
        sig = self.flow.shift_sigma(u)
        for i in range(steps):
            t = torch.cat([torch.zeros(b, 1, device=device), (sig[i] * self.flow.T).expand(b, frames - 1)], dim=1)
            v = self.dit(x, t, ctx, context_embedded=True).video.float()
            x[:, :, 1:] = x[:, :, 1:] + (sig[i + 1] - sig[i]) * v[:, :, 1:]
        return x
