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

import math
import re
import zlib
from collections.abc import Sequence

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


class TextContextCache:
    """instruction -> context [Lt, text_dim], filled from an encoder on first use or preloaded."""

    def __init__(self, cfg: TextConfig, encoder=None):
        self.cfg = cfg
        self.encoder = encoder
        self._cache: dict[str, torch.Tensor] = {}

    def add(self, instruction: str, context: torch.Tensor) -> None:
        if context.shape != (self.cfg.max_tokens, self.cfg.dim):
            raise ValueError(f"context for {instruction!r}: expected {(self.cfg.max_tokens, self.cfg.dim)}, "
                             f"got {tuple(context.shape)}")
        self._cache[instruction] = context.detach().float().cpu()

    def __contains__(self, instruction: str) -> bool:
        return instruction in self._cache

    def get(self, instructions: Sequence[str]) -> torch.Tensor:
        """-> [N, Lt, text_dim] fp32 (CPU)."""
        missing = [s for s in dict.fromkeys(instructions) if s not in self._cache]
        if missing:
            if self.encoder is None:
                raise KeyError(f"no cached text context for {missing[:3]} and no text encoder configured "
                               f"(text.encoder={self.cfg.encoder!r}); build the text cache first")
            ctx = self.encoder([format_prompt(self.cfg, s) for s in missing])
            for s, c in zip(missing, ctx):
                self.add(s, c)
        return torch.stack([self._cache[s] for s in instructions])

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self._cache)


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
