"""benchmarks/gpu_check.sh, the one command for a lent GPU machine, and what it relies on.

- CPU mode (``--cpu``): the same stages (environment, install check, headline benchmarks, GPU test tier) at
  small shapes, so that the command cannot rot between GPU windows: exactly two files come back (the
  tarball and summary.json), stages in the headline-first order, records written outside the repo.
- A stage cut by its time limit keeps the measurements it finished, and the next stage still runs.
- ``--plan``: the GPU budget fits one device command, the Python that has torch is picked, and a machine
  without nvcc is planned as Triton-only.
- The summary's headline numbers from records, the install check, the incremental record writer.
- tests/conftest.py: TRITON_INTERPRET is set without CUDA and not with it (torch.cuda.is_available mocked
  in a pytest subprocess), and a CUDA machine requires lwam._C's CUDA kernels unless a fallback was asked.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["environment", "install", "bench_latent_downsample", "bench_query_pool", "bench_policy",
          "bench_train_step", "gpu_tests"]
BENCHMARKS = ["latent_downsample", "query_pool", "policy_latency", "train_step"]
BASH = shutil.which("bash") or "bash"
DEVICE_COMMAND_LIMIT_S = 600  # one device command (/work/.library/device/README.md); runs use timeout_s 570
needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None
                                 or shutil.which("tar") is None, reason="needs bash, coreutils timeout and tar")

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check_summary as gcs  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "LWAM_BENCH_"))}
    env.update(PYTHON=sys.executable, **extra)
    return env


def _run(out: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SCRIPT), "--cpu", str(out)], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=timeout)


def _unpack(out: Path, dest: Path) -> Path:
    """The two files, and the tarball's content under ``dest``/gpu_check."""
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.json"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
        assert all(n == "gpu_check" or n.startswith("gpu_check/") for n in names), names
        tar.extractall(dest, filter="data")
    return dest / "gpu_check"


def _logs(d: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((d / "logs").glob("*.log")))


