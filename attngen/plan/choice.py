"""Choosing the chunk, the queries per group and the span from the cost model, by counting
each candidate's plan quantities without building its groups; and the quantities of a
built plan, for its cost report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from attngen.cost import BLOCK_ROWS, HeadLayout, Machine, PlanStats, evaluate
from attngen.errors import PlanError, plan_int
from attngen.plan.fold import _n_folded
from attngen.plan.groups import _alike_pairs, _dense, _programs, _Rows, _Slots, _slots, _TrialGroups
from attngen.plan.layout import _Chunking, _KvNodes, _pieces, _place, _Placements, _places
from attngen.plan.spans import EVEN_BELOW, SPLIT_ALIGN, _coalescible_trials, _run_pieces, _Runs
from attngen.plan.visibility import WORD, _Pairs, _queries_per_chunk, _Sight
from attngen.tree import MAX_KV_TOKENS, TreeBatch

#: Candidate chunk sizes the cost model chooses among (multiples of 32).
CHUNK_CHOICES = (64, 128, 256, 512)

#: The largest chunk a plan may be given. The kernels take any multiple of 32 (stage 1
#: reads a masked group's bits tile by tile, ``chunk // 32`` int32 words per slot), so
#: this is a sane bound, not a kernel limit: 8x the largest chunk the cost model chooses
#: and the H200 sweep measured (512). The planner keeps a table of prefix masks per chunk
#: size for the process's life, (chunk + 1) x chunk / 32 words (visibility.py
#: ``_prefix_masks``), chunk**2 / 8 bytes: 32 KB at 512, 2 MB here, and 1.25 PB at the
#: 10**8 of a typo; and each slot of a masked group carries chunk / 8 bytes of bits.
MAX_CHUNK = 4096


#: Candidate spans (tokens per group after coalescing a long node's full chunks): steps of
#: 1.25-1.5x, so that a long prompt can be cut into any of 2..8 pieces. How many pieces
#: decides how many SMs the dense kernel leaves to the rest: a 32000-token prompt runs
#: in 8 pieces at 4096, 7 at 5120, 6 at 6144 (session 54).
SPAN_CHOICES = (768, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 8192, 12288, 16384)

#: The longest span a plan may be given: a group's KV range is int32 in the plan
#: (group_kv_start, group_kv_len) and no batch holds more tokens (tree.MAX_KV_TOKENS), so
#: a longer span plans the same groups; past int64 one would not even reach the planner's
#: arrays (``np.asarray([span], np.int64)``).
MAX_SPAN = MAX_KV_TOKENS


def _check_params(chunk: int | None, qg: int | None, heads: HeadLayout) -> None:
    for name, value in (("chunk", chunk), ("queries_per_group", qg)):
        if value is not None:
            plan_int(value, name)
    if chunk is not None and not (WORD <= chunk <= MAX_CHUNK and chunk % WORD == 0):
        raise PlanError(
            f"chunk {chunk} must be a positive multiple of {WORD} up to {MAX_CHUNK} (allowed: "
            f"{WORD}..{MAX_CHUNK} in steps of {WORD}; the cost model chooses among 64..512)."
        )
    if qg is None:
        return
    # bounded above by the heads' choices (at most TALL_ROWS), each a few int comparisons
    choices = heads.queries_per_group_choices()
    if qg in choices:
        return
    if qg < 1 or qg & (qg - 1):
        raise PlanError(f"queries_per_group {qg} must be a power of two >= 1 (allowed: {list(choices)}).")
    raise PlanError(
        f"queries_per_group {qg} x {heads.group} query heads per KV head = "
        f"{qg * heads.group} rows exceeds the {min(heads.max_rows, BLOCK_ROWS)} of a power-of-two "
        f"QG (max_rows {heads.max_rows}); allowed: {list(choices)}."
    )


def _check_span(span: int | None) -> None:
    if span is not None:
        plan_int(span, "span")
    if span is not None and not 1 <= span <= MAX_SPAN:
        raise PlanError(
            f"span {span} must be a positive number of tokens up to {MAX_SPAN} (allowed: "
            f"1..{MAX_SPAN}, a group's int32 KV range; the cost model chooses among the chunk "
            f"and {SPAN_CHOICES[0]}..{SPAN_CHOICES[-1]})."
        )


def _chunk_stats(
    tree: TreeBatch,
    sight: _Sight,
    places: _Placements,
    qgs: np.ndarray,
    heads: HeadLayout,
    machine: Machine,
) -> PlanStats:
    """Plan quantities for every (chunking, QG) pair, as [chunkings, QG]. Vectorized over both,
    and over the distinct query counts of a chunk rather than the chunks: a chunk's groups
    depend on its query count alone, so the chunks of each count are summed per chunking
    first (their number, tokens, and how many are among the longest), and the groups are
    worked out once per count (41 counts against 338 chunks on a random 256-node tree)."""
    n, length = len(places.chunks), places.length
    per_chunk = _queries_per_chunk(sight, places)
    of = np.arange(n).repeat(np.diff(places.bounds))
    # each chunking's longest chunk (a tree without KV has no chunks in any)
    top = np.maximum.reduceat(length, places.bounds[:-1]) if len(length) else np.zeros(n, dtype=np.int64)
    # [counts, chunkings]: chunks of each query count, their tokens, the longest of them;
    # the weighted counts stay float64 (exact here), which the cost formula computes in
    # and takes faster than int64
    key = per_chunk * n + of
    bins = (int(per_chunk.max(initial=0)) + 1) * n
    count = np.flatnonzero(np.bincount(per_chunk))  # the query counts some chunk has
    chunks = np.bincount(key, minlength=bins).reshape(-1, n)[count]
    tokens = np.bincount(key, length, bins).reshape(-1, n)[count]
    longest = np.bincount(key, 2 * length >= top[of], bins).reshape(-1, n)[count]
    qg = qgs[:, None]
    # a chunk's groups: count // qg of qg queries, and one of the rest (if any)
    n_full = count // qg
    rest = count - n_full * qg
    has_rest = rest > 0
    per_qg = n_full + has_rest  # groups per chunk [QG, counts]
    # a full group (qg filled slots) is worked out beside the rest groups, as column 0 of
    # [QG, 1 + counts]: its tile rows, whether it is dense, its stage-1 programs (per KV
    # head). Groups tall enough to be dense are taken as full: whether they are is not
    # known here, so this is an upper bound (the QG and span choice that follows is exact)
    filled = np.concatenate((qg, rest), axis=1)
    tile_rows = heads.tile_rows(filled, qg)
    dense = _dense(filled * heads.group, True, 1)
    group_programs = _programs(tile_rows, dense, machine)
    full_rows, rest_rows = tile_rows[:, :1], tile_rows[:, 1:]
    full_dense, rest_dense = dense[:, :1], dense[:, 1:]
    full_programs, rest_programs = group_programs[:, :1], group_programs[:, 1:]
    rows = n_full * full_rows + has_rest * rest_rows
    tall = n_full * full_dense + rest_dense
    tall_rows = n_full * full_dense * full_rows + rest_dense * rest_rows
    # stage-1 programs per chunk, and those of the Triton kernel: all, or all but the
    # dense ones where the machine runs those apart
    programs = n_full * full_programs + has_rest * rest_programs
    triton_programs = programs - tall * machine.dense_apart
    partials = count @ chunks
    launches = _launches(partials, tree.n_seeing, tree.n_queries)

    def per_chunking(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """[QG, counts] summed per chunking with ``weight`` [counts, chunkings]: [chunkings, QG]."""
        return (values @ weight).T

    # [chunkings, QG], the per-chunking and per-QG quantities as a column and a row
    dense_groups = per_chunking(tall, chunks)
    return PlanStats(
        chunk=np.array(places.chunks)[:, None],
        queries_per_group=qgs[None, :],
        groups=per_chunking(per_qg, chunks),
        tokens_read=per_chunking(per_qg, tokens),
        row_tokens=per_chunking(rows, tokens),
        longest=top[:, None],
        n_longest=per_chunking(triton_programs, longest),
        partials=partials[:, None],
        queries=tree.n_queries,
        launches=launches[:, None],
        branch_tokens=int(tree.query_visible_counts.sum()),
        unique_tokens=tree.needed_kv_tokens,
        dense_groups=dense_groups,
        dense_tokens=per_chunking(tall, tokens),
        dense_row_tokens=per_chunking(tall_rows, tokens),
        dense_longest=top[:, None] * (dense_groups > 0),
    )


def _choose(
    tree: TreeBatch, chunk: int | None, qg: int | None, heads: HeadLayout, machine: Machine
) -> tuple[_Chunking, int]:
    """The chunking and QG of least predicted time (ties: the earliest chunk, then the
    smallest QG). Both given: nothing to compare, nothing evaluated. The candidates are
    compared on pair counts alone, without listing their pairs."""
    return _chunk_candidates(tree, chunk, qg, heads, machine, neighbours=False)[0]


def _chunk_candidates(
    tree: TreeBatch,
    chunk: int | None,
    qg: int | None,
    heads: HeadLayout,
    machine: Machine,
    neighbours: bool,
) -> list[tuple[_Chunking, int]]:
    """:func:`_choose`'s chunking and QG first; with ``neighbours``, then each neighbouring
    chunking (the next choice above and below, at its QG of least predicted time) whose
    candidate has dense groups where the machine runs them apart, for
    :func:`_choose_plan_params` to compare after coalescing. How a long prompt's dense
    groups are cut into spans decides how the SMs are split between the dense kernel and
    the rest (``SPLIT`` in :mod:`attngen.cost_model`), which the uncoalesced chunks compared
    here do not show: fewshot_32k_x64 GQA ran 85.6 us at chunk 256 in six prompt pieces,
    against 92.3 at the best span of chunk 512 (session 54)."""
    _check_params(chunk, qg, heads)
    nodes = _KvNodes.of(tree)
    if chunk is not None and qg is not None:
        return [(_pieces(nodes, _place(nodes, chunk)), qg)]
    places = _places(nodes, CHUNK_CHOICES if chunk is None else (chunk,))
    qgs = np.asarray(heads.queries_per_group_choices() if qg is None else [qg], dtype=np.int64)
    stats = _chunk_stats(tree, _Sight.of(tree, nodes), places, qgs, heads, machine)
    times = evaluate("time_s", stats, heads, machine)  # [chunkings, QG]
    at = times.argmin(axis=1)  # each chunking's best QG (the first of equal times)
    first = int(np.argmin(times)) // len(qgs)  # the first minimum's chunking
    order = [first]
    if neighbours and machine.dense_apart:
        dense = np.asarray(stats.dense_groups)[np.arange(len(places.chunks)), at] > 0  # [chunkings], at their best QG
        order += [c for c in (first + 1, first - 1) if 0 <= c < len(places.chunks) and dense[c]]
    return [(_pieces(nodes, places.one(c)), int(qgs[at[c]])) for c in order]


#: How much faster than the first chunking's best plan a neighbouring chunking's must be
#: predicted to replace it (:func:`_chunk_candidates`): the split model's precision. On the
#: H200, spec_16k_184's chunk 256, predicted 0.4% faster than 512, ran 3-5% slower, while
#: shared_prefix_32k_x64 GQA's, predicted 1.03% faster, ran 10.5% faster (session 55).
NEIGHBOUR_MARGIN = 0.01


def _choose_plan_params(
    tree: TreeBatch, chunk: int | None, qg: int | None, span: int | None, heads: HeadLayout, machine: Machine
) -> _SpanChoice:
    """The chunking, QG and span of least predicted time where the span is to be chosen
    (or QG, or both): :func:`_choose_qg_span` at each of :func:`_chunk_candidates`, a
    neighbouring chunking taken only where it is predicted faster by NEIGHBOUR_MARGIN."""
    candidates = _chunk_candidates(tree, chunk, qg, heads, machine, neighbours=True)
    choices = [_choose_qg_span(tree, layout, q, qg is not None, span, heads, machine) for layout, q in candidates]
    best = choices[0]
    for other in choices[1:]:
        if other.time_s < best.time_s * (1 - NEIGHBOUR_MARGIN):
            best = other
    return best


def _span_stats(
    tree: TreeBatch,
    layout: _Chunking,
    qgs: list[int],
    trial_groups: _TrialGroups,
    runs: list[_Runs] | None,
    spans: np.ndarray,
    heads: HeadLayout,
    machine: Machine,
) -> PlanStats:
    """Plan quantities after coalescing at each of ``spans``, for each QG trial's groups and
    runs (QG-major), without building the groups; a run's pieces are taken to be as long
    as its first (its even share rounded up to where :func:`_span_groups` cuts).
    Vectorized over both: the trials' groups and runs side by side, summed per trial by a
    one-hot product, as in :func:`_chunk_stats`. ``runs`` None: nothing coalesces (one
    span), and every group stays as it is."""
    n, column = len(qgs), spans[:, None]
    one_hot = np.eye(n, dtype=np.int64)
    # the trials' groups: coalescing joins groups of equal slots, so their rows, hence
    # row-tokens, stay, and so do the dense groups' tokens (a dense run's pieces are dense)
    g_trial, filled, full = trial_groups.trial, trial_groups.filled, trial_groups.full
    length = layout.length[trial_groups.chunk]
    by_group = one_hot[g_trial]  # [groups, trials]
    tile_rows = heads.tile_rows(filled, np.asarray(qgs)[g_trial])
    row_tokens = (length * tile_rows) @ by_group
    is_dense = _dense(filled * heads.group, full, length)
    programs = _programs(tile_rows, is_dense, machine)
    apart = machine.dense_apart
    # the groups that stay as they are: all, or those not in a run of full groups
    stay = slice(None) if runs is None else ~full
    rest, by_rest, rest_programs = length[stay], by_group[stay], programs[stay]
    rest_dense = is_dense[stay]
    rest_triton = ~(rest_dense & apart)

    def longest(values: np.ndarray, by: np.ndarray) -> np.ndarray:
        """The largest of ``values`` [..., items] per trial (``by`` [items, trials])."""
        return (values[..., None] * by).max(axis=-2, initial=0)

    # [1, trials], then [spans, trials] once the runs are cut at each span (so all four
    # have ``groups``' shape): the Triton kernel's longest group, the dense kernel's, the
    # dense groups, the groups
    top = longest(rest * rest_triton, by_rest)[None, :]
    top_dense = longest(rest * rest_dense, by_rest)[None, :]
    dense = (rest_dense @ by_rest)[None, :]
    groups = by_rest.sum(axis=0)[None, :]
    partials = (filled @ by_group)[None, :]  # a slot per pair
    pairs = int(partials[0, 0])  # the same for every QG: a query has one slot per chunk it sees
    n_longest = np.zeros_like(groups)
    if runs is not None:  # the trials' runs of full groups, cut into pieces at each span
        by_run = one_hot[np.repeat(np.arange(n), [len(r.tokens) for r in runs])]
        tokens = np.concatenate([r.tokens for r in runs])
        members = np.concatenate([r.members for r in runs])
        run_slots = np.concatenate([r.slots for r in runs])
        run_rows = heads.tile_rows(run_slots, np.repeat(qgs, [len(r.tokens) for r in runs]))
        run_dense = _dense(run_slots * heads.group, True, tokens)
        run_programs = _programs(run_rows, run_dense, machine)
        run_triton = ~(run_dense & apart)
        pieces = _run_pieces(members, tokens, column, layout.chunk)  # [spans, runs]
        # a piece ends where _span_groups cuts: at the first member start (a chunk
        # boundary) at or past its even share, or, where it cuts evenly, at the first
        # multiple of SPLIT_ALIGN; the first piece is then the longest
        share = -(-tokens // np.maximum(pieces, 1))
        even = (column < EVEN_BELOW * layout.chunk) & (tokens > pieces * (layout.chunk + SPLIT_ALIGN))
        grid = np.where(even, SPLIT_ALIGN, layout.chunk)
        piece_len = np.minimum(-(-share // grid) * grid, tokens)
        # uncoalesced: each member is at most a chunk
        piece_len = np.where(column <= layout.chunk, np.minimum(piece_len, layout.chunk), piece_len)
        top = np.maximum(longest(piece_len * run_triton, by_run), top)
        top_dense = np.maximum(longest(piece_len * run_dense, by_run), top_dense)
        n_longest = (pieces * run_programs * run_triton * (2 * piece_len >= top @ by_run.T)) @ by_run
        partials = partials + (pieces * run_slots) @ by_run - (members * run_slots) @ by_run
        groups = groups + pieces @ by_run
        dense = dense + (pieces * run_dense) @ by_run
    n_longest = n_longest + ((2 * rest >= top @ by_rest.T) * rest_programs * rest_triton) @ by_rest
    return PlanStats(
        chunk=layout.chunk,
        queries_per_group=np.repeat(qgs, len(spans)),
        groups=groups.T.ravel(),
        tokens_read=np.repeat(length @ by_group, len(spans)),
        row_tokens=np.repeat(row_tokens, len(spans)),
        longest=top.T.ravel(),
        n_longest=n_longest.T.ravel(),
        partials=partials.T.ravel(),
        dense_groups=dense.T.ravel(),
        dense_tokens=np.repeat((length * is_dense) @ by_group, len(spans)),
        dense_row_tokens=np.repeat((length * tile_rows * is_dense) @ by_group, len(spans)),
        dense_longest=top_dense.T.ravel(),
        # the launches as counted before coalescing, at every span
        **_tree_fields(tree, pairs),
    )


def _choose_qg_span(
    tree: TreeBatch,
    layout: _Chunking,
    qg: int,
    fixed_qg: bool,
    span: int | None,
    heads: HeadLayout,
    machine: Machine,
) -> _SpanChoice:
    """Queries per group and span of least predicted time, with the slots and runs of the
    winner (runs None if nothing coalesces). QG ranges over the first choice and its
    neighbours (unless fixed), span over the chunk itself (no coalescing) and the
    :data:`SPAN_CHOICES` above it (unless given); ties go to the smallest QG, then the
    smallest span. Only the chosen rows get their bits (:meth:`_SpanChoice.rows`)."""
    pairs, source = _alike_pairs(tree, layout)
    choices = heads.queries_per_group_choices()
    at = choices.index(qg) if qg in choices else 0
    qgs = [qg] if fixed_qg else list(choices[max(at - 1, 0) : at + 2])
    spans = np.asarray(
        [span] if span is not None else [layout.chunk, *(s for s in SPAN_CHOICES if s > layout.chunk)],
        dtype=np.int64,
    )
    groups = _TrialGroups.of_pairs(pairs, qgs, source)
    coalescible = _coalescible_trials(groups, len(qgs))
    slots: list[_Slots] = []  # every trial's, where their runs need them
    runs: list[_Runs] | None = None
    if coalescible.any():
        slots = [_slots(pairs, layout, g, source) for g in qgs]
        runs = [_Runs.of(layout, s, bool(c)) for s, c in zip(slots, coalescible, strict=True)]
    else:  # nothing coalesces: every span plans the same groups, and only the winner's slots are made
        spans = spans[:1]
    times = evaluate("time_s", _span_stats(tree, layout, qgs, groups, runs, spans, heads, machine), heads, machine)
    g, i = divmod(int(np.argmin(times)), len(spans))  # the first minimum
    return _SpanChoice(float(times[g * len(spans) + i]), layout, qgs[g], int(spans[i]),
                       slots[g] if slots else _slots(pairs, layout, qgs[g], source), pairs,
                       None if runs is None else runs[g])


@dataclass(frozen=True, slots=True)
class _SpanChoice:
    """:func:`_choose_qg_span`'s winner at one chunking, and its predicted time."""

    time_s: float
    layout: _Chunking
    qg: int
    span: int
    slots: _Slots
    pairs: _Pairs
    runs: _Runs | None

    def rows(self) -> _Rows:
        return self.slots.with_bits(self.pairs, self.layout)


