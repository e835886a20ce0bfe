"""Groups: each chunk's queries split into groups of at most ``queries_per_group`` slots,
which groups are dense, and how many stage-1 programs a group takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attngen.cost import BLOCK_ROWS, DENSE_ROWS, Machine
from attngen.plan.layout import _Chunking
from attngen.plan.visibility import WORD, _pair_bits, _Pairs, _pairs
from attngen.tree import TreeBatch


@dataclass(frozen=True, slots=True)
class _SlotBits:
    """The visibility words of [G, QG] group slots as rows of one table: ``table`` [P, W]
    holds pairs' words (and a zero row for empty slots), ``slot`` [G, QG] the row of each
    slot. The words are gathered only for the groups a plan keeps: coalescing keeps a few
    groups of a long prompt's thousands, and the inner chunks of a long node share their
    rows, so gathering every group's words first took most of the time (a 300k-token
    prompt with 3000 leaves of 100 tokens: 115 MB of words, 14 MB of rows here)."""

    table: np.ndarray  # [P, W] int32
    slot: np.ndarray  # [G, QG] int64

    def take(self, groups: np.ndarray) -> np.ndarray:
        """The words [len(groups), QG, W] of ``groups`` (indices)."""
        rows = self.slot.take(groups, axis=0)
        return self.table.take(rows.reshape(-1), axis=0).reshape(*rows.shape, self.table.shape[1])

    def array(self) -> np.ndarray:
        """Every group's words, [G, QG, W]."""
        return self.take(np.arange(len(self.slot)))

    def select(self, groups: np.ndarray) -> _SlotBits:
        """These slots of ``groups`` (indices or a mask), the words not gathered."""
        return _SlotBits(self.table, self.slot[groups])

    def compact(self) -> _SlotBits:
        """The same words with only the table rows some slot uses: a replan keeps slots
        and adds rows, and its table would otherwise grow at every step."""
        used = np.zeros(len(self.table), dtype=bool)
        used[self.slot.reshape(-1)] = True
        if used.all():
            return self
        renumber = used.cumsum() - 1
        return _SlotBits(self.table[used], renumber.take(self.slot))

    @staticmethod
    def concat(parts: list[_SlotBits]) -> _SlotBits:
        offsets = np.cumsum([0] + [len(p.table) for p in parts[:-1]])
        return _SlotBits(
            np.concatenate([p.table for p in parts]),
            np.concatenate([p.slot + offset for p, offset in zip(parts, offsets, strict=True)]),
        )


