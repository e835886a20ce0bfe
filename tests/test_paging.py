"""Paged KV layouts (attngen.paging): page tables over the flattened order, pages owned by
nodes, the slot of every token, and the errors for tables and pages that do not fit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from attngen.errors import PlanError
from attngen.paging import (
    MAX_CACHE_SLOTS,
    make_node_pages,
    make_page_table,
    node_page_slots,
    physical_slots,
    table_paged_cache,
    validate_page_table,
)
from attngen.tree import TreeBatch


def loose(value: object) -> Any:
    """``value`` with its type hidden from mypy, for inputs of the wrong type on purpose."""
    return value


def _tree() -> TreeBatch:
    # 0 -> {1 -> {3}, 2}; preorder 0, 1, 3, 2; 3, 2, 4 and 1 tokens
    return TreeBatch.from_parents([-1, 0, 0, 1], [3, 2, 4, 1])


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
        (lambda: validate_page_table([0, 9], 8, 4, cache_slots=16), "outside the cache"),
        (lambda: validate_page_table([0], 8, 4, cache_slots=16), "need 2"),
        (lambda: validate_page_table(loose([0, 1.5]), 8, 4, cache_slots=16), "page table: entry 1 is 1.5"),
        (lambda: node_page_slots(_tree(), [[0], [1], [2]], 4), "node_pages has 3 entries but the tree has 4"),
        (lambda: node_page_slots(_tree(), [[0], [1], [2], [3]], 2), r"node_pages\[0\] has 1 page\(s\) but node 0 holds 3 tokens"),
        (lambda: node_page_slots(_tree(), [[0], [1], [2], [0]], 4), "nodes 0 and 3 both hold page 0"),
        (lambda: node_page_slots(_tree(), [[0], [1], [8], [3]], 4, cache_pages=8),
         r"node_pages\[2\] holds page 8; allowed pages are 0..7"),
        (lambda: node_page_slots(_tree(), [[0], [1], [-2], [3]], 4), "holds page -2"),
        (lambda: node_page_slots(_tree(), loose([[0], [1.5], [2], [3]]), 4), r"node_pages\[1\]: entry 0 is 1.5"),
        (lambda: node_page_slots(_tree(), [[0], [1], [2], [3]], 0), "page_size must be >= 1"),
        (lambda: make_page_table(2**40, 16), r"page table: n_kv 1099511627776 is out of range \(allowed: 0\.\.2147483647"),
        (lambda: make_page_table(10, 4, cache_pages=2**40, seed=0),
         r"page table: cache_pages 1099511627776 is out of range \(allowed: 0\.\.536870912"),
        (lambda: make_page_table(10, 0), r"page table: page_size 0 is out of range \(allowed: 1\.\.2147483648"),
        (lambda: make_node_pages(_tree(), 4, spare_pages=2**40, seed=0),
         r"node pages: spare_pages 1099511627776 is out of range \(allowed: 0\.\.536870912"),
        (lambda: physical_slots(np.zeros(1, np.int32), 2**40, 16), r"physical slots: n_kv 1099511627776 is out of range"),
    ],
)
def test_tables_and_pages_that_do_not_fit_raise_plan_error(build: Callable[[], object], message: str) -> None:
    """A page table or node pages that point outside the cache, share a page, hold too
    few pages, or are sized past the int32 slots: a PlanError naming what and where,
    before anything is built from them."""
    with pytest.raises(PlanError, match=message):
        build()


def test_node_page_slots_keep_every_slot_in_int32() -> None:
    """Pages of a size that does not divide 2**31: the last page whose slots all fit int32
    is the highest allowed (the bound was one page higher, whose last slot is 2**31)."""
    tree = TreeBatch.from_parents([-1], [3])
    top = MAX_CACHE_SLOTS // 3  # 715827882 pages of 3 slots
    assert node_page_slots(tree, [[top - 1]], 3).tolist() == [2147483643, 2147483644, 2147483645]
    with pytest.raises(PlanError, match=rf"node_pages\[0\] holds page {top}; allowed pages are 0..{top - 1}"):
        node_page_slots(tree, [[top]], 3)
