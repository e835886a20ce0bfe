"""TreeBatch: construction, flattened order, visibility, mutations, paged layout, errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import networkx as nx
import numpy as np
import pytest

from attngen.errors import PlanError
from attngen.tree import (
    MAX_CACHE_SLOTS,
    MAX_KV_TOKENS,
    TreeBatch,
    make_node_pages,
    make_page_table,
    node_page_slots,
    physical_slots,
    table_paged_cache,
    validate_page_table,
)


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


def test_paged_layout() -> None:
    table = make_page_table(10, 4, cache_pages=8, seed=1)
    validate_page_table(table, 10, 4, cache_slots=32)
    slots = physical_slots(table, 10, 4)
    assert len(set(slots.tolist())) == 10
    assert slots[5] == table[1] * 4 + 1


def test_node_page_slots_read_each_node_from_its_own_pages() -> None:
    tree = TreeBatch.from_parents([-1, 0, 0, 1], [6, 0, 3, 5])  # preorder 0, 1, 3, 2
    pages = {0: [9, 2], 2: [4, 7], 3: [0, 5]}  # node 2 has a page to grow into
    slots = node_page_slots(tree, pages, 4, cache_pages=10)
    expected = [36, 37, 38, 39, 8, 9, 0, 1, 2, 3, 20, 16, 17, 18]  # nodes 0, 1 (none), 3, 2
    assert slots.dtype == np.int32 and slots.tolist() == expected
    assert node_page_slots(tree, [[9, 2], [], [4, 7], [0, 5]], 4).tolist() == expected
    in_order, cache = make_node_pages(tree, 4, spare_pages=1)
    assert [p.tolist() for p in in_order] == [[0, 1], [], [2], [3, 4]] and cache == 6
    drawn, cache = make_node_pages(tree, 4, spare_pages=2, seed=3)
    held = np.concatenate(drawn)
    assert all(len(p) >= n for p, n in zip(drawn, [2, 0, 1, 2], strict=True))
    assert np.unique(held).size == held.size and cache == held.size + 2 and held.max() < cache
    assert node_page_slots(tree, drawn, 4, cache_pages=cache).size == tree.n_kv
    grown = tree.append_tokens({2: 2})  # node 2 fills its first page, then its second
    assert node_page_slots(grown, pages, 4).tolist() == [*expected, 19, 28]  # nothing else moves


def test_table_paged_cache_holds_the_flattened_kv_behind_its_table() -> None:
    import torch

    k, v = torch.randn(13, 2, 8), torch.randn(13, 2, 4)
    k_cache, v_cache, table = table_paged_cache(k, v, 4, spare_pages=2, seed=5, fill=float("nan"))
    assert k_cache.shape == (6, 4, 2, 8) and v_cache.shape == (6, 4, 2, 4) and table.dtype == torch.int32
    where = torch.from_numpy(physical_slots(table.numpy(), 13, 4))
    assert torch.equal(k_cache.flatten(0, 1)[where], k) and torch.equal(v_cache.flatten(0, 1)[where], v)
    assert int(k_cache.isnan().flatten(0, 1).all(-1).all(-1).sum()) == 6 * 4 - 13  # every other slot
    in_order, _, identity = table_paged_cache(k, v, 4)
    assert identity.tolist() == [0, 1, 2, 3] and torch.equal(in_order.flatten(0, 1)[:13], k)


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
        (lambda: validate_page_table([0, 9], 8, 4, cache_slots=16), "outside the cache"),
        (lambda: validate_page_table([0], 8, 4, cache_slots=16), "need 2"),
        (lambda: validate_page_table(loose([0, 1.5]), 8, 4, cache_slots=16), "page table: entry 1 is 1.5"),
        (lambda: _example().prune(9), "does not exist"),
        (lambda: node_page_slots(_example(), [[0], [1], [2]], 4), "node_pages has 3 entries but the tree has 4"),
        (lambda: node_page_slots(_example(), [[0], [1], [2], [3]], 2), r"node_pages\[0\] has 1 page\(s\) but node 0 holds 3 tokens"),
        (lambda: node_page_slots(_example(), [[0], [1], [2], [0]], 4), "nodes 0 and 3 both hold page 0"),
        (lambda: node_page_slots(_example(), [[0], [1], [8], [3]], 4, cache_pages=8),
         r"node_pages\[2\] holds page 8; allowed pages are 0..7"),
        (lambda: node_page_slots(_example(), [[0], [1], [-2], [3]], 4), "holds page -2"),
        (lambda: node_page_slots(_example(), loose([[0], [1.5], [2], [3]]), 4), r"node_pages\[1\]: entry 0 is 1.5"),
        (lambda: node_page_slots(_example(), [[0], [1], [2], [3]], 0), "page_size must be >= 1"),
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
        (lambda: make_page_table(2**40, 16), r"page table: n_kv 1099511627776 is out of range \(allowed: 0\.\.2147483647"),
        (lambda: make_page_table(10, 4, cache_pages=2**40, seed=0),
         r"page table: cache_pages 1099511627776 is out of range \(allowed: 0\.\.536870912"),
        (lambda: make_page_table(10, 0), r"page table: page_size 0 is out of range \(allowed: 1\.\.2147483648"),
        (lambda: make_node_pages(_example(), 4, spare_pages=2**40, seed=0),
         r"node pages: spare_pages 1099511627776 is out of range \(allowed: 0\.\.536870912"),
        (lambda: physical_slots(np.zeros(1, np.int32), 2**40, 16), r"physical slots: n_kv 1099511627776 is out of range"),
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


def test_node_page_slots_keep_every_slot_in_int32() -> None:
    """Pages of a size that does not divide 2**31: the last page whose slots all fit int32
    is the highest allowed (the bound was one page higher, whose last slot is 2**31)."""
    tree = TreeBatch.from_parents([-1], [3])
    top = MAX_CACHE_SLOTS // 3  # 715827882 pages of 3 slots
    assert node_page_slots(tree, [[top - 1]], 3).tolist() == [2147483643, 2147483644, 2147483645]
    with pytest.raises(PlanError, match=rf"node_pages\[0\] holds page {top}; allowed pages are 0..{top - 1}"):
        node_page_slots(tree, [[top]], 3)
