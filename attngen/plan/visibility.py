"""Which queries see which tokens of a chunk: the (chunk, query) pairs of a chunking,
their visibility bits, and the count of each chunk's queries without listing its pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attngen.plan.arrays import _gaps, _segment_sums, _stable_argsort
from attngen.plan.layout import _Chunking, _KvNodes, _Placements
from attngen.tree import TreeBatch

#: Bits per visibility word (``group_bits`` holds int32 words).
WORD = 32


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
        return _Sight(above, seen_whole, own, own_len)


def _queries_per_chunk(sight: _Sight, places: _Placements) -> np.ndarray:
    """How many queries see each chunk of ``places`` (every chunk size's, in one array). A
    query sees a range of chunks of each KV node on its root path; a node's range shares a
    chunk with the ranges before it only when it starts in the chunk of its nearest KV
    ancestor's last piece, so each query is counted once per chunk by dropping that first
    chunk from the node's range. The chunk sizes side by side: each one's ranges lie in
    its own chunks, and its entries and exits cancel by its last chunk, so one running
    sum counts them all."""
    first = places.first + places.bounds[:-1, None]  # [K, nodes], numbered among all chunks
    end = first + places.pieces
    after = (sight.above >= 0) & (first == end[:, sight.above] - 1)
    lo = first + after
    n = len(places.start) + 1
    weight = np.tile(sight.seen_whole, len(places.chunks))
    enter = np.bincount(lo.reshape(-1), weight, n)
    leave = np.bincount(end.reshape(-1), weight, n)
    if len(sight.own_node):  # chunks of the own node up to the query's own tokens
        enter += np.bincount(lo[:, sight.own_node].reshape(-1), minlength=n)
        chunk = np.asarray(places.chunks, dtype=np.int64)[:, None]
        own_end = first[:, sight.own_node] - (-sight.own_len // chunk)
        leave += np.bincount(own_end.reshape(-1), minlength=n)
    return (enter - leave).cumsum()[:-1].astype(np.int64)


def _pairs(tree: TreeBatch, layout: _Chunking, piece_mask: np.ndarray | None = None) -> _Pairs:
    """Every (chunk, query) pair with a visible token, sorted by (chunk, query), with the
    spans of the chunk it sees: its pieces' spans, in chunk order, touching ones joined."""
    pp, query, visible = _piece_queries(tree, layout, piece_mask)
    key = layout.piece_chunk[pp] * max(tree.n_queries, 1) + query
    by_key = _stable_argsort(key, layout.n_chunks * max(tree.n_queries, 1))
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
