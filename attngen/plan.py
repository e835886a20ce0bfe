"""KV-guided tree planning (DeFT-style, with tree split) for the tree kernels.

The planner flattens a :class:`~attngen.tree.TreeBatch`'s KV (preorder, node tokens
contiguous), cuts it into chunks, pairs each chunk with every query that sees any of its
tokens and splits each chunk's queries into groups of at most ``queries_per_group``.
Stage 1 of the kernel computes one partial (O, LSE) per (group, query slot); stage 2
merges each query's partials by log-sum-exp in plan order: stage 1 writes partial
``(g, s)`` at row ``merge_row[g, s]``, and query ``i``'s partials are rows
``merge_ptr[i]`` to ``merge_ptr[i + 1]``, ascending group.

**Chunking rule** (node-aware packing). Nodes are visited in preorder. A node that fits
entirely in the open chunk joins it; otherwise it starts a fresh chunk and is cut into
``ceil(tokens / chunk)`` pieces, the last of which stays open. So a node is split over
the fewest chunks possible, small nodes (speculative token trees, short thoughts) share
chunks, and a chunk spans nodes only when they fit whole — which keeps every chunk's
query set close to the queries that need all of it. Empty nodes take no space.

**Plan format** (the contract with the kernels; int32 tensors on the requested device):
``group_kv_start[G]``, ``group_kv_len[G]``, ``group_q[G, QG]`` (-1 padded),
``group_full[G]``, ``group_slots[G]`` (slots up to the group's last filled one: stage 1
runs the group at the tile height they need), ``group_bits[G, QG, chunk // 32]`` (bit
``j % 32`` of word ``j // 32``: chunk token ``j`` is visible to the slot's query),
``merge_ptr[NQ + 1]``,
``merge_row[G, QG]`` (-1 for an empty slot), ``q_pos[NQ]``,
``kv_pos[n_kv]``, ``q_tree[NQ]``, ``dense_count[1]``, ``group_fold[G]`` and
``group_lead[G]`` (see :func:`_fold`). Groups are ordered by chunk, slots by
query id, except that the ``n_dense`` dense groups (full, with filled rows in
:data:`~attngen.cost.DENSE_ROWS` for the plan's heads) come first, in the same order:
kernels may run them apart (the Gluon stage 1 on Hopper), and there run each group that
``group_fold`` folds into one as its tail.

>>> from attngen.tree import TreeBatch
>>> p = plan_tree(TreeBatch.from_parents([-1, 0, 0], [40, 30, 50]), chunk=64, queries_per_group=2)
>>> p.n_groups, p.group_q.tolist(), p.merge_ptr.tolist()
(3, [[0, 1], [0, -1], [1, -1]], [0, 2, 4])
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from attngen.cost import (
    BLOCK_ROWS,
    DENSE_ROWS,
    HeadLayout,
    Machine,
    PlanCost,
    PlanStats,
    evaluate,
    plan_cost,
)
from attngen.errors import PlanError
from attngen.tree import TreeBatch

#: Candidate chunk sizes the cost model chooses among (multiples of 32).
CHUNK_CHOICES = (64, 128, 256, 512)
#: Candidate spans (tokens per group after coalescing a long node's full chunks).
SPAN_CHOICES = (768, 1024, 2048, 4096, 8192, 16384)
#: Tokens a coalesced group's range is cut at (the smallest stage-1 KV tile).
SPLIT_ALIGN = 64
#: A group is folded into a dense one only if the dense one's length is a multiple of
#: this: the Gluon stage 1's largest K/V tile, so that the folded range starts on a tile.
FOLD_ALIGN = 128
WORD = 32


@dataclass(frozen=True, slots=True)
class _Chunking:
    """Chunks of the flattened KV (they tile it, in order) and the node pieces they hold,
    sorted by chunk."""

    chunk: int
    start: np.ndarray  # [n_chunks] flattened index of the first token
    length: np.ndarray  # [n_chunks]
    piece_chunk: np.ndarray  # [n_pieces]
    piece_rank: np.ndarray  # preorder rank of the piece's node
    piece_offset: np.ndarray  # first token of the piece within its node
    piece_len: np.ndarray
    piece_local: np.ndarray  # first token of the piece within its chunk

    @property
    def n_chunks(self) -> int:
        return len(self.start)

    def keys(self) -> np.ndarray:
        """int64 [n_chunks, 5] per chunk: (first piece's node rank, its offset, last
        piece's node rank, its end, length), which identifies a chunk's content across
        token appends that do not touch it. Ascending in the first two columns."""
        count = np.bincount(self.piece_chunk, minlength=self.n_chunks)
        last = np.cumsum(count) - 1
        first = last - count + 1
        ends = self.piece_offset + self.piece_len
        cols = (self.piece_rank[first], self.piece_offset[first], self.piece_rank[last], ends[last], self.length)
        return np.stack(cols, axis=1)


@dataclass(frozen=True, slots=True)
class _KvNodes:
    """The nodes that hold KV (non-empty), in preorder: the ones the packing rule places."""

    rank: np.ndarray  # preorder rank
    size: np.ndarray  # tokens
    end: np.ndarray  # flattened index one past the node's last token

    @staticmethod
    def of(tree: TreeBatch) -> _KvNodes:
        sizes = tree.tokens[tree.order]
        rank = (sizes > 0).nonzero()[0]
        size = sizes[rank]
        return _KvNodes(rank, size, size.cumsum())


@dataclass(frozen=True, slots=True)
class _Placement:
    """Where the packing rule puts each node of a :class:`_KvNodes` for one chunk size,
    and the chunks that result (they tile the flattened KV in order)."""

    chunk: int
    first: np.ndarray  # [nodes] the node's first chunk
    pieces: np.ndarray  # [nodes] chunks the node spans
    local: np.ndarray  # [nodes] the node's first token within its first chunk
    start: np.ndarray  # [n_chunks] flattened index of the chunk's first token
    length: np.ndarray  # [n_chunks]


def _place(nodes: _KvNodes, chunk: int) -> _Placement:
    """The placement for one chunk size (see :func:`_places`)."""
    return _places(nodes, (chunk,))[0]


def _places(nodes: _KvNodes, chunks: tuple[int, ...]) -> list[_Placement]:
    """Implements the packing rule of the module docstring for each of ``chunks``, side by
    side. A node that starts a chunk leaves its last piece open; the nodes after it join
    that chunk while they fit, so the next node to start a chunk is one search in the
    token prefix sums away, and the only loop steps from one such node to the next."""
    size, end = nodes.size, nodes.end
    n, chunk = len(size), np.asarray(chunks, dtype=np.int64)[:, None]  # [chunkings, 1]
    pieces = -(-size // chunk)  # [chunkings, nodes]
    last = size - (pieces - 1) * chunk  # tokens of the last piece, in (0, chunk]
    next_start = end.searchsorted(end + (chunk - last), "right").tolist()
    starters = []  # flat [chunking, node] index of the nodes that start a chunk
    for k, row in enumerate(next_start):
        i = 0
        while i < n:
            starters.append(k * n + i)
            i = row[i]
    opens = np.zeros(pieces.shape, dtype=np.int64)  # chunks each node opens
    at = np.array(starters, dtype=np.int64)
    opens.reshape(-1)[at] = pieces.reshape(-1)[at]
    pieces = np.maximum(opens, 1)  # a node that joins a chunk fits whole in it
    first = opens.cumsum(axis=1) - pieces
    counts = opens.sum(axis=1)
    bounds = np.concatenate(([0], counts.cumsum()))
    kv_start = end - size
    # chunk first + k of a node that opens chunks starts at the node's token k * chunk
    start = (kv_start - first * chunk).reshape(-1).repeat(opens.reshape(-1))
    start += (np.arange(len(start)) - bounds[:-1].repeat(counts)) * chunk.reshape(-1).repeat(counts)
    local = kv_start - start[first + bounds[:-1, None]]
    # each chunk ends where the next starts, the last of each chunking at the KV's end
    length = np.empty_like(start)
    length[:-1] = start[1:]
    length[bounds[1:][counts > 0] - 1] = end[-1] if n else 0
    length -= start
    return [
        _Placement(c, first[k], pieces[k], local[k], start[lo:hi], length[lo:hi])
        for k, (c, lo, hi) in enumerate(zip(chunks, bounds[:-1], bounds[1:], strict=True))
    ]


def _chunk_layout(tree: TreeBatch, chunk: int) -> _Chunking:
    """Cut the flattened KV of ``tree`` into chunks and its nodes into pieces."""
    nodes = _KvNodes.of(tree)
    return _pieces(nodes, _place(nodes, chunk))


def _pieces(nodes: _KvNodes, place: _Placement) -> _Chunking:
    """The chunking of ``place``, with each node cut into one piece per chunk it spans."""
    piece_node = np.arange(len(place.pieces)).repeat(place.pieces)
    k = np.arange(len(piece_node)) - (place.pieces.cumsum() - place.pieces)[piece_node]
    offset = k * place.chunk
    return _Chunking(
        place.chunk,
        place.start,
        place.length,
        place.first[piece_node] + k,
        nodes.rank[piece_node],
        offset,
        np.minimum(place.chunk, nodes.size[piece_node] - offset),
        place.local[piece_node],
    )


@dataclass(frozen=True, slots=True)
class _Pairs:
    """Unique (chunk, query) pairs sorted by (chunk, query), with what is needed for bits."""

    chunk: np.ndarray
    query: np.ndarray
    whole: np.ndarray  # the query sees the whole chunk
    span_lo: np.ndarray  # per (piece, query) span, sorted by pair
    span_hi: np.ndarray
    span_starts: np.ndarray  # first span of each pair
    per_chunk: np.ndarray  # [n_chunks] pairs (queries) of each chunk
    rank: np.ndarray  # the pair's place among its chunk's queries


def _piece_queries(
    tree: TreeBatch, layout: _Chunking, piece_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(piece, query, visible tokens) for every piece a query sees a token of; a query
    sees a piece iff the piece's node is an ancestor-or-self of the query's node (a
    preorder-range test)."""
    q_rank = tree.pre_rank[tree.query_node]
    by_rank = _stable_argsort(q_rank, tree.n_nodes)
    sorted_rank = q_rank[by_rank]
    pieces = np.arange(len(layout.piece_chunk)) if piece_mask is None else piece_mask.nonzero()[0]
    rank = layout.piece_rank[pieces]
    lo = sorted_rank.searchsorted(rank)
    counts = sorted_rank.searchsorted(tree.pre_end[tree.order[rank]]) - lo
    pp = pieces.repeat(counts)
    # each piece's queries are a slice of the queries in rank order
    query = by_rank[np.arange(len(pp)) + (lo - (counts.cumsum() - counts)).repeat(counts)]
    visible = layout.piece_len[pp]
    if tree.query_mode == "node":  # a node-mode query sees all of its own node
        return pp, query, visible
    own = q_rank[query] == layout.piece_rank[pp]
    own_visible = np.minimum((tree.query_own_len[query] - layout.piece_offset[pp]).clip(0), visible)
    visible = np.where(own, own_visible, visible)
    keep = visible > 0
    return pp[keep], query[keep], visible[keep]


@dataclass(frozen=True, slots=True)
class _Sight:
    """Which KV nodes each query sees, in the form that counts (chunk, query) pairs without
    listing them: a query sees every piece of its KV ancestors and the pieces of its own
    node that hold its own tokens (all of them in node mode)."""

    above: np.ndarray  # [nodes] the nearest KV node that is a strict ancestor, -1: none
    seen_whole: np.ndarray  # [nodes] queries that see all of it: below it, or on it (node mode)
    own_node: np.ndarray  # token mode: the KV node of each query on one
    own_len: np.ndarray  # token mode: how many of that node's tokens the query sees
    seeing: int  # queries that see any token

    @staticmethod
    def of(tree: TreeBatch, nodes: _KvNodes) -> _Sight:
        parent = tree.parent[tree.order]
        parent_rank = np.where(parent >= 0, tree.pre_rank[parent], -1)
        q_rank = tree.pre_rank[tree.query_node]
        if len(nodes.rank) == tree.n_nodes:  # every node holds KV: a rank is its KV node
            above, own, own_len = parent_rank, q_rank, tree.query_own_len
        else:
            kv_node = np.full(tree.n_nodes + 1, -1, dtype=np.int64)  # by preorder rank; [-1]: none
            kv_node[nodes.rank] = np.arange(len(nodes.rank))
            # the nearest KV node at or above each rank: pointer doubling over empty nodes
            kv_at = np.append(np.where(kv_node[:-1] >= 0, np.arange(tree.n_nodes), parent_rank), -1)
            while not np.array_equal(kv_at[kv_at], kv_at):
                kv_at = kv_at[kv_at]
            above, own = kv_node[kv_at[parent_rank[nodes.rank]]], kv_node[q_rank]
            on_kv = own >= 0
            own, own_len = own[on_kv], tree.query_own_len[on_kv]
        sorted_rank = np.sort(q_rank)
        end = tree.pre_end[tree.order[nodes.rank]]
        seen_whole = sorted_rank.searchsorted(end) - sorted_rank.searchsorted(nodes.rank, "right")
        if tree.query_mode == "node":  # a query sees all of its own node
            seen_whole += np.bincount(own, minlength=len(seen_whole))
            own = own_len = own[:0]
        return _Sight(
            above,
            seen_whole,
            own,
            own_len,
            int(np.count_nonzero(tree.query_visible_counts)),
        )


def _queries_per_chunk(sight: _Sight, place: _Placement) -> np.ndarray:
    """How many queries see each chunk. A query sees a range of chunks of each KV node on
    its root path; a node's range shares a chunk with the ranges before it only when it
    starts in the chunk of its nearest KV ancestor's last piece, so each query is counted
    once per chunk by dropping that first chunk from the node's range."""
    first, end = place.first, place.first + place.pieces
    after = (sight.above >= 0) & (first == end[sight.above] - 1)
    lo = first + after
    n = len(place.start) + 1
    enter = np.bincount(lo, sight.seen_whole, n)
    leave = np.bincount(end, sight.seen_whole, n)
    if len(sight.own_node):  # chunks of the own node up to the query's own tokens
        enter += np.bincount(lo[sight.own_node], minlength=n)
        own_end = first[sight.own_node] - (-sight.own_len // place.chunk)
        leave += np.bincount(own_end, minlength=n)
    return (enter - leave).cumsum()[:-1].astype(np.int64)


def _pairs(tree: TreeBatch, layout: _Chunking, piece_mask: np.ndarray | None = None) -> _Pairs:
    """Every (chunk, query) pair with a visible token, sorted by (chunk, query), with the
    spans of the chunk it sees: its pieces' spans, in chunk order, touching ones joined."""
    pp, query, visible = _piece_queries(tree, layout, piece_mask)
    key = layout.piece_chunk[pp] * max(tree.n_queries, 1) + query
    by_key = key.argsort(kind="stable")
    key, pp, query, visible = key[by_key], pp[by_key], query[by_key], visible[by_key]
    lo = layout.piece_local[pp]
    new_pair = np.ones(len(key), dtype=bool)
    new_pair[1:] = key[1:] != key[:-1]
    new_span = new_pair.copy()
    new_span[1:] |= lo[1:] != lo[:-1] + visible[:-1]
    starts, span_first = new_pair.nonzero()[0], new_span.nonzero()[0]
    chunk = layout.piece_chunk[pp[starts]]
    per_chunk = np.bincount(chunk, minlength=layout.n_chunks)
    return _Pairs(
        chunk=chunk,
        query=query[starts],
        whole=_segment_sums(visible, starts) == layout.length[chunk],
        span_lo=lo[span_first],
        span_hi=lo[span_first] + _segment_sums(visible, span_first),
        span_starts=new_pair[span_first].nonzero()[0],
        per_chunk=per_chunk,
        rank=np.arange(len(chunk)) - (per_chunk.cumsum() - per_chunk)[chunk],
    )


def _gaps(starts: np.ndarray, end: int) -> np.ndarray:
    """Lengths of the segments that begin at ``starts`` (ascending), the last ending at
    ``end`` (``np.diff`` with ``append`` costs several times more on short arrays)."""
    return np.concatenate((starts[1:], [end])) - starts if len(starts) else starts


def _stable_argsort(keys: np.ndarray, bound: int) -> np.ndarray:
    """``keys.argsort(kind="stable")`` of keys in ``[0, bound)``: as uint16 where they fit,
    which numpy sorts by radix, 3-5x faster than its merge sort of int64 at a plan's
    thousand partials."""
    return (keys.astype(np.uint16) if bound <= 1 << 16 else keys).argsort(kind="stable")


def _segment_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of ``values`` over the segments that begin at ``starts`` (ascending, from 0)."""
    return np.add.reduceat(values, starts) if len(values) else values


def _prefix_masks(chunk: int) -> np.ndarray:
    """uint32 [chunk + 1, chunk // 32]: row x has bits 0..x-1 set (the span [0, x))."""
    x = np.arange(chunk + 1, dtype=np.int64)[:, None]
    ones = np.clip(x - np.arange(chunk // WORD, dtype=np.int64) * WORD, 0, WORD)
    return ((np.left_shift(1, ones) - 1) & 0xFFFFFFFF).astype(np.uint32)


_PREFIX_MASKS: dict[int, np.ndarray] = {}


def _pair_bits(pairs: _Pairs, chunk: int) -> np.ndarray:
    """int32 [pairs, chunk // 32] visibility words. A span [lo, hi) is prefix(hi) ^
    prefix(lo); a pair's spans (distinct pieces of one chunk) are disjoint, so OR = XOR."""
    table = _PREFIX_MASKS.get(chunk)
    if table is None:
        table = _PREFIX_MASKS.setdefault(chunk, _prefix_masks(chunk))
    # ndarray.take: much faster than fancy indexing at gathering rows
    words = table.take(pairs.span_hi, axis=0) ^ table.take(pairs.span_lo, axis=0)
    if len(pairs.span_starts) == len(words):
        return words.view(np.int32)
    # a pair's first span, then its k-th span XORed into the pairs that have one: few
    # pairs have several spans and none many (its node and ancestors in one chunk), and a
    # running XOR over every span costs more
    spans = _gaps(pairs.span_starts, len(words))
    pair_words = words.take(pairs.span_starts, axis=0)
    more, k = (spans > 1).nonzero()[0], 1
    while len(more):
        pair_words[more] ^= words.take(pairs.span_starts[more] + k, axis=0)
        k += 1
        more = more[spans[more] > k]
    return pair_words.view(np.int32)


@dataclass(frozen=True, slots=True)
class _Rows:
    """Group rows in numpy: the chunk of each group, its query slots, bits, fullness."""

    chunk: np.ndarray  # [G]
    query: np.ndarray  # [G, QG]
    bits: np.ndarray  # [G, QG, W]
    full: np.ndarray  # [G] bool

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        """Rows of several parts, stably ordered by chunk."""
        chunk = np.concatenate([p.chunk for p in parts])
        order = chunk.argsort(kind="stable")
        return _Rows(
            chunk[order],
            np.concatenate([p.query for p in parts]).take(order, axis=0),
            np.concatenate([p.bits for p in parts]).take(order, axis=0),
            np.concatenate([p.full for p in parts])[order],
        )


@dataclass(frozen=True, slots=True)
class _Slots:
    """Group rows before their bits, which is all that comparing QG and span needs: the
    chunk of each group, its query slots, fullness, and the flat slot of each pair.
    ``pair_slot`` numbers the ``made_groups`` groups made from the pairs; with ``made``,
    the groups are those repeated over the chunks (see :meth:`repeated`), and group ``g``
    is made group ``made[g]``."""

    chunk: np.ndarray  # [G]
    query: np.ndarray  # [G, QG]
    full: np.ndarray  # [G] bool
    pair_slot: np.ndarray  # [pairs] g * QG + s
    filled: np.ndarray  # [G] slots filled, from the first (as ``_filled_slots`` counts)
    made_groups: int
    made: np.ndarray | None = None  # [G] the made group each group repeats

    def with_bits(self, pairs: _Pairs, layout: _Chunking) -> _Rows:
        words, qg = layout.chunk // WORD, self.query.shape[1]
        # every slot takes its pair's words, a padding slot the zero row after them
        pair_bits = _pair_bits(pairs, layout.chunk)
        slot_pair = np.full((self.made_groups, qg), len(pair_bits))
        slot_pair.reshape(-1)[self.pair_slot] = np.arange(len(pair_bits))
        if self.made is not None:
            slot_pair = slot_pair.take(self.made, axis=0)
        bits = np.concatenate((pair_bits, np.zeros((1, words), np.int32))).take(slot_pair.reshape(-1), axis=0)
        return _Rows(self.chunk, self.query, bits.reshape(*self.query.shape, words), self.full)

    def repeated(self, source: np.ndarray) -> _Slots:
        """These slots with each chunk's groups those of its ``source`` chunk (in chunk
        order); the slots must have no groups in chunks that repeat another."""
        per_chunk = np.bincount(self.chunk, minlength=len(source))
        count = per_chunk[source]
        first = (per_chunk.cumsum() - per_chunk)[source]
        made = np.arange(int(count.sum())) + np.repeat(first - (count.cumsum() - count), count)
        return _Slots(
            np.arange(len(source)).repeat(count),
            self.query.take(made, axis=0),
            self.full[made],
            self.pair_slot,
            self.filled[made],
            self.made_groups,
            made,
        )


def _slots(pairs: _Pairs, layout: _Chunking, qg: int, source: np.ndarray | None = None) -> _Slots:
    """Split each chunk's queries (ascending id) into groups of at most ``qg``. With
    ``source`` (:func:`_alike_sources`), ``pairs`` are those of the chunks that repeat no
    other, and the others repeat their source's groups."""
    n_groups = -(-pairs.per_chunk // qg)
    first_group = n_groups.cumsum() - n_groups
    group = first_group[pairs.chunk] + pairs.rank // qg
    total = int(n_groups.sum())
    pair_slot = group * qg + pairs.rank % qg
    query = np.full(total * qg, -1, dtype=np.int64)
    query[pair_slot] = pairs.query
    full = np.ones(total, dtype=bool)
    full[group[~pairs.whole]] = False
    chunks = np.arange(layout.n_chunks).repeat(n_groups)
    # a chunk's queries fill its groups in rank order, so a group's pairs are its slots
    made = _Slots(chunks, query.reshape(total, qg), full, pair_slot, np.bincount(group, minlength=total), total)
    return made if source is None else made.repeated(source)


def _rows(pairs: _Pairs, layout: _Chunking, qg: int, source: np.ndarray | None = None) -> _Rows:
    return _slots(pairs, layout, qg, source).with_bits(pairs, layout)


def _alike_sources(tree: TreeBatch, layout: _Chunking) -> np.ndarray | None:
    """Per chunk, the chunk whose groups it repeats (itself, for most), or None if none
    does. A chunk that one piece of a node fills is seen whole by every query that sees
    the node, except, in token mode, by the node's own queries (they see it up to their
    token), so nodes with queries are left out there. Such a chunk after another of the
    same node has that chunk's queries, all whole, hence its groups: the inner chunks of
    a long prefix (97% of spec_16k_184's (chunk, query) pairs) are planned once."""
    eligible = layout.piece_len == layout.chunk  # the piece fills its chunk
    if tree.query_mode == "token":
        eligible &= ~np.isin(tree.order[layout.piece_rank], tree.query_nodes)
    chunk, rank = layout.piece_chunk[eligible], layout.piece_rank[eligible]
    repeats = (chunk[1:] == chunk[:-1] + 1) & (rank[1:] == rank[:-1])
    if not repeats.any():
        return None
    source = np.arange(layout.n_chunks)
    new_class = np.concatenate(([True], ~repeats))
    first = chunk[new_class][np.cumsum(new_class) - 1]
    source[chunk] = first
    return source


def _layout_rows(tree: TreeBatch, layout: _Chunking, qg: int) -> _Rows:
    """The group rows of ``layout`` at ``qg``, planned once for each set of chunks that
    repeat one another (:func:`_alike_sources`); equal to ``_rows`` of every pair."""
    pairs, source = _alike_pairs(tree, layout)
    return _rows(pairs, layout, qg, source)


def _alike_pairs(tree: TreeBatch, layout: _Chunking) -> tuple[_Pairs, np.ndarray | None]:
    """The pairs of the chunks of ``layout`` that repeat no other, and the chunks' sources
    (:func:`_alike_sources`; None: every chunk's pairs)."""
    source = _alike_sources(tree, layout)
    if source is None:
        return _pairs(tree, layout), None
    own = source == np.arange(layout.n_chunks)
    return _pairs(tree, layout, piece_mask=own[layout.piece_chunk]), source


# ---------------------------------------------------------------------------------------
# Choosing chunk and queries per group from the cost model.


def _chunk_stats(
    tree: TreeBatch,
    sight: _Sight,
    places: list[_Placement],
    qgs: np.ndarray,
    heads: HeadLayout,
    machine: Machine,
) -> PlanStats:
    """Plan quantities for every (chunking, QG) pair, as [chunkings, QG]. Vectorized over both,
    and over the distinct query counts of a chunk rather than the chunks: a chunk's groups
    depend on its query count alone, so the chunks of each count are summed per chunking
    first (their number, tokens, and how many are among the longest), and the groups are
    worked out once per count (41 counts against 338 chunks on a random 256-node tree)."""
    n = len(places)
    per_chunk = np.concatenate([_queries_per_chunk(sight, place) for place in places])
    length = np.concatenate([place.length for place in places])
    of = np.repeat(np.arange(n), [len(place.length) for place in places])
    top = np.array([place.length.max(initial=0) for place in places], dtype=np.int64)
    # [counts, chunkings]: chunks of each query count, their tokens, the longest of them
    key = per_chunk * n + of
    bins = (int(per_chunk.max(initial=0)) + 1) * n
    chunks = np.bincount(key, minlength=bins).reshape(-1, n)
    count = np.flatnonzero(chunks.any(axis=1))
    chunks = chunks[count]
    tokens = np.bincount(key, length, bins).reshape(-1, n)[count].astype(np.int64)
    longest = np.bincount(key, 2 * length >= top[of], bins).reshape(-1, n)[count].astype(np.int64)
    qg = qgs[:, None]
    # a chunk's groups: count // qg of qg queries, and one of the rest (if any)
    n_full = count // qg
    rest = count - n_full * qg
    per_qg = n_full + (rest > 0)  # groups per chunk [QG, counts]
    rows = n_full * heads.tile_rows(qg, qg) + (rest > 0) * heads.tile_rows(rest, qg)
    # groups tall enough to be dense, taken as full: whether they are is not known here,
    # so this is an upper bound (the QG and span choice that follows is exact)
    full_dense, rest_dense = _dense(qg * heads.group, True, 1), _dense(rest * heads.group, True, 1)
    tall = n_full * full_dense + rest_dense
    # stage-1 programs per chunk (per KV head)
    full_programs = _programs(heads.tile_rows(qg, qg), full_dense, machine)
    programs = n_full * full_programs + (rest > 0) * _programs(heads.tile_rows(rest, qg), rest_dense, machine)
    partials = count @ chunks
    # every query that sees a token has a partial: one launch iff none has two
    launches = np.where(partials <= sight.seeing, 1, 2)

    def per_chunking(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """[QG, counts] summed per chunking with ``weight`` [counts, chunkings]: [chunkings, QG]."""
        return (values @ weight).T

    # [chunkings, QG], the per-chunking and per-QG quantities as a column and a row
    return PlanStats(
        chunk=np.array([place.chunk for place in places])[:, None],
        queries_per_group=qgs[None, :],
        groups=per_chunking(per_qg, chunks),
        tokens_read=per_chunking(per_qg, tokens),
        row_tokens=per_chunking(rows, tokens),
        longest=top[:, None],
        n_longest=per_chunking(programs, longest),
        partials=partials[:, None],
        queries=tree.n_queries,
        launches=launches[:, None],
        branch_tokens=int(tree.query_visible_counts.sum()),
        unique_tokens=tree.needed_kv_tokens,
        dense_groups=per_chunking(tall, chunks),
    )


def _programs(tile_rows: np.ndarray, dense: np.ndarray | bool, machine: Machine) -> np.ndarray:
    """Stage-1 programs per (group, KV head): one for a dense group where the machine runs
    dense groups in a kernel of their own, else one per row block of :data:`BLOCK_ROWS`
    (a tall plan's other groups run as two)."""
    blocks = -(-tile_rows // BLOCK_ROWS)
    return np.where(dense & (machine.dense_kernel_launches > 0), 1, blocks)


def _dense(rows: np.ndarray | int, full: np.ndarray | bool, length: np.ndarray | int) -> np.ndarray:
    """Which groups are dense: full, not empty, and of filled ``rows`` in
    :data:`DENSE_ROWS` (the plan lists them first; Hopper runs them in Gluon)."""
    rows = np.asarray(rows)
    return np.asarray(full) & (rows > DENSE_ROWS[0]) & (rows <= DENSE_ROWS[1]) & (np.asarray(length) > 0)


def _choose(
    tree: TreeBatch, chunk: int | None, qg: int | None, heads: HeadLayout, machine: Machine
) -> tuple[_Chunking, int]:
    """The chunking and QG of least predicted time (ties: the earliest chunk, then the
    smallest QG). Both given: nothing to compare, nothing evaluated. The candidates are
    compared on pair counts alone, without listing their pairs."""
    _check_params(chunk, qg, heads)
    nodes = _KvNodes.of(tree)
    if chunk is not None and qg is not None:
        return _pieces(nodes, _place(nodes, chunk)), qg
    places = _places(nodes, CHUNK_CHOICES if chunk is None else (chunk,))
    qgs = np.asarray(heads.queries_per_group_choices() if qg is None else [qg], dtype=np.int64)
    stats = _chunk_stats(tree, _Sight.of(tree, nodes), places, qgs, heads, machine)
    best = int(np.argmin(evaluate("time_s", stats, heads, machine)))  # first minimum
    return _pieces(nodes, places[best // len(qgs)]), int(qgs[best % len(qgs)])


def _check_params(chunk: int | None, qg: int | None, heads: HeadLayout) -> None:
    if chunk is not None and (chunk < WORD or chunk % WORD):
        raise PlanError(f"chunk {chunk} must be a positive multiple of {WORD} (e.g. 64..512).")
    if qg is None:
        return
    choices = heads.queries_per_group_choices()
    if qg in choices:
        return
    if qg < 1 or qg & (qg - 1):
        raise PlanError(f"queries_per_group {qg} must be a power of two >= 1, or one of {list(choices)}.")
    raise PlanError(
        f"queries_per_group {qg} x {heads.group} query heads per KV head = "
        f"{qg * heads.group} rows exceeds the {min(heads.max_rows, BLOCK_ROWS)} of a power-of-two "
        f"QG (max_rows {heads.max_rows}); allowed: {list(choices)}."
    )


# ---------------------------------------------------------------------------------------
# The plan.


@dataclass(frozen=True, slots=True)
class _State:
    """What the incremental path needs from a previous plan, and what its cost report is
    worked out from (numpy, CPU)."""

    tree: TreeBatch
    layout: _Chunking
    rows: _Rows
    heads: HeadLayout
    machine: Machine
    host: dict[str, np.ndarray]  # the plan arrays the cost report reads (_group_stats)


@dataclass(frozen=True, eq=False)
class Plan:
    """A plan: the python ints and int32 tensors the tree kernels read (see module doc)."""

    chunk: int
    queries_per_group: int
    span: int
    n_groups: int
    n_queries: int
    n_kv: int
    group_kv_start: torch.Tensor
    group_kv_len: torch.Tensor
    group_q: torch.Tensor
    group_full: torch.Tensor
    group_slots: torch.Tensor
    group_bits: torch.Tensor
    merge_ptr: torch.Tensor
    merge_row: torch.Tensor
    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    q_tree: torch.Tensor
    dense_count: torch.Tensor  # [1]: n_dense on the device
    group_fold: torch.Tensor
    group_lead: torch.Tensor
    n_partials: int
    n_dense: int
    n_folded: int  # groups run as a dense group's tail where the dense groups run apart
    state: _State = field(repr=False)

    @functools.cached_property
    def cost(self) -> PlanCost:
        """The cost model's prediction for this plan and for per-branch decoding of its
        batch. Worked out when first asked for, so that planning (a decode step's replan
        above all) does not pay for a report it may not read: 20-45 us of a plan."""
        s = self.state
        stats = _group_stats(s.tree, self.chunk, self.queries_per_group, s.host, s.heads, s.machine)
        return plan_cost(stats, s.heads, s.machine)

    @property
    def group(self) -> int:
        """Query heads per KV head the plan was made for (its dense groups depend on it)."""
        return self.state.heads.group

    def tensors(self) -> dict[str, torch.Tensor]:
        """The plan tensors by contract name."""
        return {name: getattr(self, name) for name in TENSOR_NAMES}


TENSOR_NAMES = (
    "group_kv_start",
    "group_kv_len",
    "group_q",
    "group_full",
    "group_slots",
    "group_bits",
    "merge_ptr",
    "merge_row",
    "q_pos",
    "kv_pos",
    "q_tree",
    "dense_count",
    "group_fold",
    "group_lead",
)


def _merge_order(query: np.ndarray, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """merge_ptr, merge_row from the [G, QG] query slots: the partials sorted by query,
    each query's in ascending group (= ascending chunk kv_start) order, so that a query's
    partials are contiguous rows for the merge."""
    flat = query.reshape(-1)
    partial = (flat >= 0).nonzero()[0]
    owner = flat[partial]
    row = np.full(flat.shape, -1, dtype=np.int64)
    row[partial[_stable_argsort(owner, n_queries)]] = np.arange(len(partial))
    ptr = np.concatenate(([0], np.bincount(owner, minlength=n_queries).cumsum()))
    return ptr, row.reshape(query.shape)


#: int32 elements per 16 bytes: each plan tensor starts at a 16-byte boundary of the
#: buffer they share, as a tensor of its own would (Triton specializes on it).
_ALIGN = 4


def _starts(sizes: list[int]) -> list[int]:
    """Where each of int32 arrays of ``sizes`` elements starts in one buffer that holds them
    all, each from a 16-byte boundary; then the buffer's size."""
    return np.cumsum([0] + [-(-n // _ALIGN) * _ALIGN for n in sizes]).tolist()


def _views(flat: torch.Tensor, starts: list[int], shapes: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The plan tensors (:data:`TENSOR_NAMES` order) as views of ``flat`` at ``starts``."""
    return {
        name: flat[start : start + math.prod(shape)].view(shape)
        for name, start, shape in zip(TENSOR_NAMES, starts, shapes, strict=True)
    }


def _int32_tensors(host: dict[str, np.ndarray], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The plan tensors of ``host`` as int32 tensors on ``device``. On the CPU, each array
    converted on its own (int32 ones shared, not copied). Elsewhere, views of one buffer
    copied over at once: on the H200 that took 96-123 us a plan, against 174-194 for a
    copy per tensor and 95-159 through page-locked staging memory (session 28; the
    256-node tree, spec_8k_248, fewshot_32k_x64)."""
    arrays = [host[name] for name in TENSOR_NAMES]
    if torch.device(device).type == "cpu":
        return {
            name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))
            for name, a in zip(TENSOR_NAMES, arrays, strict=True)
        }
    starts = _starts([a.size for a in arrays])
    buffer = np.zeros(starts[-1], dtype=np.int32)
    for a, start in zip(arrays, starts[:-1], strict=True):
        buffer[start : start + a.size] = a.ravel()
    return _views(torch.from_numpy(buffer).to(device), starts[:-1], [a.shape for a in arrays])


@dataclass(frozen=True, slots=True)
class _Groups:
    """The groups as the kernels see them: KV range, query slots, bits, fullness."""

    start: np.ndarray  # [G]
    length: np.ndarray  # [G]
    query: np.ndarray  # [G, QG]
    bits: np.ndarray  # [G, QG, W]
    full: np.ndarray  # [G] bool


#: Odd 64-bit multipliers for hashing a group's query slots (wrapping arithmetic).
_ROW_WEIGHTS = np.random.default_rng(0x5EED).integers(1, 2**62, 1024, dtype=np.int64) | 1


@dataclass(frozen=True, slots=True)
class _Runs:
    """The span-independent half of coalescing: the full groups that share their query
    slots over contiguous KV (the pieces of one long node, e.g. a shared prefix), as runs."""

    order: np.ndarray  # full groups, each run's together and in KV order
    run: np.ndarray  # the run of each entry of ``order``
    offset: np.ndarray  # tokens from its run's start to each entry's
    members: np.ndarray  # [runs] groups in the run
    tokens: np.ndarray  # [runs] tokens in the run
    slots: np.ndarray  # [runs] real query slots (partials per piece)

    @staticmethod
    def of(layout: _Chunking, rows: _Slots | _Rows, coalescible: bool | None = None) -> _Runs:
        """The runs of ``rows``; ``coalescible``: :func:`_coalescible` of them, if known."""
        full = rows.full.nonzero()[0]
        query = rows.query.take(full, axis=0)
        if not (_coalescible(rows) if coalescible is None else coalescible):
            # each full group is a run of its own
            n = len(full)
            slots = (query >= 0).sum(axis=1)
            zeros, ones = np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)
            return _Runs(full, np.arange(n), zeros, ones, layout.length[rows.chunk[full]], slots)
        # a hash brings equal slot rows together, in KV order (the groups come in KV order
        # and the sort is stable); neighbours are then compared exactly, so a collision
        # can only split a run, never join different queries
        row_hash = (query + 1) @ _ROW_WEIGHTS[np.arange(query.shape[1]) % len(_ROW_WEIGHTS)]
        by = row_hash.argsort(kind="stable")
        order, q = full[by], query.take(by, axis=0)
        chunk = rows.chunk[order]
        new_run = np.ones(len(order), dtype=bool)
        # KV contiguity: the chunks tile the KV, so contiguous chunks are consecutive
        new_run[1:] = (q[1:] != q[:-1]).any(axis=1) | (chunk[1:] != chunk[:-1] + 1)
        run = new_run.cumsum() - 1
        first = new_run.nonzero()[0]
        start, length = layout.start[chunk], layout.length[chunk]
        return _Runs(
            order,
            run,
            start - start[first][run],
            _gaps(first, len(order)),
            np.add.reduceat(length, first),
            (q[first] >= 0).sum(axis=1),
        )


def _coalescible(rows: _Slots | _Rows) -> bool:
    """Whether two full groups sit in neighbouring chunks: only such groups, if their slots
    are equal, make a run that a span longer than a chunk joins (most trees without long
    nodes have none)."""
    chunk = rows.chunk[rows.full]
    return bool((chunk[1:] == chunk[:-1] + 1).any())


def _run_pieces(members: np.ndarray, tokens: np.ndarray, span: int | np.ndarray, chunk: int) -> np.ndarray:
    """Groups each run of ``members`` groups and ``tokens`` tokens becomes: ceil(tokens /
    span), or its members when span <= chunk (spans as a column: one row per span)."""
    return np.where(span <= chunk, members, -(-tokens // span))


def _span_groups(
    layout: _Chunking, rows: _Rows, span: int, runs: _Runs | None = None
) -> _Groups:
    """Coalesce each run of full groups (see :class:`_Runs`) into groups of about ``span``
    tokens: a run of n tokens becomes k = ceil(n / span) groups, the i-th starting at the
    first of the run's groups at or past i * n / k. Under a span of two chunks, where a
    chunk's slack would nearly double a piece, pieces that stay longer than a chunk start
    instead at the first multiple of :data:`SPLIT_ALIGN` tokens (from the run's start) at
    or past it: a full group reads no bits, so its range may start anywhere.

    On the H200, fewshot_4k_x20 GQA's prompt in six pieces of at most 704 tokens ran 20.2
    us against 23.4 for four of 1024. Chunk cuts still give 2048 + 1536 on spec_4k_92
    MHA, where even ones (1792 + 1792) ran 37.0 against 34.9: the long pieces then end at
    once, and the groups after them wait (session 22, BENCHMARKS.md). Groups stay in
    ascending KV order, which is the merge order. ``runs``: those of ``rows``, if known."""
    start, length = layout.start[rows.chunk], layout.length[rows.chunk]
    if span <= layout.chunk or len(start) < 2 or not rows.full.any():
        return _Groups(start, length, rows.query, rows.bits, rows.full)
    runs = runs if runs is not None else _Runs.of(layout, rows)
    pieces = _run_pieces(runs.members, runs.tokens, span, layout.chunk)
    of_run = np.repeat(np.arange(len(pieces)), pieces)
    k = pieces[of_run]
    i = np.arange(len(of_run)) - (np.cumsum(pieces) - pieces)[of_run]
    tokens = runs.tokens[of_run]
    stride = int(runs.tokens.max()) + 1
    keys = runs.run * stride + runs.offset  # ascending: runs in order, KV order within
    # under a span of two chunks, where each piece stays longer than a chunk: cut evenly
    even = (span < 2 * layout.chunk) & (tokens > k * (layout.chunk + SPLIT_ALIGN))

    def cut(at: np.ndarray) -> np.ndarray:
        target = -(-at * tokens // k)  # ceil(at * n / k)
        nxt = np.minimum(np.searchsorted(keys, of_run * stride + target), len(keys) - 1)
        at_group = np.where((runs.run[nxt] == of_run) & (target < tokens), runs.offset[nxt], tokens)
        at_align = np.minimum(-(-target // SPLIT_ALIGN) * SPLIT_ALIGN, tokens)
        return np.where(even, at_align, at_group)

    lo, hi = cut(i), cut(i + 1)
    # a target past the run's last group start cuts at the run's end: that piece is empty
    filled = hi > lo
    of_run, lo, hi = of_run[filled], lo[filled], hi[filled]
    # a piece takes its slots from the run's group it starts in (a run's groups share
    # their slots and are full)
    member = np.searchsorted(keys, of_run * stride + lo, side="right") - 1
    rest = (~rows.full).nonzero()[0]
    source = np.concatenate((runs.order[member], rest))
    begin = np.concatenate((start[runs.order[member]] - runs.offset[member] + lo, start[rest]))
    total = np.concatenate((hi - lo, length[rest]))
    # ascending KV, and at one start by first query, as the groups of a chunk are
    by_kv = np.lexsort((rows.query[source, 0], begin))
    source, begin, total = source[by_kv], begin[by_kv], total[by_kv]
    query, bits = rows.query.take(source, axis=0), rows.bits.take(source, axis=0)
    return _Groups(begin, total, query, bits, rows.full[source])


def _span_stats(
    tree: TreeBatch,
    layout: _Chunking,
    qgs: list[int],
    slots: list[_Slots],
    runs: list[_Runs] | None,
    spans: np.ndarray,
    heads: HeadLayout,
    machine: Machine,
) -> PlanStats:
    """Plan quantities after coalescing at each of ``spans``, for each QG trial's slots and
    runs (QG-major), without building the groups; a run's pieces are taken to be as long
    as its first (its even share rounded up to where :func:`_span_groups` cuts).
    Vectorized over both: the trials' groups and runs side by side, summed per trial by a
    one-hot product, as in :func:`_chunk_stats`. ``runs`` None: nothing coalesces (one
    span), and every group stays as it is."""
    n, column = len(slots), spans[:, None]
    one_hot = np.eye(n, dtype=np.int64)
    # the trials' groups: coalescing joins groups of equal slots, so their rows, hence
    # row-tokens, stay, and so does whether there are dense groups (all the formulas ask)
    g_trial = np.repeat(np.arange(n), [len(s.chunk) for s in slots])
    filled = np.concatenate([s.filled for s in slots])
    full = np.concatenate([s.full for s in slots])
    length = layout.length[np.concatenate([s.chunk for s in slots])]
    by_group = one_hot[g_trial]  # [groups, trials]
    tile_rows = heads.tile_rows(filled, np.asarray(qgs)[g_trial])
    row_tokens = (length * tile_rows) @ by_group
    is_dense = _dense(filled * heads.group, full, length)
    dense = is_dense @ by_group
    programs = _programs(tile_rows, is_dense, machine)
    # the groups that stay as they are: all, or those not in a run of full groups
    stay = np.ones_like(full) if runs is None else ~full
    rest, by_rest, rest_programs = length[stay], by_group[stay], programs[stay]
    top = (rest[:, None] * by_rest).max(axis=0, initial=0)[None, :]  # [spans, trials]
    groups = by_rest.sum(axis=0)[None, :]
    partials = np.array([[s.filled.sum() for s in slots]], dtype=np.int64)  # a slot per pair
    n_longest = np.zeros_like(groups)
    if runs is not None:  # the trials' runs of full groups, cut into pieces at each span
        by_run = one_hot[np.repeat(np.arange(n), [len(r.tokens) for r in runs])]
        tokens = np.concatenate([r.tokens for r in runs])
        members = np.concatenate([r.members for r in runs])
        run_slots = np.concatenate([r.slots for r in runs])
        run_rows = heads.tile_rows(run_slots, np.repeat(qgs, [len(r.tokens) for r in runs]))
        run_programs = _programs(run_rows, _dense(run_slots * heads.group, True, tokens), machine)
        pieces = _run_pieces(members, tokens, column, layout.chunk)  # [spans, runs]
        # a piece ends where _span_groups cuts: at the first member start (a chunk
        # boundary) at or past its even share, or, where it cuts evenly, at the first
        # multiple of SPLIT_ALIGN; the first piece is then the longest
        share = -(-tokens // np.maximum(pieces, 1))
        even = (column < 2 * layout.chunk) & (tokens > pieces * (layout.chunk + SPLIT_ALIGN))
        grid = np.where(even, SPLIT_ALIGN, layout.chunk)
        piece_len = np.minimum(-(-share // grid) * grid, tokens)
        # uncoalesced: each member is at most a chunk
        piece_len = np.where(column <= layout.chunk, np.minimum(piece_len, layout.chunk), piece_len)
        top = np.maximum((piece_len[:, :, None] * by_run).max(axis=1, initial=0), top)
        n_longest = (pieces * run_programs * (2 * piece_len >= top @ by_run.T)) @ by_run
        partials = partials + (pieces * run_slots) @ by_run - (members * run_slots) @ by_run
        groups = groups + pieces @ by_run
    n_longest = n_longest + ((2 * rest >= top @ by_rest.T) * rest_programs) @ by_rest
    return PlanStats(
        chunk=layout.chunk,
        queries_per_group=np.repeat(qgs, len(spans)),
        groups=groups.T.ravel(),
        tokens_read=np.repeat(length @ by_group, len(spans)),
        row_tokens=np.repeat(row_tokens, len(spans)),
        longest=top.T.ravel(),
        n_longest=n_longest.T.ravel(),
        partials=partials.T.ravel(),
        dense_groups=np.repeat(dense, len(spans)),
        # the same for every QG: a query has one slot per chunk it sees
        **_tree_fields(tree, slots[0].query),
    )


def _host_arrays(tree: TreeBatch, groups: _Groups, heads: HeadLayout, machine: Machine) -> dict[str, np.ndarray]:
    """Every plan tensor as a numpy array (the single place the format is assembled),
    the dense groups moved to the front. Merge rows are assigned before the move, so a
    query's partials still merge in KV order."""
    slots = _filled_slots(groups.query)
    rows = slots * heads.group
    dense = _dense(rows, groups.full, groups.length)
    order = np.argsort(~dense, kind="stable")
    ptr, row = _merge_order(groups.query, tree.n_queries)
    host = {
        "group_kv_start": groups.start[order],
        "group_kv_len": groups.length[order],
        "group_q": groups.query[order],
        "group_full": groups.full[order].astype(np.int64),
        "group_slots": slots[order],
        "group_bits": groups.bits[order],
        "merge_ptr": ptr,
        "merge_row": row[order],
        "q_pos": tree.q_pos,
        "kv_pos": tree.kv_pos,
        "q_tree": tree.q_tree,
        "dense_count": np.array([dense.sum()]),
    }
    host["group_fold"], host["group_lead"] = _fold(host, heads, machine)
    return host


def _fold(host: dict[str, np.ndarray], heads: HeadLayout, machine: Machine) -> tuple[np.ndarray, np.ndarray]:
    """Plan tensors ``group_fold`` and ``group_lead``: which groups a machine with a dense
    kernel of its own (the Gluon stage 1 on Hopper) runs as the tail of a dense group.

    A group of the rest can fold into the dense group that ends where it starts and has
    the same query slots (on a speculative tree: the chunk of the tree's own tokens, after
    the prefix's last span), when that dense group's length is a multiple of
    :data:`FOLD_ALIGN` and the two together are no longer than the longest dense group.
    The dense kernel's program then runs both ranges, applying the folded group's bits past
    its ``group_lead`` leading keys (those every slot sees). Groups are folded only when
    every group of the rest can fold, so that no kernel runs beside the dense one (the
    gain: a launch and a second stream), and when all the plan's programs outnumber the
    SMs (else the rest runs beside the dense programs at no cost to them). On the H200,
    in two A/B runs against the module before the fold: spec_16k_184 GQA 95.0 and 95.9 us
    against 100.0 and 97.5, MHA 111.4 and 109.4 against 115.9 and 109.2; folding two of
    fewshot_32k_x64 GQA's 34 other groups lost 3.4 us, and spec_4k_92 GQA (whose rest fits
    beside) 1.7 in a scratch run (session 37, BENCHMARKS.md).

    ``group_fold[g]``: for a dense group, the group folded into it; for a folded group,
    its dense group; -1 elsewhere. ``group_lead[g]``: for a folded group, its leading
    keys that every filled slot sees; 0 elsewhere."""
    n, n_dense = len(host["group_kv_start"]), int(host["dense_count"][0])
    fold, lead = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    if not machine.dense_kernel_launches or n_dense in (0, n):
        return fold, lead
    # the rest's programs (a tall plan's run as two row blocks) fit beside the dense ones
    rest_rows = heads.tile_rows(host["group_slots"][n_dense:], host["group_q"].shape[1])
    rest_programs = int(_programs(rest_rows, False, machine).sum())
    if (n_dense + rest_programs) * heads.heads_kv <= machine.sms:
        return fold, lead
    start, length, query = host["group_kv_start"], host["group_kv_len"], host["group_q"]
    # a dense group's (end, first slot) against each other group's (start, first slot)
    width = int(query.max(initial=0)) + 2
    dense_key = (start[:n_dense] + length[:n_dense]) * width + query[:n_dense, 0] + 1
    rest_key = start[n_dense:] * width + query[n_dense:, 0] + 1
    by_key = np.argsort(dense_key, kind="stable")
    host_of = by_key[np.minimum(np.searchsorted(dense_key, rest_key, sorter=by_key), n_dense - 1)]
    ok = (
        (dense_key[host_of] == rest_key)
        & (query[host_of] == query[n_dense:]).all(axis=1)
        & (length[host_of] % FOLD_ALIGN == 0)
        & (length[host_of] + length[n_dense:] <= length[:n_dense].max())
    )
    if not ok.all():
        return fold, lead
    fold[host_of], fold[n_dense:] = np.arange(n_dense, n), host_of
    lead[n_dense:] = _common_lead(host["group_bits"][n_dense:], query[n_dense:], length[n_dense:])
    return fold, lead


def _n_folded(fold: np.ndarray, n_dense: int) -> int:
    """Groups of a plan's ``group_fold`` that run as a dense group's tail (past its
    ``n_dense`` dense groups, those pointing to their dense group)."""
    return int((fold[n_dense:] >= 0).sum())


def _common_lead(bits: np.ndarray, query: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Per group of ``bits`` [K, QG, W] (int32 words) and ``query`` [K, QG]: how many of
    its leading tokens every filled slot sees, at most ``length``."""
    words = np.where(query[:, :, None] >= 0, bits, np.int32(-1)).astype(np.int32, copy=False).view(np.uint32)
    common = np.bitwise_and.reduce(words, axis=1)  # [K, W]: the tokens every slot sees
    whole = common == np.uint32(0xFFFFFFFF)
    n_words = whole.shape[1]
    first = np.where(whole.all(axis=1), n_words, whole.argmin(axis=1))  # the first word with a gap
    unseen = ~common[np.arange(len(common)), np.minimum(first, n_words - 1)]
    lowest = unseen & (~unseen + np.uint32(1))  # its lowest set bit: the gap's first token
    ones = np.log2(np.maximum(lowest, 1).astype(np.float64)).astype(np.int64)
    return np.minimum(first * WORD + np.where(first < n_words, ones, 0), length)


def _tree_fields(tree: TreeBatch, query: np.ndarray) -> dict[str, int]:
    """The PlanStats fields that come from the tree and the query slots alone: the slots
    fix how many partials each query has, hence the launches."""
    per_query = np.bincount(query[query >= 0], minlength=tree.n_queries)
    return {
        "queries": tree.n_queries,
        "launches": 1 if per_query.max(initial=0) <= 1 else 2,
        "branch_tokens": int(tree.query_visible_counts.sum()),
        "unique_tokens": tree.needed_kv_tokens,
    }


def _filled_slots(query: np.ndarray) -> np.ndarray:
    """Per group of ``query`` [G, QG] slots: the slots up to its last filled one (0 if
    none), which set the tile height stage 1 runs it at (plan tensor ``group_slots``)."""
    filled = query.shape[1] - (query[:, ::-1] >= 0).argmax(axis=1)
    filled[(query < 0).all(axis=1)] = 0
    return filled


#: The plan arrays :func:`_group_stats` reads (a plan keeps them for its cost report).
_STATS_ARRAYS = ("group_kv_len", "group_q", "group_slots", "dense_count", "group_fold")


def _group_stats(
    tree: TreeBatch, chunk: int, qg: int, host: dict[str, np.ndarray], heads: HeadLayout, machine: Machine
) -> PlanStats:
    """The plan's quantities, from its assembled arrays (``_host_arrays``)."""
    length, query = host["group_kv_len"], host["group_q"]
    tile_rows = heads.tile_rows(host["group_slots"], qg)
    dense = np.arange(len(length)) < host["dense_count"][0]  # listed first
    longest = 2 * length >= length.max(initial=0)
    return PlanStats(
        chunk=chunk,
        queries_per_group=qg,
        groups=len(length),
        tokens_read=int(length.sum()),
        row_tokens=int(length @ tile_rows),
        longest=int(length.max(initial=0)),
        n_longest=int(longest @ _programs(tile_rows, dense, machine)),
        partials=int((query >= 0).sum()),
        dense_groups=int(host["dense_count"][0]),
        folded=int(_n_folded(host["group_fold"], int(host["dense_count"][0])) > 0),
        **_tree_fields(tree, query),
    )


def _choose_qg_span(
    tree: TreeBatch,
    layout: _Chunking,
    qg: int,
    fixed_qg: bool,
    span: int | None,
    heads: HeadLayout,
    machine: Machine,
) -> tuple[int, int, _Rows, _Runs | None]:
    """Queries per group and span of least predicted time, with the rows and runs of the
    winner (runs None if nothing coalesces). QG ranges over the first choice and its
    neighbours (unless fixed), span over the chunk itself (no coalescing) and the
    :data:`SPAN_CHOICES` above it (unless given); ties go to the smallest QG, then the
    smallest span. Only the winner's rows get their bits."""
    pairs, source = _alike_pairs(tree, layout)
    choices = heads.queries_per_group_choices()
    at = choices.index(qg) if qg in choices else 0
    qgs = [qg] if fixed_qg else list(choices[max(at - 1, 0) : at + 2])
    spans = np.asarray(
        [span] if span is not None else [layout.chunk, *(s for s in SPAN_CHOICES if s > layout.chunk)],
        dtype=np.int64,
    )
    slots = [_slots(pairs, layout, g, source) for g in qgs]
    coalescible = [_coalescible(s) for s in slots]
    runs = [_Runs.of(layout, s, c) for s, c in zip(slots, coalescible, strict=True)] if any(coalescible) else None
    if runs is None:  # nothing coalesces: every span plans the same groups
        spans = spans[:1]
    times = evaluate("time_s", _span_stats(tree, layout, qgs, slots, runs, spans, heads, machine), heads, machine)
    g, i = divmod(int(np.argmin(times)), len(spans))  # the first minimum
    return qgs[g], int(spans[i]), slots[g].with_bits(pairs, layout), None if runs is None else runs[g]


def _make_plan(
    tree: TreeBatch,
    layout: _Chunking,
    rows: _Rows,
    qg: int,
    span: int,
    heads: HeadLayout,
    machine: Machine,
    device: torch.device | str,
    runs: _Runs | None = None,
) -> Plan:
    groups = _span_groups(layout, rows, span, runs)
    host = _host_arrays(tree, groups, heads, machine)
    return Plan(
        chunk=layout.chunk,
        queries_per_group=qg,
        span=span,
        n_groups=len(groups.start),
        n_queries=tree.n_queries,
        n_kv=tree.n_kv,
        **_int32_tensors(host, device),
        n_partials=int(host["merge_ptr"][-1]),
        n_dense=int(host["dense_count"][0]),
        n_folded=_n_folded(host["group_fold"], int(host["dense_count"][0])),
        state=_State(tree, layout, rows, heads, machine, {name: host[name] for name in _STATS_ARRAYS}),
    )


def plan_tree(
    tree: TreeBatch,
    *,
    chunk: int | None = None,
    queries_per_group: int | None = None,
    span: int | None = None,
    heads: HeadLayout | None = None,
    machine: Machine | None = None,
    device: torch.device | str = "cpu",
) -> Plan:
    """Plan ``tree``; ``chunk`` and ``queries_per_group`` default to the cost model's choice
    among :data:`CHUNK_CHOICES` and :meth:`HeadLayout.queries_per_group_choices`, then
    ``span`` (how long a group of a long node's fully visible chunks may grow) among the
    chunk and :data:`SPAN_CHOICES`."""
    heads, machine = heads or HeadLayout(), machine or Machine()
    _check_span(span)
    layout, qg = _choose(tree, chunk, queries_per_group, heads, machine)
    if queries_per_group is not None and span is not None:
        rows, runs = _layout_rows(tree, layout, qg), None
    else:
        qg, span, rows, runs = _choose_qg_span(
            tree, layout, qg, queries_per_group is not None, span, heads, machine
        )
    span = max(span, layout.chunk)
    return _make_plan(tree, layout, rows, qg, span, heads, machine, device, runs)


def _check_span(span: int | None) -> None:
    if span is not None and span < 1:
        raise PlanError(f"span {span} must be a positive number of tokens (e.g. 1024..16384).")


def replan_after_append(plan: Plan, tree: TreeBatch, device: torch.device | str = "cpu") -> Plan:
    """The plan of ``tree``, which is ``plan``'s tree with tokens appended to some nodes
    (e.g. :meth:`TreeBatch.append_to_leaves`), reusing every group whose chunk is
    unchanged. Chunks are recomputed (cheap); only the pairs and bits of chunks whose
    content changed are. Equal to ``plan_tree`` with the same chunk and QG; falls back
    to it when the structure, the query mode (token mode adds queries) or anything but
    appends changed."""
    old = plan.state
    if not _is_append_only(old.tree, tree):
        return plan_tree(
            tree,
            chunk=plan.chunk,
            queries_per_group=plan.queries_per_group,
            span=plan.span,
            heads=old.heads,
            machine=old.machine,
            device=device,
        )
    layout = _chunk_layout(tree, plan.chunk)
    new_to_old = _matched(layout.keys(), old.layout.keys())
    reused = _reused_rows(old.rows, new_to_old, old.layout.n_chunks)
    fresh_chunk = new_to_old < 0
    pairs = _pairs(tree, layout, piece_mask=fresh_chunk[layout.piece_chunk])
    rows = _Rows.concat([reused, _rows(pairs, layout, plan.queries_per_group)])
    return _make_plan(tree, layout, rows, plan.queries_per_group, plan.span, old.heads, old.machine, device)


def _matched(keys: np.ndarray, old_keys: np.ndarray) -> np.ndarray:
    """Per chunk of ``keys`` (:meth:`_Chunking.keys`), the chunk of ``old_keys`` with the
    same key, or -1. Both ascend in their first token's (rank, offset), so one search
    finds the only candidate."""
    if len(old_keys) == 0:
        return np.full(len(keys), -1, dtype=np.int64)
    at = (old_keys[:, 0] << 32) | old_keys[:, 1]
    found = np.minimum(at.searchsorted((keys[:, 0] << 32) | keys[:, 1]), len(old_keys) - 1)
    return np.where((old_keys[found] == keys).all(axis=1), found, -1)


def _is_append_only(before: TreeBatch, after: TreeBatch) -> bool:
    return (
        before.query_mode == "node"
        and before.same_structure(after)
        and bool((after.tokens >= before.tokens).all())
    )


def _reused_rows(old: _Rows, new_to_old: np.ndarray, old_chunks: int) -> _Rows:
    """Old rows of chunks that survive, relabelled with their new chunk ids."""
    old_to_new = np.full(old_chunks, -1, dtype=np.int64)
    kept = np.flatnonzero(new_to_old >= 0)
    old_to_new[new_to_old[kept]] = kept
    new_chunk = old_to_new[old.chunk]
    keep = new_chunk >= 0
    return _Rows(new_chunk[keep], old.query[keep], old.bits[keep], old.full[keep])


# ---------------------------------------------------------------------------------------
# Fixed-capacity buffers (CUDA graph capture).


@dataclass(frozen=True, slots=True)
class PlanSizes:
    """How much of each buffer a plan uses."""

    n_groups: int
    n_queries: int
    n_kv: int
    n_partials: int


@dataclass(frozen=True, eq=False)
class _Store:
    """One int32 allocation that every buffer is a view of (each from a 16-byte boundary,
    in :data:`TENSOR_NAMES` order), and a copy of it on the host that :func:`plan_into`
    writes first: a GPU's buffers then take a plan in one or a few copies."""

    device: torch.Tensor  # [total]
    host: np.ndarray  # [total] what ``device`` holds; on the CPU, the same memory
    starts: list[int]  # each buffer's first element, then the total
    written: list[int]  # per buffer, the rows the last plan used (the rest hold padding)


@dataclass(frozen=True, eq=False)
class PlanBuffers:
    """Preallocated plan tensors of fixed capacity (build them with :meth:`allocate`);
    ``chunk``, ``queries_per_group``, ``span`` and ``heads`` are fixed too, since a
    captured kernel is specialised on them (``span`` defaults to the chunk: no
    coalescing). The tensors are :func:`plan_into`'s to write: it writes only the rows
    that changed, so nothing else may."""

    chunk: int
    queries_per_group: int
    span: int
    tensors: dict[str, torch.Tensor]
    heads: HeadLayout
    store: _Store = field(repr=False)

    @property
    def group(self) -> int:
        """Query heads per KV head the buffers are planned for."""
        return self.heads.group

    @classmethod
    def allocate(
        cls,
        *,
        max_groups: int,
        max_queries: int,
        max_kv: int,
        chunk: int,
        queries_per_group: int,
        span: int | None = None,
        heads: HeadLayout | None = None,
        device: torch.device | str = "cpu",
    ) -> PlanBuffers:
        """Empty buffers (-1 query slots and merge rows, zeros elsewhere) for plans of at
        most ``max_groups`` groups, ``max_queries`` queries and ``max_kv`` KV tokens; the
        parameters are checked as :func:`plan_tree` checks them, before anything is
        allocated."""
        heads = heads or HeadLayout()
        for name, value in (("max_groups", max_groups), ("max_queries", max_queries), ("max_kv", max_kv)):
            if value < 1:
                raise PlanError(f"PlanBuffers.allocate: {name} {value} must be a positive capacity.")
        _check_params(chunk, queries_per_group, heads)
        _check_span(span)
        shapes = {
            "group_kv_start": (max_groups,),
            "group_kv_len": (max_groups,),
            "group_q": (max_groups, queries_per_group),
            "group_full": (max_groups,),
            "group_slots": (max_groups,),
            "group_bits": (max_groups, queries_per_group, chunk // WORD),
            "merge_ptr": (max_queries + 1,),
            "merge_row": (max_groups, queries_per_group),
            "q_pos": (max_queries,),
            "kv_pos": (max_kv,),
            "q_tree": (max_queries,),
            "dense_count": (1,),
            "group_fold": (max_groups,),
            "group_lead": (max_groups,),
        }
        sizes = [math.prod(shapes[name]) for name in TENSOR_NAMES]
        starts = _starts(sizes)
        host = np.zeros(starts[-1], dtype=np.int32)
        for name, start, size in zip(TENSOR_NAMES, starts[:-1], sizes, strict=True):
            host[start : start + size] = _PAD.get(name, 0)
        flat = torch.from_numpy(host).to(device)
        if flat.device.type == "cpu":
            host = flat.numpy()  # one memory: plan_into's writes are the buffers'
        tensors = _views(flat, starts[:-1], [shapes[name] for name in TENSOR_NAMES])
        store = _Store(flat, host, starts, [0] * len(TENSOR_NAMES))
        return cls(chunk, queries_per_group, max(span or chunk, chunk), tensors, heads, store)

    @property
    def n_folded(self) -> int:
        """Groups of the plan last written (:func:`plan_into`) that run as a dense group's
        tail, read from the host copy. A launch reads it when it is made: over buffers
        whose plan folds, a generated module runs the folded groups in its Gluon kernel
        and has its Triton kernel skip them on the device, so a CUDA graph captured then
        stays right for any plan written later (one that folds nothing runs the Gluon
        kernel's folding form, with no tails)."""
        host, starts, capacity = self.store.host, self.store.starts, self.tensors["group_fold"].numel()
        fold = host[starts[_FOLD_AT] : starts[_FOLD_AT] + capacity]  # not the alignment past it
        return _n_folded(fold, int(host[starts[_DENSE_AT]]))

    def capacity(self) -> PlanSizes:
        t = self.tensors
        return PlanSizes(
            t["group_q"].shape[0],
            t["q_pos"].shape[0],
            t["kv_pos"].shape[0],
            t["merge_row"].numel(),  # at most one partial per group slot
        )


_PAD = {"group_q": -1, "merge_row": -1, "group_fold": -1}
_FOLD_AT, _DENSE_AT = TENSOR_NAMES.index("group_fold"), TENSOR_NAMES.index("dense_count")
#: Elements between two written stretches of a GPU's buffers below which plan_into copies
#: them as one. A copy from the host costs its caller 15-20 us on the H200's host (twelve
#: took 230 us, session 29); 256 KB more at a pageable copy's ~10 GB/s cost about as much
#: (a judgement: the rate was not measured on its own).
_COPY_GAP = 64 * 1024


def plan_into(
    buffers: PlanBuffers,
    tree: TreeBatch,
    *,
    heads: HeadLayout | None = None,
    machine: Machine | None = None,
) -> PlanSizes:
    """Plan ``tree`` into ``buffers`` (in place) and return the sizes used.

    Unused tails are cleared (-1 query slots, zero bits and lengths; ``merge_ptr`` stays
    flat past the last query) so a kernel launched over the full capacity does no work
    there. A plan that does not fit raises PlanError before anything is written.
    ``heads`` defaults to the buffers' own; other heads must have the same query heads per
    KV head (the dense groups depend on it).

    Only the rows the plan uses are written, and those the previous plans used past them
    (cleared). They are written on the host, then copied to a GPU in one copy per
    stretch of them (stretches closer than :data:`_COPY_GAP` elements copied as one).
    """
    heads, machine = heads or buffers.heads, machine or Machine()
    if heads.group != buffers.group:
        raise PlanError(
            f"plan_into: heads with {heads.group} query heads per KV head, but the buffers were "
            f"allocated for {buffers.group} (PlanBuffers.allocate(heads=...)); nothing was written."
        )
    layout, qg = _choose(tree, buffers.chunk, buffers.queries_per_group, heads, machine)
    groups = _span_groups(layout, _layout_rows(tree, layout, qg), buffers.span)
    host = _host_arrays(tree, groups, heads, machine)
    used = PlanSizes(len(host["group_kv_start"]), tree.n_queries, tree.n_kv, int(host["merge_ptr"][-1]))
    _check_capacity(used, buffers.capacity())
    store = buffers.store
    stretches = []
    for i, name in enumerate(TENSOR_NAMES):
        values, width = host[name], math.prod(buffers.tensors[name].shape[1:])
        n = len(values)
        # merge_ptr's tail repeats its last entry, which moves with every plan: all of it
        end = store.starts[i + 1] if name == "merge_ptr" else store.starts[i] + max(n, store.written[i]) * width
        at = store.starts[i] + n * width
        store.host[store.starts[i] : at] = values.ravel()
        store.host[at:end] = used.n_partials if name == "merge_ptr" else _PAD.get(name, 0)
        store.written[i] = n
        stretches.append((store.starts[i], end))
    if store.device.device.type != "cpu":
        for lo, hi in _joined(stretches, _COPY_GAP):
            store.device[lo:hi].copy_(torch.from_numpy(store.host[lo:hi]))
    return used


def _joined(stretches: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Ascending, disjoint ``[lo, hi)`` stretches, those less than ``gap`` apart joined
    (empty ones dropped)."""
    joined: list[tuple[int, int]] = []
    for lo, hi in stretches:
        if hi <= lo:
            continue
        if joined and lo - joined[-1][1] < gap:
            joined[-1] = (joined[-1][0], hi)
        else:
            joined.append((lo, hi))
    return joined


def _check_capacity(used: PlanSizes, cap: PlanSizes) -> None:
    # partials need no check of their own: at most one per group slot
    for name in ("n_groups", "n_queries", "n_kv"):
        if getattr(used, name) > getattr(cap, name):
            raise PlanError(
                f"plan_into: the plan needs {name} = {getattr(used, name)} but the buffers hold "
                f"{getattr(cap, name)}; allocate larger buffers (nothing was written)."
            )
