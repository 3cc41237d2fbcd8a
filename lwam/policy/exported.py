"""ExportedPolicy: a policy from one ``.pt2`` file (``lwam export``), with no model code and no compilation.

The file is an AOTInductor package (``torch._inductor.aoti_compile_and_package``) of the compiled policy's
transformed action path (:class:`lwam.policy.compiled.FastActionPath`, exported with ``torch.export`` at
batch 1 and the checkpoint's image size, fp32, CPU), plus two entries lwam adds to the archive:

* ``<archive>/lwam/policy.json``: the model config (for the observation layout), the normalisation
  statistics, the instructions in order, the executed steps, the export's versions;
* ``<archive>/lwam/tensors.safetensors``: the embedded text tokens of every instruction
  (``text.<i>`` [Lt, D]) and the RoPE tables (``rope_cos``, ``rope_sin`` [S, d/2]): the path's constant
  inputs, computed once at export.

Loading needs torch and lwam's op registrations (``lwam.ops``: the fused pooling op the graph calls), not
the model, the trainer or a compiler. A batch of B observations runs B single-sample calls.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lwam.errors import WeightFileError
from lwam.policy.base import ModelPolicy

__all__ = ["ExportedPolicy", "load_exported", "META_NAME", "TENSORS_NAME", "FORMAT_VERSION"]

META_NAME = "lwam/policy.json"  # lwam's own folder: torch reads extra/ entries as text
TENSORS_NAME = "lwam/tensors.safetensors"
FORMAT_VERSION = 1


class _EmbeddedText:
    """The instructions an exported policy answers (embedded at export; no encoder)."""

    encoder = None

    def __init__(self, embedded: dict[str, torch.Tensor]):
        self.embedded = embedded

    @property
    def instructions(self) -> list[str]:
        return list(self.embedded)

    def __contains__(self, instruction: str) -> bool:
        return instruction in self.embedded


def archive_prefix(path: str | os.PathLike) -> str:
    """The top-level folder of a .pt2 archive (every entry lives under it)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    if len(tops) != 1:
        raise WeightFileError(f"{path}: not a .pt2 package (entries under {sorted(tops)[:3]})")
    return tops.pop()


def read_extras(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(lwam_policy.json, the tensors) of an exported file; WeightFileError if it is not one."""
    from safetensors.torch import load as load_safetensors

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"exported policy not found: {p}")
    try:
        prefix = archive_prefix(p)
        with zipfile.ZipFile(p) as z:
            meta = json.loads(z.read(f"{prefix}/{META_NAME}"))
            tensors = load_safetensors(z.read(f"{prefix}/{TENSORS_NAME}"))
    except (zipfile.BadZipFile, KeyError) as e:
        raise WeightFileError(f"{p}: not a policy exported by `lwam export` ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightFileError(f"{p}: export format {meta.get('format_version')!r}, this lwam reads "
                              f"{FORMAT_VERSION}; export it again")
    return meta, tensors


class ExportedPolicy(ModelPolicy):
    """The contract of lwam.policy.base over an AOTInductor package (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        import lwam.ops  # noqa: F401  registers lwam::query_pool, which the exported graph calls
        from lwam.config import LightWAMConfig
        from lwam.policy.inputs import make_normalizer

        meta, tensors = read_extras(path)
        self.path = Path(path)
        self.meta = meta
        self.cfg = LightWAMConfig.from_dict(meta["config"])
        self.normalizer = make_normalizer(meta["stats"], self.cfg) if meta.get("stats") else None
        self.text = _EmbeddedText({s: tensors[f"text.{i}"] for i, s in enumerate(meta["instructions"])})
        self._cos, self._sin = tensors["rope_cos"], tensors["rope_sin"]
        self._executed_steps = None
        self.image_hw = tuple(meta["image_hw"])
        self._run = torch._inductor.aoti_load_package(str(self.path))

    @property
    def default_executed_steps(self) -> int:
        return int(self.meta["executed_steps"])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @torch.no_grad()
    def predict_batch(self, images: Any, instructions: Sequence[str] | str, proprio: Any) -> Any:
        """images [B, 3, H, W] float in [-1, 1] or uint8 [B, H, W, 3]; instructions: B str (or one);
        proprio [B, P] raw -> de-normalised actions [B, H, A] float32 (numpy if proprio is numpy)."""
        x, instr, prop, is_numpy = self._inputs(images, instructions, proprio)
        if tuple(x.shape[2:]) != self.image_hw:
            raise ValueError(f"images: this policy was exported for {self.image_hw[0]}x{self.image_hw[1]} "
                             f"frames, got {x.shape[2]}x{x.shape[3]}")
        # The compiled graph was specialised to contiguous inputs (export's strides) and reads any other
        # layout as if it were contiguous: uint8 HWC images arrive permuted, so copy.
        x = x.contiguous()
        out = [self._run(x[i:i + 1], prop[i:i + 1].contiguous(), self.text.embedded[s][None], self._cos, self._sin)
               for i, s in enumerate(instr)]
        return self._outputs(torch.cat(out), is_numpy)

    def warmup(self, batch_size: int = 1, image_hw: tuple[int, int] | None = None,
               instruction: str | None = None) -> float:
        """One pass (nothing to compile: the file is compiled). Returns the seconds it took."""
        import time

        h, w = image_hw or self.image_hw
        s = instruction or self.text.instructions[0]
        t0 = time.perf_counter()
        self.predict_batch(torch.zeros(batch_size, 3, h, w), [s] * batch_size,
                           torch.zeros(batch_size, self.cfg.proprio_dim))
        return time.perf_counter() - t0

    def __repr__(self) -> str:
        return f"ExportedPolicy({str(self.path)!r}, preset={self.cfg.name!r}, instructions={len(self.text.instructions)})"


def load_exported(path: str | os.PathLike) -> ExportedPolicy:
    """An :class:`ExportedPolicy` from a file written by ``lwam export`` / :func:`lwam.export.export_policy`."""
    return ExportedPolicy(path)
