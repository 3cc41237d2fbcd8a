"""Fused multi-layer learned-query pooling (lwam::query_pool) against the plain reference pooler.

CPU tier: Triton kernels under TRITON_INTERPRET=1 (set below without CUDA, before Triton is imported), fp32, a
representative subset of the shape grid (size 1, odd, non-power-of-two, the real policy shape); the full
grid is marked slow; fp16/bf16 and paper shapes need a GPU. Every kernel buffer is NaN-poisoned before
the launches that write it, so memory a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import itertools
import os

import torch

if not torch.cuda.is_available():  # with CUDA the kernels run compiled
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from lwam._logging import _seen
from lwam.modules.query_pool import (
    LearnedQueryPooler,
    MultiLayerQueryPooler,
    fold_for_inference,
    pool_layers,
)
from lwam.ops.query_pool import query_pool, query_pool_kernel_available
from lwam.reference.query_pool import (
    ReferenceQueryPooler,
    fold_pooler_params,
    folded_pooler_post,
    query_pool_folded_reference,
)
from lwam.testing import assert_close

try:
    import lwam.kernels.query_pool as kq
except ImportError:  # no Triton: the kernel tests skip, the reference tests still run
    kq = None

HAS_CUDA = torch.cuda.is_available()
needs_kernel = pytest.mark.skipif(kq is None, reason="triton is not installed")
gpu = pytest.mark.gpu
# The full grid takes many minutes in the interpreter: opt in with LWAM_SLOW=1 (or run it on a GPU machine).
slow = pytest.mark.skipif(os.environ.get("LWAM_SLOW", "0") != "1", reason="slow: set LWAM_SLOW=1 to run")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _device() -> torch.device:
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")


@pytest.fixture(autouse=True)
def _poison_kernel_buffers():
    if kq is not None:
        kq.set_poison(True)
    yield
    if kq is not None:
        kq.set_poison(False)


def _make_refs(L: int, D: int, H: int, Q: int, seed: int = 0) -> list[ReferenceQueryPooler]:
    """Reference poolers with every parameter perturbed (non-trivial LN affine, biases, merge logits)."""
    g = torch.Generator().manual_seed(seed)
    refs = []
    for _ in range(L):
        r = ReferenceQueryPooler(D, num_queries=Q, num_heads=H)
        with torch.no_grad():
            for p in r.parameters():
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.05))
            r.query_tokens.mul_(20.0)  # logits of order 1, so the softmax over tokens is not flat
        refs.append(r)
    return refs


def _inputs(L: int, B: int, S: int, D: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, D, generator=g) * 1.7 + 0.3 for _ in range(L)]


def _reference(refs, xs, gout, dtype):
    """Outputs and grads (inputs, then every parameter) of the plain poolers, computed in ``dtype``."""
    copies = [ReferenceQueryPooler(r.dim, r.num_queries, r.num_heads, eps=r.eps).to(dtype) for r in refs]
    for c, r in zip(copies, refs):
        c.load_state_dict(r.state_dict())
    xs_ = [x.detach().to(dtype).requires_grad_(True) for x in xs]
    out = torch.stack([c(x) for c, x in zip(copies, xs_)], dim=1)
    params = [p for c in copies for p in c.parameters()]
    grads = torch.autograd.grad(out, [*xs_, *params], gout.to(dtype))
    return out, grads


def _reference_fp64(refs, xs, gout):
    return _reference(refs, xs, gout, torch.float64)


def _assert_close_to_truth(got, truth, ref32, dtype, name):
    """``got`` vs the fp64 ``truth`` with the table's tolerance for ``dtype``, widened by twice the worst
    error of the plain fp32 reference itself: where the true value is a cancellation of large terms
    (e.g. the merge-logit grad, exactly 0 when S = 1) fp32 rounding noise is all any fp32 code can give."""
    from lwam.testing import TOLERANCES
    rtol, atol = TOLERANCES[dtype]
    truth = truth.detach().double()
    scale = max(1.0, float(truth.abs().max())) if truth.numel() else 1.0
    noise = float((ref32.detach().double() - truth).abs().max()) if truth.numel() else 0.0
    torch.testing.assert_close(got.detach().double(), truth, rtol=rtol, atol=atol * scale + 2.0 * noise,
                               msg=lambda m: f"{name}: {m}")


def _check_against_reference(L, B, S, D, H, Q, device, dtype=torch.float32, make_layers=None, seed=0):
    """Fused MultiLayerQueryPooler vs fp64 reference poolers: output, grad of every layer input and of
    every parameter. ``make_layers(xs, device, dtype)`` builds the layer tensors (views, for layouts)."""
    refs = _make_refs(L, D, H, Q, seed=seed)
    fused = MultiLayerQueryPooler(L, D, num_queries=Q, num_heads=H)
    fused.poolers.load_state_dict(torch.nn.ModuleList(refs).state_dict())
    fused = fused.to(device, dtype)
    xs = _inputs(L, B, S, D, seed=seed + 1)
    if make_layers is None:
        layers = [x.to(device, dtype).requires_grad_(True) for x in xs]
    else:
        layers = make_layers(xs, device, dtype)
    assert query_pool_kernel_available(layers[0])
    out = fused(layers)
    assert out.shape == (B, L, D) and out.dtype == dtype
    gout = torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed + 2))
    params = list(fused.parameters())
    grads = torch.autograd.grad(out, [*layers, *params], gout.to(device, dtype))
    inputs = [x.detach().cpu().float() for x in layers]
    ref_out, ref_grads = _reference(refs, inputs, gout, torch.float64)
    out32, grads32 = _reference(refs, inputs, gout, torch.float32)
    _assert_close_to_truth(out.cpu(), ref_out, out32, dtype, "output")
    names = [f"grad x[{i}]" for i in range(L)] + [f"grad poolers.{n}" for n, _ in fused.named_parameters()]
    assert len(grads) == len(ref_grads) == len(names)
    for g, r, r32, n in zip(grads, ref_grads, grads32, names):
        assert g is not None, n
        _assert_close_to_truth(g.cpu(), r, r32, dtype, n)


# ----------------------------------------------------------------------------------------------------------
# reference and folding (no Triton)

@pytest.mark.parametrize("B,S,D,H,Q", [(1, 1, 64, 1, 1), (3, 7, 96, 8, 16), (2, 5, 64, 8, 3)])
def test_folding_is_exact(B, S, D, H, Q):
    ref = _make_refs(1, D, H, Q)[0].double()
    x = _inputs(1, B, S, D)[0].double()
    p = fold_pooler_params(ref)
    y = query_pool_folded_reference([x], p.A.unsqueeze(0), p.w.unsqueeze(0), ref.eps)
    torch.testing.assert_close(folded_pooler_post(y[0], p), ref(x), rtol=1e-12, atol=1e-12)


def test_reference_pooler_matches_manual_attention():
    torch.manual_seed(0)
    B, S, D, H, Q = 2, 5, 32, 4, 3
    ref = _make_refs(1, D, H, Q)[0].double()
    x = torch.randn(B, S, D, dtype=torch.float64)
    kv = torch.nn.functional.layer_norm(x, (D,), ref.token_norm.weight, ref.token_norm.bias, 1e-5)
    Wq, Wk, Wv = ref.attn.in_proj_weight.chunk(3)
    bq, bk, bv = ref.attn.in_proj_bias.chunk(3)
    q = (ref.query_tokens @ Wq.T + bq).view(Q, H, D // H).transpose(0, 1)            # [H, Q, d]
    k = (kv @ Wk.T + bk).view(B, S, H, D // H).permute(0, 2, 1, 3)                    # [B, H, S, d]
    v = (kv @ Wv.T + bv).view(B, S, H, D // H).permute(0, 2, 1, 3)
    att = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, dim=-1) @ v          # [B, H, Q, d]
    out = att.permute(0, 2, 1, 3).reshape(B, Q, D) @ ref.attn.out_proj.weight.T + ref.attn.out_proj.bias
    merged = (torch.softmax(ref.query_merge_logits, 0)[:, None] * out).sum(1)
    expect = torch.nn.functional.layer_norm(merged, (D,), ref.output_norm.weight, ref.output_norm.bias, 1e-5)
    torch.testing.assert_close(ref(x), expect, rtol=1e-12, atol=1e-12)


def test_state_dict_keys_match_reference():
    ref = ReferenceQueryPooler(64, num_queries=4, num_heads=2)
    mod = LearnedQueryPooler(64, num_queries=4, num_heads=2)
    assert list(mod.state_dict().keys()) == list(ref.state_dict().keys())
    assert set(mod.state_dict().keys()) == {
        "token_norm.weight", "token_norm.bias", "query_tokens", "attn.in_proj_weight", "attn.in_proj_bias",
        "attn.out_proj.weight", "attn.out_proj.bias", "query_merge_logits", "output_norm.weight",
        "output_norm.bias"}
    mod.load_state_dict(ref.state_dict())
    for (n, a), (_, b) in zip(mod.state_dict().items(), ref.state_dict().items()):
        assert a.shape == b.shape, n


def test_unfused_is_exactly_the_reference():
    refs = _make_refs(2, 64, 8, 4)
    mod = MultiLayerQueryPooler(2, 64, num_queries=4, num_heads=8, fused=False)
    mod.poolers.load_state_dict(torch.nn.ModuleList(refs).state_dict())
    xs = _inputs(2, 3, 5, 64)
    expect = torch.stack([r(x) for r, x in zip(refs, xs)], dim=1)
    assert torch.equal(mod(xs), expect)
    single = LearnedQueryPooler(64, 4, 8, fused=False)
    single.load_state_dict(refs[0].state_dict())
    assert torch.equal(single(xs[0]), refs[0](xs[0]))


def test_fallback_without_interpreter_logs_once_and_is_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    refs = _make_refs(1, 64, 8, 4)
    mod = LearnedQueryPooler(64, 4, 8)
    mod.load_state_dict(refs[0].state_dict())
    x = _inputs(1, 2, 5, 64)[0]
    assert not query_pool_kernel_available(x)
    assert torch.equal(mod(x), refs[0](x))  # the module falls back to the exact reference
    p = fold_pooler_params(refs[0])
    A, w = p.A.unsqueeze(0).detach(), p.w.unsqueeze(0).detach()
    y = query_pool([x], A, w, 1e-5)          # the op falls back to the folded reference, with a log line
    torch.testing.assert_close(y, query_pool_folded_reference([x], A, w, 1e-5))
    assert any(k.startswith("query_pool.fallback.") and "TRITON_INTERPRET" in k for k in _seen)


def test_fp64_uses_reference_path():
    refs = _make_refs(1, 32, 4, 2)
    mod = LearnedQueryPooler(32, 2, 4).double()
    mod.load_state_dict(refs[0].state_dict())
    x = _inputs(1, 2, 3, 32)[0].double()
    assert torch.equal(mod(x), refs[0].double()(x))


def test_input_validation():
    x = torch.randn(2, 5, 64)
    A = torch.randn(1, 64, 8)
    w = torch.full((1, 4), 0.25)
    with pytest.raises(ValueError, match="xs"):
        query_pool([], A, w)
    with pytest.raises(ValueError, match="xs\\[1\\]"):
        query_pool([x, torch.randn(2, 6, 64)], torch.randn(2, 64, 8), torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="A"):
        query_pool([x], torch.randn(1, 32, 8), w)
    with pytest.raises(ValueError, match="A"):
        query_pool([x], torch.randn(1, 64, 6), w)
    with pytest.raises(ValueError, match="w"):
        query_pool([x], A, torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="poolers"):
        pool_layers([LearnedQueryPooler(64, 4, 8)], [x, x])
    with pytest.raises(ValueError, match="xs\\[0\\]"):
        pool_layers([LearnedQueryPooler(64, 4, 8)], [torch.randn(2, 5, 32)])


# ----------------------------------------------------------------------------------------------------------
# fused path vs the reference pooler (kernels; interpreter on CPU)

SUBSET = [
    # (L, B, S, D, H, Q)
    (1, 1, 1, 64, 1, 1),        # all sizes 1
    (3, 3, 7, 96, 8, 16),       # odd B and S, non-power-of-two D
    (1, 16, 7, 64, 8, 1),       # training batch, Q = 1
    (3, 1, 392, 1536, 8, 16),   # the real policy (inference) shape
]


@needs_kernel
@pytest.mark.parametrize("L,B,S,D,H,Q", SUBSET)
def test_fused_matches_reference(L, B, S, D, H, Q):
    _check_against_reference(L, B, S, D, H, Q, _device())


FULL_GRID = list(itertools.product([1, 3], [1, 3, 16], [1, 7, 392, 480], [64, 96, 1536], [1, 8], [1, 16]))


@needs_kernel
@pytest.mark.slow
@slow
@pytest.mark.parametrize("L,B,S,D,H,Q", FULL_GRID)
def test_fused_matches_reference_full_grid(L, B, S, D, H, Q):
    _check_against_reference(L, B, S, D, H, Q, _device())


def _transposed_layers(xs, device, dtype):
    # Each layer a [B, S, D] view of a [B, D, S] tensor: non-contiguous, equal strides for all layers.
    return [x.transpose(1, 2).contiguous().to(device, dtype).requires_grad_(True).transpose(1, 2) for x in xs]


def _mixed_layers(xs, device, dtype):
    # Layer strides differ: one contiguous, one column-strided view into a wider tensor, one transposed.
    a = xs[0].to(device, dtype).requires_grad_(True)
    wide = torch.zeros(*xs[1].shape[:2], 2 * xs[1].shape[2], device=device, dtype=dtype)
    wide[..., 1::2] = xs[1].to(device, dtype)
    wide.requires_grad_(True)
    t = xs[2].transpose(1, 2).contiguous().to(device, dtype).requires_grad_(True)
    return [a, wide[..., 1::2], t.transpose(1, 2)]


@needs_kernel
def test_fused_noncontiguous_shared_strides():
    _check_against_reference(3, 3, 7, 96, 8, 16, _device(), make_layers=_transposed_layers)


@needs_kernel
def test_fused_tap_buffer_in_place():
    # A preallocated tap buffer [L, B, S, D] sliced out of a wider one; read in place, grads land in it.
    L, B, S, D, H, Q = 3, 3, 7, 96, 8, 16
    refs = _make_refs(L, D, H, Q)
    fused = MultiLayerQueryPooler(L, D, Q, H).to(_device())
    fused.poolers.load_state_dict(torch.nn.ModuleList(refs).state_dict())
    xs = _inputs(L, B, S, D)
    buf = torch.zeros(L, B, S, D + 3, device=_device())
    buf[..., 3:] = torch.stack(xs).to(_device())
    buf.requires_grad_(True)
    out = fused(buf[..., 3:])
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (gbuf,) = torch.autograd.grad(out, [buf], gout.to(_device()))
    ref_out, ref_grads = _reference_fp64(refs, xs, gout)
    assert_close(out.cpu(), ref_out, torch.float32, name="output")
    assert_close(gbuf[..., 3:].cpu(), torch.stack(ref_grads[:L]), torch.float32, name="grad tap buffer")
    assert torch.count_nonzero(gbuf[..., :3]) == 0


@needs_kernel
def test_fused_noncontiguous_mixed_strides():
    _check_against_reference(3, 2, 5, 64, 8, 4, _device(), make_layers=_mixed_layers)


@needs_kernel
def test_op_matches_folded_reference_noncontiguous_params():
    torch.manual_seed(0)
    L, B, S, D, H, Q = 2, 3, 9, 96, 4, 3
    xs = [(torch.randn(B, S, D) * 2 + 1).requires_grad_(True) for _ in range(L)]
    A = torch.randn(L, H * Q, D).transpose(1, 2).requires_grad_(True)       # non-contiguous [L, D, H*Q]
    w = torch.softmax(torch.randn(Q, L), 0).t().requires_grad_(True)         # non-contiguous [L, Q]
    y = query_pool(xs, A, w, 1e-5)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [*xs, A, w], gy)
    y_ref = query_pool_folded_reference([x.double() for x in xs], A.double(), w.double(), 1e-5)
    want = torch.autograd.grad(y_ref, [*xs, A, w], gy.double())
    assert_close(y, y_ref, torch.float32, name="y")
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, torch.float32, name=f"grad {i}")


@needs_kernel
def test_one_launch_per_kernel_for_all_layers():
    L, B, S, D, H, Q = 3, 2, 5, 64, 8, 4
    xs = [x.requires_grad_(True) for x in _inputs(L, B, S, D)]
    A = torch.randn(L, D, H * Q, requires_grad=True)
    w = torch.full((L, Q), 1.0 / Q, requires_grad=True)
    kq.reset_launch_count()
    y = query_pool(xs, A, w)
    assert kq.launch_count() == 3
    y.sum().backward()
    assert kq.launch_count() == 3 + 4


@needs_kernel
def test_fold_for_inference_matches():
    L, B, S, D, H, Q = 3, 2, 7, 96, 8, 16
    refs = _make_refs(L, D, H, Q)
    mod = MultiLayerQueryPooler(L, D, Q, H)
    mod.poolers.load_state_dict(torch.nn.ModuleList(refs).state_dict())
    folded = fold_for_inference(mod)
    xs = _inputs(L, B, S, D)
    with torch.no_grad():
        expect = torch.stack([r.double()(x.double()) for r, x in zip(refs, xs)], dim=1)
        assert_close(folded(xs), expect, torch.float32, name="folded(list)")
        assert_close(folded(torch.stack(xs)), expect, torch.float32, name="folded(buffer)")


@needs_kernel
def test_opcheck():
    torch.manual_seed(0)
    L, B, S, D, H, Q = 2, 2, 5, 64, 4, 3
    xs = [torch.randn(B, S, D, requires_grad=True) for _ in range(L)]
    A = torch.randn(L, D, H * Q, requires_grad=True)
    w = torch.softmax(torch.randn(L, Q), -1).requires_grad_(True)
    torch.library.opcheck(torch.ops.lwam.query_pool.default, (xs, A, w, 1e-5))
    y, stats, lse = torch.ops.lwam.query_pool([x.detach() for x in xs], A.detach(), w.detach(), 1e-5)
    torch.library.opcheck(torch.ops.lwam.query_pool_backward.default,
                          (torch.randn_like(y), [x.detach() for x in xs], A.detach(), w.detach(), stats, lse, 1e-5))
    A_t = A.detach().transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous: fake strides must match
    torch.library.opcheck(torch.ops.lwam.query_pool_backward.default,
                          (torch.randn_like(y), [x.detach() for x in xs], A_t, w.detach(), stats, lse, 1e-5))


def _compile_check(backend: str, with_backward: bool):
    torch._dynamo.reset()
    L, B, S, D, H, Q = 3, 2, 5, 64, 8, 4
    refs = _make_refs(L, D, H, Q)
    mod = MultiLayerQueryPooler(L, D, Q, H)
    mod.poolers.load_state_dict(torch.nn.ModuleList(refs).state_dict())
    xs = _inputs(L, B, S, D)

    def f(layers):
        return mod(layers)

    compiled = torch.compile(f, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    xe = [x.clone().requires_grad_(True) for x in xs]
    xc = [x.clone().requires_grad_(True) for x in xs]
    with torch.set_grad_enabled(with_backward):
        eager, got = f(xe), compiled(xc)
    assert_close(got, eager, torch.float32, name="compiled output")
    if with_backward:
        gout = torch.randn_like(eager)
        ge = torch.autograd.grad(eager, [*xe, *mod.parameters()], gout)
        gc = torch.autograd.grad(got, [*xc, *mod.parameters()], gout)
        for i, (a, b) in enumerate(zip(gc, ge)):
            assert_close(a, b, torch.float32, name=f"compiled grad {i}")


@needs_kernel
def test_torch_compile_fullgraph_forward_backward():
    # aot_eager: Dynamo (fullgraph) + AOT autograd through the fake and autograd registrations; cheap on CPU.
    _compile_check("aot_eager", with_backward=True)


@needs_kernel
@pytest.mark.slow
@slow
def test_torch_compile_fullgraph_inductor():
    _compile_check("inductor", with_backward=True)


# ----------------------------------------------------------------------------------------------------------
# GPU tier

@gpu
@needs_cuda
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,B,S,D,H,Q", [(3, 16, 392, 1536, 8, 16), (3, 1, 392, 1536, 8, 16), (1, 3, 7, 96, 8, 16)])
def test_fused_matches_reference_gpu(L, B, S, D, H, Q, dtype):
    _check_against_reference(L, B, S, D, H, Q, torch.device("cuda"), dtype=dtype)


@gpu
@needs_cuda
@needs_kernel
def test_cuda_graph_capture():
    L, B, S, D, H, Q = 3, 1, 392, 1536, 8, 16
    refs = _make_refs(L, D, H, Q)
    mod = MultiLayerQueryPooler(L, D, Q, H).cuda()
    mod.poolers.load_state_dict(torch.nn.ModuleList(refs).state_dict())
    folded = fold_for_inference(mod)
    xs = [x.cuda() for x in _inputs(L, B, S, D)]
    kq.set_poison(False)
    with torch.no_grad():
        expect = folded(xs)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            folded(xs)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = folded(xs)
        graph.replay()
    torch.cuda.synchronize()
    assert_close(out, expect, torch.float32, name="graph replay")


# ----------------------------------------------------------------------------------------------------------
# the CUDA launch configuration, run by the interpreter (CPU CI never picks it by itself)

def _op_inputs(L, B, S, D, H, Q, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(B, S, D, generator=g) * 1.7 + 0.3).to(dtype) for _ in range(L)]
    A = torch.randn(L, D, H * Q, generator=g) * (2.0 / D ** 0.5)
    w = torch.softmax(torch.randn(L, Q, generator=g), dim=1)
    gy = torch.randn(L, B, H, D, generator=g)
    return xs, A, w, gy


@needs_kernel
@pytest.mark.parametrize("cc", [(8, 6), (9, 0)], ids=["sm_86", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_with_cuda_launch_config(cc, dtype):
    # S = 70: two 64-token blocks (the second partial); D = 200: four 64-wide chunks, two 128-wide pool
    # tiles (partial); B = 3: three _bwd_dA splits; H*Q = 15 of 32 padded columns.
    L, B, S, D, H, Q = 2, 3, 70, 200, 3, 5
    cfg = kq.cuda_config(cc, S, D, H, Q)
    assert cfg != kq.interpreter_config(S, D) and cfg.BS < S and cfg.BD < D and cfg.batch_split(B) == B
    xs, A, w, gy = _op_inputs(L, B, S, D, H, Q, dtype)
    y, stats, lse = kq.query_pool_forward(xs, A, w, 1e-6, config=cfg)
    gx, gA, gw = kq.query_pool_backward(gy, xs, A, w, stats, lse, 1e-6, config=cfg)

    xs64 = [x.double().requires_grad_(True) for x in xs]
    A64, w64 = A.double().requires_grad_(True), w.double().requires_grad_(True)
    y64 = query_pool_folded_reference(xs64, A64, w64, 1e-6)
    want = torch.autograd.grad(y64, [*xs64, A64, w64], gy.double())
    # bf16 inputs: A is read in bf16 too, so compare with the table's bf16 tolerance
    assert_close(y, y64, dtype, name="y")
    assert gx.dtype == dtype and gA.dtype == A.dtype and gw.dtype == w.dtype
    assert_close(gx, torch.stack(want[:L]), dtype, name="grad x")
    assert_close(gA, want[L], dtype, name="grad A")
    assert_close(gw, want[L + 1], dtype, name="grad w")


def test_cuda_config_by_shared_memory_and_columns():
    cfg86 = kq.cuda_config((8, 6), 392, 1536, 8, 16)
    cfg90 = kq.cuda_config((9, 0), 392, 1536, 8, 16)
    assert kq.shared_memory_limit((8, 6)) == kq.shared_memory_limit((8, 9)) == 101_376
    assert kq.shared_memory_limit((8, 0)) == 166_912 and kq.shared_memory_limit((9, 0)) == 232_448
    assert kq.shared_memory_limit((7, 5)) == 101_376          # unknown: the smallest known limit
    assert cfg90.stages > cfg86.stages and kq.cuda_config((8, 9), 392, 1536, 8, 16) == cfg86
    wide = kq.cuda_config((9, 0), 392, 1536, 16, 32)          # 512 logit columns: 4x shorter token blocks
    assert wide.BS * 512 == cfg90.BS * 128
    with pytest.raises(TypeError, match="config"):
        kq.query_pool_forward(*_op_inputs(1, 1, 3, 16, 1, 1, torch.float32)[:3], 1e-6, config={"BS": 16})


@needs_kernel
def test_launch_that_cannot_run_falls_back_with_one_log_line(monkeypatch):
    import triton

    def no_resources(*args, **kwargs):
        raise triton.runtime.errors.OutOfResources(106496, 101376, "shared memory")

    monkeypatch.setattr(kq, "query_pool_forward", no_resources)
    monkeypatch.setattr(kq, "query_pool_backward", no_resources)
    xs, A, w, gy = _op_inputs(2, 2, 5, 32, 2, 3, torch.float32)
    xs = [x.requires_grad_(True) for x in xs]
    A.requires_grad_(True)
    before = {k for k in _seen if k.startswith("query_pool.launch.")}
    y = query_pool(xs, A, w, 1e-6)
    grads = torch.autograd.grad(y, [*xs, A], gy)
    y_ref = query_pool_folded_reference(xs, A, w, 1e-6)
    want = torch.autograd.grad(y_ref, [*xs, A], gy)
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, want):
        torch.testing.assert_close(g, r)
    new = {k for k in _seen if k.startswith("query_pool.launch.")} - before
    assert new <= {"query_pool.launch.forward.cpu.OutOfResources", "query_pool.launch.backward.cpu.OutOfResources"}
    query_pool(xs, A, w, 1e-6)   # a second call logs nothing new
    assert {k for k in _seen if k.startswith("query_pool.launch.")} - before == new
