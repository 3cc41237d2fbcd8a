"""Model facts without allocating weights (parameter and token counts), and what was built (``lwam info
--build``: the lwam._C build record, whether the extension loads, Triton, the GPU and its kernel config)."""
from __future__ import annotations

import os
from typing import Any

import torch

from lwam.config import LightWAMConfig
from lwam.model.dit import dit_param_group


def _component(name: str) -> str:
    if name.startswith("dit."):
        group = dit_param_group(name[4:])
        return "dit_base" if group == "base" else group
    if name.startswith("expert."):
        return "action_expert"
    if name.startswith("proprio_encoder."):
        return "proprio_encoder"
    if name.startswith("vae."):
        return "vae"
    return "other"


def model_info(cfg: LightWAMConfig) -> dict[str, Any]:
    """Build the model on the meta device and count parameters per component, trainable and frozen."""
    from lwam.model.lightwam import LightWAM

    with torch.device("meta"):
        model = LightWAM(cfg)
    comps: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        c = comps.setdefault(_component(name), {"trainable": 0, "frozen": 0})
        c["trainable" if p.requires_grad else "frozen"] += p.numel()
    trainable = sum(c["trainable"] for c in comps.values())
    frozen = sum(c["frozen"] for c in comps.values())
    dit_frozen = sum(p.numel() for n, p in model.dit.named_parameters() if not p.requires_grad)
    return {
        "preset": cfg.name,
        "parameters": {
            "components": {k: {**v, "total": v["trainable"] + v["frozen"]} for k, v in sorted(comps.items())},
            "trainable": trainable,
            "frozen": frozen,
            "frozen_dit": dit_frozen,
            "dit_total": sum(p.numel() for p in model.dit.parameters()),
            "wan_dit": sum(p.numel() for n, p in model.dit.named_parameters()
                           if _component("dit." + n) in ("dit_base", "video_head")),
            "total": trainable + frozen,
        },
        "tokens": {
            "action_pass": cfg.action_tokens(),
            "video_pass": cfg.video_tokens(),
            "context": cfg.context_tokens(),
            "latent_frames": cfg.latent_frames(),
        },
        "what_trains": {
            "backbone": "frozen (LoRA + adapters + video head train)" if cfg.freeze_backbone else "trained",
            "vae": "trained" if cfg.train_vae else "frozen",
        },
        "image": [cfg.data.image_height, cfg.data.image_width],
        "chunk": cfg.chunk_size,
        "action_dim": cfg.action_dim,
        "proprio_dim": cfg.proprio_dim,
    }


def format_info(info: dict[str, Any]) -> str:
    p = info["parameters"]
    lines = [f"preset {info['preset']}: image {info['image'][0]}x{info['image'][1]}, chunk {info['chunk']}, "
             f"action_dim {info['action_dim']}, proprio_dim {info['proprio_dim']}",
             f"{'component':<18}{'trainable':>15}{'frozen':>15}"]
    for k, v in p["components"].items():
        lines.append(f"{k:<18}{v['trainable']:>15,}{v['frozen']:>15,}")
    lines.append(f"{'total':<18}{p['trainable']:>15,}{p['frozen']:>15,}")
    lines.append(f"frozen DiT: {p['frozen_dit']:,}   Wan DiT (head included): {p['wan_dit']:,}   "
                 f"DiT with LoRA + adapters: {p['dit_total']:,}")
    t = info["tokens"]
    lines.append(f"tokens: action pass {t['action_pass']}, video pass {t['video_pass']} "
                 f"({t['latent_frames']} latent frames), context {t['context']}")
    lines.append(f"backbone {info['what_trains']['backbone']}; VAE {info['what_trains']['vae']}")
    return "\n".join(lines)


def build_info() -> dict[str, Any]:
    """What setup.py built (its record beside lwam._C), whether it loads here, Triton, and on a GPU machine
    the device and the query_pool launch configuration chosen for it. Initialises CUDA only if present."""
    import importlib.util
    import platform

    from lwam.ops import _extension

    st = _extension.status()
    record: dict[str, Any] = {
        "build_record": _extension.read_build_info(),
        "extension": {"available": st.available, "with_cuda": st.with_cuda, "reason": st.reason},
        "running": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
    }
    triton: dict[str, Any] = {"installed": importlib.util.find_spec("triton") is not None}
    if triton["installed"]:
        try:
            import triton as _triton
            triton["version"] = _triton.__version__
        except Exception as exc:  # noqa: BLE001  (a broken install is reported, not raised)
            triton["error"] = f"{type(exc).__name__}: {exc}"
    record["triton"] = triton
    record["kernels"] = kernels_status(triton["installed"])
    cuda = torch.cuda.is_available()
    verdict, why = cuda_extension_verdict(cuda, st)
    record["cuda_extension"] = {"verdict": verdict, "reason": why}
    if cuda:
        cc = torch.cuda.get_device_capability(0)
        gpu: dict[str, Any] = {"name": torch.cuda.get_device_name(0), "capability": list(cc)}
        if triton.get("version"):
            import dataclasses

            from lwam.kernels import query_pool as kq
            gpu["query_pool_config"] = dataclasses.asdict(kq.cuda_config(cc, 392, 1536, 8, 16))
            gpu["shared_memory_limit"] = kq.shared_memory_limit(cc)
        record["gpu"] = gpu
    return record


