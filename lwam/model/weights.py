"""Loading published weights strictly: the Wan2.1 DiT (safetensors), the Wan2.1 VAE (.pth) and a
Light-WAM release checkpoint (.pt dict with 'mot', 'state_fusion_action_expert', 'proprio_encoder').

Nothing here unpickles code (``torch.load(weights_only=True)``) or downloads anything. Every tensor of the
file must map onto the model and every expected model tensor must be in the file, with equal shapes;
otherwise an error names the tensor.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from lwam.errors import CheckpointMismatchError  # noqa: F401  (raised here; importable from here)
from lwam.model.dit import dit_param_group

RELEASE_DIT_PREFIX = "mixtures.video."


def check_state_dict(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor | tuple[int, ...]],
                     source: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming every missing, unexpected or mis-shaped tensor."""
    shape = lambda v: tuple(v.shape) if hasattr(v, "shape") else tuple(v)  # noqa: E731
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis = sorted(f"{k}: expected {tuple(expected[k])}, found {shape(found[k])}"
                 for k in set(expected) & set(found) if tuple(expected[k]) != shape(found[k]))
    if missing or unexpected or mis:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        if mis:
            parts.append(f"mis-shaped {len(mis)}: {'; '.join(mis[:8])}{' ...' if len(mis) > 8 else ''}")
        raise CheckpointMismatchError(f"{source}: " + " | ".join(parts))


def shapes_of(module: nn.Module, keys: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
    sd = module.state_dict()
    return {k: tuple(v.shape) for k, v in sd.items() if keys is None or k in keys}


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
              only: Iterable[str] | None = None) -> None:
    """Strictly copy ``state`` into ``module`` (cast to each parameter's dtype). With ``only``, the model
    side is restricted to those keys (e.g. the frozen DiT without LoRA/adapters)."""
    expected = shapes_of(module) if only is None else {k: v for k, v in shapes_of(module).items() if k in set(only)}
    check_state_dict(expected, state, source)
    own = module.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if own[k].is_meta:
                continue
            own[k].copy_(v.to(own[k].dtype))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from lwam._safe_load import read_safetensors as _read
    return _read(path, "weight file")


def dit_pretrained_keys(dit: nn.Module) -> list[str]:
    """Keys of the DiT that come from the Wan2.1 file: everything except LoRA and adapters."""
    return [k for k in dit.state_dict() if dit_param_group(k) in ("base", "video_head")]


def load_wan_dit(dit: nn.Module, path: str | os.PathLike) -> None:
    """Load ``diffusion_pytorch_model.safetensors`` (native Wan2.1 keys) into a :class:`WanDiT`."""
    state = read_safetensors(path)
    load_into(dit, state, f"Wan2.1 DiT file {path}", only=dit_pretrained_keys(dit))


def split_release(ckpt: Mapping) -> tuple[dict, dict, dict]:
    """A release dict -> (DiT state with the 'mixtures.video.' prefix stripped, expert state, proprio state)."""
    for entry in ("mot", "state_fusion_action_expert", "proprio_encoder"):
        if entry not in ckpt:
            raise CheckpointMismatchError(f"Light-WAM release: entry {entry!r} missing (found {sorted(ckpt)})")
    mot = ckpt["mot"]
    bad = [k for k in mot if not k.startswith(RELEASE_DIT_PREFIX)]
    if bad:
        raise CheckpointMismatchError(f"Light-WAM release: 'mot' keys without prefix {RELEASE_DIT_PREFIX!r}: {bad[:5]}")
    dit = {k[len(RELEASE_DIT_PREFIX):]: v for k, v in mot.items()}
    return dit, dict(ckpt["state_fusion_action_expert"]), dict(ckpt["proprio_encoder"])


def load_lightwam_release(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a published Light-WAM ``.pt`` into a :class:`LightWAM` (DiT incl. frozen weights, LoRA and
    adapters; the SFAE; the proprio encoder). Returns the remaining metadata ('step', 'torch_dtype')."""
    from lwam._safe_load import torch_load_plain
    ckpt = torch_load_plain(path, "Light-WAM checkpoint")
    if not isinstance(ckpt, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    dit, expert, proprio = split_release(ckpt)
    load_into(model.dit, dit, f"{path} ['mot']")
    load_into(model.expert, expert, f"{path} ['state_fusion_action_expert']")
    load_into(model.proprio_encoder, proprio, f"{path} ['proprio_encoder']")
    return {k: ckpt[k] for k in ("step", "torch_dtype") if k in ckpt}


def read_layout(tsv: str | os.PathLike) -> list[tuple[str | None, str, tuple[int, ...]]]:
    """Parse a layout file of ``shared/checkpoint_layouts`` -> [(entry or None, key, shape)]."""
    rows = []
    for line in Path(tsv).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if cols[0] in ("key", "entry"):
            continue
        shape = tuple(int(s) for s in cols[-1].split("x")) if cols[-1] else ()
        rows.append((cols[0] if len(cols) == 3 else None, cols[-2], shape))
    return rows
