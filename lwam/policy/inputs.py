"""Input preparation shared by the in-process policies (compiled and eager): image conversion, the
normalisation statistics and the text-context cache a policy is given. CPU only, before any device work."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lwam.config import LightWAMConfig
from lwam.model.text import TextContextCache

__all__ = ["prepare_images", "make_normalizer", "text_cache_of"]


def prepare_images(images: Any, batched: bool, factor: int, name: str = "images") -> torch.Tensor:
    """Check and convert images to a float32 CPU tensor [B, 3, H, W] in [-1, 1].

    Accepts float [B, 3, H, W] in [-1, 1] or uint8 [B, H, W, 3] (without B when ``batched`` is False),
    as torch tensors or numpy arrays. Raises TypeError/ValueError naming the expected and received shape
    or dtype. ``factor``: H and W must be divisible by it (VAE factor x patch size).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(images).__name__}")
    lead = "B, " if batched else ""
    rank = 4 if batched else 3
    if images.dtype == torch.uint8:
        if images.dim() != rank or images.shape[-1] != 3:
            raise ValueError(f"{name}: expected uint8 [{lead}H, W, 3], got {tuple(images.shape)}")
        x = images if batched else images[None]
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    elif images.is_floating_point():
        if images.dim() != rank or images.shape[-3] != 3:
            raise ValueError(f"{name}: expected [{lead}3, H, W] in [-1, 1], got {tuple(images.shape)}")
        x = (images if batched else images[None]).float()
    else:
        raise TypeError(f"{name}: expected a float tensor in [-1, 1] ([{lead}3, H, W]) or uint8 "
                        f"[{lead}H, W, 3], got {images.dtype}")
    if x.shape[2] % factor or x.shape[3] % factor or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: H and W must be divisible by {factor}, got {tuple(images.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image, got {tuple(images.shape)}")
    return x.cpu()


def make_normalizer(stats: Any, cfg: LightWAMConfig):
    """A :class:`~lwam.data.normalize.Normalizer` from ``stats`` (a Normalizer, its ``to_dict()``, or a
    feature -> {min, max, mean, std} dict read with the config's modes); None stays None."""
    if stats is None:
        return None
    from lwam.data.normalize import Normalizer

    if isinstance(stats, Normalizer):
        return stats
    if isinstance(stats, Mapping) and "modes" in stats and "stats" in stats:
        return Normalizer.from_dict(stats)
    if isinstance(stats, Mapping):
        if "features" in stats:
            stats = stats["features"]
        return Normalizer.from_config(stats, cfg.data)
    raise TypeError(f"stats: expected a Normalizer or a stats dict, got {type(stats).__name__}")


def text_cache_of(text_cache: Any, cfg: LightWAMConfig) -> TextContextCache:
    """A :class:`TextContextCache`, its file (``TextContextCache.save`` / ``build_text_cache``), a mapping
    instruction -> context [Lt, text_dim], or None (empty)."""
    if isinstance(text_cache, TextContextCache):
        return text_cache
    out = TextContextCache(cfg.text)
    if text_cache is None:
        return out
    if isinstance(text_cache, Mapping):
        out.update(text_cache)
        return out
    if isinstance(text_cache, (str, os.PathLike)):
        return TextContextCache.load(text_cache, cfg.text)
    raise TypeError(f"text_cache: expected a TextContextCache, its file or a mapping, got {type(text_cache).__name__}")
