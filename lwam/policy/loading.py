"""The one loader of a warmed-up policy: :func:`load_policy` (a trained model or a checkpoint -> a compiled
:class:`~lwam.policy.compiled.Policy`, or the plain :class:`~lwam.policy.eager.EagerPolicy`), used by
``lwam eval``, ``lwam serve``, ``lwam demo`` and ``lwam experiment``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lwam._logging import logger

__all__ = ["compile_failures", "warm_policy", "load_policy"]


def compile_failures() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "torch.compile could not build the action path" (a backend or C++ compiler
    failure, e.g. no working compiler on the machine). Only these make :func:`warm_policy` fall back."""
    import torch._dynamo.exc as dynamo_exc

    failures: list[type[BaseException]] = [dynamo_exc.BackendCompilerFailed]
    try:
        from torch._inductor import exc as inductor_exc
        failures += [inductor_exc.InductorError, inductor_exc.CppCompileError]
    except (ImportError, AttributeError):  # older torch: BackendCompilerFailed wraps them
        pass
    return tuple(failures)


def warm_policy(build, batch_sizes=(1,), compiled: bool = True):
    """``build(compile: bool) -> Policy``; warm up (compile) every batch size in ``batch_sizes``.

    A compile failure (:func:`compile_failures`) is the one documented fallback: it is logged with its
    reason and the same transformed policy is rebuilt with ``compile=False``. Any other error propagates."""
    policy = build(compiled)
    try:
        for b in batch_sizes:
            policy.warmup(b)
    except compile_failures() as e:
        if not compiled:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        logger.warning(f"torch.compile failed for the action path ({type(e).__name__}: {first}); "
                       f"running the same transformed Policy without compilation (compile=False)")
        policy = build(False)
        for b in batch_sizes:
            policy.warmup(b)
    return policy


def load_policy(source: Any, stats: Any = None, device: str | torch.device | None = None, *,
                eager: bool = False, compiled: bool = True, text_cache: Any = None, batch_sizes=(1,)):
    """A robot-facing policy, warmed up at every batch size in ``batch_sizes``.

    ``source``: a :class:`~lwam.model.lightwam.LightWAM` (with ``stats``, its normalisation statistics) or a
    checkpoint directory / published ``.pt`` (its own stats.json; ``stats`` overrides). ``text_cache``: extra
    instruction contexts (a TextContextCache, its file or a mapping). Default: the compiled Policy (without
    ``torch.compile`` if it fails to compile, logged: :func:`warm_policy`); ``compiled=False``: the same Policy
    uncompiled; ``eager=True``: the plain model (debugging). Every other failure raises: nothing silently
    swaps in another implementation. ``device``: default the model's (a checkpoint: cpu)."""
    from lwam.policy.compiled import Policy

    if isinstance(source, (str, os.PathLike)):
        if eager:
            from lwam.checkpoint import load_checkpoint

            model, own_stats = load_checkpoint(Path(source))
            stats = stats if stats is not None else own_stats
        else:
            extra = {"stats": stats} if stats is not None else {}
            return warm_policy(lambda c: Policy.from_checkpoint(source, device=device, compile=c,
                                                                text_cache=text_cache, **extra),
                               batch_sizes, compiled)
    else:
        model = source
    from lwam.policy.inputs import text_cache_of

    extra = text_cache_of(text_cache, model.cfg)
    if eager:
        from lwam.policy.eager import EagerPolicy

        model.text.update(extra)  # the eager policy answers from the model's own cache
        policy = EagerPolicy(model, stats, device)
        for b in batch_sizes:
            policy.warmup(b)
        return policy

    def build(c: bool) -> Policy:
        policy = Policy.from_model(model, stats=stats, device=device, compile=c)
        for name, context in extra.state().items():
            policy.add_instruction(name, context)
        return policy

    return warm_policy(build, batch_sizes, compiled)
