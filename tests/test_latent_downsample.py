"""lwam::latent_downsample (lwam._C, csrc/) against the reference F.avg_pool3d(kernel (1, f, f)).

CPU tier: forward and backward over dtypes, factors and awkward shapes, non-contiguous inputs, errors,
torch.library.opcheck, torch.compile(fullgraph=True), the reference fallback and its one log line.
With LWAM_REQUIRE_EXTENSION=1 (CI) a missing extension fails instead of skipping.
GPU tier (marked gpu): the CUDA kernels, both the vectorised and the scalar paths.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lwam.ops import _extension
from lwam.ops.latent_downsample import implementation, latent_downsample
from lwam.reference.latent_downsample import latent_downsample as reference
from lwam.testing import assert_close, poison_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FACTORS = [1, 2, 3, 4]
# (B, C, T, h, w): output spatial size; the input is (h * f, w * f). Size 1, odd, prime, the policy's.
BASE_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 11), (1, 4, 3, 14, 28), (3, 1, 2, 5, 1), (1, 2, 1, 1, 13)]
REQUIRE = os.environ.get("LWAM_REQUIRE_EXTENSION", "") == "1"
STATUS = _extension.status()
cuda_only = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _make(base, factor, dtype, device="cpu", seed=0):
    B, C, T, h, w = base
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, T, h * factor, w * factor, generator=g).to(device=device, dtype=dtype)


def _poisoned_call(fn, *args):
    """Run ``fn`` right after freeing a NaN-filled buffer of the output's size, so that an allocator that
    hands the same memory back exposes any element the kernel forgot to write."""
    probe = fn(*args)
    junk = poison_(torch.empty_like(probe))
    del junk, probe
    return fn(*args)


def test_extension_is_built():
    """CI builds lwam._C (pip install -e .); there, its absence is a failure, elsewhere a skip."""
    if REQUIRE:
        assert STATUS.available, f"LWAM_REQUIRE_EXTENSION=1 but lwam._C is unusable: {STATUS.reason}"
        assert implementation("cpu") == "lwam._C"
    elif not STATUS.available:
        pytest.skip(f"lwam._C not built: {STATUS.reason}")
    assert STATUS.build_info.get("kind") in ("cpu", "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("base", BASE_SHAPES)
def test_forward_matches_reference(base, factor, dtype):
    x = _make(base, factor, dtype)
    out = _poisoned_call(latent_downsample, x, factor)
    expected = reference(x, factor)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert_close(out, expected, name=f"latent_downsample f={factor} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_factor_one_is_an_exact_copy(dtype):
    x = _make((2, 3, 2, 5, 7), 1, dtype)
    out = latent_downsample(x, 1)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_fp32_paper_shape_and_block_means():
    """The policy's shape [B, 16, 3, 28, 56] at f=2, and a hand-checkable case."""
    x = _make((2, 16, 3, 14, 28), 2, torch.float32)
    assert_close(latent_downsample(x, 2), reference(x, 2))
    x = torch.arange(16.0).reshape(1, 1, 1, 4, 4)
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).reshape(1, 1, 1, 2, 2)
    assert torch.equal(latent_downsample(x, 2), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("base", BASE_SHAPES[1:3])
def test_backward_matches_reference_autograd(base, factor, dtype):
    x = _make(base, factor, dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = latent_downsample(x, factor)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(grad_out)
    reference(x_ref, factor).backward(grad_out)
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, x_ref.grad, name=f"grad f={factor} {dtype}")


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_gradcheck_fp64(factor):
    x = _make((1, 2, 2, 2, 3), factor, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: latent_downsample(t, factor), (x,))
    assert torch.autograd.gradgradcheck(lambda t: latent_downsample(t, factor), (x,))


@pytest.mark.parametrize("layout", ["permuted", "sliced", "channels_last_3d", "expanded", "offset"])
def test_non_contiguous_input(layout):
    f = 2
    base = _make((2, 3, 4, 6, 10), f, torch.float32)
    if layout == "permuted":  # a [B, C, T, H, W] view of a [B, T, C, W, H] buffer
        x = base.permute(0, 2, 1, 4, 3).contiguous().permute(0, 2, 1, 4, 3)
    elif layout == "sliced":
        x = base[:, ::2, :, :, :]
    elif layout == "channels_last_3d":
        x = base.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "expanded":
        x = base[:, :1].expand(-1, 5, -1, -1, -1)
    else:  # a contiguous view whose data pointer is not 16-byte aligned
        x = base.flatten()[1:1 + base.numel() // 2].view(1, 3, 4, 12, 20)
    assert not x.is_contiguous() or layout == "offset"
    assert_close(latent_downsample(x, f), reference(x, f))
    xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    out = latent_downsample(xg, f)
    # a non-contiguous incoming gradient too
    grad_out = torch.randn(out.shape[:-1] + (out.shape[-1] * 2,))[..., ::2]
    out.backward(grad_out)
    assert_close(xg.grad, torch.ops.lwam.latent_downsample_backward(grad_out.contiguous(), f))
    assert torch.equal(xg.grad, grad_out.repeat_interleave(f, 3).repeat_interleave(f, 4) / 4)


@pytest.mark.parametrize("factor", [1, 2])
def test_empty_tensors(factor):
    x = torch.randn(0, 3, 2, 4, 4)
    assert latent_downsample(x, factor).shape == (0, 3, 2, 4 // factor, 4 // factor)


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["public", "op"])
@pytest.mark.parametrize(
    "shape, factor, pattern",
    [
        ((1, 2, 3, 6, 7), 2, r"divisible by factor 2.*\[1, 2, 3, 6, 7\]"),
        ((1, 2, 3, 9, 8), 2, r"divisible by factor 2.*\[1, 2, 3, 9, 8\]"),
        ((1, 2, 3, 6, 6), 4, r"divisible by factor 4.*\[1, 2, 3, 6, 6\]"),
        ((2, 6, 8), 2, r"rank 5.*\[2, 6, 8\].*factor 2"),
        ((1, 1, 2, 3, 6, 8), 2, r"rank 5.*\[1, 1, 2, 3, 6, 8\].*factor 2"),
        ((1, 2, 3, 6, 8), 0, r"positive.*factor 0.*\[1, 2, 3, 6, 8\]"),
        ((1, 2, 3, 6, 8), -2, r"positive.*factor -2.*\[1, 2, 3, 6, 8\]"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, shape, factor, pattern):
    x = torch.randn(shape)
    fn = latent_downsample if call == "public" else torch.ops.lwam.latent_downsample
    with pytest.raises(ValueError, match=pattern):
        fn(x, factor)


def test_bad_types_raise_type_errors():
    with pytest.raises(TypeError, match="dtype"):
        latent_downsample(torch.zeros(1, 1, 1, 2, 2, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.lwam.latent_downsample(torch.zeros(1, 1, 1, 2, 2, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="factor"):
        latent_downsample(torch.zeros(1, 1, 1, 2, 2), 2.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        latent_downsample([[1.0]], 2)


def test_backward_op_checks_its_arguments():
    with pytest.raises(ValueError, match=r"rank 5.*\[4, 4\].*factor 2"):
        torch.ops.lwam.latent_downsample_backward(torch.zeros(4, 4), 2)
    with pytest.raises(ValueError, match=r"factor 0"):
        torch.ops.lwam.latent_downsample_backward(torch.zeros(1, 1, 1, 2, 2), 0)


# ---- PyTorch integration -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_opcheck(factor, dtype):
    x = _make((2, 3, 2, 2, 3), factor, dtype)
    torch.library.opcheck(torch.ops.lwam.latent_downsample.default, (x, factor))
    torch.library.opcheck(torch.ops.lwam.latent_downsample.default, (x.requires_grad_(True), factor))
    g = _make((2, 3, 2, 2, 3), 1, dtype)
    torch.library.opcheck(torch.ops.lwam.latent_downsample_backward.default, (g, factor))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def step(x, w):
        return (latent_downsample(x * w, 2).square()).sum()

    compiled = torch.compile(step, fullgraph=True)
    x = _make((2, 4, 3, 7, 14), 2, torch.float32)
    w = torch.randn(()).requires_grad_(True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager = step(xe, w)
    eager.backward()
    grad_w_eager = w.grad.clone()
    w.grad = None
    result = compiled(xc, w)
    result.backward()
    assert_close(result, eager)
    assert_close(xc.grad, xe.grad)
    assert_close(w.grad, grad_w_eager)


def test_extension_version_mismatch_is_refused(monkeypatch):
    """A binary built for another torch is not imported; the reason says what it was built for."""
    if not STATUS.available:
        pytest.skip(f"lwam._C not built: {STATUS.reason}")
    info = dict(STATUS.build_info, torch="2.0.0", cuda="11.8", python="3.9.1")
    monkeypatch.setattr(_extension, "read_build_info", lambda: info)
    st = _extension._load()
    assert not st.available
    assert "built for torch 2.0.0 (CUDA 11.8, Python 3.9.1)" in st.reason
    assert f"running torch {torch.__version__}" in st.reason


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_fallback_logs_one_line_and_matches_reference():
    code = (
        "import torch\n"
        "from lwam.ops.latent_downsample import latent_downsample, implementation\n"
        "from lwam.reference.latent_downsample import latent_downsample as ref\n"
        "x = torch.randn(2, 3, 2, 6, 9, requires_grad=True)\n"
        "for _ in range(3):\n"
        "    y = latent_downsample(x, 3)\n"
        "    assert torch.equal(y, ref(x, 3))\n"
        "y.sum().backward()\n"
        "assert torch.allclose(x.grad, torch.full_like(x, 1 / 9))\n"
        "print(implementation('cpu'))\n"
    )
    proc = _run_python(code, LWAM_NO_EXTENSION="1")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "latent_downsample" in ln]
    assert len(lines) == 1, proc.stderr
    assert "uses the PyTorch reference" in lines[0] and "LWAM_NO_EXTENSION=1" in lines[0]
    assert proc.stdout.strip().startswith("reference (LWAM_NO_EXTENSION=1")


def test_import_does_not_initialise_cuda():
    proc = _run_python("import torch, lwam.ops.latent_downsample\nassert not torch.cuda.is_initialized()\n")
    assert proc.returncode == 0, proc.stderr


# ---- GPU tier ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("base", [(1, 1, 1, 1, 1), (2, 3, 5, 7, 11), (16, 16, 3, 14, 28), (1, 2, 3, 4, 16)])
@pytest.mark.parametrize(*["aligned", [True, False]])
def test_cuda_matches_reference(base, factor, dtype, aligned):
    x = _make(base, factor, dtype, "cuda")
    if not aligned:  # same values, data pointer off 16-byte alignment: the scalar path
        buf = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)
        buf[1:].copy_(x.flatten())
        x = buf[1:].view(x.shape)
    out = _poisoned_call(latent_downsample, x, factor)
    assert out.shape == reference(x, factor).shape and torch.isfinite(out).all()
    assert_close(out, reference(x, factor), name=f"cuda f={factor} {dtype}")
    xg = x.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(out.shape, device="cuda").to(dtype)
    latent_downsample(xg, factor).backward(grad_out)
    reference(xr, factor).backward(grad_out)
    assert_close(xg.grad, xr.grad, name=f"cuda grad f={factor} {dtype}")


for _m in cuda_only:
    test_cuda_matches_reference = _m(test_cuda_matches_reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_in_use_and_graph_capture():
    if REQUIRE or STATUS.with_cuda:
        assert implementation("cuda") == "lwam._C", implementation("cuda")
    x = _make((16, 16, 3, 14, 28), 2, torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.lwam.latent_downsample.default, (x, 2))
    static_out = latent_downsample(x, 2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = latent_downsample(x, 2)
    x.copy_(_make((16, 16, 3, 14, 28), 2, torch.bfloat16, "cuda", seed=3))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(static_out, reference(x, 2))
