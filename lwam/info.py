"""Model facts without allocating weights (parameter and token counts), and what was built (``lwam info
--build``: the lwam._C build record, whether the extension loads, Triton, the GPU and its kernel config)."""
from __future__ import annotations

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
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability(0)
        gpu: dict[str, Any] = {"name": torch.cuda.get_device_name(0), "capability": list(cc)}
        if triton.get("version"):
            import dataclasses

            from lwam.kernels import query_pool as kq
            gpu["query_pool_config"] = dataclasses.asdict(kq.cuda_config(cc, 392, 1536, 8, 16))
            gpu["shared_memory_limit"] = kq.shared_memory_limit(cc)
        record["gpu"] = gpu
    return record


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
    if "gpu" in record:
        g = record["gpu"]
        lines.append(f"gpu: {g['name']} (sm_{g['capability'][0]}{g['capability'][1]})")
        if "query_pool_config" in g:
            lines.append(f"  query_pool launch config (paper shape): {g['query_pool_config']}, shared memory "
                         f"limit {g['shared_memory_limit']} bytes")
    else:
        lines.append("gpu: none")
    return "\n".join(lines)
