"""Foundation tests of the reference model on the tiny preset (CPU)."""
import copy
import subprocess
import sys

import pytest
import torch

from lwam.config import ImplConfig, get_preset
from lwam.model.attention import first_frame_causal_attention, first_frame_causal_mask
from lwam.model.lightwam import LightWAM
from lwam.model.rope import apply_rope, rope_cos_sin
from lwam.reference.rope import rope_apply_complex


# The reference pooling path keeps these model tests fast (the fused op runs in Triton's interpreter on
# CPU); fused-vs-reference equality of the expert is tested on its own below.
IMPL = ImplConfig(fused_pooling=False)


def tiny(**overrides):
    return get_preset("tiny").replace(**overrides)


def make_batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.latent_hw()
    return {
        "latents": torch.randn(b, cfg.vae.z_dim, cfg.latent_frames(), h, w, generator=g),
        "instruction": ["press the button", "open the drawer"][:b] * (b // 2 + 1),
        "proprio": torch.randn(b, cfg.proprio_dim, generator=g),
        "actions": torch.rand(b, cfg.chunk_size, cfg.action_dim, generator=g) * 2 - 1,
        "actions_is_pad": torch.zeros(b, cfg.chunk_size, dtype=torch.bool),
    }


def _fix_batch(batch):
    batch["instruction"] = batch["instruction"][: batch["latents"].shape[0]]
    return batch


def test_first_frame_causal_mask_semantics():
    m = first_frame_causal_mask(6, 2)
    assert m[:2, :2].all() and not m[:2, 2:].any()   # frame-0 tokens see only frame 0
    assert m[2:].all()                                 # later tokens see everything


@pytest.mark.parametrize("n0,s", [(4, 12), (1, 5), (7, 7)])
def test_attention_split_equals_masked(n0, s):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, s, 3, 8, generator=g) for _ in range(3))
    ref = first_frame_causal_attention(q, k, v, n0, impl="masked")
    out = first_frame_causal_attention(q, k, v, n0, impl="split")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_frame0_tokens_ignore_later_frames():
    cfg = tiny()
    torch.manual_seed(0)
    dit = LightWAM(cfg, build_vae=False, impl=IMPL).dit.eval()
    for p in dit.parameters():  # make every path non-trivial
        p.data.add_(torch.randn_like(p) * 0.02)
    lat = torch.randn(1, 16, 3, 4, 8)
    ctx = torch.randn(1, 5, cfg.dit.text_dim)
    t = torch.tensor([[0.0, 400.0, 400.0]])
    out1 = dit(lat, t, ctx, taps=(1,), return_video=True)
    lat2 = lat.clone()
    lat2[:, :, 1:] = torch.randn_like(lat2[:, :, 1:])
    out2 = dit(lat2, t, ctx, taps=(1,), return_video=True)
    n0 = 2 * 4
    torch.testing.assert_close(out1.taps[0][:, :n0], out2.taps[0][:, :n0])
    assert not torch.allclose(out1.taps[0][:, n0:], out2.taps[0][:, n0:])


def test_rope_real_fp32_matches_complex_reference():
    grid = (3, 4, 5)
    x = torch.randn(2, 60, 2, 128)
    cos, sin = rope_cos_sin(grid, 128)
    torch.testing.assert_close(apply_rope(x, cos, sin), rope_apply_complex(x, grid), rtol=1e-5, atol=1e-5)


def test_zero_init_lora_and_adapters_leave_frozen_model_unchanged():
    cfg = tiny()
    torch.manual_seed(0)
    with_ad = LightWAM(cfg, build_vae=False, impl=IMPL).dit.eval()
    bare_cfg = cfg.replace(**{"lora.enabled": False, "adapter.layers": (), })
    plain = type(with_ad)(bare_cfg.dit, bare_cfg.lora, None).eval()
    missing, unexpected = plain.load_state_dict(with_ad.state_dict(), strict=False)
    assert not missing and all("lora_" in k or "wam_adapters" in k for k in unexpected)
    lat = torch.randn(2, 16, 3, 4, 8)
    t = torch.tensor([[0.0, 300.0, 300.0], [0.0, 900.0, 900.0]])
    ctx = torch.randn(2, 5, cfg.dit.text_dim)
    torch.testing.assert_close(with_ad(lat, t, ctx).video, plain(lat, t, ctx).video, rtol=0, atol=0)


def test_gradients_reach_exactly_the_trainable_set():
    cfg = tiny(freeze_backbone=True)
    torch.manual_seed(0)
    model = LightWAM(cfg, impl=IMPL)
    # Zero-initialised LoRA-up/adapter-up/head would block gradients to their partners: perturb them.
    for n, p in model.named_parameters():
        if "up_proj" in n or n == "dit.head.head.weight":
            p.data.normal_(0, 0.02)
    loss, _ = model.training_loss(_fix_batch(make_batch(cfg)))
    loss.backward()
    for n, p in model.named_parameters():
        trainable = p.requires_grad
        if n.startswith("dit."):
            sub = n[4:]
            expected = ".lora_" in sub or ".ffn_lora_" in sub or sub.startswith(("wam_adapters.", "head."))
        else:
            expected = not n.startswith("vae.")
        assert trainable == expected, n
        if trainable:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"no gradient reached {n}"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


def test_blocks_after_last_tap_do_not_change_actions():
    cfg = tiny(**{"adapter.layers": (0, 1, 2)})
    torch.manual_seed(0)
    model = LightWAM(cfg, impl=IMPL).eval()
    img = torch.rand(1, 3, 64, 128) * 2 - 1
    prop = torch.randn(1, cfg.proprio_dim)
    a1 = model.predict_actions(img, prop, instruction="press the button")
    model.dit.blocks[3].ffn[2].weight.data.normal_()
    a2 = model.predict_actions(img, prop, instruction="press the button")
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)


