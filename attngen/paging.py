"""Paged KV caches for the tree kernels: page tables, node-owned pages, and the slot of
each flattened token.

A paged module reads flattened token ``L`` from cache slot
``page_table[L // page_size] * page_size + L % page_size``, or from ``slots[L]``. A page
table over the flattened order suits a cache packed in that order. A serving cache whose
pages belong to nodes (a node's token ``t`` in page ``node_pages[n][t // page_size]``)
never moves data as the tree grows, and is read through slots (:func:`node_page_slots`).
Every invalid input raises :class:`~attngen.errors.PlanError` before anything is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attngen.errors import PlanError, plan_int
from attngen.tree import MAX_KV_TOKENS, TreeBatch, checked_ints

#: Slots a paged cache may have: page tables and slots are int32, and stage 1 forms a
#: slot, page * page_size + offset, in int32 before widening it (``_tree_slots``).
MAX_CACHE_SLOTS = 2**31


def _bounded(value: object, what: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``lo..hi``; PlanError naming ``what`` otherwise, before a
    size reaches an allocation (an arange, a permutation) or an int32 table."""
    count = plan_int(value, what)
    if not lo <= count <= hi:
        raise PlanError(
            f"{what} {count} is out of range (allowed: {lo}..{hi}; a paged cache holds at most "
            f"{MAX_CACHE_SLOTS} slots, as its int32 slots address, and a batch {MAX_KV_TOKENS} tokens)."
        )
    return count