@dataclass(frozen=True, slots=True)
class _Rows:
    """Group rows in numpy: the chunk of each group, its query slots, bits, fullness, and
    filled slots."""

    chunk: np.ndarray  # [G]
    query: np.ndarray  # [G, QG]
    bits: _SlotBits  # [G, QG] slots of W words
    full: np.ndarray  # [G] bool
    filled: np.ndarray  # [G] slots filled, from the first (see _Slots)

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        """Rows of several parts, stably ordered by chunk."""
        chunk = np.concatenate([p.chunk for p in parts])
        order = chunk.argsort(kind="stable")
        return _Rows(
            chunk[order],
            np.concatenate([p.query for p in parts]).take(order, axis=0),
            _SlotBits.concat([p.bits for p in parts]).select(order).compact(),
            np.concatenate([p.full for p in parts])[order],
            np.concatenate([p.filled for p in parts])[order],
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
    # [G] slots filled: a group's filled slots come first, so these are the slots up to
    # its last filled one (0 if none), which set the tile height stage 1 runs it at (plan
    # tensor ``group_slots``)
    filled: np.ndarray
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
        table = np.concatenate((pair_bits, np.zeros((1, words), np.int32)))
        return _Rows(self.chunk, self.query, _SlotBits(table, slot_pair), self.full, self.filled)

    def repeated(self, source: np.ndarray) -> _Slots:
        """These slots with each chunk's groups those of its ``source`` chunk (in chunk
        order); the slots must have no groups in chunks that repeat another."""
        count, made = _repeated(np.bincount(self.chunk, minlength=len(source)), source)
        return _Slots(
            np.arange(len(source)).repeat(count),
            self.query.take(made, axis=0),
            self.full[made],
            self.pair_slot,
            self.filled[made],
            self.made_groups,
            made,
        )


def _repeated(per_chunk: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups listed in chunk order, ``per_chunk`` of each chunk, where each chunk is to
    take the groups of its ``source`` chunk: how many each chunk then has, and the listed
    group each of the new list repeats."""
    count = per_chunk[source]
    first = (per_chunk.cumsum() - per_chunk)[source]
    return count, np.arange(int(count.sum())) + np.repeat(first - (count.cumsum() - count), count)


def _slots(pairs: _Pairs, layout: _Chunking, qg: int, source: np.ndarray | None = None) -> _Slots:
    """Split each chunk's queries (ascending id) into groups of at most ``qg``. With
    ``source`` (:func:`_alike_sources`), ``pairs`` are those of the chunks that repeat no
    other, and the others repeat their source's groups."""
    n_groups = -(-pairs.per_chunk // qg)
    first_group = n_groups.cumsum() - n_groups
    # a chunk's queries fill the slots of its groups in rank order, from its first group's
    # first slot on
    pair_slot = (first_group * qg)[pairs.chunk] + pairs.rank
    group = pair_slot // qg
    total = int(n_groups.sum())
    query = np.full(total * qg, -1, dtype=np.int64)
    query[pair_slot] = pairs.query
    full = np.ones(total, dtype=bool)
    full[group[~pairs.whole]] = False
    chunks = np.arange(layout.n_chunks).repeat(n_groups)
    # a chunk's queries fill its groups in rank order, so a group's pairs are its slots
    made = _Slots(chunks, query.reshape(total, qg), full, pair_slot, np.bincount(group, minlength=total), total)
    return made if source is None else made.repeated(source)


@dataclass(frozen=True, slots=True)
class _TrialGroups:
    """The groups of several QG trials side by side, trial-major and in chunk order within a
    trial: all that the span choice counts of them (``_span_stats``)."""

    trial: np.ndarray  # [groups] the trial (index into the QGs) of each group
    chunk: np.ndarray
    filled: np.ndarray
    full: np.ndarray

    @staticmethod
    def of_pairs(pairs: _Pairs, qgs: list[int], source: np.ndarray | None) -> _TrialGroups:
        """The groups each QG's :func:`_slots` makes, worked out for every QG at once
        without their slots: the (trial, chunk) pairs numbered as one list of chunks."""
        qg = np.asarray(qgs, dtype=np.int64)[:, None]
        n_groups = -(-pairs.per_chunk // qg)  # [trials, chunks]
        trials, chunks = n_groups.shape
        flat = n_groups.reshape(-1)
        ends = flat.cumsum()
        # a chunk's queries fill its groups in rank order: each group has qg but the
        # chunk's last, which has the rest
        filled = np.broadcast_to(qg, n_groups.shape).reshape(-1).repeat(flat)
        last = flat > 0
        filled[ends[last] - 1] = (pairs.per_chunk - (n_groups - 1) * qg).reshape(-1)[last]
        # a group is full unless a pair that sees its chunk in part falls in it (as in _slots)
        part = (~pairs.whole).nonzero()[0]
        first_group = (ends - flat).reshape(trials, chunks)
        full = np.ones(len(filled), dtype=bool)
        full[(first_group.take(pairs.chunk[part], axis=1) + pairs.rank[part] // qg).reshape(-1)] = False
        if source is None:
            at = np.arange(trials * chunks).repeat(flat)
        else:  # each chunk takes its source's groups (as _Slots.repeated), within its trial
            count, made = _repeated(flat, (np.arange(trials)[:, None] * chunks + source).reshape(-1))
            at = np.arange(trials * chunks).repeat(count)
            filled, full = filled[made], full[made]
        trial, chunk = np.divmod(at, chunks)
        return _TrialGroups(trial, chunk, filled, full)


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
    return _own_pairs(tree, layout, source), source


def _own_pairs(tree: TreeBatch, layout: _Chunking, source: np.ndarray | None) -> _Pairs:
    """The pairs of the chunks that are their own ``source`` (None: every chunk's)."""
    if source is None:
        return _pairs(tree, layout)
    own = source == np.arange(layout.n_chunks)
    return _pairs(tree, layout, piece_mask=own[layout.piece_chunk])


def _dense(rows: np.ndarray, full: np.ndarray | bool, length: np.ndarray | int) -> np.ndarray:
    """Which groups are dense: full, not empty, and of filled ``rows`` in
    :data:`DENSE_ROWS` (the plan lists them first; Hopper runs them in Gluon)."""
    return (rows > DENSE_ROWS[0]) & (rows <= DENSE_ROWS[1]) & full & (length > 0)


def _programs(tile_rows: np.ndarray, dense: np.ndarray | bool, machine: Machine) -> np.ndarray:
    """Stage-1 programs per (group, KV head): one for a dense group where the machine runs
    dense groups in a kernel of their own, else one per row block of :data:`BLOCK_ROWS`
    (a tall plan's other groups run as two)."""
    blocks = -(-tile_rows // BLOCK_ROWS)
    return np.where(dense & machine.dense_apart, 1, blocks)
