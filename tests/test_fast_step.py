"""The fast implementation (lwam.config.ImplConfig.fast(), explained in lwam.model.fast) against the reference: same loss, same gradient for every
trainable parameter (same weights, same batch, same flow noise), within the lwam.testing tolerances.

CPU tier: the tiny preset in fp32 with the backbone frozen as in the paper (LoRA, adapters, head, proprio
encoder and SFAE train), every switch on its own and all together; torch.compile of the blocks is
exercised on one block (one graph, quick) and on the whole step (marked slow: four graphs). The split-vs-masked attention op itself is
tested in tests/test_model.py; here the switch is checked inside the model.
GPU tier (marked): the paper model's shapes in bf16 autocast, on fewer layers.
"""
import copy
import dataclasses

import pytest
import torch

from lwam.config import ImplConfig, get_preset
from lwam.model.fast import check_frozen
from lwam.model.lightwam import LightWAM
from lwam.model.rope import apply_rope, rope_freqs_complex
from lwam.reference.rope import rope_apply_complex
from lwam.testing import assert_close
from lwam.train import Trainer


def _cfg(**overrides):
    return get_preset("tiny").replace(freeze_backbone=True, **overrides)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = LightWAM(cfg, build_vae=False)
    # Zero-initialised LoRA-up / adapter-up / head would leave their partners without gradient: perturb
    # them so that every trainable parameter's gradient is non-trivial.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "up_proj" in n or n == "dit.head.head.weight":
                p.normal_(0, 0.05)
    return model


def _batch(cfg, b=2, seed=0):
    """A training batch with its flow noise fixed ('flow_eps', 'flow_u'), so both steps see the same noise."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.latent_hw()
    f = cfg.latent_frames()
    ds = cfg.train.video_downsample
    return {
        "latents": torch.randn(b, cfg.vae.z_dim, f, h, w, generator=g),
        "text_context": torch.randn(b, cfg.text.max_tokens, cfg.text.dim, generator=g),
        "proprio": torch.randn(b, cfg.proprio_dim, generator=g),
        "actions": torch.rand(b, cfg.chunk_size, cfg.action_dim, generator=g) * 2 - 1,
        "actions_is_pad": torch.zeros(b, cfg.chunk_size, dtype=torch.bool),
        "flow_eps": torch.randn(b, cfg.vae.z_dim, f, h // ds, w // ds, generator=g),
        "flow_u": torch.rand(b, generator=g),
    }


def _step(model, batch, autocast_dtype=None):
    """Forward + backward of ``model.training_loss`` -> (loss, {name: grad})."""
    for p in model.parameters():
        p.grad = None
    dev = model.proprio_encoder.weight.device.type
    with torch.autocast(dev, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss, _ = model.training_loss(batch)
    loss.backward()
    check_frozen(model, after_backward=True)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


def _with(model, impl):
    return copy.deepcopy(model).set_impl(impl)


def _assert_same_step(got, want, dtype=torch.float32, label=""):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert_close(loss, ref_loss, dtype=dtype, name=f"{label} loss")
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert torch.isfinite(grads[n]).all(), f"{label} {n}: non-finite gradient"
        assert_close(grads[n], g, dtype=dtype, name=f"{label} grad {n}")


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = _cfg()
    model = _model(cfg)
    batch = _batch(cfg)
    ref = _with(model, ImplConfig.reference())
    return cfg, model, batch, _step(ref, batch)


def test_impl_is_applied_to_the_modules(tiny_setup):
    _, model, _, _ = tiny_setup
    m = _with(model, ImplConfig.reference())
    assert m.impl == ImplConfig.reference() and m.dit.impl == ImplConfig.reference()
    assert all(b.self_attn.attention == "masked" for b in m.dit.blocks)
    assert not m.expert.fused_pooling
    m.set_impl(ImplConfig.fast(compile_blocks=False))
    assert all(b.self_attn.attention == "split" for b in m.dit.blocks) and m.expert.fused_pooling
    # The state dict is the same object layout either way (no wrapper prefixes).
    assert list(m.state_dict()) == list(model.state_dict())


def test_impl_config_values_and_round_trip():
    ref, fast = ImplConfig.reference(), ImplConfig.fast()
    assert ref != fast and fast.compile_blocks and not ref.compile_blocks
    assert ImplConfig.named("reference") == ref and ImplConfig.named("fast") == fast
    assert ImplConfig.from_dict(fast.to_dict()) == fast
    with pytest.raises(ValueError, match="attention"):
        ImplConfig(attention="flash")
    with pytest.raises(ValueError, match="impl"):
        ImplConfig.named("fastest")
    with pytest.raises(TypeError, match="impl"):
        LightWAM(_cfg(), build_vae=False).set_impl("fast")


def test_reference_trains_exactly_the_trainable_set(tiny_setup):
    cfg, model, _, (_, ref_grads) = tiny_setup
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ref_grads) == names
    assert not any(n.startswith("dit.blocks.") and ".lora_" not in n and "ffn_lora_" not in n for n in names)
    assert all(bool(g.abs().sum() > 0) for g in ref_grads.values())


def test_fast_step_eager_equals_reference(tiny_setup):
    """Every change except compile: split attention, real fp32 RoPE (cached), fused pooling (Triton's
    interpreter on CPU), fused downsampling, frozen weights checked."""
    _, model, batch, want = tiny_setup
    m = _with(model, ImplConfig.fast(compile_blocks=False))
    _assert_same_step(_step(m, batch), want, label="fast(eager)")
    _assert_same_step(_step(m, batch), want, label="fast(eager, cached RoPE)")


_FAST = ImplConfig.fast()
SWITCHES = [f.name for f in dataclasses.fields(ImplConfig) if f.name != "compile_blocks"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_alone_equals_reference(tiny_setup, switch):
    _, model, batch, want = tiny_setup
    impl = ImplConfig.reference().replace(**{switch: getattr(_FAST, switch)})
    m = _with(model, impl)
    assert m.impl == impl
    _assert_same_step(_step(m, batch), want, label=switch)


def test_complex_rope_in_model_is_the_reference_arithmetic():
    """The model's complex path is bit-identical to lwam.reference.rope; the real path agrees within fp32."""
    grid = (3, 2, 5)
    x = torch.randn(2, 30, 3, 24, dtype=torch.float32)
    freqs = rope_freqs_complex(grid, 24)
    assert freqs.dtype == torch.complex128
    torch.testing.assert_close(apply_rope(x, freqs, None), rope_apply_complex(x, grid), rtol=0, atol=0)