def pages_needed(n_kv: int, page_size: int) -> int:
    """Logical pages that hold ``n_kv`` tokens."""
    return -(-n_kv // page_size)


def make_page_table(
    n_kv: int, page_size: int, *, cache_pages: int | None = None, seed: int | None = None
) -> np.ndarray:
    """An int32 page table for ``n_kv`` tokens: identity, or (with ``seed``) distinct pages
    drawn at random from a cache of ``cache_pages`` pages (default: just enough)."""
    n_kv = _bounded(n_kv, "page table: n_kv", 0, MAX_KV_TOKENS)
    page_size = _bounded(page_size, "page table: page_size", 1, MAX_CACHE_SLOTS)
    needed = pages_needed(n_kv, page_size)
    top = MAX_CACHE_SLOTS // page_size
    cache_pages = needed if cache_pages is None else _bounded(cache_pages, "page table: cache_pages", 0, top)
    if cache_pages < needed:
        raise PlanError(f"page table: {needed} pages needed but the cache has {cache_pages}.")
    if seed is None:
        return np.arange(needed, dtype=np.int32)
    rng = np.random.default_rng(seed)
    return rng.permutation(cache_pages)[:needed].astype(np.int32)


def make_node_pages(
    tree: TreeBatch, page_size: int, *, spare_pages: int = 0, seed: int | None = None
) -> tuple[list[np.ndarray], int]:
    """Pages that each node of ``tree`` owns, as a serving cache holds them: the pages its
    tokens fill and, with ``seed``, at random one more to grow into, all drawn at random
    (without ``seed``: in node order, none spare). Returns them by node id, for
    :func:`node_page_slots`, and the cache's page count, ``spare_pages`` more than the
    nodes hold."""
    page_size = _bounded(page_size, "node pages: page_size", 1, MAX_CACHE_SLOTS)
    # the most a cache may need: every node's pages, one more each, and the spares
    spare_pages = _bounded(spare_pages, "node pages: spare_pages", 0, MAX_CACHE_SLOTS // page_size)
    own = -(-tree.tokens // page_size)
    if seed is None:
        return np.split(np.arange(int(own.sum())), np.cumsum(own)[:-1]), int(own.sum()) + spare_pages
    rng = np.random.default_rng(seed)
    own = own + rng.integers(0, 2, size=tree.n_nodes)
    held = int(own.sum())
    return np.split(rng.permutation(held + spare_pages)[:held], np.cumsum(own)[:-1]), held + spare_pages


def validate_page_table(
    page_table: np.ndarray | Sequence[int], n_kv: int, page_size: int, cache_slots: int
) -> None:
    """PlanError unless ``page_table`` maps all ``n_kv`` tokens to distinct slots inside a
    cache of ``cache_slots`` token slots."""
    table = checked_ints(page_table, "page table")
    needed, cache_pages = pages_needed(n_kv, page_size), cache_slots // page_size
    if table.size < needed:
        raise PlanError(
            f"page table has {table.size} entries but {n_kv} tokens with page size {page_size} "
            f"need {needed}."
        )
    used = table[:needed]
    bad = np.flatnonzero((used < 0) | (used >= cache_pages))
    if bad.size:
        raise PlanError(
            f"page table points outside the cache: logical page {int(bad[0])} -> physical page "
            f"{int(used[bad[0]])}, but the cache holds {cache_pages} pages of {page_size} tokens "
            f"({cache_slots} slots); allowed pages are 0..{cache_pages - 1}."
        )
    if np.unique(used).size != used.size:
        raise PlanError("page table maps two logical pages to the same physical page.")


def physical_slots(page_table: np.ndarray, n_kv: int, page_size: int) -> np.ndarray:
    """Physical cache slot of every logical flattened token."""
    logical = np.arange(_bounded(n_kv, "physical slots: n_kv", 0, MAX_KV_TOKENS), dtype=np.int64)
    return (
        np.asarray(page_table, dtype=np.int64)[logical // page_size] * page_size
        + logical % page_size
    )


def paged_copy(x: Any, slots: Any, cache_pages: int, page_size: int, *, fill: float = 0.0) -> Any:
    """``x`` (a torch tensor ``[n_kv, ...]`` in flattened order) laid out in a paged cache
    ``[cache_pages, page_size, ...]``: token ``L`` in slot ``slots[L]`` (from
    :func:`physical_slots` or :func:`node_page_slots`), every other slot ``fill``."""
    import torch

    cache = torch.full((cache_pages * page_size, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    cache[torch.as_tensor(slots, device=x.device).long()] = x
    return cache.view(cache_pages, page_size, *x.shape[1:])


def node_page_slots(
    tree: TreeBatch,
    node_pages: Sequence[Sequence[int] | np.ndarray] | Mapping[int, Sequence[int] | np.ndarray],
    page_size: int,
    *,
    cache_pages: int | None = None,
) -> np.ndarray:
    """int32 ``[n_kv]``: the cache slot of every flattened token of ``tree`` when each node
    owns its pages: token ``t`` of node ``n`` lives in slot
    ``node_pages[n][t // page_size] * page_size + t % page_size``. Pass it as a paged
    module's ``slots``. ``node_pages`` is indexed by node id (a mapping may leave out
    nodes without tokens); a node may hold more pages than its tokens fill (room to grow).
    PlanError when a node has too few pages, two nodes share a page, or (with
    ``cache_pages``) a page lies outside the cache.

    >>> tb = TreeBatch.from_parents([-1, 0, 0], [5, 2, 3])
    >>> node_page_slots(tb, [[7, 2], [0], [4]], 4).tolist()
    [28, 29, 30, 31, 8, 0, 1, 16, 17, 18]
    """
    size = plan_int(page_size, "page_size")
    if size < 1:
        raise PlanError(f"page_size must be >= 1, got {size}.")
    if isinstance(node_pages, Mapping):
        lists = [node_pages.get(n, ()) for n in range(tree.n_nodes)]
    elif len(node_pages) == tree.n_nodes:
        lists = list(node_pages)
    else:
        raise PlanError(f"node_pages has {len(node_pages)} entries but the tree has {tree.n_nodes} nodes.")
    needed = (-(-tree.tokens // size)).tolist()
    used = []  # each node's pages that its tokens fill, by node id
    for n, (pages, need) in enumerate(zip(lists, needed, strict=True)):
        have = checked_ints(pages, f"node_pages[{n}]")
        if have.size < need:
            raise PlanError(
                f"node_pages[{n}] has {have.size} page(s) but node {n} holds {int(tree.tokens[n])} tokens, "
                f"which need {need} pages of {size}."
            )
        used.append(have[:need])
    flat = np.concatenate([np.zeros(0, np.int64), *used])
    owner = np.repeat(np.arange(tree.n_nodes), needed)
    # every slot page * size + offset must fit int32: MAX_CACHE_SLOTS // size pages
    top = MAX_CACHE_SLOTS // size if cache_pages is None else cache_pages
    bad = np.flatnonzero((flat < 0) | (flat >= top))
    if bad.size:
        raise PlanError(f"node_pages[{int(owner[bad[0]])}] holds page {int(flat[bad[0]])}; "
                        f"allowed pages are 0..{top - 1}.")
    values, counts = np.unique(flat, return_counts=True)
    if (counts > 1).any():
        page = int(values[counts > 1][0])
        a, b = owner[flat == page][:2].tolist()
        holders = f"nodes {a} and {b} both hold" if a != b else f"node {a} holds twice"
        raise PlanError(f"node_pages: {holders} page {page}; a page holds the tokens of one node.")
    # flattened token L is token t of node n: entry t // size of n's pages
    base = np.concatenate(([0], np.cumsum(needed)))[:-1]
    node = np.asarray(tree.token_node)
    offset = np.arange(tree.n_kv) - tree.node_kv_start[node]
    return (flat[base[node] + offset // size] * size + offset % size).astype(np.int32)


def node_paged_cache(
    tree: TreeBatch, k: Any, v: Any, page_size: int, *, spare_pages: int = 0, seed: int = 0, fill: float = 0.0
) -> tuple[Any, Any, Any]:
    """``k`` and ``v`` (torch, ``[n_kv, ...]`` in flattened order) in paged caches whose
    pages belong to the nodes, drawn at random with room to grow (:func:`make_node_pages`),
    every other slot ``fill``; and the int32 slots to read them by, on ``k``'s device."""
    import torch

    node_pages, cache_pages = make_node_pages(tree, page_size, spare_pages=spare_pages, seed=seed)
    slots = node_page_slots(tree, node_pages, page_size)
    return (paged_copy(k, slots, cache_pages, page_size, fill=fill),
            paged_copy(v, slots, cache_pages, page_size, fill=fill), torch.from_numpy(slots).to(k.device))


def table_paged_cache(
    k: Any, v: Any, page_size: int, *, spare_pages: int = 0, seed: int | None = None, fill: float = 0.0
) -> tuple[Any, Any, Any]:
    """``k`` and ``v`` (torch, ``[n_kv, ...]`` in flattened order) in paged caches read
    through a page table over the flattened order (:func:`make_page_table`: pages in
    order, or with ``seed`` shuffled), every other slot ``fill``; and the int32 table, on
    ``k``'s device."""
    import torch

    n_kv = k.shape[0]
    cache_pages = pages_needed(n_kv, page_size) + spare_pages
    table = make_page_table(n_kv, page_size, cache_pages=cache_pages, seed=seed)
    where = physical_slots(table, n_kv, page_size)
    return (paged_copy(k, where, cache_pages, page_size, fill=fill),
            paged_copy(v, where, cache_pages, page_size, fill=fill), torch.from_numpy(table).to(k.device))