def _launches(partials: Any, seeing: int, queries: int) -> Any:
    """The launches of the two stages that a generated module makes (templates/tree.py.j2,
    ``attention``) for plans of ``partials`` partials, of a batch of ``queries`` queries,
    ``seeing`` of which see a token: stage 1 when there are partials (groups); the merge
    unless every query has exactly one partial (stage 1 then writes the outputs). Every
    query that sees a token has a partial, so each has exactly one iff every query sees a
    token and there are no more partials than such queries. So a plan of no groups
    launches the merge alone, which writes its queries' outputs (O 0, LSE -inf), and one
    without queries launches nothing. Arithmetic only, so that it takes numpy arrays (the
    candidates of :func:`_chunk_stats`) and Python ints (one plan's, in
    :func:`_tree_fields`, where numpy's calls on scalars would cost more than the rest)."""
    one_each = (partials <= seeing) & (seeing == queries)
    return (partials > 0) * 1 + (1 - one_each)


def _tree_fields(tree: TreeBatch, partials: int) -> dict[str, int]:
    """The PlanStats fields that come from the tree and the plan's count of partials alone
    (which, with the queries that see a token, fixes the launches)."""
    return {
        "queries": tree.n_queries,
        "launches": _launches(partials, tree.n_seeing, tree.n_queries),
        "branch_tokens": int(tree.query_visible_counts.sum()),
        "unique_tokens": tree.needed_kv_tokens,
    }


