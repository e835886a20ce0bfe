"""TreeBatch: construction, flattened order, visibility, mutations, paged layout, errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import networkx as nx
import numpy as np
import pytest

from attngen.errors import PlanError
from attngen.tree import MAX_KV_TOKENS, TreeBatch


def loose(value: object) -> Any:
    """``value`` with its type hidden from mypy, for inputs of the wrong type on purpose."""
    return value


def _example() -> TreeBatch:
    # 0 -> {1 -> {3}, 2}; preorder 0, 1, 3, 2
    return TreeBatch.from_parents([-1, 0, 0, 1], [3, 2, 4, 1])


def test_flattened_order_is_preorder_with_children_by_id() -> None:
    tb = _example()
    assert tb.order.tolist() == [0, 1, 3, 2]
    assert tb.node_kv_start.tolist() == [0, 3, 6, 5]
    assert tb.node_tokens.tolist() == [3, 2, 4, 1]
    assert tb.n_kv == 10
    assert tb.token_node.tolist() == [0, 0, 0, 1, 1, 3, 2, 2, 2, 2]
    assert tb.kv_pos.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6]


def test_node_queries_see_their_root_path() -> None:
    tb = _example()  # default queries: the leaves 2, 3
    assert tb.query_nodes.tolist() == [2, 3]
    assert tb.q_pos.tolist() == [6, 5]
    assert tb.query_visible_tokens(0).tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert tb.query_visible_tokens(1).tolist() == [0, 1, 2, 3, 4, 5]


def test_token_queries_see_their_prefix_of_the_node() -> None:
    tb = TreeBatch.from_parents([-1, 0], [2, 3], [1], mode="token")
    assert tb.n_queries == 3
    assert tb.q_pos.tolist() == [2, 3, 4]
    assert tb.query_visible_tokens(0).tolist() == [0, 1, 2]
    assert tb.query_visible_tokens(2).tolist() == [0, 1, 2, 3, 4]


def test_visible_matrix_matches_per_query_lists() -> None:
    tb = TreeBatch.from_parents(
        [-1, 0, 0, 1, -1, 4], [3, 2, 0, 1, 2, 2], [0, 2, 3, 5], mode="token"
    )
    vis = tb.visible_matrix()
    for i in range(tb.n_queries):
        assert np.flatnonzero(vis[i]).tolist() == tb.query_visible_tokens(i).tolist()


def test_from_networkx_matches_parent_array() -> None:
    g = nx.DiGraph()
    for n, t in enumerate([3, 2, 4, 1]):
        g.add_node(n, tokens=t)
    g.add_edges_from([(0, 1), (0, 2), (1, 3)])
    tb = TreeBatch.from_networkx(g)
    assert tb.parent.tolist() == [-1, 0, 0, 1]
    assert nx.utils.graphs_equal(tb.to_networkx(), g)


def test_forest_and_concat() -> None:
    a, b = _example(), TreeBatch.from_parents([-1, 0], [5, 1])
    forest = TreeBatch.concat([a, b])
    assert forest.n_trees == 2 and forest.n_kv == 16
    assert forest.q_tree.tolist() == [0, 0, 1]
    assert forest.node_kv_start[4] == 10


def test_mutations() -> None:
    tb = _example()
    grown = tb.append_to_leaves(1)
    assert grown.tokens.tolist() == [3, 2, 5, 2]
    assert tb.tokens.tolist() == [3, 2, 4, 1]  # immutable
    branched = tb.add_branch(1, 7)
    assert branched.parent.tolist() == [-1, 0, 0, 1, 1]
    assert branched.query_nodes.tolist() == [2, 3, 4]
    pruned, remap = tb.prune(1)
    assert remap.tolist() == [0, -1, 1, -1]
    assert pruned.parent.tolist() == [-1, 0] and pruned.query_nodes.tolist() == [1]
    assert tb.append_tokens({0: 2}).q_pos.tolist() == [8, 7]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TreeBatch.from_parents([1, 2, 0], [1, 1, 1]), "cycle"),
        (lambda: TreeBatch.from_parents([-1, 0, 2], [1, 1, 1]), "cycle: 2 -> 2"),
        (lambda: TreeBatch.from_parents([-1, 5], [1, 1]), "not a node"),
        (lambda: TreeBatch.from_parents([-1, -1], [1, 1], expect_single_tree=True), "forest"),
        (lambda: TreeBatch.from_parents([-1, 0], [1, -3]), "negative"),
        (lambda: TreeBatch.from_parents([-1, 0], [1, 2], [7]), "does not exist"),
        (lambda: TreeBatch.from_parents([-1, 0], [1, 2], [1, 1]), "more than once"),
        (lambda: TreeBatch.from_parents([-1, 0], [1, 2], kv_len=4), "disagree|KV has 4"),
        (lambda: TreeBatch.from_parents([-1, 0], [1, 2, 3]), "one count per node"),
        (lambda: _example().prune(9), "does not exist"),
        (lambda: _example().query_visible_tokens(5), "does not exist"),
        # what a plain int64 cast would take silently: 3.5 as 3, "3" as 3, a nested list
        # (loose(): the wrong types are the point)
        (lambda: TreeBatch.from_parents([-1, 0], loose([3.5, 2])), r"token counts: entry 0 is 3\.5"),
        (lambda: TreeBatch.from_parents([-1, 0], loose(["3", 2])), "token counts: entry 0 is '3'"),
        (lambda: TreeBatch.from_parents([-1, 0], loose([float("nan"), 2])), "entry 0 is nan"),
        (lambda: TreeBatch.from_parents(loose([[-1, 0]]), [1, 2]), r"parent array: .* shape \(1, 2\)"),
        (lambda: TreeBatch.from_parents(loose([-1, [0, 1]]), [1, 2]), "parent array: expected a flat"),
        (lambda: TreeBatch.from_parents([-1, 0], [1, 2], loose([True])), "queries: entry 0 is True"),
        (lambda: _example().append_tokens(loose({1: 0.5})), "append_tokens counts: entry 0 is 0.5"),
        (lambda: _example().append_tokens(loose([0, 0, 0, 1.5])), "append_tokens counts: entry 3"),
        (lambda: _example().append_tokens(loose({"a": 1})), "append_tokens: a node id must be an int, got 'a'"),
        (lambda: _example().prune(loose([1])), r"prune: a node id must be an int, got \[1\]"),
    ],
)
def test_bad_input_raises_plan_error(build: Callable[[], object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        build()


def test_integer_like_inputs_are_taken() -> None:
    """Other integer dtypes and integral floats (a count computed in float, a float
    tensor's values) mean what they say."""
    for parent, tokens in [
        ([-1, 0], [3.0, 2.0]),
        (np.array([-1, 0], dtype=np.int32), np.array([3, 2], dtype=np.uint8)),
        ((-1, np.int64(0)), (np.float32(3), 2)),
    ]:
        tree = TreeBatch.from_parents(loose(parent), loose(tokens))
        assert tree.parent.tolist() == [-1, 0] and tree.tokens.tolist() == [3, 2]
    assert _example().prune(loose(np.int64(3)))[0].n_nodes == 3


def test_networkx_two_parents_is_an_error() -> None:
    g = nx.DiGraph()
    g.add_nodes_from([(0, {"tokens": 1}), (1, {"tokens": 1}), (2, {"tokens": 1})])
    g.add_edges_from([(0, 2), (1, 2)])
    with pytest.raises(PlanError, match="2 parents"):
        TreeBatch.from_networkx(g)


def test_networkx_fractional_tokens_is_an_error() -> None:
    g = nx.DiGraph()
    g.add_nodes_from([("root", {"tokens": 4}), ("leaf", {"tokens": 2.5})])
    g.add_edge("root", "leaf")
    with pytest.raises(PlanError, match=r"node 'leaf' has tokens 2\.5"):
        TreeBatch.from_networkx(g)


# ---- size limits: what the tree kernels address (int32 KV offsets) ---------------------

TOO_BIG = 2**31  # MAX_KV_TOKENS + 1
ALLOWED = r"\(allowed: 0\.\.2147483647 per node, 2147483647 in all"


def _near_full() -> TreeBatch:
    """A root and a leaf one token short of the limit, built from counts alone (a batch
    allocates nothing per token until a plan or a per-token view asks)."""
    return TreeBatch.from_parents([-1, 0], [MAX_KV_TOKENS - 2, 1])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        # a node past the limit: the numpy out-of-memory error in the planner's chunking
        (lambda: TreeBatch.from_parents([-1, 0], [3, 3_000_000_000_000]),
         rf"token counts: node 1 has 3000000000000 tokens, .* {ALLOWED}"),
        (lambda: TreeBatch.from_parents([-1, 0], [MAX_KV_TOKENS, 1]),
         rf"token counts: the batch holds 2147483648 tokens in all, .* {ALLOWED}"),
        # four 2**62-token nodes add up to 2**64, which int64 wraps to 0
        (lambda: TreeBatch.from_parents([-1, 0, 0, 0], [2**62] * 4), rf"node 0 has {2**62} tokens, .* {ALLOWED}"),
        # past int64: numpy keeps a Python int as an object, a uint64 wraps negative
        (lambda: TreeBatch.from_parents([-1, 0], [3, 3 * 10**20]),
         r"token counts: entry 1 is 300000000000000000000; expected an integer in 0\.\.2147483647"),
        (lambda: TreeBatch.from_parents([-1], np.array([2**63], dtype=np.uint64)),
         "token counts: entry 0 is 9223372036854775808; expected an integer in"),
        (lambda: TreeBatch.from_parents([-1], loose([3e20])), r"token counts: entry 0 is 3e\+20; expected an integer"),
        (lambda: TreeBatch.from_parents([-1, 0], loose([3, None])), "token counts: entry 1 is None; expected an integer"),
        (lambda: _near_full().append_tokens([0, 2]),
         rf"append_tokens: the batch would hold 2147483648 tokens \(2147483646 held, 2 appended\), .* {ALLOWED}"),
        (lambda: _near_full().append_tokens({1: 2**63 - 1}),
         rf"append_tokens: {2**63 - 1} tokens appended to node 1, .* {ALLOWED}"),
        (lambda: _near_full().append_to_leaves(2), "append_tokens: the batch would hold 2147483648 tokens"),
        (lambda: _example().append_to_leaves(10**30), rf"append_to_leaves: count {10**30} is out of range {ALLOWED}"),
        (lambda: _example().append_to_leaves(-1), rf"append_to_leaves: count -1 is out of range {ALLOWED}"),
        (lambda: _example().append_to_leaves(loose(1.5)), "append_to_leaves: count must be an int, got 1.5"),
        (lambda: _near_full().add_branch(0, 2), "token counts: the batch holds 2147483648 tokens in all"),
        (lambda: TreeBatch.concat([_near_full(), _example()]), "token counts: the batch holds 2147483656 tokens in all"),
    ],
)
def test_sizes_past_the_kernels_offsets_raise_plan_error(build: Callable[[], object], message: str) -> None:
    """Every count a batch holds, or an append adds, is refused past MAX_KV_TOKENS before
    anything is sized by it: a PlanError naming the argument, the value and the allowed
    range, never a MemoryError, an OverflowError or a count wrapped negative."""
    with pytest.raises(PlanError, match=message):
        build()


def test_sizes_at_the_limit_are_taken() -> None:
    tree = _near_full().append_tokens([0, 1])
    assert tree.n_kv == MAX_KV_TOKENS and tree.node_depth_start.tolist() == [0, MAX_KV_TOKENS - 2]
    assert TreeBatch.from_parents([-1], [MAX_KV_TOKENS]).n_kv == MAX_KV_TOKENS
    assert TreeBatch.from_parents([-1], np.array([7], dtype=np.uint64)).tokens.tolist() == [7]
    g = nx.DiGraph()
    g.add_node("root", tokens=10**20)
    with pytest.raises(PlanError, match=r"node 'root' has tokens 100000000000000000000; .* \(allowed: 0\.\."):
        TreeBatch.from_networkx(g)