def test_rope_cache_returns_the_same_tables():
    cfg = _cfg()
    dit = _model(cfg).dit
    dit.set_impl(ImplConfig(rope_cache=True))
    a = dit.rope_tables((3, 2, 4), torch.device("cpu"))
    b = dit.rope_tables((3, 2, 4), torch.device("cpu"))
    assert a[0] is b[0] and a[1] is b[1]
    dit.set_impl(ImplConfig(rope_cache=False))
    c = dit.rope_tables((3, 2, 4), torch.device("cpu"))
    assert c[0] is not a[0] and torch.equal(c[0], a[0]) and torch.equal(c[1], a[1])
    with torch.inference_mode():  # inference tensors would break a later training step: not cached
        dit.set_impl(ImplConfig(rope_cache=True))
        dit.rope_tables((1, 2, 4), torch.device("cpu"))
    assert not dit._rope_tables


def test_frozen_check_catches_reenabled_weights(tiny_setup):
    _, model, batch, _ = tiny_setup
    m = _with(model, ImplConfig())
    m.dit.blocks[0].self_attn.q.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="self_attn.q.weight"):
        check_frozen(m)
    m.apply_freezing()
    check_frozen(m)
    assert not m.dit.blocks[0].self_attn.q.weight.requires_grad


def test_compiled_block_equals_eager_block(tiny_setup):
    """The compile switch on one DiT block at the video pass's shapes (one compiled graph, forward and
    backward): output, input gradient and every trainable (LoRA) gradient equal the eager block's; the
    compile is in place, so the state-dict keys stay."""
    cfg, model, batch, _ = tiny_setup
    dit = _with(model, ImplConfig()).dit
    eager = dit.blocks[1]
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    compiled.compile(dynamic=False)
    assert list(compiled.state_dict()) == keys
    g = torch.Generator().manual_seed(3)
    b, d = 2, cfg.dit.dim
    h, w = cfg.latent_hw()
    grid = (cfg.latent_frames(), h // 2 // 2, w // 2 // 2)  # video pass: 2x downsampled, 2x2 patches
    s = grid[0] * grid[1] * grid[2]
    x = torch.randn(b, s, d, generator=g)
    _, e6 = dit.time_embed(torch.tensor([[0.0, 300.0, 300.0], [0.0, 700.0, 700.0]]))
    ctx = torch.randn(b, cfg.context_tokens(), d, generator=g)
    cos, sin = dit.rope_tables(grid, torch.device("cpu"))
    outs = []
    for blk in (eager, compiled):
        xi = x.clone().requires_grad_(True)
        y = blk(xi, e6.detach(), ctx, cos, sin, grid[1] * grid[2])
        (y * torch.linspace(-1, 1, d)).square().mean().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in blk.named_parameters() if p.requires_grad}))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert gp0 and gp0.keys() == gp1.keys()
    assert_close(y1, y0, name="block output")
    assert_close(gx1, gx0, name="block input grad")
    for n in gp0:
        assert_close(gp1[n], gp0[n], name=f"block grad {n}")


