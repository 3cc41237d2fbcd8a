"""Text conditioning: context embeddings [N, Lt, text_dim] for instructions.

Three sources:
- a cache of precomputed umT5-XXL embeddings (the paper's setup: the 5.7B encoder runs offline once);
- ``UMT5TextEncoder``: the real encoder through ``transformers``, from weights already on disk;
- ``BuiltinTextEncoder``: for presets without a pretrained text encoder. It is NOT a language model:
  each lower-cased word maps to a fixed pseudo-random vector (seeded by a CRC32 of the word) plus a
  sinusoidal position code. Distinct instructions get distinct, deterministic contexts, which is all a
  policy trained from scratch on a handful of tasks needs.
Contexts are zero-padded to ``max_tokens`` (the published Wan pipeline pads with zeros, no mask).
"""
from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lwam.config import TextConfig


def format_prompt(cfg: TextConfig, instruction: str) -> str:
    return cfg.prompt_template.format(instruction=instruction.strip())


class BuiltinTextEncoder:
    """Deterministic word-hash embeddings: list[str] -> [N, max_tokens, dim] fp32."""

    def __init__(self, dim: int, max_tokens: int):
        self.dim = dim
        self.max_tokens = max_tokens

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def _word(self, word: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
        return torch.randn(self.dim, generator=g)

    def _position(self, n: int) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        ang = torch.arange(n, dtype=torch.float32)[:, None] * freqs[None]
        pos = torch.zeros(n, self.dim)
        pos[:, :half] = torch.sin(ang)
        pos[:, half:2 * half] = torch.cos(ang)
        return pos

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.max_tokens, self.dim)
        for i, text in enumerate(texts):
            words = self.tokenize(text)[: self.max_tokens]
            if words:
                vecs = torch.stack([self._word(w) for w in words])
                out[i, : len(words)] = vecs + 0.5 * self._position(len(words))
        return out


class UMT5TextEncoder:
    """umT5 encoder through ``transformers`` from a local directory (no download)."""

    def __init__(self, path: str, max_tokens: int = 128, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except ImportError as e:  # pragma: no cover - optional dependency
            raise ImportError("UMT5TextEncoder needs `pip install lwam[text]` (transformers)") from e
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = UMT5EncoderModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype).to(device).eval()
        self.max_tokens = max_tokens
        self.device = device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        h = self.model(**tok).last_hidden_state.float()
        return h * tok["attention_mask"][..., None].float()  # zero the padding, as the Wan pipeline does


TEXT_CACHE_FORMAT = "lwam-text-cache-v1"


