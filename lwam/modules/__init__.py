"""``nn.Module`` drop-ins built on ``lwam.ops`` (state-dict compatible with the plain reference modules)."""
from __future__ import annotations

from lwam.modules.query_pool import (FoldedQueryPooling, LearnedQueryPooler, MultiLayerQueryPooler,
                                     fold_for_inference, pool_layers)

__all__ = ["LearnedQueryPooler", "MultiLayerQueryPooler", "FoldedQueryPooling", "pool_layers", "fold_for_inference"]
