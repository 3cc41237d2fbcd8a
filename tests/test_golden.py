"""Golden tests: lwam against outputs written by the published Light-WAM code itself.

tests/data/golden/ holds a small release checkpoint written by the published ``save_checkpoint``, the
inputs, and the published code's outputs in fp32 and fp64 (see its README). Loading that release through
lwam's own strict loader and feeding the same inputs must give the same numbers, for

* the reference model (DiT forward with per-frame timesteps, the action path, the SFAE alone with its
  intermediate stages, the training loss with and without padding, and named gradients), fp32 and fp64;
* the Policy's transformed action path (LoRA merged, truncated, folded pooling), each transformation on
  its own and all together, eager and compiled;
* the fast training step (split attention, real RoPE, fused pooling, fused downsampling).

The last group flips each of the four behaviours of the published model that lwam once got wrong back
to the wrong variant and checks that the golden comparison then fails, so none of them can regress
silently. Metric: max|a - b| / max|b| with the fixtures' recommended tolerances.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lwam.config import ImplConfig, VAEConfig, get_preset
from lwam.model import action_expert as action_expert_mod
from lwam.model import dit as dit_mod
from lwam.model.layers import GELU
from lwam.model.lightwam import LightWAM, latent_steps_is_pad
from lwam.model.weights import load_lightwam_release

from conftest import GOLDEN

META = json.loads((GOLDEN / "lightwam_small_golden.json").read_text())
TOL = META["tolerances"]["recommended"]
TAPS = (0, 2)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    # Fresh tensors: CPU kernels round differently on the buffers safetensors returns (fixtures README).
    return {k: v.clone() for k, v in load_file(GOLDEN / "lightwam_small_golden.safetensors").items()}


def golden_config(small_vae: bool = False):
    cfg = get_preset("paper").replace(**META["config"]["lwam_config"]["overrides"])
    if small_vae:  # only for building a Policy; the fixtures give latents, so the VAE never runs here
        cfg = cfg.replace(vae=VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1))
    return cfg


def load_model(dtype: torch.dtype = torch.float32, build_vae: bool = False, small_vae: bool = False) -> LightWAM:
    model = LightWAM(golden_config(small_vae), build_vae=build_vae)
    load_lightwam_release(model, GOLDEN / "lightwam_small_release.pt")
    return model.to(dtype)


@pytest.fixture(scope="module")
def model32() -> LightWAM:
    return load_model().eval()


@pytest.fixture(scope="module")
def model64() -> LightWAM:
    # fp64 throughout: the published (complex128) RoPE; the real-arithmetic path uses fp32 tables.
    return load_model(torch.float64).eval().set_impl(ImplConfig(rope="complex"))


def _key(prefix: str, dtype: torch.dtype, name: str) -> str:
    return ("fp64." if dtype == torch.float64 else "") + prefix + name


def _tol(kind: str, dtype: torch.dtype) -> float:
    return TOL[("fp64_" if dtype == torch.float64 else "fp32_") + kind]


def loss_batch(T: dict[str, torch.Tensor], case: str, dtype: torch.dtype = torch.float32) -> dict:
    p = f"loss_{case}."
    return {"latents": T[p + "sample.video_latents"].to(dtype), "text_context": T[p + "sample.context"].to(dtype),
            "proprio": T[p + "proprio_current"].to(dtype), "actions": T[p + "sample.action"].to(dtype),
            "actions_is_pad": T[p + "actions_is_pad"], "frames_is_pad": T[p + "frames_is_pad"],
            "flow_eps": T[p + "flow_noise"].to(dtype), "flow_u": T[p + "flow_u"]}


def dit_forward(model: LightWAM, T: dict[str, torch.Tensor], dtype: torch.dtype):
    ctx = model.context(T["dit.text_context"].to(dtype), T["dit.proprio"].to(dtype))
    return model.dit(T["dit.latents"].to(dtype), T["dit.frame_timesteps"].to(dtype), ctx, taps=TAPS,
                     context_embedded=True)


def action_path(model: LightWAM, T: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    ctx = model.context(T["action.text_context"].to(dtype), T["action.proprio"].to(dtype))
    return model.action_pass(T["action.latent"].to(dtype), ctx)


def sfae_inputs(T: dict[str, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return [T[f"sfae.adapted.layer{l}"].to(dtype) for l in TAPS]


# --------------------------------------------------------------------------------------------
# the reference model
# --------------------------------------------------------------------------------------------
def test_fixture_facts():
    """What the fixtures say about the published model, recorded as facts lwam implements."""
    assert META["produced_by"]["commit"] == "b2785f66e13fd9987e94ae1ecc1c441d5059c9ae"
    sf = META["config"]["sfae"]
    assert "tanh" in sf["gelu"] and sf["step_code"].startswith("[cos | sin]")
    assert "GELU_tanh" in META["config"]["adapters"]["form"]
    assert "all 4 of its raw frames are padding" in META["config"]["padding_rule"]["latent_step_is_pad"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dit_forward(golden, model32, model64, dtype):
    T, model = golden, (model64 if dtype == torch.float64 else model32)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [model.dit.blocks[l].register_forward_hook(lambda m, i, o, l=l: outputs.__setitem__(l, o)) for l in TAPS]
    try:
        with torch.no_grad():
            out = dit_forward(model, T, dtype)
    finally:
        for h in hooks:
            h.remove()
    tol = _tol("forward", dtype)
    assert max_rel(out.video, T[_key("dit.", dtype, "video")]) < tol
    for l, tap in zip(TAPS, out.taps):
        assert max_rel(tap, T[_key("dit.", dtype, f"adapted.layer{l}")]) < tol
        if dtype == torch.float32:  # block outputs before the adapter are stored in fp32 only
            assert max_rel(outputs[l], T[f"dit.block_out.layer{l}"]) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_action_path(golden, model32, model64, dtype):
    T, model = golden, (model64 if dtype == torch.float64 else model32)
    with torch.no_grad():
        actions = action_path(model, T, dtype)
    assert max_rel(actions, T[_key("action.", dtype, "actions")]) < _tol("forward", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sfae_stages(golden, model32, model64, dtype):
    T, model = golden, (model64 if dtype == torch.float64 else model32)
    ex = model.expert
    tol = _tol("forward", dtype)
    with torch.no_grad():
        pooled = ex.pool(sfae_inputs(T, dtype))
        code = action_expert_mod.step_sinusoid(ex.chunk_size, ex.cfg.step_embed_dim)
        actions = ex(sfae_inputs(T, dtype))
        step_embed = ex.step_pos_proj(code.to(dtype))
    assert max_rel(pooled, T[_key("sfae.", dtype, "pooled")]) < tol
    assert max_rel(code, T["fp64.sfae.step_code"]) < 1e-12  # the code itself is computed in fp64
    assert max_rel(step_embed, T[_key("sfae.", dtype, "step_embed")]) < tol
    assert max_rel(actions, T[_key("sfae.", dtype, "actions")]) < tol


def test_sfae_state(golden, model32):
    """The trunk state before the step embedding (fp32)."""
    T, ex = golden, model32.expert
    with torch.no_grad():
        pooled = ex.pool(sfae_inputs(T, torch.float32))
        z = torch.cat([c(pooled[:, i]) for i, c in enumerate(ex.layer_compressors)], dim=-1)
        z = ex.fused_proj(ex.fused_norm(z))
        for block in ex.trunk:
            z = block(z)
    assert max_rel(z, T["sfae.state"]) < TOL["fp32_forward"]


def test_latent_steps_is_pad_matches_fixture(golden):
    for case in "ab":
        p = f"loss_{case}."
        got = latent_steps_is_pad(golden[p + "frames_is_pad"], 4)
        assert torch.equal(got, golden[p + "latent_steps_is_pad"].bool())
    # case (b) covers every padding kind the rule distinguishes
    steps = golden["loss_b.latent_steps_is_pad"].bool()
    assert steps[0].tolist() == [False, False, True] and steps[2].tolist() == [False, True, True]
    assert not steps[1].any() and golden["loss_b.frames_is_pad"][1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", ["a", "b"])
def test_training_loss(golden, dtype, case):
    model = load_model(dtype).train().set_impl(ImplConfig(rope="complex"))
    loss, metrics = model.training_loss(loss_batch(golden, case, dtype))
    tol = _tol("loss", dtype)
    p = f"loss_{case}."
    assert max_rel(loss, golden[_key(p, dtype, "loss_total")]) < tol
    assert max_rel(metrics["video_loss"], golden[_key(p, dtype, "loss_video")]) < tol
    assert max_rel(metrics["action_loss"], golden[_key(p, dtype, "loss_action")]) < tol


def _grads_match(model: LightWAM, T: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    params = dict(model.named_parameters())
    errs = {}
    for key, info in META["gradients"].items():
        g = params[info["lwam_parameter"]].grad
        assert g is not None, f"{info['lwam_parameter']} got no gradient"
        errs[info["lwam_parameter"]] = max_rel(g, T[_key("", dtype, key)])
    return errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_training_gradients(golden, dtype):
    model = load_model(dtype).train().set_impl(ImplConfig(rope="complex"))
    loss, _ = model.training_loss(loss_batch(golden, "a", dtype))
    loss.backward()
    errs = _grads_match(model, golden, dtype)
    assert len(errs) == 14
    bad = {k: v for k, v in errs.items() if not v < _tol("grad", dtype)}
    assert not bad, bad


# --------------------------------------------------------------------------------------------
# the Policy's transformed path and the fast training step
# --------------------------------------------------------------------------------------------
POLICY_CASES = {
    "merge_lora": dict(merge_lora=True, truncate=False, fold_pooling=False),
    "truncate": dict(merge_lora=False, truncate=True, fold_pooling=False),
    "fold_pooling": dict(merge_lora=False, truncate=False, fold_pooling=True),
    "all": dict(merge_lora=True, truncate=True, fold_pooling=True),
}


@pytest.fixture(scope="module")
def policy_model() -> LightWAM:
    return load_model(build_vae=True, small_vae=True).eval()


def _policy_actions(fast, T: dict[str, torch.Tensor]) -> torch.Tensor:
    from lwam.model.rope import rope_cos_sin

    z = T["action.latent"]
    cfg = fast.cfg
    cos, sin = rope_cos_sin((1, z.shape[3] // 2, z.shape[4] // 2), cfg.dit.head_dim, cfg.dit.rope_theta)
    ctx = fast.context(fast.embed_text(T["action.text_context"]), T["action.proprio"])
    return fast.expert_head(fast.backbone(z, ctx, cos, sin))


@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_policy_path(golden, policy_model, case):
    from lwam.policy.compiled import Policy

    policy = Policy.from_model(policy_model, device="cpu", compile=False, **POLICY_CASES[case])
    with torch.no_grad():
        actions = _policy_actions(policy.fast, golden)
    assert max_rel(actions, golden["action.actions"]) < TOL["fp32_forward"]


def test_policy_path_compiled(golden, policy_model):
    from lwam.policy.compiled import Policy

    fast = Policy.from_model(policy_model, device="cpu", compile=False).fast
    T = golden
    run = torch.compile(lambda z, ctx, cos, sin: fast.expert_head(fast.backbone(z, ctx, cos, sin)),
                        dynamic=False, fullgraph=True)
    from lwam.model.rope import rope_cos_sin

    z = T["action.latent"]
    cos, sin = rope_cos_sin((1, z.shape[3] // 2, z.shape[4] // 2), fast.cfg.dit.head_dim, fast.cfg.dit.rope_theta)
    with torch.no_grad():
        ctx = fast.context(fast.embed_text(T["action.text_context"]), T["action.proprio"])
        actions = run(z, ctx, cos, sin)
    assert max_rel(actions, T["action.actions"]) < TOL["fp32_forward"]


def test_fast_training_step(golden):
    """The fast step (split attention, real RoPE, fused pooling through the Triton interpreter, fused
    downsampling; blocks eager) against the published loss and gradients."""
    model = load_model().train().set_impl(ImplConfig.fast(compile_blocks=False))
    for case in "ab":
        model.zero_grad(set_to_none=True)
        loss, metrics = model.training_loss(loss_batch(golden, case))
        p = f"loss_{case}."
        assert max_rel(loss, golden[p + "loss_total"]) < TOL["fp32_loss"]
        assert max_rel(metrics["video_loss"], golden[p + "loss_video"]) < TOL["fp32_loss"]
        if case == "a":
            loss.backward()
            bad = {k: v for k, v in _grads_match(model, golden, torch.float32).items() if not v < TOL["fp32_grad"]}
            assert not bad, bad


# --------------------------------------------------------------------------------------------
# each of the four published behaviours, flipped back, breaks the golden match
# --------------------------------------------------------------------------------------------
def _exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def _sin_cos_code(num_steps: int, dim: int, device=None) -> torch.Tensor:
    code = action_expert_mod.sinusoid(torch.arange(num_steps, dtype=torch.float64, device=device), dim)
    half = dim // 2
    return torch.cat([code[:, half:], code[:, :half]], dim=-1)


def _exact_gelu_modules(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, GELU):
            m.approximate = "none"


def test_golden_detects_exact_gelu_in_adapters(golden, model32, model64, monkeypatch):
    monkeypatch.setattr(dit_mod, "gelu", _exact_gelu)
    with torch.no_grad():
        err64 = max_rel(action_path(model64, golden, torch.float64), golden["fp64.action.actions"])
        err32 = max_rel(dit_forward(model32, golden, torch.float32).taps[0], golden["dit.adapted.layer0"])
    # small adapters move the states little (~7e-5 relative here), but far beyond both tolerances
    assert err64 > 1e4 * TOL["fp64_forward"] and err32 > 3 * TOL["fp32_forward"]


# fp64 separates a wrong variant from rounding by many orders of magnitude (tolerance 1e-10); the fp32
# errors of these flips (1e-5 .. 1e-1 relative in this small model) also exceed the fp32 tolerance.
@pytest.mark.parametrize("part", ["trunk", "step_pos_proj", "output"])
def test_golden_detects_exact_gelu_in_sfae(golden, part, monkeypatch):
    model = load_model(torch.float64).eval()
    if part == "trunk":
        monkeypatch.setattr(action_expert_mod, "gelu", _exact_gelu)
    else:
        _exact_gelu_modules(getattr(model.expert, part))
    with torch.no_grad():
        actions = model.expert(sfae_inputs(golden, torch.float64))
    assert max_rel(actions, golden["fp64.sfae.actions"]) > 1e4 * TOL["fp64_forward"]


def test_golden_detects_sin_cos_step_code(golden, model32, monkeypatch):
    monkeypatch.setattr(action_expert_mod, "step_sinusoid", _sin_cos_code)
    with torch.no_grad():
        actions = model32.expert(sfae_inputs(golden, torch.float32))
    assert max_rel(actions, golden["sfae.actions"]) > 100 * TOL["fp32_forward"]


def test_golden_detects_fp32_step_code(golden):
    """The step code is computed in fp64 and then cast: an fp32 code misses the fp64 golden output."""
    model = load_model(torch.float64).eval()
    code32 = action_expert_mod.step_sinusoid(32, model.expert.cfg.step_embed_dim).float().double()
    with torch.no_grad():
        embed = model.expert.step_pos_proj(code32)
    assert max_rel(embed, golden["fp64.sfae.step_embed"]) > 100 * TOL["fp64_forward"]


def test_golden_detects_unmasked_video_loss(golden):
    model = load_model().train()
    batch = loss_batch(golden, "b")
    del batch["frames_is_pad"]
    _, metrics = model.training_loss(batch)
    assert max_rel(metrics["video_loss"], golden["loss_b.loss_video"]) > 100 * TOL["fp32_loss"]
