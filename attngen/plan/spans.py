"""Coalescing: runs of full groups with the same query slots over contiguous KV (the
chunks of one long node, e.g. a shared prefix), cut into groups of about ``span`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attngen.plan.arrays import _gaps
from attngen.plan.groups import _Rows, _Slots, _TrialGroups
from attngen.plan.layout import _Chunking

#: Tokens a coalesced group's range is cut at (the smallest stage-1 KV tile).
SPLIT_ALIGN = 64
#: Spans under this many chunks cut a run evenly (see :func:`_span_groups`); longer ones
#: cut at chunk boundaries, so a run's last piece may be shorter than the rest.
EVEN_BELOW = 2


@dataclass(frozen=True, slots=True)
class _Groups:
    """The groups as the kernels see them: KV range, query slots, bits, fullness, filled
    slots."""

    start: np.ndarray  # [G]
    length: np.ndarray  # [G]
    query: np.ndarray  # [G, QG]
    bits: np.ndarray  # [G, QG, W]
    full: np.ndarray  # [G] bool
    filled: np.ndarray  # [G]


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


def _coalescible_trials(groups: _TrialGroups, trials: int) -> np.ndarray:
    """:func:`_coalescible` of each trial's groups, side by side (the QG choice's trials)."""
    trial, chunk = groups.trial[groups.full], groups.chunk[groups.full]
    neighbours = (trial[1:] == trial[:-1]) & (chunk[1:] == chunk[:-1] + 1)
    return np.bincount(trial[1:][neighbours], minlength=trials) > 0


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
    once, and the groups after them wait (session 22, docs/benchmarks/HISTORY.md). Even cuts of long
    dense runs lost too (session 56, ``scripts/explore_cuts.py``): spec_8k_248's (2-5%)
    for that reason, and spec_16k_184's (5-9%) because its tree chunk then no longer
    folds into the shortest piece. Groups stay in
    ascending KV order, which is the merge order. ``runs``: those of ``rows``, if known."""
    start, length = layout.start[rows.chunk], layout.length[rows.chunk]
    if span <= layout.chunk or len(start) < 2 or not rows.full.any():
        return _Groups(start, length, rows.query, rows.bits.array(), rows.full, rows.filled)
    runs = runs if runs is not None else _Runs.of(layout, rows)
    pieces = _run_pieces(runs.members, runs.tokens, span, layout.chunk)
    of_run = np.repeat(np.arange(len(pieces)), pieces)
    k = pieces[of_run]
    i = np.arange(len(of_run)) - (np.cumsum(pieces) - pieces)[of_run]
    tokens = runs.tokens[of_run]
    stride = int(runs.tokens.max()) + 1
    keys = runs.run * stride + runs.offset  # ascending: runs in order, KV order within
    # under a span of two chunks, where each piece stays longer than a chunk: cut evenly
    even = (span < EVEN_BELOW * layout.chunk) & (tokens > k * (layout.chunk + SPLIT_ALIGN))

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
    query, bits = rows.query.take(source, axis=0), rows.bits.take(source)
    return _Groups(begin, total, query, bits, rows.full[source], rows.filled[source])
