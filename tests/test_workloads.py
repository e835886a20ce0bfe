"""Named workloads have the documented shapes and plan cleanly."""

from __future__ import annotations

import numpy as np
import pytest

from attngen.cost import HeadLayout
from attngen.errors import PlanError
from attngen.plan import plan_tree
from attngen.workloads import (
    REFERENCE_SHAPES,
    WORKLOADS,
    fewshot,
    per_branch_kv_tokens,
    speculative,
    unique_kv_tokens,
)

# name -> (tree tokens beyond the prompt, queries, unique KV tokens, query mode)
EXPECTED = {
    "fewshot_4k_x20": (20 * 400, 20, 4000 + 20 * 400, "node"),
    "fewshot_32k_x64": (64 * 256, 64, 32000 + 64 * 256, "node"),
    "tot_d3_w3": (39 * 300, 27, 1000 + 39 * 300, "node"),
    "spec_4k_92": (92, 92, 4092, "token"),
    "spec_16k_184": (184, 184, 16184, "token"),
}


@pytest.mark.parametrize("name", REFERENCE_SHAPES)
def test_reference_shapes(name: str) -> None:
    tree_tokens, queries, unique, mode = EXPECTED[name]
    w = WORKLOADS[name]()
    assert w.name == name
    assert w.tree.n_kv - int(w.tree.tokens[0]) == tree_tokens
    assert w.tree.n_queries == queries and w.tree.query_mode == mode
    assert unique_kv_tokens(w) == unique
    assert w.tree.n_trees == 1


def test_per_branch_tokens() -> None:
    assert per_branch_kv_tokens(WORKLOADS["fewshot_4k_x20"]()) == 20 * 4400
    # speculative: token at depth d (1-based) sees the prefix and d tree tokens
    widths, level, total = (4, 2, 2, 2, 1), 1, 0
    for depth, width in enumerate(widths, 1):
        level *= width
        total += level * (4000 + depth)
    assert per_branch_kv_tokens(WORKLOADS["spec_4k_92"]()) == total


def test_tot_queries_are_the_leaves() -> None:
    tree = WORKLOADS["tot_d3_w3"]().tree
    assert tree.query_nodes.tolist() == tree.leaves.tolist()
    assert set(tree.query_visible_counts.tolist()) == {1000 + 3 * 300}


def test_shared_prefix_is_deterministic() -> None:
    a, b = WORKLOADS["shared_prefix_32k_x64"](), WORKLOADS["shared_prefix_32k_x64"]()
    assert a.tree.tokens.tolist() == b.tree.tokens.tolist()
    assert a.tree.n_queries == 64 and a.tree.tokens[0] == 32000


def test_seeded_fewshot_lengths() -> None:
    w = fewshot(100, 8, 50, seed=3)
    assert w.tree.tokens.tolist() == fewshot(100, 8, 50, seed=3).tree.tokens.tolist()
    assert all(1 <= t <= 50 for t in w.tree.tokens[1:].tolist())


def test_bad_workload_parameters() -> None:
    with pytest.raises(PlanError, match="widths"):
        speculative(100, (2, 0))
    with pytest.raises(PlanError, match=r"budget 61 exceeds the 60 tokens that widths \[4, 2, 2, 2\] grow"):
        speculative(100, (4, 2, 2, 2), budget=61)
    with pytest.raises(PlanError, match="budget must be >= 1"):
        speculative(100, (4, 2), budget=0)


@pytest.mark.parametrize(("name", "prefix", "size"), [
    ("spec_1k_32", 1000, 32), ("spec_4k_64", 4000, 64), ("spec_8k_128", 8000, 128), ("spec_16k_256", 16000, 256),
])
def test_deft_token_tree_sizes(name: str, prefix: int, size: int) -> None:
    """DeFT's token-tree sizes exactly: the first ``size`` tokens of the width pattern in
    breadth-first order, each a query that sees the prefix and its root path."""
    tree = WORKLOADS[name]().tree
    assert (tree.n_queries, tree.n_kv, tree.query_mode, int(tree.tokens[0])) == (size, prefix + size, "token", prefix)
    depth = np.zeros(tree.n_nodes, dtype=np.int64)
    for node in range(1, tree.n_nodes):
        depth[node] = depth[tree.parent[node]] + 1
    assert (np.diff(depth) >= 0).all() and (tree.parent[1:] < np.arange(1, tree.n_nodes)).all()  # breadth-first
    assert sorted(tree.query_visible_counts.tolist()) == sorted((prefix + depth[1:]).tolist())
    full = speculative(prefix, (8, 2, 2, 2, 2, 2) if size == 256 else (4, 2, 2, 2, 2, 2)).tree
    assert tree.parent.tolist() == full.parent[: size + 1].tolist()


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_plans(name: str) -> None:
    plan = plan_tree(WORKLOADS[name]().tree, heads=HeadLayout(heads_q=32, heads_kv=8))
    assert plan.n_groups > 0
    assert plan.cost.io_saved > 0.5