class TextContextCache:
    """instruction -> raw text context [Lt, text_dim] fp32 (CPU): the one text cache of lwam.

    Filled from ``encoder`` on first use (:meth:`get`), by :meth:`add`, or from a file (:meth:`load`).
    File format (:meth:`save`, atomic): one safetensors file with ``context`` [N, Lt, text_dim] float32 and
    metadata ``format`` = ``"lwam-text-cache-v1"``, ``instructions`` (JSON list of the N strings, row
    order) and ``max_tokens`` / ``dim``. ``lwam train --text-cache`` reads it, every checkpoint carries one
    (``text.safetensors``: the contexts of its training instructions), ``Policy`` answers from it.
    """

    def __init__(self, cfg: TextConfig, encoder=None):
        self.cfg = cfg
        self.encoder = encoder
        self._cache: dict[str, torch.Tensor] = {}

    def add(self, instruction: str, context: torch.Tensor) -> None:
        if not isinstance(instruction, str):
            raise TypeError(f"instruction: expected a str, got {type(instruction).__name__}")
        if not isinstance(context, torch.Tensor) or tuple(context.shape) != (self.cfg.max_tokens, self.cfg.dim):
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"text_context for {instruction!r}: expected {(self.cfg.max_tokens, self.cfg.dim)}, got {got}")
        self._cache[instruction] = context.detach().float().cpu()

    def update(self, contexts: Mapping[str, torch.Tensor] | "TextContextCache") -> None:
        """Add every (instruction, context [Lt, text_dim]) of a mapping or another cache."""
        items = contexts.state() if isinstance(contexts, TextContextCache) else contexts
        for instruction, context in items.items():
            self.add(instruction, context)

    def __contains__(self, instruction: str) -> bool:
        return instruction in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def instructions(self) -> list[str]:
        return list(self._cache)

    def get(self, instructions: Sequence[str]) -> torch.Tensor:
        """-> [N, Lt, text_dim] fp32 (CPU)."""
        missing = [s for s in dict.fromkeys(instructions) if s not in self._cache]
        if missing:
            if self.encoder is None:
                raise KeyError(f"no cached text context for {missing[:3]} and no text encoder configured "
                               f"(text.encoder={self.cfg.encoder!r}); build the text cache first")
            self.encode(missing)
        return torch.stack([self._cache[s] for s in instructions])

    def encode(self, instructions: Sequence[str], batch_size: int = 64) -> None:
        """Run the encoder on ``instructions`` (prompt template applied) and cache the contexts."""
        if self.encoder is None:
            raise ValueError(f"encoder: none configured (text.encoder={self.cfg.encoder!r})")
        instructions = list(instructions)
        for i in range(0, len(instructions), batch_size):
            batch = instructions[i:i + batch_size]
            with torch.no_grad():
                ctx = self.encoder([format_prompt(self.cfg, s) for s in batch])
            if not isinstance(ctx, torch.Tensor) or ctx.dim() != 3 or ctx.shape[0] != len(batch):
                got = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else type(ctx).__name__
                raise ValueError(f"encoder: expected contexts [{len(batch)}, {self.cfg.max_tokens}, {self.cfg.dim}], "
                                 f"got {got}")
            for s, c in zip(batch, ctx):
                self.add(s, c)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self._cache)

    def subset(self, instructions: Sequence[str]) -> "TextContextCache":
        """A cache with only ``instructions`` (each must be cached or encodable, else KeyError)."""
        self.get(list(instructions))
        out = TextContextCache(self.cfg, self.encoder)
        for s in dict.fromkeys(instructions):
            out.add(s, self._cache[s])
        return out

    # --- the file -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache to ``path`` (safetensors, the format in the class docstring), atomically."""
        from safetensors.torch import save_file

        from lwam._atomic import atomic_path

        if not self._cache:
            raise ValueError("TextContextCache.save: the cache is empty")
        names = list(self._cache)
        meta = {"format": TEXT_CACHE_FORMAT, "instructions": json.dumps(names),
                "max_tokens": str(self.cfg.max_tokens), "dim": str(self.cfg.dim)}
        with atomic_path(path) as tmp:
            save_file({"context": torch.stack([self._cache[s] for s in names]).contiguous()}, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: TextConfig, encoder=None) -> "TextContextCache":
        """Read a file written by :meth:`save` (or :func:`build_text_cache`); shapes checked against ``cfg``."""
        from lwam._safe_load import read_safetensors_with_metadata
        from lwam.errors import WeightFileError

        path = Path(path)
        tensors, meta = read_safetensors_with_metadata(path, "text cache")
        if meta.get("format") != TEXT_CACHE_FORMAT or "context" not in tensors:
            raise WeightFileError(f"text cache {path}: not an lwam text cache (metadata format="
                                  f"{meta.get('format')!r}, expected {TEXT_CACHE_FORMAT!r} with a 'context' tensor)")
        context = tensors["context"]
        try:
            names = json.loads(meta.get("instructions", ""))
        except ValueError:
            raise WeightFileError(f"text cache {path}: its 'instructions' metadata is not JSON") from None
        if context.dim() != 3 or context.shape[0] != len(names):
            raise ValueError(f"{path}: context {tuple(context.shape)} does not hold {len(names)} instructions")
        out = cls(cfg, encoder)
        for s, c in zip(names, context):
            out.add(s, c)
        return out


def build_text_cache(instructions: Sequence[str], cfg: TextConfig, path: str | os.PathLike, encoder=None,
                     batch_size: int = 64) -> Path:
    """Encode every instruction once (``encoder``: list[str] -> [B, Lt, text_dim]; default the config's,
    :func:`make_text_encoder`) and write the :class:`TextContextCache` file to ``path``."""
    instructions = list(dict.fromkeys(str(s) for s in instructions))
    if not instructions:
        raise ValueError("instructions: expected at least one string")
    cache = TextContextCache(cfg, encoder if encoder is not None else make_text_encoder(cfg))
    cache.encode(instructions, batch_size=batch_size)
    return cache.save(path)


def make_text_encoder(cfg: TextConfig, umt5_path: str | None = None):
    if cfg.encoder == "builtin":
        return BuiltinTextEncoder(cfg.dim, cfg.max_tokens)
    if cfg.encoder == "umt5":
        if not umt5_path:
            raise ValueError("text.encoder='umt5' needs the path of a local umT5 model directory")
        return UMT5TextEncoder(umt5_path, cfg.max_tokens)
    if cfg.encoder == "cache":
        return None
    raise ValueError(f"text.encoder must be 'cache', 'umt5' or 'builtin', got {cfg.encoder!r}")
