"""Every Triton kernel of lwam::query_pool compiles for sm_80, sm_86, sm_89 and sm_90 with the launch
configuration the CUDA launchers pick there, and fits each target: shared memory per block and registers
(per thread and per SM) within its limits, no spills in bf16/fp16. No GPU needed: Triton lowers to PTX and
a cubin with the ptxas it ships (tests/aot_compile_worker.py, started in a subprocess with TRITON_INTERPRET
unset and an empty kernel cache, since this process runs the interpreter).

The CI set (about 60 compiles) covers every kernel on every architecture in bf16 at the paper training
shape and in fp16 (paper inference shape on sm_86/sm_90, an odd shape on sm_80/sm_89: both shared-memory
tiers each), and fp32 at the training shape on sm_90; LWAM_SLOW=1
runs the full matrix (4 architectures x 3 dtypes x 3 shapes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import triton  # noqa: F401
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "aot_compile_worker.py"
ARCHS = [(8, 0), (8, 6), (8, 9), (9, 0)]
TRAIN = [3, 16, 392, 1536, 8, 16]   # paper training: L, B, S, D, H, Q
INFER = [3, 1, 392, 1536, 8, 16]    # paper inference (batch 1)
ODD = [2, 3, 37, 200, 3, 5]         # odd sizes everywhere (S, D not multiples of any tile)
KERNELS = {"_fwd_logits", "_fwd_softmax", "_fwd_pool", "_bwd_probs", "_bwd_softmax", "_bwd_dx", "_bwd_dA"}
# Kernels whose token-block dots must run on Hopper's warpgroup MMA at the paper training shape.
WGMMA_ON_HOPPER = {"_fwd_logits", "_bwd_probs", "_bwd_dx", "_bwd_dA"}


def _jobs() -> list[dict]:
    def job(cc, dtype, shape):
        return {"cc": list(cc), "dtype": dtype, "shape": shape}

    if os.environ.get("LWAM_SLOW", "0") == "1":
        return [job(cc, dt, sh) for cc in ARCHS for dt in ("bfloat16", "float16", "float32")
                for sh in (TRAIN, INFER, ODD)]
    jobs = [job(cc, "bfloat16", TRAIN) for cc in ARCHS]
    jobs += [job((8, 6), "float16", INFER), job((9, 0), "float16", INFER)]
    jobs += [job((8, 0), "float16", ODD), job((8, 9), "float16", ODD), job((9, 0), "float32", TRAIN)]
    return jobs


def _limits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, lwam.kernels.query_pool as k; print(json.dumps({'smem': "
            "{f'{a}{b}': v for (a, b), v in k.SHARED_MEMORY_PER_BLOCK.items()}, 'regs_sm': k.REGISTERS_PER_SM, "
            "'regs_thread': k.REGISTERS_PER_THREAD}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Run the worker in two processes (architectures split between them); return its records."""
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9 warns when unset; 1 is what it does anyway
    jobs = _jobs()
    halves = [[j for j in jobs if j["cc"] in ([8, 0], [8, 9])], [j for j in jobs if j["cc"] in ([8, 6], [9, 0])]]
    procs = []
    for i, part in enumerate(halves):
        (tmp / f"jobs{i}.json").write_text(json.dumps(part))
        penv = dict(env, TRITON_CACHE_DIR=str(tmp / f"cache{i}"))  # nothing reused across runs
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp / f"jobs{i}.json"),
                                       str(tmp / f"out{i}.json")], env=penv, cwd=str(ROOT),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    records = []
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=1200)
        assert p.returncode == 0, f"AOT compile worker failed:\n{out[-8000:]}"
        records += json.loads((tmp / f"out{i}.json").read_text())["records"]
    assert sum(len(h) for h in halves) == len(jobs)
    if os.environ.get("LWAM_AOT_REPORT"):  # where to keep the measurements (benchmarks/README.md quotes them)
        Path(os.environ["LWAM_AOT_REPORT"]).write_text(json.dumps(records, indent=1))
    return records


def test_every_kernel_compiled_for_every_job(compiled):
    for job in _jobs():
        got = {r["kernel"] for r in compiled
               if r["cc"] == job["cc"] and r["dtype"] == job["dtype"] and r["shape"] == job["shape"]}
        assert got == KERNELS, f"{job}: compiled {sorted(got)}, expected {sorted(KERNELS)}"


@pytest.mark.parametrize("cc", ARCHS, ids=[f"sm_{a}{b}" for a, b in ARCHS])
def test_kernels_fit_target_limits(compiled, cc):
    limits = _limits()
    smem_limit = limits["smem"][f"{cc[0]}{cc[1]}"]
    problems = []
    for r in (r for r in compiled if tuple(r["cc"]) == cc):
        where = f"{r['kernel']} sm_{cc[0]}{cc[1]} {r['dtype']} {r['shape']} (warps {r['num_warps']})"
        if r["shared"] > smem_limit:
            problems.append(f"{where}: {r['shared']} bytes of shared memory > {smem_limit}")
        if r["registers"] > limits["regs_thread"]:
            problems.append(f"{where}: {r['registers']} registers per thread > {limits['regs_thread']}")
        if r["registers"] * r["num_warps"] * 32 > limits["regs_sm"]:
            problems.append(f"{where}: {r['registers']} x {r['num_warps'] * 32} threads > {limits['regs_sm']} "
                            f"registers per SM")
        if r["dtype"] in ("bfloat16", "float16") and r["spills"]:
            problems.append(f"{where}: spills {r['spills']} bytes per thread (stores + loads; stack frame "
                            f"{r['stack']} bytes)")
    assert not problems, "\n".join(problems)


def test_hopper_uses_warpgroup_mma_at_training_shape(compiled):
    rows = {r["kernel"]: r for r in compiled
            if r["cc"] == [9, 0] and r["dtype"] == "bfloat16" and r["shape"] == TRAIN}
    missing = sorted(k for k in WGMMA_ON_HOPPER if not rows[k]["wgmma"])
    assert not missing, f"no wgmma in the sm_90 PTX of {missing}"
    # and Ampere/Ada get tensor-core mma.sync for the same kernels
    for cc in ([8, 0], [8, 6], [8, 9]):
        rows = {r["kernel"]: r for r in compiled if r["cc"] == cc and r["dtype"] == "bfloat16" and r["shape"] == TRAIN}
        missing = sorted(k for k in WGMMA_ON_HOPPER if not rows[k]["mma_sync"])
        assert not missing, f"no mma.sync in the sm_{cc[0]}{cc[1]} PTX of {missing}"