def test_overfit_one_batch_loss_falls():
    cfg = tiny()
    torch.manual_seed(0)
    model = LightWAM(cfg, impl=IMPL)
    batch = _fix_batch(make_batch(cfg, b=4))
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=3e-3)
    torch.manual_seed(1)
    hist = []
    for step in range(50):
        loss, m = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(m)
    assert hist[-1]["action_loss"] < 0.4 * hist[0]["action_loss"], (hist[0], hist[-1])
    first = sum(h["video_mse"] for h in hist[:5]) / 5
    last = sum(h["video_mse"] for h in hist[-5:]) / 5
    assert last < first, (first, last)


def test_action_loss_prefix_and_padding_mask():
    cfg = tiny()
    model = LightWAM(cfg, build_vae=False, impl=IMPL)
    pred = torch.zeros(2, 32, 4)
    act = torch.zeros(2, 32, 4)
    act[:, cfg.train.action_loss_steps:] = 5.0          # outside the weighted prefix: ignored
    assert float(model.action_loss(pred, act, None)) == 0.0
    act[0, 0] = 1.0
    pad = torch.zeros(2, 32, dtype=torch.bool)
    pad[0, 0] = True                                     # padded: ignored
    assert float(model.action_loss(pred, act, pad)) == 0.0


def test_flow_weight_zero_at_ends_mean_one():
    from lwam.model.flow import FlowMatching
    fm = FlowMatching(get_preset("paper").flow)
    w = fm.weight(torch.tensor([0.0, 500.0, 1000.0]))
    assert w[0] == 0 and w[2] == 0 and w[1] > 1
    grid = 1000 * fm.shift_sigma(torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1])
    assert abs(float(fm.weight(grid).mean()) - 1.0) < 1e-5
    s = fm.shift_sigma(torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(s, torch.tensor([0.0, 5 * 0.5 / (1 + 4 * 0.5), 1.0]))


def test_bad_inputs_raise_clear_errors():
    cfg = tiny()
    model = LightWAM(cfg, impl=IMPL)
    prop = torch.randn(1, cfg.proprio_dim)
    with pytest.raises(ValueError, match="divisible by 16"):
        model.predict_actions(torch.zeros(1, 3, 60, 128), prop, instruction="x")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.predict_actions(torch.zeros(1, 4, 64, 128), prop, instruction="x")
    with pytest.raises(ValueError, match="proprio"):
        model.predict_actions(torch.zeros(1, 3, 64, 128), torch.zeros(1, 9), instruction="x")
    batch = _fix_batch(make_batch(cfg))
    batch["actions"] = batch["actions"][:, :5]
    with pytest.raises(ValueError, match="actions: expected"):
        model.training_loss(batch)
    with pytest.raises(ValueError, match="image_height=50 must be divisible by 16"):
        get_preset("tiny").replace(**{"data.image_height": 50}).validate()


def test_import_does_not_initialise_cuda():
    code = ("import torch, lwam, lwam.model.lightwam, lwam.cli; "
            "import lwam.ops.latent_downsample, lwam.modules.query_pool; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_checkpoint_round_trip(tmp_path):
    from lwam.checkpoint import load_checkpoint, save_checkpoint
    cfg = tiny()
    torch.manual_seed(0)
    model = LightWAM(cfg, impl=IMPL)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.01)
    stats = {"action": {"min": [0, 0, 0, 0], "max": [1, 1, 1, 1]}}
    save_checkpoint(model, tmp_path / "ckpt", stats=stats)
    loaded, st = load_checkpoint(tmp_path / "ckpt")
    assert st == stats and loaded.cfg == cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not list(tmp_path.glob(".ckpt.tmp-*"))


def _expert_pair():
    from lwam.config import ActionExpertConfig
    from lwam.model.action_expert import StateFusionActionExpert
    torch.manual_seed(0)
    cfg = ActionExpertConfig(num_queries=3, num_heads=2, compress_dim=16, hidden_dim=24, step_embed_dim=8)
    fused = StateFusionActionExpert(cfg, dim=32, num_layers=3, chunk_size=5, action_dim=3)
    plain = StateFusionActionExpert(cfg, dim=32, num_layers=3, chunk_size=5, action_dim=3)
    plain.fused_pooling = False  # what LightWAM.set_impl(ImplConfig(fused_pooling=False)) sets
    for p in fused.parameters():  # non-trivial merge logits and norms
        p.data.add_(torch.randn_like(p) * 0.05)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_action_expert_fused_pooling_matches_reference_fwd_bwd():
    pytest.importorskip("triton")
    from lwam.testing import assert_close
    from lwam.kernels import query_pool as kernel
    fused, plain = _expert_pair()
    states = [torch.randn(2, 7, 32, requires_grad=True) for _ in range(3)]
    ref_states = [s.detach().clone().requires_grad_() for s in states]
    kernel.reset_launch_count()
    out, ref = fused(states), plain(ref_states)
    assert kernel.launch_count() > 0, "the fused expert did not run the Triton kernel"
    assert_close(out, ref, name="actions")
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for s, r in zip(states, ref_states):
        assert_close(s.grad, r.grad, name="state grad")
    for (n, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        assert_close(p.grad, q.grad, name=n)


def test_action_expert_compiles_fullgraph_without_breaks():
    pytest.importorskip("triton")
    from lwam.testing import assert_close
    fused, _ = _expert_pair()
    states = [torch.randn(2, 7, 32) for _ in range(3)]
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert_close(compiled(states), fused(states), name="compiled expert")
