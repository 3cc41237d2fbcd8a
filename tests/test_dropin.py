"""lwam's fused pooling as a drop-in for a foreign model with the published Light-WAM pooler structure.

The published SFAE keeps one ``LearnedQueryPooler(embed_dim=, num_queries=, num_heads=, merge_dim=None,
merge_num_slots=)`` per tapped layer under ``layer_poolers.{l}.adapted`` (an ``nn.ModuleDict`` per layer),
with parameters ``token_norm``, ``query_tokens`` [Q, D], ``attn`` (batch-first ``nn.MultiheadAttention``),
``query_merge_logits`` [Q] and ``output_norm``; its forward is LN -> attention of the queries over the
tokens -> softmax(merge logits)-weighted sum over queries -> LN. The classes below are written here from
those facts (they are not the published code) and carry the golden release's pooler weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwam.modules.query_pool as qp_mod
from lwam.modules.query_pool import LearnedQueryPooler, apply_fused_pooling, is_learned_query_pooler, pool_layers

from conftest import GOLDEN
from test_golden import TOL, golden, max_rel  # noqa: F401  (fixture)


class ForeignPooler(nn.Module):
    def __init__(self, embed_dim, num_queries, num_heads, merge_dim=None, merge_num_slots=2):
        super().__init__()
        assert merge_dim is None
        self.embed_dim, self.num_queries = embed_dim, num_queries
        self.token_norm = nn.LayerNorm(embed_dim)
        self.query_tokens = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.attn = nn.MultiheadAttention(embed_dim=embed_dim, num_heads=num_heads, batch_first=True)
        self.query_merge_logits = nn.Parameter(torch.zeros(num_queries))
        self.query_slot_merge_logits = None
        self.query_merge_projector = None
        self.output_norm = nn.LayerNorm(embed_dim)

    def forward(self, tokens):
        kv = self.token_norm(tokens)
        q = self.query_tokens.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attn(query=q, key=kv, value=kv, need_weights=False)
        w = F.softmax(self.query_merge_logits, dim=0)
        return self.output_norm((pooled * w.view(1, -1, 1)).sum(dim=1))


class ForeignExpert(nn.Module):
    """The published SFAE's pooler container, plus a head that is not a pooler."""

    def __init__(self, dim=96, queries=3, heads=4, layers=2):
        super().__init__()
        self.layer_poolers = nn.ModuleList(
            nn.ModuleDict({"adapted": ForeignPooler(embed_dim=dim, num_queries=queries, num_heads=heads,
                                                    merge_dim=None, merge_num_slots=2)})
            for _ in range(layers))
        self.head = nn.Linear(dim, 4)

    def forward(self, states):
        return torch.stack([p["adapted"](x) for p, x in zip(self.layer_poolers, states)], dim=1)


def foreign_expert() -> ForeignExpert:
    release = torch.load(GOLDEN / "lightwam_small_release.pt", weights_only=True)
    sd = {k: v for k, v in release["state_fusion_action_expert"].items() if k.startswith("layer_poolers.")}
    ex = ForeignExpert()
    missing, unexpected = ex.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == {"head.weight", "head.bias"}
    return ex


def taps(T):
    return [T["sfae.adapted.layer0"], T["sfae.adapted.layer2"]]


def test_published_constructor_signature():
    kw = dict(embed_dim=64, num_queries=4, num_heads=8, merge_dim=None, merge_num_slots=2)
    a, b = LearnedQueryPooler(**kw), LearnedQueryPooler(64, 4, 8, None, 2)
    assert a.embed_dim == a.output_dim == 64 and a.merge_dim is None and a.merge_num_slots == 2
    assert a.state_dict().keys() == ForeignPooler(**kw).state_dict().keys() == b.state_dict().keys()
    with pytest.raises(ValueError, match="merge_dim"):
        LearnedQueryPooler(**{**kw, "merge_dim": 128})
    with pytest.raises(ValueError, match="embed_dim"):
        LearnedQueryPooler(embed_dim=0, num_queries=4, num_heads=8)
    # strict loading of a published pooler's state dict
    LearnedQueryPooler(**kw).load_state_dict(ForeignPooler(**kw).state_dict(), strict=True)


def test_foreign_tree_matches_published_pooling(golden):
    with torch.no_grad():
        assert max_rel(foreign_expert()(taps(golden)), golden["sfae.pooled"]) < TOL["fp32_forward"]


def test_pool_layers_takes_foreign_poolers(golden):
    ex = foreign_expert()
    with torch.no_grad():
        out = pool_layers([p["adapted"] for p in ex.layer_poolers], taps(golden))
    assert max_rel(out, golden["sfae.pooled"]) < TOL["fp32_forward"]


def test_apply_fused_pooling_swaps_in_place(golden, monkeypatch):
    ex = foreign_expert()
    before_params = {n: p for n, p in ex.named_parameters()}
    keys = list(ex.state_dict().keys())
    reference = [t.clone().requires_grad_(True) for t in taps(golden)]
    ref_out = ex(reference)
    ref_out.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in ex.named_parameters() if p.grad is not None}
    ex.zero_grad(set_to_none=True)

    replaced = apply_fused_pooling(ex)
    assert replaced == ["layer_poolers.0.adapted", "layer_poolers.1.adapted"]
    assert all(isinstance(p["adapted"], LearnedQueryPooler) for p in ex.layer_poolers)
    assert list(ex.state_dict().keys()) == keys
    assert all(p is before_params[n] for n, p in ex.named_parameters())  # the same parameter objects
    assert apply_fused_pooling(ex) == []  # idempotent

    calls = []
    real = qp_mod.query_pool
    monkeypatch.setattr(qp_mod, "query_pool", lambda *a, **k: calls.append(1) or real(*a, **k))
    xs = [t.clone().requires_grad_(True) for t in taps(golden)]
    out = ex(xs)
    assert len(calls) == 2, "each swapped pooler must go through the fused op"
    assert max_rel(out, golden["sfae.pooled"]) < TOL["fp32_forward"]
    out.square().sum().backward()
    for x, r in zip(xs, reference):
        assert max_rel(x.grad, r.grad) < TOL["fp32_grad"]
    for n, g in ref_grads.items():
        assert max_rel(dict(ex.named_parameters())[n].grad, g) < TOL["fp32_grad"], n


def test_apply_fused_pooling_leaves_unknown_structures():
    class WithExtra(ForeignPooler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.temperature = nn.Parameter(torch.ones(()))

    class SlotMerge(ForeignPooler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.query_merge_projector = nn.Linear(4, 4)

    tree = nn.ModuleDict({"extra": WithExtra(32, 2, 4), "slots": SlotMerge(32, 2, 4), "plain": ForeignPooler(32, 2, 4)})
    assert not is_learned_query_pooler(tree["slots"]) and is_learned_query_pooler(tree["extra"])
    assert apply_fused_pooling(tree) == ["plain"]
    assert type(tree["extra"]) is WithExtra and type(tree["slots"]) is SlotMerge
    with pytest.raises(TypeError, match="model"):
        apply_fused_pooling("not a module")
