"""lwam.policy.compiled.Policy against the eager LightWAM.predict_actions (tiny preset, CPU; GPU tests marked)."""
import copy

import numpy as np
import pytest
import torch

from lwam.config import get_preset
from lwam.errors import UnknownInstructionError
from lwam.policy.compiled import Policy
from lwam.model.lightwam import LightWAM
from lwam.testing import assert_close, perturb_zero_inits_

INSTR = ["pick up the red cube", "open the top drawer", "push the button"]


def _nontrivial_(model):
    """LoRA and adapter up-projections are zero-initialised; make every path count."""
    return perturb_zero_inits_(model, torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _nontrivial_(LightWAM(get_preset("tiny")).eval())


def _inputs(cfg, b, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, cfg.data.image_height, cfg.data.image_width, generator=g) * 2 - 1
    proprio = torch.randn(b, cfg.proprio_dim, generator=g)
    return images, [INSTR[(seed + i) % len(INSTR)] for i in range(b)], proprio


def _eager(model, images, instr, proprio):
    with torch.no_grad():
        return model.predict_actions(images, proprio, instruction=instr).float()


FLAGS = ["merge_lora", "truncate", "fold_pooling", "single_frame_vae"]


@pytest.mark.parametrize("off", [None, *FLAGS])
def test_transformations_match_eager(model, off):
    """All transformations on, and each one off in turn (eager execution of the transformed path)."""
    kw = {off: False} if off else {}
    pol = Policy.from_model(model, compile=False, **kw)
    images, instr, proprio = _inputs(model.cfg, 2, seed=1)
    out = pol.predict_batch(images, instr, proprio)
    assert out.shape == (2, model.cfg.chunk_size, model.cfg.action_dim) and out.dtype == torch.float32
    assert_close(out, _eager(model, images, instr, proprio), dtype=torch.float32, name=f"off={off}")


def test_lora_merge_and_truncation_exact_fp32():
    """Merging LoRA into W and deleting the blocks after the last tap change nothing beyond fp32 rounding.
    (Taps (1, 2) of 4 blocks, so that truncation deletes blocks 3.)"""
    torch.manual_seed(1)
    model = _nontrivial_(LightWAM(get_preset("tiny").replace(**{"adapter.layers": (1, 2)})).eval())
    images, instr, proprio = _inputs(model.cfg, 2, seed=2)
    ref = _eager(model, images, instr, proprio)
    base = dict(compile=False, fold_pooling=False, single_frame_vae=False)
    plain = Policy.from_model(model, merge_lora=False, truncate=False, **base)
    both = Policy.from_model(model, merge_lora=True, truncate=True, **base)
    assert len(both.fast.dit.blocks) == max(model.cfg.tap_layers) + 1 < len(model.dit.blocks)
    assert not any(".lora_" in n or "ffn_lora" in n for n, _ in both.fast.named_parameters())
    assert any(".lora_" in n for n, _ in plain.fast.named_parameters())
    out_plain = plain.predict_batch(images, instr, proprio)
    out_both = both.predict_batch(images, instr, proprio)
    torch.testing.assert_close(out_plain, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_both, ref, rtol=1e-5, atol=1e-6)
    # the merged weight is exactly W + scale * up @ down
    blk, src = both.fast.dit.blocks[0], model.dit.blocks[0]
    want = src.self_attn.q.weight + src.self_attn.lora_q.delta_weight()
    torch.testing.assert_close(blk.self_attn.q.weight, want, rtol=0, atol=1e-6)


def test_source_model_untouched(model):
    images, instr, proprio = _inputs(model.cfg, 1, seed=3)
    before = _eager(model, images, instr, proprio)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    Policy.from_model(model, compile=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    assert hasattr(model.dit.blocks[0].self_attn, "lora_q")
    torch.testing.assert_close(_eager(model, images, instr, proprio), before, rtol=0, atol=0)


def test_text_context_cached_per_instruction(model):
    pol = Policy.from_model(model, compile=False)
    images, _, proprio = _inputs(model.cfg, 1, seed=4)
    pol.predict_batch(images, [INSTR[0]], proprio)
    emb = pol._text_emb[INSTR[0]]
    pol.predict_batch(images, [INSTR[0]], proprio)
    assert pol._text_emb[INSTR[0]] is emb          # embedded once, reused
    want = model.dit.text_embedding(model.text.get([INSTR[0]])[0])
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_matches_eager_and_never_recompiles(model, backend):
    """Warm up, then three calls with different images/proprio/instructions: same as eager, no new graph."""
    from torch._dynamo.utils import counters

    pol = Policy.from_model(model, compile=True, compile_backend=backend)
    cfg = model.cfg
    images, instr, proprio = _inputs(cfg, 2, seed=10)
    assert_close(pol.predict_batch(images, instr, proprio), _eager(model, images, instr, proprio),
                 dtype=torch.float32, name="warm-up")
    graphs = counters["stats"]["unique_graphs"]
    frames = dict(counters["frames"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (11, 12, 13):
            images, instr, proprio = _inputs(cfg, 2, seed=seed)
            out = pol.predict_batch(images, instr, proprio)
            assert_close(out, _eager(model, images, instr, proprio), dtype=torch.float32, name=f"seed {seed}")
    assert counters["stats"]["unique_graphs"] == graphs
    assert dict(counters["frames"]) == frames


def test_predict_single_uint8_numpy_and_stats(model):
    from lwam.data.lerobot import ACTION_KEY, STATE_KEY
    from lwam.data.normalize import Normalizer

    cfg = model.cfg
    stats = {STATE_KEY: {"min": [-2.0] * cfg.proprio_dim, "max": [3.0] * cfg.proprio_dim,
                         "mean": [0.0] * cfg.proprio_dim, "std": [1.0] * cfg.proprio_dim},
             ACTION_KEY: {"min": [-0.5] * cfg.action_dim, "max": [1.5] * cfg.action_dim,
                          "mean": [0.0] * cfg.action_dim, "std": [1.0] * cfg.action_dim}}
    norm = Normalizer.from_config(stats, cfg.data)
    pol = Policy.from_model(model, stats=stats, compile=False)
    g = torch.Generator().manual_seed(5)
    img_u8 = torch.randint(0, 256, (cfg.data.image_height, cfg.data.image_width, 3), dtype=torch.uint8, generator=g)
    raw = np.random.default_rng(0).uniform(-2, 3, cfg.proprio_dim).astype(np.float32)
    out = pol.predict(img_u8.numpy(), INSTR[1], raw)
    assert isinstance(out, np.ndarray) and out.shape == (cfg.chunk_size, cfg.action_dim)
    img = img_u8.permute(2, 0, 1).float()[None] / 127.5 - 1
    ref = _eager(model, img, [INSTR[1]], norm.apply(STATE_KEY, torch.from_numpy(raw))[None])
    np.testing.assert_allclose(out, norm.invert(ACTION_KEY, ref)[0].numpy(), rtol=2e-4, atol=2e-5)
    # float [3, H, W] input and tensor proprio give the same actions as a tensor
    out_t = pol.predict(img[0], INSTR[1], torch.from_numpy(raw))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out, rtol=1e-6, atol=1e-6)


def _no_device_work(pol):
    assert pol._runners == {} and pol._text_emb == {}


@pytest.mark.parametrize("case,exc,msg", [
    ("image_rank", ValueError, "images: expected [B, 3, H, W]"),
    ("image_channels_last_float", ValueError, "images: expected [B, 3, H, W]"),
    ("image_dtype", TypeError, "images: expected a float tensor"),
    ("image_uint8_shape", ValueError, "images: expected uint8 [B, H, W, 3]"),
    ("image_indivisible", ValueError, "divisible by 16"),
    ("proprio_dim", ValueError, "proprio: expected [B=2, 4], got (2, 5)"),
    ("proprio_batch", ValueError, "proprio: expected [B=2, 4], got (3, 4)"),
    ("instr_count", ValueError, "instructions: expected 2"),
])
def test_bad_inputs_fail_before_device_work(model, case, exc, msg):
    pol = Policy.from_model(model, compile=False)
    cfg = model.cfg
    images, instr, proprio = _inputs(cfg, 2, seed=6)
    h, w = cfg.data.image_height, cfg.data.image_width
    if case == "image_rank":
        images = images[0]
    elif case == "image_channels_last_float":
        images = images.permute(0, 2, 3, 1)
    elif case == "image_dtype":
        images = images.long()
    elif case == "image_uint8_shape":
        images = torch.zeros(2, 3, h, w, dtype=torch.uint8)
    elif case == "image_indivisible":
        images = images[:, :, :h - 8]
    elif case == "proprio_dim":
        proprio = torch.zeros(2, cfg.proprio_dim + 1)
    elif case == "proprio_batch":
        proprio = torch.zeros(3, cfg.proprio_dim)
    elif case == "instr_count":
        instr = instr[:1]
    with pytest.raises(exc) as e:
        pol.predict_batch(images, instr, proprio)
    assert msg in str(e.value)
    _no_device_work(pol)


def test_unknown_instruction_without_encoder(model):
    m = copy.deepcopy(model)
    m.text.encoder = None  # a cache-only text setup (the paper's)
    pol = Policy.from_model(m, compile=False)
    images, _, proprio = _inputs(model.cfg, 1, seed=7)
    with pytest.raises(UnknownInstructionError, match="no cached text context") as e:
        pol.predict_batch(images, ["never seen"], proprio)
    assert isinstance(e.value, ValueError) and isinstance(e.value, KeyError)
    _no_device_work(pol)
    ctx = model.text.encoder(["anything"])[0]
    pol.add_instruction("never seen", ctx)
    assert pol.predict_batch(images, ["never seen"], proprio).shape[0] == 1
    with pytest.raises(ValueError, match="text_context"):
        pol.add_instruction("bad", ctx[:, :3])


def test_from_checkpoint_roundtrip(model, tmp_path):
    from lwam.checkpoint import save_checkpoint

    save_checkpoint(model, tmp_path / "ckpt")
    pol = Policy.from_checkpoint(tmp_path / "ckpt", compile=False)
    images, instr, proprio = _inputs(model.cfg, 2, seed=8)
    assert_close(pol.predict_batch(images, instr, proprio), _eager(model, images, instr, proprio),
                 dtype=torch.float32)


def test_from_release_files(model, tmp_path):
    """A published-layout .pt (prefix 'mixtures.video.') + the VAE state dict file beside it."""
    from lwam.model.weights import RELEASE_DIT_PREFIX

    release = {"mot": {RELEASE_DIT_PREFIX + k: v for k, v in model.dit.state_dict().items()},
               "state_fusion_action_expert": model.expert.state_dict(),
               "proprio_encoder": model.proprio_encoder.state_dict(), "step": 7, "torch_dtype": "float32"}
    torch.save(release, tmp_path / "lightwam.pt")
    torch.save(model.vae.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    from lwam.model.text import build_text_cache

    cfg = copy.deepcopy(model.cfg.replace(**{"text.encoder": "cache"}))  # contexts from the file only
    cache = build_text_cache(INSTR, cfg.text, tmp_path / "text.safetensors", encoder=model.text.encoder)
    pol = Policy.from_checkpoint(tmp_path / "lightwam.pt", compile=False, cfg=cfg, text_cache=cache)
    assert sorted(pol.instructions) == sorted(INSTR)
    images, instr, proprio = _inputs(model.cfg, 2, seed=9)
    assert_close(pol.predict_batch(images, instr, proprio), _eager(model, images, instr, proprio),
                 dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="VAE"):
        Policy.from_release(tmp_path / "lightwam.pt", tmp_path / "missing.pth", cfg=cfg)


# ------------------------------------------------------------------------------------------ GPU tier
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(model, dtype):
    m = copy.deepcopy(model).to("cuda", dtype)
    pol = Policy.from_model(m, device="cuda", dtype=dtype)
    assert pol.options.cuda_graphs
    for seed in (20, 21, 22):
        images, instr, proprio = _inputs(model.cfg, 2, seed=seed)
        out = pol.predict_batch(images, instr, proprio)
        ref = _eager(m, images.cuda(), instr, proprio.cuda()).cpu()
        assert_close(out, ref, dtype=dtype, name=f"graph replay {dtype}")
    r = next(iter(pol._runners.values()))
    assert r.graph is not None


@pytest.mark.gpu
def test_bf16_policy_close_to_fp32_eager(model):
    pol = Policy.from_model(model, device="cuda")
    assert pol.dtype == torch.bfloat16
    images, instr, proprio = _inputs(model.cfg, 1, seed=30)
    assert_close(pol.predict_batch(images, instr, proprio), _eager(model, images, instr, proprio),
                 dtype=torch.bfloat16)


def test_bench_latency_cli_tiny(capsys):
    """`lwam bench latency` machinery on the tiny preset (no timing assertions)."""
    import argparse
    import json

    from lwam.bench_latency import add_bench_parser

    p = argparse.ArgumentParser(prog="lwam")
    add_bench_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["bench", "latency", "--preset", "tiny", "--device", "cpu", "--iters", "2",
                         "--warmup", "1", "--no-compile", "--json"])
    assert args.func(args) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["preset"] == "tiny" and rec["weights"].startswith("random weights")
    for side in ("eager", "policy"):
        assert set(rec["results"][side]) == {"query", "vae_encode", "context", "backbone", "expert"}
        assert all(r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] for r in rec["results"][side].values())
    assert rec["torch"] == torch.__version__ and "commit" in rec
    args = p.parse_args(["bench", "latency", "--device", "cpu", "--iters", "1", "--warmup", "0",
                         "--no-compile", "--no-stages"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "speed-up" in out


def test_policy_from_a_model_with_compiled_blocks_copies_eager_blocks(model):
    """After training with ImplConfig.fast() the blocks are compiled in place; the policy's copies must run
    their own (copied) weights, not the source's compiled forward. Nothing is compiled here: the compile
    wrapper is lazy and the policy runs eagerly."""
    from lwam.config import ImplConfig

    compiled = copy.deepcopy(model).set_impl(ImplConfig.fast())
    assert all(b._compiled_call_impl is not None for b in compiled.dit.blocks)
    pol = Policy.from_model(compiled, compile=False)
    assert all(b._compiled_call_impl is None for b in pol.fast.dit.blocks)
    with torch.no_grad():  # a change to the source after the copy must not reach the policy
        for p in compiled.dit.blocks[0].parameters():
            p.add_(1.0)
    want = Policy.from_model(model, compile=False)
    images, instr, proprio = _inputs(model.cfg, 1, seed=11)
    torch.testing.assert_close(pol.predict_batch(images, instr, proprio), want.predict_batch(images, instr, proprio),
                               rtol=0, atol=0)


# ------------------------------------------------------------------------ one capture, owned outputs
def test_self_capturing_compile_mode_is_translated_under_policy_capture():
    from lwam._logging import _seen
    from lwam.policy.compiled import SELF_CAPTURING_COMPILE_MODES, single_capture_mode

    assert single_capture_mode("reduce-overhead", policy_captures=True) is None
    assert "policy.compile-mode.reduce-overhead" in _seen
    assert single_capture_mode("max-autotune", policy_captures=True) == "max-autotune-no-cudagraphs"
    assert single_capture_mode("max-autotune-no-cudagraphs", True) == "max-autotune-no-cudagraphs"
    assert single_capture_mode("reduce-overhead", policy_captures=False) == "reduce-overhead"
    assert single_capture_mode(None, True) is None
    assert set(SELF_CAPTURING_COMPILE_MODES) == {"reduce-overhead", "max-autotune"}
    with pytest.raises(TypeError, match="compile_mode"):
        single_capture_mode(3, True)


def test_policy_rejects_nested_capture_when_built_directly(model):
    import dataclasses

    pol = Policy.from_model(model, compile=False)
    opts = dataclasses.replace(pol.options, compile=True, cuda_graphs=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="reduce-overhead.*captures CUDA graphs"):
        Policy(pol.fast, pol.cfg, opts, pol.normalizer, pol.text)


class _OverwritingGraph:
    """Stands in for a captured CUDA graph: each replay rewrites the static output buffer in place, as a
    real replay does (the eager path computes what the graph would)."""

    def __init__(self, runner):
        self.runner = runner

    def replay(self):
        self.runner.out.copy_(self.runner.policy.fast(*self.runner.args()))


def test_graph_replay_results_are_not_overwritten_by_later_queries(model):
    pol = Policy.from_model(model, compile=False)
    cfg = model.cfg
    pol.warmup(batch_size=1)
    r = next(iter(pol._runners.values()))
    r.graph = _OverwritingGraph(r)
    images, instr, proprio = _inputs(cfg, 1, seed=40)
    first = pol.predict_normalized(images, instr, proprio)
    kept = first.clone()
    images2, instr2, proprio2 = _inputs(cfg, 1, seed=41)
    second = pol.predict_normalized(images2, instr2, proprio2)
    assert not torch.equal(second, kept)            # the replay did rewrite the static buffer...
    assert torch.equal(first, kept)                 # ...but not the tensor the caller holds
    assert first.data_ptr() != r.out.data_ptr() and second.data_ptr() != r.out.data_ptr()


@pytest.mark.gpu
def test_cuda_graph_outputs_of_two_shapes_stay_valid(model):
    pol = Policy.from_model(copy.deepcopy(model).to("cuda"), device="cuda", compile_mode="reduce-overhead")
    assert pol.options.cuda_graphs and pol.options.compile_mode is None   # translated, one capture
    a = _inputs(model.cfg, 1, seed=50)
    b = _inputs(model.cfg, 2, seed=51)
    out_a = pol.predict_normalized(*a)
    keep_a = out_a.clone()
    out_b = pol.predict_normalized(*b)
    keep_b = out_b.clone()
    pol.predict_normalized(*_inputs(model.cfg, 1, seed=52))
    pol.predict_normalized(*_inputs(model.cfg, 2, seed=53))
    assert torch.equal(out_a, keep_a) and torch.equal(out_b, keep_b)