@needs_shell
def test_gpu_check_cpu_mode(tmp_path):
    out = tmp_path / "OUT"
    committed = ROOT / "benchmarks" / "results"
    before = set(committed.glob("*.json")) if committed.exists() else set()
    proc = _run(out, _env(), timeout=1500)
    d = _unpack(out, tmp_path / "unpacked")
    assert proc.returncode == 0, f"gpu_check --cpu failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}\n{_logs(d)}"
    assert "[gpu_check]" in proc.stdout and "stage bench_policy" in proc.stdout   # progress is printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((d / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["ok"] and summary["complete"]
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert all(s["rc"] == 0 and s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert summary["extension"]["mode"] == "cpu" and summary["extension"]["lwam_kernels"]["importable"]
    assert summary["torch"] and summary["python"] == sys.executable

    assert list(summary["headline"]) == BENCHMARKS
    h = {k: v["numbers"] for k, v in summary["headline"].items()}
    assert all(v["device"] == "cpu" and v["complete"] for v in summary["headline"].values())
    assert h["latent_downsample"] and h["latent_downsample"][0]["lwam_GB/s"] > 0
    assert h["query_pool"][0]["mode"] == "fwd_bwd" and h["query_pool"][0]["speedup_vs_reference"] > 0
    assert h["policy_latency"]["speedup_vs_reference"] > 0 and h["policy_latency"]["matches_reference"] is True
    assert set(h["train_step"]["cases"]) == {"reference", "fast_eager"}
    assert all(c["matches_reference_loss"] for c in h["train_step"]["cases"].values())

    records = [json.loads(p.read_text()) for p in sorted((d / "records").glob("*.json"))]
    assert sorted(r["benchmark"] for r in records) == sorted(BENCHMARKS)
    assert all(r["device"] == "cpu" and r["results"] and r["complete"] for r in records)
    pool = next(r for r in records if r["benchmark"] == "query_pool")
    fused = [row for row in pool["results"] if row["case"] == "fused"]
    assert fused and all(row["kernel_bytes"] >= row["floor_bytes"] > 0 for row in fused)
    policy = next(r for r in records if r["benchmark"] == "policy_latency")
    assert [row["side"] for row in policy["results"]] == ["reference", "policy"]
    reference_side = policy["results"][0]
    assert reference_side["impl"]["attention"] == "masked" and not reference_side["options"]["compile"]
    assert not any(reference_side["options"][k] for k in ("merge_lora", "truncate", "fold_pooling",
                                                          "single_frame_vae", "cuda_graphs"))
    assert summary["gpu_tests"]["tests"] > 0 and summary["gpu_tests"]["failures"] == 0
    assert summary["gpu_tests"]["errors"] == 0
    assert {f"{s}.log" for s in STAGES} <= {p.name for p in (d / "logs").iterdir()}
    assert (d / "build_info.json").exists() and "| bench_train_step | ok |" in (d / "summary.md").read_text()
    after = set(committed.glob("*.json")) if committed.exists() else set()
    assert after == before, f"records written outside OUTDIR: {sorted(after - before)}"


STALL_PLUGIN = '''
import os, time
from pathlib import Path

def pytest_runtest_teardown(item, nextitem):
    # Stand in for a benchmark slower than its share: stall once a record with a result exists.
    records = list(Path(os.environ["LWAM_BENCH_RESULTS"]).glob("*.json"))
    if "test_bench_" in item.nodeid and records:
        Path(os.environ["GPU_CHECK_DIR"], "stalled").write_text(item.nodeid)
        time.sleep(3600)
'''


@needs_shell
def test_a_stage_cut_by_its_share_keeps_its_records_and_the_next_stage_runs(tmp_path):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "stall_after_first_record.py").write_text(STALL_PLUGIN)
    out = tmp_path / "OUT"
    env = _env(GPU_CHECK_ONLY="bench_latent_downsample,gpu_tests", GPU_CHECK_BUDGET="150",
               GPU_CHECK_SHARE_bench_latent_downsample="60",
               PYTEST_ADDOPTS="-p stall_after_first_record",
               PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]))
    proc = _run(out, env, timeout=600)
    d = _unpack(out, tmp_path / "unpacked")
    assert proc.returncode != 0  # a cut stage is a failed run
    stages = {s["stage"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert list(stages) == STAGES
    assert all(stages[s]["status"] == "not selected" for s in STAGES if s not in ("bench_latent_downsample",
                                                                                 "gpu_tests"))
    cut = stages["bench_latent_downsample"]
    assert (d / "stalled").exists(), _logs(d)  # it was cut while stalled, after its first measurement
    assert cut["rc"] in (124, 137) and cut["status"].startswith("cut") and cut["limit_s"] == 60, cut
    assert stages["gpu_tests"]["rc"] == 0, _logs(d)   # the next stage started and ran
    records = [json.loads(p.read_text()) for p in (d / "records").glob("*.json")]
    assert len(records) == 1 and records[0]["benchmark"] == "latent_downsample"
    assert records[0]["results"] and records[0]["complete"] is False
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["ok"] and not summary["complete"]
    assert summary["headline"]["latent_downsample"]["numbers"][0]["lwam_GB/s"] > 0
    assert summary["headline"]["query_pool"] is None


def _plan(*args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([BASH, str(SCRIPT), *args, "--plan"], cwd=str(ROOT), env=env or _env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_shell
def test_plan_fits_one_device_command_and_puts_the_headline_first():
    plan = _plan()
    assert plan["mode"] == "gpu" and plan["budget_s"] == 480
    assert [s["stage"] for s in plan["stages"]] == STAGES
    shares = [s["share_s"] for s in plan["stages"]]
    assert shares[-1] == "rest" and sum(shares[:-1]) < plan["budget_s"]  # the GPU tests get what is left
    # The budget, the summary after it and one cut stage's kill grace stay inside one device command.
    assert plan["budget_s"] + 60 <= DEVICE_COMMAND_LIMIT_S - 30
    commands = {s["stage"]: s["command"] for s in plan["stages"]}
    assert "pip install --no-index --no-build-isolation --no-deps -e ." in commands["install"]  # no index there
    assert "--dry-run" not in commands["install"] and "--check-install" in commands["install"]
    assert "-m 'gpu or install_check'" in commands["gpu_tests"]
    assert _plan("--cpu")["budget_s"] == 900


@needs_shell
def test_plan_picks_the_python_with_torch_and_goes_triton_only_without_nvcc(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "ls", "sort"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 1\n")  # a python3 without torch, first on PATH
    (bin_dir / "python3").chmod(0o755)
    env = _env(PATH=str(bin_dir), GPU_CHECK_NVCC_DIRS=str(tmp_path / "no-cuda"))
    env.pop("PYTHON")
    env.pop("CUDA_HOME", None)
    plan = _plan(env=env)
    assert plan["python"] == str(bin_dir / "python")
    assert plan["nvcc"] == "" and plan["extension_mode"] == "triton-only"
    assert "LWAM_ALLOW_FALLBACK=1" in plan["extension_reason"]
    # With nvcc in a toolkit directory (not on PATH) the extension is built with it.
    cuda_bin = tmp_path / "cuda-13.0" / "bin"
    cuda_bin.mkdir(parents=True)
    (cuda_bin / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    (cuda_bin / "nvcc").chmod(0o755)
    plan = _plan(env=dict(env, GPU_CHECK_NVCC_DIRS=str(tmp_path / "cuda-*" / "bin")))
    assert plan["nvcc"] == str(cuda_bin / "nvcc") and plan["extension_mode"] == "cuda"
    # A stale CUDA_HOME (no bin/nvcc) does not hide that toolkit; the summary says it was ignored.
    plan = _plan(env=dict(env, GPU_CHECK_NVCC_DIRS=str(tmp_path / "cuda-*" / "bin"), CUDA_HOME=str(tmp_path / "old")))
    assert plan["nvcc"] == str(cuda_bin / "nvcc") and f"CUDA_HOME={tmp_path / 'old'} holds no bin/nvcc" in \
        plan["extension_reason"]
    env["PYTHON"] = str(bin_dir / "python3")  # asked for, and it has no torch: a clear stop
    proc = subprocess.run([BASH, str(SCRIPT), "--plan"], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "no Python that imports torch" in proc.stderr


def _write_records(d: Path) -> None:
    rec = d / "records"
    rec.mkdir(parents=True)
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "time": "t"}
    files = {
        "latent_downsample": [{"case": c, "shape": [16, 16, 3, 28, 56], "dtype": "bfloat16", "median_s": 1e-5,
                               "GB/s": g} for c, g in (("copy", 3000.0), ("lwam", 2400.0), ("avg_pool3d", 600.0))],
        "query_pool": [{"case": c, "mode": m, "shape_name": "train", "dtype": "bfloat16", "median_s": t}
                       for m, c, t in (("fwd", "fused", 1.0), ("fwd", "reference", 2.0), ("fwd_bwd", "fused", 2.0),
                                       ("fwd_bwd", "reference", 8.0))],
        "policy_latency": [{"side": "reference", "median_ms": 90.0, "peak_bytes": 4e9},
                           {"side": "policy", "median_ms": 15.0, "peak_bytes": 3e9, "matches_reference": True}],
        "train_step": [{"case": "reference", "median_s": 2.0, "samples_per_s": 8.0, "peak_memory_bytes": 6e10},
                       {"case": "fast", "median_s": 1.0, "samples_per_s": 16.0, "peak_memory_bytes": 3e10,
                        "speedup_vs_reference": 2.0}],
    }
    for name, rows in files.items():
        (rec / f"{name}-cuda-1.json").write_text(json.dumps({"benchmark": name, **env, "complete": True,
                                                             "results": rows}))


def test_summary_headline_from_records(tmp_path):
    d = tmp_path / "gpu_check"
    _write_records(d)
    (d / "facts.tsv").write_text("mode\tgpu\nbudget_s\t480\ngpu\tNVIDIA H100 80GB HBM3\nextension_mode\t"
                                 "triton-only\nextension_reason\tno nvcc found\n")
    (d / "stages.tsv").write_text("environment\t0\t3\t15\t15\tok\ninstall\t0\t70\t150\t150\tok\n"
                                  "bench_latent_downsample\t124\t30\t30\t30\tcut at its 30s share\n"
                                  "gpu_tests\t\t0\t0\t0\tskipped: budget spent\n")
    (d / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"/><testcase classname="tests.test_x" name="test_b">'
        '<failure message="assert 1 == 2&#10;more">tb</failure></testcase>'
        '<testcase classname="tests.test_x" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    s = gcs.write_summary(d)
    assert s["device"] == "NVIDIA H100 80GB HBM3" and s["budget_s"] == 480 and s["elapsed_s"] == 103
    assert not s["ok"] and not s["complete"] and s["extension"]["triton_only"]
    assert [st["stage"] for st in s["stages"]] == ["environment", "install", "bench_latent_downsample", "gpu_tests"]
    h = {k: v["numbers"] for k, v in s["headline"].items()}
    assert list(h) == BENCHMARKS
    assert h["latent_downsample"][0]["fraction_of_copy_bandwidth"] == pytest.approx(0.8)
    assert h["latent_downsample"][0]["speedup_vs_avg_pool3d"] == pytest.approx(4.0)
    assert [r["mode"] for r in h["query_pool"]] == ["fwd_bwd", "fwd"]
    assert h["query_pool"][0]["speedup_vs_reference"] == pytest.approx(4.0)
    assert h["policy_latency"]["speedup_vs_reference"] == pytest.approx(6.0)
    assert h["policy_latency"]["reference_peak_bytes"] == 4e9 and h["policy_latency"]["policy_peak_bytes"] == 3e9
    assert h["train_step"]["cases"]["fast"]["speedup_vs_reference"] == 2.0
    t = s["gpu_tests"]
    assert (t["tests"], t["passed"], t["failures"], t["skipped"]) == (3, 1, 1, 1)
    assert t["failed"] == [{"test": "tests.test_x::test_b", "kind": "failure", "message": "assert 1 == 2"}]
    assert json.loads((d / "summary.json").read_text()) == json.loads(json.dumps(s, default=str))
    assert "| bench_latent_downsample | cut at its 30s share |" in (d / "summary.md").read_text()


def test_check_install():
    ok = {"triton": {"installed": True}, "kernels": {"importable": True},
          "cuda_extension": {"verdict": "ok", "reason": ""}}
    assert gcs.check_install(ok) is None
    assert "lwam.kernels" in gcs.check_install(dict(ok, kernels={"importable": False, "error": "No module"}))
    assert gcs.check_install(dict(ok, triton={"installed": False}, kernels={"importable": False})) is None
    missing = dict(ok, cuda_extension={"verdict": "missing", "reason": "CPU kernel only"})
    assert "no CUDA kernels" in gcs.check_install(missing)
    assert gcs.check_install(dict(ok, cuda_extension={"verdict": "fallback", "reason": ""})) is None


def test_record_is_rewritten_after_every_measurement(tmp_path, monkeypatch):
    import _record

    monkeypatch.setenv("LWAM_BENCH_RECORD", "1")
    monkeypatch.setenv("LWAM_BENCH_RESULTS", str(tmp_path))
    rec = _record.Record("demo", "cpu", note="x")
    assert rec.write() is None and not list(tmp_path.iterdir())  # nothing before the first result
    rec.add({"case": "a", "median_s": 1.0})
    first = json.loads(rec.path.read_text())
    assert first["results"] == [{"case": "a", "median_s": 1.0}] and first["complete"] is False
    assert first["note"] == "x" and first["device"] == "cpu" and "torch" in first
    rec.add({"case": "b", "median_s": 2.0}, speedup=2.0)
    rec.finish()
    last = json.loads(rec.path.read_text())
    assert [r["case"] for r in last["results"]] == ["a", "b"] and last["speedup"] == 2.0 and last["complete"]
    assert [p.name for p in tmp_path.iterdir()] == [rec.path.name]  # one file, no temporaries left
    monkeypatch.setenv("LWAM_BENCH_RECORD", "0")
    assert _record.Record("demo", "cpu").add({"case": "a"}) is None


MOCK_CUDA_PLUGIN = '''
import json, os
import torch

torch.cuda.is_available = lambda: os.environ["MOCK_CUDA"] == "1"

def pytest_collection_finish(session):
    skipped = [i.nodeid for i in session.items if any(m.name == "skip" for m in i.iter_markers())]
    with open(os.environ["MOCK_CUDA_REPORT"], "w") as f:
        json.dump({"env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "LWAM_REQUIRE_EXTENSION")},
                   "items": len(session.items), "skipped": skipped}, f)
'''


def _collect_with_mocked_cuda(tmp_path, cuda: bool, paths: list[str], **env_extra: str) -> dict:
    plugin = tmp_path / "plugin"
    plugin.mkdir(exist_ok=True)
    (plugin / "mock_cuda.py").write_text(MOCK_CUDA_PLUGIN)
    report = tmp_path / f"report-{int(cuda)}.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "LWAM_REQUIRE_EXTENSION", "LWAM_ALLOW_FALLBACK", "PYTEST_ADDOPTS")}
    env.update(MOCK_CUDA="1" if cuda else "0", MOCK_CUDA_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]), **env_extra)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "mock_cuda", *paths], cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(report.read_text())


def test_the_test_suite_sets_triton_interpret_only_without_cuda(tmp_path):
    """Collecting the whole suite (every module imported, every conftest run) with CUDA mocked present
    leaves TRITON_INTERPRET unset, so `pytest -m gpu` runs compiled kernels; mocked absent, it is 1."""
    with_cuda = _collect_with_mocked_cuda(tmp_path, True, ["tests"])
    assert with_cuda["items"] > 100
    assert with_cuda["env"]["TRITON_INTERPRET"] is None
    assert with_cuda["env"]["LWAM_REQUIRE_EXTENSION"] == "1"  # lwam._C's CUDA kernels are required there
    without = _collect_with_mocked_cuda(tmp_path, False, ["tests/test_query_pool.py"])
    assert without["env"]["TRITON_INTERPRET"] == "1" and without["env"]["LWAM_REQUIRE_EXTENSION"] is None


def test_a_cuda_machine_with_a_requested_fallback_skips_the_cuda_extension_tests(tmp_path):
    """This machine's lwam._C has no CUDA kernels: with CUDA mocked and LWAM_ALLOW_FALLBACK=1 the CUDA
    kernel tests of tests/test_latent_downsample.py are skipped (with the reason), nothing is required."""
    report = _collect_with_mocked_cuda(tmp_path, True, ["tests/test_latent_downsample.py"],
                                       LWAM_ALLOW_FALLBACK="1")
    assert report["env"]["LWAM_REQUIRE_EXTENSION"] is None
    assert any("test_cuda_kernel_in_use_and_graph_capture" in n for n in report["skipped"])
    assert all("cuda" in n for n in report["skipped"]), report["skipped"]
    assert report["items"] > len(report["skipped"])