#: The plan arrays :func:`_group_stats` reads (a plan keeps them for its cost report).
_STATS_ARRAYS = ("group_kv_len", "group_q", "group_slots", "dense_count", "group_fold")


def _group_stats(
    tree: TreeBatch, chunk: int, qg: int, host: dict[str, np.ndarray], heads: HeadLayout, machine: Machine
) -> PlanStats:
    """The plan's quantities, from its assembled arrays (``_host_arrays``)."""
    length, partials = host["group_kv_len"], int((host["group_q"] >= 0).sum())
    tile_rows = heads.tile_rows(host["group_slots"], qg)
    dense = np.arange(len(length)) < host["dense_count"][0]  # listed first
    triton = ~dense if machine.dense_apart else np.ones_like(dense)
    top = int(length[triton].max(initial=0))
    longest = (2 * length >= top) & triton
    return PlanStats(
        chunk=chunk,
        queries_per_group=qg,
        groups=len(length),
        tokens_read=int(length.sum()),
        row_tokens=int(length @ tile_rows),
        longest=top,
        n_longest=int(longest @ _programs(tile_rows, dense, machine)),
        partials=partials,
        dense_groups=int(host["dense_count"][0]),
        folded=int(_n_folded(host["group_fold"], int(host["dense_count"][0])) > 0),
        dense_tokens=int(length[dense].sum()),
        dense_row_tokens=int(length[dense] @ tile_rows[dense]),
        dense_longest=int(length[dense].max(initial=0)),
        **_tree_fields(tree, partials),
    )
