"""Ahead-of-time compile of the Triton kernels of ``lwam.kernels.query_pool`` for real GPU targets, with no GPU.

Run as a script in a process where TRITON_INTERPRET is unset (tests/test_aot_compile.py starts it so):

    python tests/aot_compile_worker.py JOBS_JSON OUT_JSON

JOBS_JSON is a list of {"cc": [8, 6], "dtype": "bfloat16", "shape": [L, B, S, D, H, Q]}. For each job the
CUDA launchers run on meta tensors with the configuration they pick for that compute capability
(``cuda_config``) and a launch hook that records every launch instead of running it; each recorded launch
(kernel, argument types and the specialisation the Triton runtime would give them, constexprs, num_warps,
num_stages) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, once per
distinct key. The cubin's resource usage comes from the ``cuobjdump`` shipped with Triton. OUT_JSON gets one
record per job and kernel: shared memory (bytes), registers per thread, stack and local bytes per thread
(spills land there), num_warps, whether the PTX uses Hopper warpgroup MMA (wgmma) or mma.sync, and the
compile time. Spills come from the ptxas -v log that Triton prints with TRITON_DUMP_PTXAS_LOG=1 (stack frame
and local bytes count instead when a Triton version prints none).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("aot_compile_worker: TRITON_INTERPRET=1 is set; run with it unset")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"   # Triton prints ptxas -v (registers, stack, spills) per compile

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import lwam.kernels.query_pool as kq  # noqa: E402

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int64: "i64"}


def _specialise(fn, args, kwargs):
    """(signature, constexprs, attrs) for ``fn(*args, **kwargs)`` as the Triton runtime specialises a call:
    tensors -> pointer type, 16-byte divisibility when the address is; ints equal to 1 -> constexpr; other
    ints -> i32/i64, divisibility by 16 noted; floats -> fp32; keyword constexprs by name."""
    names = list(fn.arg_names)
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, values)):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPE[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]] if value.data_ptr() % 16 == 0 else []
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            attrs[(i,)] = [["tt.divisibility", 16]] if value % 16 == 0 else []
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__} is not handled")
    return signature, constexprs, attrs


def _record_launches(cc, dtype, shape):
    L, B, S, D, H, Q = shape
    meta = torch.device("meta")
    xs = [torch.empty(B, S, D, dtype=dtype, device=meta) for _ in range(L)]
    A = torch.empty(L, D, H * Q, dtype=torch.float32, device=meta)
    w = torch.empty(L, Q, dtype=torch.float32, device=meta)
    cfg = kq.cuda_config(tuple(cc), S, D, H, Q)
    launches = []
    kq._launch_hook = lambda kernel, grid, args, kwargs: launches.append((kernel, grid, args, kwargs))
    try:
        _y, stats, lse = kq.query_pool_forward(xs, A, w, 1e-6, config=cfg)
        gy = torch.empty(L, B, H, D, dtype=torch.float32, device=meta)
        kq.query_pool_backward(gy, xs, A, w, stats, lse, 1e-6, config=cfg)
    finally:
        kq._launch_hook = None
    return cfg, launches


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump output not understood:\n{out}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "static_shared": int(m.group(3)),
            "local": int(m.group(4))}


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(kernel, sig, consts, attrs, cc, options):
    """triton.compile for GPUTarget("cuda", cc); returns (kernel, spill bytes (stores + loads) or None when
    this Triton prints no ptxas log)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", cc[0] * 10 + cc[1], 32),
                           options=options)
    found = _SPILLS.findall(log.getvalue())
    return k, (sum(int(a) + int(b) for a, b in found) if found else None)


def main(jobs_path: str, out_path: str) -> None:
    jobs = json.loads(open(jobs_path).read())
    compiled: dict[str, dict] = {}
    records = []
    for job in jobs:
        cc, dtype = tuple(job["cc"]), getattr(torch, job["dtype"])
        cfg, launches = _record_launches(cc, dtype, job["shape"])
        for kernel, grid, args, kwargs in launches:
            kw = dict(kwargs)
            options = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)}
            sig, consts, attrs = _specialise(kernel, args, kw)
            key = repr((kernel.__name__, cc, sorted(sig.items()), sorted(consts.items()), sorted(attrs.items()),
                        sorted(options.items())))
            if key not in compiled:
                t0 = time.perf_counter()
                k, spills = _compile(kernel, sig, consts, attrs, cc, options)
                usage = _resource_usage(k.asm["cubin"])
                ptx = k.asm["ptx"]
                compiled[key] = {
                    "shared": int(k.metadata.shared) + usage["static_shared"],
                    "registers": usage["registers"], "stack": usage["stack"], "local": usage["local"],
                    # without a ptxas log, anything in the stack frame or local memory counts as spilled
                    "spills": spills if spills is not None else usage["stack"] + usage["local"],
                    "num_warps": int(k.metadata.num_warps), "num_stages": options["num_stages"],
                    "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
                    "compile_s": round(time.perf_counter() - t0, 2),
                }
                print(f"compiled {kernel.__name__} sm_{cc[0]}{cc[1]} {job['dtype']} {job['shape']}: "
                      f"{compiled[key]}", flush=True)
            records.append({"kernel": kernel.__name__, "cc": list(cc), "dtype": job["dtype"],
                            "shape": job["shape"], "grid": list(grid), "config": cfg.__dict__,
                            **compiled[key]})
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"triton": triton.__version__, "records": records}, f, indent=1)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