class _Samples(torch.utils.data.Dataset):
    """A map-style dataset over the rows of a fixed batch (what the Trainer draws from)."""

    def __init__(self, batch):
        self.rows = [{k: v[i] for k, v in batch.items() if not k.startswith("flow_")}
                     for i in range(batch["latents"].shape[0])]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _trainer_step(model, impl, tmp_path, name, batch):
    """One ``Trainer.train_step`` with ``impl`` -> (loss, {name: grad}) (the step's own noise and batch)."""
    cfg = model.cfg.train
    cfg = dataclasses.replace(cfg, batch_size=batch["latents"].shape[0], grad_accum=1)
    tr = Trainer(copy.deepcopy(model), _Samples(batch), tmp_path / name, cfg, impl=impl, device="cpu",
                 resume=False, progress=False)
    assert tr.model.impl == impl and tr.impl == impl
    metrics = tr.train_step()
    assert isinstance(metrics["loss"], torch.Tensor)  # on the device until the logging interval reads it
    check_frozen(tr.model, after_backward=True)
    return metrics["loss"], {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}


def test_trainer_step_fast_equals_reference(tiny_setup, tmp_path):
    """One Trainer step (the step `lwam train` runs), fast arithmetic (eager blocks) vs the reference:
    same loss, same (clipped) gradient for every trainable parameter."""
    _, model, batch, _ = tiny_setup
    want = _trainer_step(model, ImplConfig.reference(), tmp_path, "ref", batch)
    got = _trainer_step(model, ImplConfig.fast(compile_blocks=False), tmp_path, "fast", batch)
    _assert_same_step(got, want, label="Trainer fast(eager)")


@pytest.mark.slow
def test_trainer_step_fast_compiled_equals_reference(tiny_setup, tmp_path):
    """The same with ``ImplConfig.fast()`` as it is (compiled blocks: four block graphs, video/action pass
    x first/later block; minutes of inductor compile on a small CPU), then the compiled model switched back
    to eager blocks and to the reference."""
    _, model, batch, _ = tiny_setup
    want = _trainer_step(model, ImplConfig.reference(), tmp_path, "ref", batch)
    _assert_same_step(_trainer_step(model, ImplConfig.fast(), tmp_path, "fast", batch), want,
                      label="Trainer fast(compiled)")
    m = _with(model, ImplConfig.fast())
    assert all(b._compiled_call_impl is not None for b in m.dit.blocks)
    m.set_impl(ImplConfig.reference())
    assert all(b._compiled_call_impl is None for b in m.dit.blocks)
    assert list(m.state_dict()) == list(model.state_dict())


def test_fast_step_with_optimizer_matches_reference_after_updates(tiny_setup, tmp_path):
    """Three Trainer steps (AdamW, schedule, clipping): parameters stay equal (eager fast path; the compiled
    path is covered above). AdamW's eps is 1e-6, not 1e-8: for a gradient element near zero (one adapter
    down-projection weight here), m / (sqrt(v) + 1e-8) turns rounding-level gradient differences into
    lr-sized parameter differences; the comparison itself stays as strict as for one step."""
    _, model, batch, _ = tiny_setup
    runs = []
    for impl in (ImplConfig.reference(), ImplConfig.fast(compile_blocks=False)):
        cfg = dataclasses.replace(model.cfg.train, batch_size=2, grad_accum=1, lr=1e-3, warmup_steps=1)
        tr = Trainer(copy.deepcopy(model), _Samples(batch), tmp_path / impl.attention, cfg, impl=impl,
                     device="cpu", resume=False, progress=False)
        for group in tr.optimizer.param_groups:
            group["eps"] = 1e-6
        losses = torch.stack([tr.train_step()["loss"] for _ in range(3)])
        runs.append((losses, {n: p.detach().clone() for n, p in tr.model.named_parameters()}))
    assert_close(runs[1][0], runs[0][0], name="losses")
    for n, p in runs[0][1].items():
        assert_close(runs[1][1][n], p, name=n)


@pytest.mark.gpu
def test_fast_step_equals_reference_paper_bf16():
    """Paper dims and LIBERO shapes (video 294 tokens, action 392 tokens, 129 context tokens), batch 2,
    bf16 autocast on CUDA, on 9 of the 30 blocks (taps 2, 5, 8) to bound time and memory."""
    cfg = get_preset("paper").replace(**{"dit.num_layers": 9, "adapter.layers": (2, 5, 8)})
    model = _model(cfg).cuda()
    batch = {k: v.cuda() for k, v in _batch(cfg, b=2).items()}
    ref = _with(model, ImplConfig.reference())
    want = _step(ref, batch, autocast_dtype=torch.bfloat16)
    del ref
    m = model.set_impl(ImplConfig.fast())
    _step(m, batch, autocast_dtype=torch.bfloat16)  # compile
    _assert_same_step(_step(m, batch, autocast_dtype=torch.bfloat16), want, dtype=torch.bfloat16,
                      label="paper bf16")
