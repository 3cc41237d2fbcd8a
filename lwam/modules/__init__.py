"""``nn.Module`` drop-ins built on ``lwam.ops`` (state-dict compatible with the plain reference modules)."""
from __future__ import annotations

from lwam.modules.query_pool import (FoldedQueryPooling, LearnedQueryPooler, MultiLayerQueryPooler,
                                     apply_fused_pooling, fold_for_inference, is_learned_query_pooler, pool_layers)

__all__ = ["LearnedQueryPooler", "MultiLayerQueryPooler", "FoldedQueryPooling", "pool_layers", "fold_for_inference",
           "apply_fused_pooling", "is_learned_query_pooler"]