def kernels_status(triton_installed: bool) -> dict[str, Any]:
    """Whether ``lwam.kernels.query_pool`` (the Triton kernels, installed from kernels/) imports:
    {"importable": bool, "error": str (when not)}. With Triton installed a failure means a broken install
    (setup.py maps kernels/ to lwam.kernels) or a Triton the kernels do not support."""
    if not triton_installed:
        return {"importable": False, "error": "triton is not installed"}
    try:
        import lwam.kernels.query_pool  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (reported, not raised: the caller decides)
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"importable": True}


def fallback_allowed(build_record: dict[str, Any], env=None) -> bool:
    """``LWAM_ALLOW_FALLBACK=1`` now, or recorded by setup.py as the reason of the installed build."""
    env = os.environ if env is None else env
    return env.get("LWAM_ALLOW_FALLBACK", "") == "1" or "LWAM_ALLOW_FALLBACK=1" in build_record.get("reason", "")


def cuda_extension_verdict(cuda_available: bool, status: Any, env=None) -> tuple[str, str]:
    """What lwam._C means for CUDA tensors here, as (verdict, reason):

    - "not-applicable": no CUDA device;
    - "ok": the loaded binary has CUDA kernels;
    - "fallback": it has none (or is missing) and the fallback was asked for (LWAM_ALLOW_FALLBACK=1, now or
      at install): CUDA tensors use the reference, and the CUDA-kernel tests skip;
    - "missing": it has none and nobody asked for that: a CPU-only build on a CUDA machine must fail the
      CUDA-extension tests, not pass them on the reference.

    ``status`` is an :class:`lwam.ops._extension.ExtensionStatus` (``available``, ``with_cuda``,
    ``reason``, ``build_info``)."""
    if not cuda_available:
        return "not-applicable", "no CUDA device"
    if status.available and status.with_cuda:
        return "ok", status.reason
    what = status.reason if not status.available else f"lwam._C has no CUDA kernels ({status.reason})"
    if fallback_allowed(status.build_info, env):
        return "fallback", f"{what}; LWAM_ALLOW_FALLBACK=1: CUDA tensors use the reference"
    return "missing", (f"{what}, on a machine with a CUDA device: reinstall with nvcc available "
                       f"(`pip install --no-build-isolation -e .`), or set LWAM_ALLOW_FALLBACK=1 to accept it")


def format_build_info(record: dict[str, Any]) -> str:
    b = record["build_record"]
    lines = [f"build: {b.get('kind', 'none')} ({b.get('reason', 'no build record: lwam was not built by setup.py')})"]
    if b:
        lines.append(f"  built for torch {b.get('torch', '?')} (CUDA {b.get('cuda') or 'none'}, Python "
                     f"{b.get('python', '?')})" + (f", nvcc {b['nvcc']}" if b.get("nvcc") else "")
                     + (f", CUDA_HOME {b['cuda_home']}" if b.get("cuda_home") else ""))
        if b.get("cuda_arch_flags"):
            lines.append(f"  device code: {' '.join(b['cuda_arch_flags'])}")
    e, r = record["extension"], record["running"]
    lines.append(f"lwam._C: {e['reason']}")
    lines.append(f"running: torch {r['torch']} (CUDA {r['cuda'] or 'none'}, Python {r['python']})")
    t = record["triton"]
    lines.append("triton: " + (t.get("version") or t.get("error") or "not installed"))
    k = record.get("kernels", {})
    if t.get("installed"):
        lines.append("lwam.kernels: " + ("importable" if k.get("importable") else f"NOT importable ({k.get('error')})"))
    c = record.get("cuda_extension")
    if c and c["verdict"] != "not-applicable":
        lines.append(f"lwam._C on CUDA: {c['verdict']} ({c['reason']})")
    if "gpu" in record:
        g = record["gpu"]
        lines.append(f"gpu: {g['name']} (sm_{g['capability'][0]}{g['capability'][1]})")
        if "query_pool_config" in g:
            lines.append(f"  query_pool launch config (paper shape): {g['query_pool_config']}, shared memory "
                         f"limit {g['shared_memory_limit']} bytes")
    else:
        lines.append("gpu: none")
    return "\n".join(lines)


if __name__ == "__main__":  # ``python -m lwam.info [--json]``: the build report without the CLI
    import json
    import sys

    rec = build_info()
    print(json.dumps(rec, indent=2, default=str) if "--json" in sys.argv[1:] else format_build_info(rec))
