"""Planner invariants, chosen on their own: exact coverage, no invisible bit, determinism,
the incremental decode step, fixed-capacity buffers, bad input and planning time."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attngen import cli
from attngen.bench_tree import planning_ms
from attngen.cost import DENSE_ROWS, HeadLayout, Machine
from attngen.errors import PlanError
from attngen.plan import (
    FOLD_ALIGN,
    TENSOR_NAMES,
    Plan,
    PlanBuffers,
    plan_into,
    plan_tree,
    replan_after_append,
)
from attngen.plan.arrays import _stable_argsort
from attngen.plan.buffers import _joined
from attngen.plan.choice import (
    MAX_CHUNK,
    _chunk_stats,
    _group_stats,
    _span_stats,
)
from attngen.plan.groups import (
    _alike_pairs,
    _alike_sources,
    _layout_rows,
    _rows,
    _Slots,
    _slots,
    _TrialGroups,
)
from attngen.plan.layout import _chunk_layout, _KvNodes, _pieces, _place, _places
from attngen.plan.planner import _matched
from attngen.plan.spans import _coalescible, _coalescible_trials, _Runs
from attngen.plan.tensors import _int32_tensors
from attngen.plan.visibility import _pairs, _prefix_masks, _queries_per_chunk, _Sight
from attngen.tree import QueryMode, TreeBatch
from attngen.workloads import WORKLOADS, planning_target_tree


def coverage(tree: TreeBatch, plan: Plan) -> np.ndarray:
    """int [n_queries, n_kv]: how many (group, slot) cover each (query, token), read as
    the kernel reads a plan: a full group's slots see its whole KV range, any other
    group's slots see the tokens of their bits."""
    bits = plan.group_bits.numpy().view(np.uint8)
    visible = np.unpackbits(bits, axis=-1, bitorder="little").astype(bool)  # [G, QG, chunk]
    full = plan.group_full.numpy().astype(bool)
    starts, lens, slots = plan.group_kv_start.numpy(), plan.group_kv_len.numpy(), plan.group_q.numpy()
    g, s, j = np.nonzero(visible & ~full[:, None, None])
    query = slots[g, s]
    assert (query >= 0).all(), "a padding slot has a bit set"
    assert (j < lens[g]).all(), "a bit past the chunk's length"
    cov = np.zeros((tree.n_queries, tree.n_kv), dtype=np.int64)
    np.add.at(cov, (query, starts[g] + j), 1)
    for f in np.flatnonzero(full):
        cov[slots[f][slots[f] >= 0], starts[f] : starts[f] + lens[f]] += 1
    return cov


def check_invariants(tree: TreeBatch, plan: Plan) -> None:
    assert (coverage(tree, plan) == tree.visible_matrix()).all()
    for name in TENSOR_NAMES:
        assert getattr(plan, name).dtype == torch.int32, name
    starts, lens = plan.group_kv_start.numpy(), plan.group_kv_len.numpy()
    query, full = plan.group_q.numpy(), plan.group_full.numpy().astype(bool)
    assert (lens >= 1).all() and (starts + lens <= tree.n_kv).all()
    # only full groups grow past a chunk (coalesced into spans), by at most a chunk's slack
    assert ((lens <= plan.chunk) | full).all()
    assert (lens < max(plan.span, plan.chunk) + plan.chunk).all()
    bits_set = np.unpackbits(plan.group_bits.numpy().view(np.uint8), axis=-1).sum(-1)
    chunk_sized = lens <= plan.chunk
    every_bit = ((bits_set == lens[:, None]) | (query < 0)).all(axis=1)
    assert every_bit[chunk_sized].tolist() == full[chunk_sized].tolist()
    # group_slots: the slots up to each group's last filled one (the kernel's tile height)
    qg = plan.queries_per_group
    last = np.where(query >= 0, np.arange(1, qg + 1), 0).max(axis=1)
    assert plan.group_slots.tolist() == last.tolist()
    ptr, row = plan.merge_ptr.numpy(), plan.merge_row.numpy()
    assert ptr[0] == 0 and ptr[-1] == plan.n_partials and (np.diff(ptr) >= 0).all()
    # every filled slot has its own merge row, and the rows are 0..P-1
    assert row.shape == query.shape and ((row >= 0) == (query >= 0)).all()
    assert sorted(row[row >= 0].tolist()) == list(range(plan.n_partials))
    by_row = np.argsort(np.where(row >= 0, row, row.size), axis=None)[: plan.n_partials]
    for i in range(tree.n_queries):
        parts = by_row[ptr[i] : ptr[i + 1]]  # flat slots g * QG + s, in merge order
        assert (query.reshape(-1)[parts] == i).all()
        assert (np.diff(starts[parts // plan.queries_per_group]) > 0).all()
        assert (len(parts) > 0) == (tree.query_visible_counts[i] > 0)
    assert plan.q_pos.tolist() == tree.q_pos.tolist()
    assert plan.kv_pos.tolist() == tree.kv_pos.tolist()
    # the dense groups (full, rows in DENSE_ROWS for the plan's heads) come first
    rows = last * plan.group
    dense = full & (rows > DENSE_ROWS[0]) & (rows <= DENSE_ROWS[1])
    assert plan.n_dense == int(plan.tensors()["dense_count"][0]) == dense.sum()
    assert dense[: plan.n_dense].all() and not dense[plan.n_dense :].any()
    check_fold(plan)


def check_fold(plan: Plan) -> None:
    """group_fold pairs a dense group with the group that continues it (same slots, from
    its end, itself of whole 128-key tiles), for every group past the dense ones or for
    none; group_lead is the tail's leading tokens that every filled slot sees, and no more."""
    fold, lead = plan.group_fold.numpy(), plan.group_lead.numpy()
    starts, lens, query = plan.group_kv_start.numpy(), plan.group_kv_len.numpy(), plan.group_q.numpy()
    paired = np.flatnonzero(fold >= 0)
    assert (fold[fold[paired]] == paired).all()
    hosts = paired[paired < plan.n_dense]
    tails = fold[hosts]
    assert (tails >= plan.n_dense).all() and 2 * len(hosts) == len(paired) == 2 * plan.n_folded
    assert plan.n_folded in (0, plan.n_groups - plan.n_dense)
    assert (starts[tails] == starts[hosts] + lens[hosts]).all()
    assert (query[tails] == query[hosts]).all() and (lens[hosts] % FOLD_ALIGN == 0).all()
    assert (lens[hosts] + lens[tails] <= lens[: plan.n_dense].max(initial=0)).all()
    others = np.ones(len(fold), dtype=bool)
    others[tails] = False
    assert (lead[others] == 0).all()
    seen = np.unpackbits(plan.group_bits.numpy().view(np.uint8), axis=-1, bitorder="little").astype(bool)
    for t in tails:
        filled = seen[t][query[t] >= 0]  # [slots, chunk]
        assert filled[:, : lead[t]].all()
        assert lead[t] == lens[t] or not filled[:, lead[t]].all()


# ---- hypothesis strategies: tree shapes -------------------------------------------------


@st.composite
def parent_arrays(draw: st.DrawFn) -> list[int]:
    n = draw(st.integers(1, 40))
    shape = draw(st.sampled_from(["recursive", "chain", "star", "deep", "forest"]))
    if shape == "chain":
        return [-1, *range(n - 1)]
    if shape == "star":
        return [-1] + [0] * (n - 1)
    if shape == "deep":  # a long spine with short side branches
        return [-1] + [max(i - 1 - draw(st.integers(0, 1)) * (i % 3 == 0), 0) for i in range(1, n)]
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    if shape == "forest":
        for i in draw(st.lists(st.integers(0, n - 1), max_size=3)):
            parents[i] = -1
    return parents


@st.composite
def tree_batches(draw: st.DrawFn) -> TreeBatch:
    parents = draw(parent_arrays())
    n = len(parents)
    sizes = st.one_of(st.just(0), st.just(1), st.integers(0, 40), st.integers(30, 300))
    tokens = draw(st.lists(sizes, min_size=n, max_size=n))
    queries = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    mode: QueryMode = draw(st.sampled_from(["node", "token"]))
    return TreeBatch.from_parents(parents, tokens, queries, mode=mode)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    tree_batches(),
    st.sampled_from([32, 64, 96, 128, 256]),
    st.sampled_from([1, 2, 4, 16]),
    st.sampled_from([1, 1.5, 1.75, 2, 3, 8]),
)
def test_every_visible_pair_covered_exactly_once(
    tree: TreeBatch, chunk: int, qg: int, span_chunks: float
) -> None:
    # spans under two chunks cut long runs evenly (SPLIT_ALIGN), the rest at chunks
    plan = plan_tree(tree, chunk=chunk, queries_per_group=qg, span=int(span_chunks * chunk))
    check_invariants(tree, plan)


def test_a_cut_past_the_runs_last_group_leaves_no_empty_group() -> None:
    # found by hypothesis: the last token query sees node 5 (22 tokens, chunk 0) and all of
    # its own node (27 tokens, chunk 1) whole, a run of 49 tokens; span 48 asks for two
    # pieces, but the second cut (25) is past the run's last group start (22)
    tokens = [0] * 29
    tokens[5], tokens[19] = 22, 27
    tree = TreeBatch.from_parents([-1] + [0] * 18 + [5] + [0] * 9, tokens, [0, 1, 19], mode="token")
    check_invariants(tree, plan_tree(tree, chunk=32, queries_per_group=1, span=48))


def test_buffers_report_the_folds_of_their_plan() -> None:
    """PlanBuffers.n_folded (read by a launch over them) counts the folded groups of the
    plan last written, from the host copy: as plan_tree's, and 0 once an unfolded plan
    of the same tree replaces it."""
    tree = WORKLOADS["spec_4k_92"]().tree
    heads = HeadLayout(heads_q=32, heads_kv=32)
    # a capacity of 13 groups: the host copy aligns each tensor's start, so 3 spare elements
    # follow group_fold
    buffers = PlanBuffers.allocate(max_groups=13, max_queries=tree.n_queries, max_kv=tree.n_kv, chunk=512,
                                   queries_per_group=128, span=1024, heads=heads)
    assert buffers.n_folded == 0
    plan_into(buffers, tree)
    assert buffers.n_folded == plan_tree(tree, chunk=512, queries_per_group=128, span=1024, heads=heads).n_folded == 1
    plan_into(buffers, tree, machine=Machine(sms=1000))  # every program fits: nothing folds
    assert buffers.n_folded == 0 and (buffers.tensors["group_fold"] == -1).all()


@pytest.mark.parametrize(("name", "heads_kv", "folded", "lead"), [
    # the tree's chunk after the prefix's last span, one QG: 128 prefix tokens every
    # query sees, then the 184 tree tokens
    ("spec_16k_184", 32, 1, 128),
    ("spec_16k_184", 8, 4, 128),  # the same for each of four QGs
    # chunk 256, span 1536 (session 55): its tree chunk's 32 programs run beside 96 dense ones
    ("spec_4k_92", 32, 0, 0),
    ("spec_4k_92", 8, 0, 0),  # its 24 tree-chunk programs fit beside the 96 dense ones
    ("fewshot_4k_x20", 8, 0, 0),  # no dense groups
])
def test_the_fold_on_the_reference_workloads(name: str, heads_kv: int, folded: int, lead: int) -> None:
    tree = WORKLOADS[name]().tree
    heads = HeadLayout(heads_q=32, heads_kv=heads_kv)
    plan = plan_tree(tree, heads=heads)
    check_invariants(tree, plan)
    assert plan.n_folded == folded
    if folded:
        tails = plan.group_fold.numpy()[: plan.n_dense]
        assert plan.group_lead.numpy()[tails[tails >= 0]].tolist() == [lead] * folded
    # a machine without a kernel of its own for dense groups folds nothing
    alone = plan_tree(tree, heads=heads, machine=Machine(dense_kernel_launches=0))
    assert alone.n_folded == 0 and (alone.group_fold.numpy() == -1).all()


def test_a_tree_without_kv_plans_no_group() -> None:
    # a forest: queries on empty nodes see nothing
    tree = TreeBatch.from_parents([-1, 0, 0, -1], [0, 0, 0, 0], [1, 2, 3])
    for plan in (plan_tree(tree), plan_tree(tree, chunk=64, queries_per_group=2, span=256)):
        assert plan.n_groups == 0 and plan.n_partials == 0
        assert plan.merge_ptr.tolist() == [0, 0, 0, 0]
        check_invariants(tree, plan)


def test_short_spans_cut_long_runs_evenly() -> None:
    # one 4000-token prompt seen by 20 queries, in chunks of 512: at span 768 its six
    # pieces are cut at multiples of 64 tokens, not at chunk boundaries (which would give
    # pieces of 1024 and 512); at span 1024 (two chunks) they stay chunk-aligned
    tree = TreeBatch.from_parents([-1] + [0] * 20, [4000] + [400] * 20, list(range(1, 21)))
    plan = plan_tree(tree, chunk=512, queries_per_group=32, span=768)
    prompt = plan.group_kv_start.numpy() < 4000
    assert plan.group_kv_len.numpy()[prompt].tolist() == [704, 640, 704, 640, 704, 608]
    check_invariants(tree, plan)
    aligned = plan_tree(tree, chunk=512, queries_per_group=32, span=1024)
    starts = aligned.group_kv_start.numpy()
    assert (starts[starts < 4000] % 512 == 0).all()
    check_invariants(tree, aligned)


def _trial_groups(slots: list[_Slots]) -> _TrialGroups:
    """The groups of each trial's listed slots, side by side, as the span choice counts them."""
    return _TrialGroups(
        np.arange(len(slots)).repeat([len(s.chunk) for s in slots]),
        np.concatenate([s.chunk for s in slots]),
        np.concatenate([s.filled for s in slots]),
        np.concatenate([s.full for s in slots]),
    )


@pytest.mark.parametrize("name", ["fewshot_4k_x20", "fewshot_32k_x64", "spec_4k_92", "spec_16k_184"])
@pytest.mark.parametrize("heads_kv", [32, 8])
def test_span_estimates_match_the_built_plans(name: str, heads_kv: int) -> None:
    """The QG and span choice estimates each candidate's groups without building them
    (``_span_stats``). On trees whose long nodes are whole chunks, its longest group and
    group count equal the built plan's at every QG and span: the even split it used
    before (1792 tokens where the cut gives 2048) ranked spec_4k_92 MHA's plans the wrong
    way round (session 38). So do the programs of the groups at least half as long (a
    tall plan's Triton groups count as two row blocks) on the speculative trees; the
    estimate takes a run's pieces to be as long as its first, which overcounts where a
    run's last piece is short (few-shot, QG 1: the first branch continues the prompt).
    The dense groups' count, tokens, row-tokens and longest group are equal throughout."""
    tree, machine = WORKLOADS[name]().tree, Machine()
    heads = HeadLayout(heads_q=32, heads_kv=heads_kv)
    layout = _chunk_layout(tree, 512)
    pairs, source = _alike_pairs(tree, layout)
    qgs = list(heads.queries_per_group_choices())
    slots = [_slots(pairs, layout, qg, source) for qg in qgs]
    runs = [_Runs.of(layout, s) for s in slots]
    spans = np.array([512, 768, 1024, 2048, 4096, 8192])
    estimate = _span_stats(tree, layout, qgs, _trial_groups(slots), runs, spans, heads, machine)
    longest, n_longest, groups = (np.asarray(x) for x in (estimate.longest, estimate.n_longest, estimate.groups))
    dense = ("dense_groups", "dense_tokens", "dense_row_tokens", "dense_longest")
    dense_estimates = [np.broadcast_to(getattr(estimate, f), groups.shape) for f in dense]
    for i, (qg, span) in enumerate((qg, span) for qg in qgs for span in spans):
        plan = plan_tree(tree, chunk=512, queries_per_group=qg, span=int(span), heads=heads)
        built = _group_stats(tree, 512, qg, plan.state.host, heads, machine)
        assert (longest[i], groups[i]) == (built.longest, built.groups), (qg, span)
        # the dense kernel's work: its groups, tokens, row-tokens and longest group
        assert [int(e[i]) for e in dense_estimates] == [getattr(built, f) for f in dense], (qg, span)
        if name.startswith("spec"):
            assert n_longest[i] == built.n_longest, (qg, span)
        else:
            assert built.n_longest <= n_longest[i] <= built.n_longest + len(runs[i // len(spans)].tokens)


@SETTINGS
@given(tree_batches(), st.sampled_from([(32, 32), (32, 8), (8, 1)]))
def test_cost_model_choice_keeps_invariants(tree: TreeBatch, heads: tuple[int, int]) -> None:
    layout = HeadLayout(heads_q=heads[0], heads_kv=heads[1])
    plan = plan_tree(tree, heads=layout)
    assert plan.queries_per_group * layout.group <= layout.max_rows
    check_invariants(tree, plan)


@SETTINGS
@given(tree_batches(), st.sampled_from([128, 256]), st.sampled_from([None, 512]))
def test_folds_keep_invariants(tree: TreeBatch, chunk: int, span: int | None) -> None:
    # one query head per KV head of 32 makes any group of three queries dense, and a
    # one-SM machine never has room beside the dense groups: every fold the structure
    # allows is made
    plan = plan_tree(tree, chunk=chunk, span=span, heads=HeadLayout(heads_q=32, heads_kv=1),
                     machine=Machine(sms=1))
    check_invariants(tree, plan)


def test_a_token_tree_folds_into_its_prefix() -> None:
    # a 428-token prefix, then a token tree (a root of 2 tokens with two 1-token children)
    # queried at each node. Chunks of 128 at span 256: the prefix's first 384 tokens make
    # dense groups of 256 and 128 tokens; the chunk after them (the prefix's last 44 tokens
    # and the tree's 4) has bits for the same three queries and is folded into the second
    tree = TreeBatch.from_parents([-1, 0, 1, 1], [428, 2, 1, 1], [1, 2, 3])
    plan = plan_tree(tree, chunk=128, queries_per_group=4, span=256, heads=HeadLayout(heads_q=32, heads_kv=1),
                     machine=Machine(sms=1))
    check_invariants(tree, plan)
    assert plan.n_dense == 2 and plan.n_folded == 1
    assert plan.group_kv_len.tolist() == [256, 128, 48]
    assert plan.group_fold.tolist() == [-1, 2, 1]
    assert plan.group_lead.tolist() == [0, 0, 44 + 2]  # the prefix's last tokens and the root's
    # with the SMs of an H200, the one program per KV head of the tree's chunk runs beside
    assert plan_tree(tree, chunk=128, queries_per_group=4, span=256,
                     heads=HeadLayout(heads_q=32, heads_kv=1)).n_folded == 0


@settings(max_examples=60, deadline=None)
@given(tree_batches(), st.sampled_from([32, 64, 128]), st.sampled_from([1, 2, 4, 16]))
def test_alike_chunks_planned_once_equal_every_pair_planned(tree: TreeBatch, chunk: int, qg: int) -> None:
    """The inner chunks of a long node repeat the groups of the chunk before them, rather
    than listing their pairs again: the rows are those of every pair."""
    layout = _chunk_layout(tree, chunk)
    want, got = _rows(_pairs(tree, layout), layout, qg), _layout_rows(tree, layout, qg)
    for name in ("chunk", "query", "full"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert np.array_equal(got.bits.array(), want.bits.array())
    # the slots the choice of QG and span counts from (filled slots: rows and pairs)
    pairs, source = _alike_pairs(tree, layout)
    assert np.array_equal(_slots(pairs, layout, qg, source).filled, _slots(_pairs(tree, layout), layout, qg).filled)


@settings(max_examples=60, deadline=None)
@given(tree_batches(), st.sampled_from([32, 64, 128]), st.lists(st.sampled_from([1, 2, 3, 4, 16, 64]), min_size=1, max_size=3))
def test_trial_groups_counted_at_once_equal_each_trials_slots(tree: TreeBatch, chunk: int, qgs: list[int]) -> None:
    """The QG and span choice counts every QG trial's groups in one pass, without their
    slots: each group's trial, chunk, filled slots and fullness are those of each trial's
    :func:`_slots`, and so is whether the trial has groups to coalesce."""
    layout = _chunk_layout(tree, chunk)
    pairs, source = _alike_pairs(tree, layout)
    slots = [_slots(pairs, layout, qg, source) for qg in qgs]
    want, got = _trial_groups(slots), _TrialGroups.of_pairs(pairs, qgs, source)
    for name in ("trial", "chunk", "filled", "full"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert _coalescible_trials(got, len(qgs)).tolist() == [_coalescible(s) for s in slots]


def test_alike_chunks_are_a_long_nodes_inner_chunks() -> None:
    """spec_4k_92's 4000-token prefix at chunk 512: chunks 1-6 repeat chunk 0 (7 whole
    chunks, no query on the prefix); the last, 416 tokens of the prefix and the token
    tree, is its own. A token-mode query on the prefix would see it in part: no repeats."""

    def sources(tree: TreeBatch) -> list[int] | None:
        source = _alike_sources(tree, _chunk_layout(tree, 512))
        return None if source is None else source.tolist()

    assert sources(WORKLOADS["spec_4k_92"]().tree) == [0] * 7 + [7]
    assert sources(TreeBatch.from_parents([-1, 0], [2000, 3], [0, 1], mode="token")) is None
    assert sources(TreeBatch.from_parents([-1, 0], [2000, 3], [0, 1])) == [0, 0, 0, 3]


@settings(max_examples=25, deadline=None)
@given(tree_batches())
def test_identical_inputs_give_identical_tensors(tree: TreeBatch) -> None:
    a = plan_tree(tree)
    b = plan_tree(
        TreeBatch.from_parents(
            tree.parent.tolist(),
            tree.tokens.tolist(),
            tree.query_nodes.tolist(),
            mode=tree.query_mode,
        )
    )
    for name in TENSOR_NAMES:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@settings(max_examples=40, deadline=None)
@given(
    tree_batches(),
    st.sampled_from([32, 64, 128]),
    st.sampled_from([1, 4]),
    st.integers(1, 3),
    st.sampled_from([1, 4]),
)
def test_incremental_append_equals_fresh_plan(
    tree: TreeBatch, chunk: int, qg: int, steps: int, span_chunks: int
) -> None:
    span = span_chunks * chunk
    plan = plan_tree(tree, chunk=chunk, queries_per_group=qg, span=span)
    for _ in range(steps):
        tree = tree.append_to_leaves(1)
        plan = replan_after_append(plan, tree)
    fresh = plan_tree(tree, chunk=chunk, queries_per_group=qg, span=span)
    check_invariants(tree, plan)
    for name in TENSOR_NAMES:
        assert torch.equal(getattr(plan, name), getattr(fresh, name)), name


@SETTINGS
@given(tree_batches(), st.data())
def test_appended_batch_equals_a_rebuilt_one(tree: TreeBatch, data: st.DataObject) -> None:
    """append_tokens reuses the structure and derives only the token-dependent fields;
    every field and every derived view equals those of the batch built from scratch."""
    extra = np.array(data.draw(st.lists(st.integers(0, 70), min_size=tree.n_nodes, max_size=tree.n_nodes)))
    grown = tree.append_tokens(extra)
    rebuilt = TreeBatch(tree.parent, tree.tokens + extra, tree.query_nodes, tree.query_mode)
    for name in ("parent", "tokens", "query_nodes", "order", "pre_rank", "pre_end", "node_kv_start",
                 "node_depth_start", "node_tree", "kv_pos", "q_pos", "q_tree", "query_own_len",
                 "query_visible_counts"):
        np.testing.assert_array_equal(getattr(grown, name), getattr(rebuilt, name), err_msg=name)
    assert grown.query_mode == rebuilt.query_mode and grown.needed_kv_tokens == rebuilt.needed_kv_tokens
    np.testing.assert_array_equal(grown.visible_matrix(), rebuilt.visible_matrix())
    assert not grown.tokens.flags.writeable and not grown.node_depth_start.flags.writeable


def test_incremental_keeps_unchanged_chunks_unless_a_node_fills_several(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of short nodes with a query at each, and a star of short leaves: the
    unchanged chunks' groups are kept (planning afresh is refused here). A long prompt,
    whose inner chunks a fresh plan makes once, is planned afresh (keeping is refused
    there). Both equal plan_tree (test_incremental_append_equals_fresh_plan)."""
    from attngen.plan import planner

    def refused(*_: Any) -> Any:
        raise AssertionError("not the path this tree should take")

    chain = TreeBatch.from_parents([-1, *range(31)], [64] * 32, np.arange(32))
    star = TreeBatch.from_parents([-1, *[0] * 8], [100, *[60] * 8])
    prompt = TreeBatch.from_parents([-1, 0, 0], [1000, 200, 300])
    for tree, refuse in ((chain, "_layout_rows"), (star, "_layout_rows"), (prompt, "_reused_rows")):
        plan = plan_tree(tree, chunk=128, queries_per_group=4, span=128)
        with monkeypatch.context() as patch:
            patch.setattr(planner, refuse, refused)
            grown = tree.append_to_leaves(1)
            check_invariants(grown, replan_after_append(plan, grown))


def test_replan_matches_exactly_the_unchanged_chunks() -> None:
    """Chunk 128: the prompt fills chunks 0-7; node 1 (200 tokens) chunks 8-9, node 2 (300)
    10-12. One token more on each leaf changes only their last chunks (9 and 12); the
    others keep their content, though nodes 1 and 2 now start one token later."""
    tree = TreeBatch.from_parents([-1, 0, 0], [1000, 200, 300])
    before, after = _chunk_layout(tree, 128), _chunk_layout(tree.append_to_leaves(1), 128)
    assert _matched(after.keys(), before.keys()).tolist() == [*range(9), -1, 10, 11, -1]
    assert _matched(after.keys(), before.keys()[:0]).tolist() == [-1] * 13


def test_structure_change_falls_back_to_fresh_plan() -> None:
    tree = TreeBatch.from_parents([-1, 0], [100, 10])
    plan = plan_tree(tree, chunk=64, queries_per_group=1)
    branched = tree.add_branch(0, 5)
    check_invariants(branched, replan_after_append(plan, branched))


def test_small_example_groups_and_bits() -> None:
    tree = TreeBatch.from_parents([-1, 0, 0], [40, 10, 5])
    plan = plan_tree(tree, chunk=64, queries_per_group=2)
    assert plan.n_groups == 1 and plan.group_q.tolist() == [[0, 1]]
    assert plan.group_full.tolist() == [0]
    words = plan.group_bits[0].numpy().view(np.uint32).tolist()
    # query 0 (node 1) sees tokens 0..49; query 1 (node 2) sees 0..39 and 50..54
    assert words[0] == [0xFFFFFFFF, (1 << 18) - 1]
    assert words[1] == [0xFFFFFFFF, 0xFF | (((1 << 23) - 1) ^ ((1 << 18) - 1))]


@pytest.mark.parametrize(
    ("span", "heads"),
    [(None, None), (192, None), (192, HeadLayout(heads_q=64, heads_kv=1))],  # the last: dense groups
)
def test_plan_into_fixed_buffers(span: int | None, heads: HeadLayout | None) -> None:
    tree = TreeBatch.from_parents([-1, 0, 0, 1], [300, 20, 50, 7])
    buffers = PlanBuffers.allocate(
        max_groups=64, max_queries=8, max_kv=1024, chunk=64, queries_per_group=2,
        span=span, heads=heads,
    )
    used = plan_into(buffers, tree)
    fresh = plan_tree(tree, chunk=64, queries_per_group=2, span=buffers.span, heads=heads)
    assert buffers.span == (span or 64) and buffers.group == fresh.group
    assert (fresh.n_dense > 0) == (heads is not None)
    assert used.n_groups == fresh.n_groups and used.n_partials == fresh.n_partials
    t = buffers.tensors
    for name in TENSOR_NAMES:
        n = {"merge_ptr": used.n_queries + 1, "q_pos": used.n_queries,
             "q_tree": used.n_queries, "kv_pos": used.n_kv}.get(name, used.n_groups)
        assert t[name][:n].equal(getattr(fresh, name)), name
    assert (t["group_q"][used.n_groups :] == -1).all() and (
        t["group_kv_len"][used.n_groups :] == 0
    ).all()
    assert (t["merge_ptr"][used.n_queries :] == used.n_partials).all()
    assert (t["merge_row"][used.n_groups :] == -1).all()
    small = PlanBuffers.allocate(
        max_groups=2, max_queries=8, max_kv=1024, chunk=64, queries_per_group=2
    )
    before = small.tensors["group_q"].clone()
    with pytest.raises(PlanError, match="n_groups"):
        plan_into(small, tree)
    assert small.tensors["group_q"].equal(before)
    with pytest.raises(PlanError, match="allocated for 1"):  # dense groups depend on the heads
        plan_into(small, tree, heads=HeadLayout(heads_q=32, heads_kv=8))
    assert small.tensors["group_q"].equal(before)


SEQUENCE = [
    TreeBatch.from_parents([-1, 0, 0, 1], [300, 20, 50, 7]),
    TreeBatch.from_parents([-1, 0], [40, 3]),  # fewer groups, queries and tokens
    TreeBatch.from_parents([-1, 0, 0, 0, 2, 2], [500, 64, 1, 90, 33, 120]),
    TreeBatch.from_parents([-1], [5]),
]


def _buffers(device: str) -> PlanBuffers:
    return PlanBuffers.allocate(
        max_groups=64, max_queries=8, max_kv=1024, chunk=64, queries_per_group=2, span=192, device=device
    )


def test_plan_into_a_sequence_of_plans_leaves_each_whole() -> None:
    """Plans of growing and shrinking size into one set of buffers (plan_into writes only
    the rows a plan uses and those the previous one used past them): after each, every
    buffer holds exactly the fresh plan's rows, then padding."""
    buffers = _buffers("cpu")
    pads = {"group_q": -1, "merge_row": -1, "group_fold": -1}
    for tree in SEQUENCE:
        used = plan_into(buffers, tree)
        fresh = plan_tree(tree, chunk=64, queries_per_group=2, span=192)
        for name, got in buffers.tensors.items():
            want = getattr(fresh, name)
            n = len(want)
            assert got[:n].equal(want), name
            tail = used.n_partials if name == "merge_ptr" else pads.get(name, 0)
            assert (got[n:] == tail).all(), name


@pytest.mark.gpu
def test_plan_into_gpu_buffers_equal_cpu_ones() -> None:
    """On a GPU the buffers take each plan in a few copies of their written stretches: after
    every plan of the sequence, each buffer equals the CPU one, capacity included."""
    on_gpu, on_cpu = _buffers("cuda"), _buffers("cpu")
    for tree in SEQUENCE + SEQUENCE[::-1]:
        plan_into(on_gpu, tree)
        plan_into(on_cpu, tree)
        for name in TENSOR_NAMES:
            assert on_gpu.tensors[name].cpu().equal(on_cpu.tensors[name]), name


def test_buffers_are_aligned_views_of_one_allocation() -> None:
    buffers = _buffers("cpu")
    base = buffers.store.device
    for name, t in buffers.tensors.items():
        assert t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr(), name
        assert t.storage_offset() % 4 == 0, name  # 16 bytes of int32


@pytest.mark.parametrize(
    ("stretches", "joined"),
    [
        ([(0, 10), (12, 20), (40, 50)], [(0, 20), (40, 50)]),
        ([(0, 0), (5, 5), (8, 9)], [(8, 9)]),
        ([(0, 10), (15, 20)], [(0, 10), (15, 20)]),
        ([], []),
    ],
)
def test_written_stretches_close_together_copy_as_one(
    stretches: list[tuple[int, int]], joined: list[tuple[int, int]]
) -> None:
    assert _joined(stretches, gap=5) == joined


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk": 48}, "multiple of 32"),
        ({"queries_per_group": 3}, "power of two"),
        ({"queries_per_group": 256}, "max_rows"),
        # not ints: 64.0 and "64" used to fail deep inside, 1000.5 to be cut to 1000
        ({"chunk": 64.0}, "chunk must be an int, got 64.0"),
        ({"chunk": "64"}, "chunk must be an int, got '64'"),
        ({"queries_per_group": True}, "queries_per_group must be an int, got True"),
        ({"span": 1000.5}, r"span must be an int, got 1000\.5"),
        # past the caps: a (chunk + 1) x chunk / 32 mask table of 1.25 PB, and a span
        # past int64 (an OverflowError in the span choice)
        ({"chunk": 100_000_000}, r"chunk 100000000 must be a positive multiple of 32 up to 4096 \(allowed: 32\.\.4096 in steps of 32"),
        ({"chunk": 4096 + 32}, r"chunk 4128 must be .* \(allowed: 32\.\.4096"),
        ({"span": 10**30}, rf"span {10**30} must be a positive number of tokens up to 2147483647 \(allowed: 1\.\.2147483647"),
        ({"queries_per_group": 2**70}, rf"queries_per_group {2**70} .* allowed: \[1, 2, 4, 8, 16, 32, 64, 128, 192\]"),
        ({"queries_per_group": 3 * 2**70}, rf"queries_per_group {3 * 2**70} must be a power of two >= 1 \(allowed: \[1, 2,"),
    ],
)
def test_bad_parameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_tree(TreeBatch.from_parents([-1], [5]), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk": 48}, "multiple of 32"),
        ({"queries_per_group": 3}, "power of two"),
        # 64 queries x 4 heads per KV head = 256 rows: more than a QG may take
        ({"queries_per_group": 64, "heads": HeadLayout(heads_q=32, heads_kv=8)}, r"allowed: \[1, 2, 4, 8, 16, 32, 48\]"),
        ({"span": 0}, "positive number of tokens"),
        ({"max_kv": 0}, "max_kv 0 must be a positive capacity"),
        ({"max_groups": 8.5}, "max_groups must be an int, got 8.5"),
        ({"span": 512.0}, "span must be an int"),
        # sizes that reach the one allocation: refused before it, with the allowed range
        ({"max_kv": 2**31}, r"max_kv 2147483648 must be a positive capacity up to 2147483647 \(allowed: 1\.\.2147483647; KV offsets"),
        ({"max_queries": 10**12}, r"max_queries 1000000000000 must be .* \(allowed: 1\.\.2147483647; query ids"),
        # group_bits of 8 groups x 4 slots x 2 words: 2**31 - 1 // 8 groups at most
        ({"max_groups": 2**28}, r"max_groups 268435456 must be a positive capacity up to 268435455 \(allowed: 1\.\.268435455; group_bits"),
        ({"chunk": 100_000_000}, r"chunk 100000000 must be .* up to 4096 \(allowed: 32\.\.4096"),
        ({"span": 2**31}, r"span 2147483648 must be .* \(allowed: 1\.\.2147483647"),
    ],
)
def test_buffers_check_their_parameters(kwargs: dict[str, object], message: str) -> None:
    """PlanBuffers.allocate refuses what plan_tree refuses, before allocating: a QG too tall
    for the heads would otherwise surface only at plan_into or in the kernel."""
    args: dict[str, object] = {"max_groups": 8, "max_queries": 4, "max_kv": 256, "chunk": 64, "queries_per_group": 4}
    with pytest.raises(PlanError, match=message):
        PlanBuffers.allocate(**(args | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads_kv": 5}, "heads_kv 5 must divide heads_q 32"),
        ({"heads_q": 0}, "heads_q must be at least 1"),
        ({"head_dim_qk": 128.0}, "head_dim_qk must be an int, got 128.0"),
    ],
)
def test_head_layout_checks_its_fields(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        HeadLayout(**kwargs)  # type: ignore[arg-type]


def test_the_largest_chunk_plans_and_keeps_its_mask_table_small() -> None:
    """MAX_CHUNK plans like any chunk, and its prefix-mask table (kept for the process's
    life) stays at chunk**2 / 8 bytes: 2 MB."""
    tree = TreeBatch.from_parents([-1, 0, 0, 1], [5000, 900, 30, 7000])
    plan = plan_tree(tree, chunk=MAX_CHUNK)
    assert plan.chunk == MAX_CHUNK and plan.group_bits.shape[-1] == MAX_CHUNK // 32
    check_invariants(tree, plan)
    assert _prefix_masks(MAX_CHUNK).nbytes == (MAX_CHUNK + 1) * MAX_CHUNK // 8 <= 2**21 + MAX_CHUNK


@pytest.mark.parametrize(
    ("argv", "parts"),
    [
        # the two commands that ended in a numpy MemoryError deep in the planner
        (["--tokens", "3,3000000000000"], ["token counts: node 1 has 3000000000000 tokens",
                                            "(allowed: 0..2147483647 per node, 2147483647 in all"]),
        (["--tokens", "3,3000", "--chunk", "100000000"], ["chunk 100000000 must be a positive multiple of 32 up to 4096",
                                                           "(allowed: 32..4096 in steps of 32"]),
        (["--tokens", "2147483000,1000"], ["token counts: the batch holds 2147484000 tokens in all"]),
    ],
)
def test_cli_refuses_huge_sizes_in_one_line(
    argv: list[str], parts: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`attngen plan` with sizes past the limits: exit 2 and one line naming the argument,
    the value and the allowed range, before anything is sized by them (the planner's
    allocations raised MemoryError, which the CLI does not catch)."""
    code = cli.main(["plan", "--parents=-1,0", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("attngen plan: ") and "Traceback" not in err
    for part in parts:
        assert part in err


@pytest.mark.parametrize(
    ("parents", "tokens", "queries", "launches"),
    [
        ([-1, 0, 0], [0, 0, 0], None, 1),  # no groups: the merge alone writes the outputs
        ([-1, 0], [0, 0], [], 0),  # no queries: nothing is launched
        ([-1, 0, -1], [6, 0, 0], [1, 2], 2),  # query 2 sees nothing: the merge writes it
        ([-1, 0, 0, 0], [20, 3, 1, 5], None, 1),  # one partial each: stage 1 writes the outputs
        ([-1, 0, 0, 0], [700, 30, 64, 200], None, 2),
    ],
)
def test_launches_are_the_ones_the_kernels_make(
    parents: list[int], tokens: list[int], queries: list[int] | None, launches: int
) -> None:
    """The launches the cost model reports for a built plan (and the span choice, from the
    same slots), and the chunk choice's count for its candidate, are those of
    templates/tree.py.j2's ``attention``: stage 1 iff there are groups, the merge unless
    every query has exactly one partial (test_cost runs the kernels and counts them)."""
    tree = TreeBatch.from_parents(parents, tokens, queries)
    plan = plan_tree(tree, chunk=64)
    assert plan.cost.launches == launches
    heads, machine = plan.state.heads, plan.state.machine
    nodes = _KvNodes.of(tree)
    place = _place(nodes, 64)
    chosen = _chunk_stats(tree, _Sight.of(tree, nodes), place, np.array([plan.queries_per_group]), heads, machine)
    assert np.asarray(chosen.launches).tolist() == [[launches]]


def test_an_empty_plan_costs_the_merge_launch_and_saves_nothing() -> None:
    """No groups: no KV read, no stage 1; the merge's one launch writes the outputs. Per-
    branch decoding reads no KV either, so the report says nothing is saved (it printed
    50% from the query and output bytes alone, and charged a stage-1 program)."""
    heads, machine = HeadLayout(heads_q=32, heads_kv=8), Machine()
    cost = plan_tree(TreeBatch.from_parents([-1, 0, 0], [0, 0, 0]), heads=heads).cost
    assert (cost.kv_bytes, cost.partial_bytes, cost.flops, cost.branch_kv_bytes, cost.floor_bytes) == (0, 0, 0, 0, 0)
    assert cost.total_bytes == 2 * 32 * 128 * 2  # the outputs the merge writes
    assert cost.launches == 1 and cost.time_s == pytest.approx(machine.launch_overhead)
    assert cost.io_saved == 0.0
    summary = cost.summary()
    assert "1 launch(es), 3.0 us; per-branch decoding reads no KV either (0.03 MB of queries and outputs): no IO saved;" in summary
    assert "%" not in summary
    none = plan_tree(TreeBatch.from_parents([-1], [0], [])).cost
    assert (none.launches, none.time_s, none.total_bytes, none.io_saved) == (0, 0.0, 0.0, 0.0)


def test_cost_reports_io_saved_against_per_branch() -> None:
    tree = TreeBatch.from_parents([-1] + [0] * 20, [4000] + [400] * 20)
    cost = plan_tree(tree, heads=HeadLayout(heads_q=32, heads_kv=8)).cost
    assert cost.branch_bytes > cost.total_bytes >= cost.floor_bytes
    assert 0.5 < cost.io_saved < 1


def test_cost_reports_the_floor_as_the_bench_measures_it() -> None:
    """The report's time floor is bench_tree's: the unique KV bytes and each query's Q and
    O over the bandwidth, or the visible pairs' FLOPs over the matrix rate. A memory-bound
    tree's prediction falls under it (the model has no bandwidth bound), and the report
    says so; a matrix-bound one's does not."""
    machine, heads = Machine(), HeadLayout()  # 32 / 32 heads of 128, bf16
    branches = TreeBatch.from_parents([-1] + [0] * 20, [4000] + [400] * 20)
    cost = plan_tree(branches, heads=heads, machine=machine).cost
    unique = (12000 * 32 * 256 + 20 * 32 * 256) * 2
    assert cost.floor_s == pytest.approx(unique / machine.bandwidth)
    assert cost.time_s < cost.floor_s
    assert f"{cost.floor_s * 1e6:.1f} us at the model's rates (the prediction is under it" in cost.summary()
    spec = WORKLOADS["spec_16k_184"]().tree
    cost = plan_tree(spec, heads=heads, machine=machine).cost
    flops = 2 * int(spec.query_visible_counts.sum()) * 32 * 256
    assert cost.floor_s == pytest.approx(flops / machine.matmul_rate)
    assert cost.time_s > cost.floor_s and "under it" not in cost.summary()
    # at other rates (the bench's, measured in its run): the same plan, its floor rescaled
    slower = plan_tree(spec, heads=heads, machine=machine).cost_at(replace(machine, matmul_rate=machine.matmul_rate / 2))
    assert slower.floor_s == pytest.approx(2 * cost.floor_s) and slower.flops == cost.flops


def test_planning_time_256_nodes_256_queries() -> None:
    tree = planning_target_tree()
    plan = plan_tree(tree, chunk=128, queries_per_group=8, span=1024)

    def again() -> TreeBatch:  # the same tree, built afresh
        return replace(tree)

    fixed = planning_ms(lambda t: plan_tree(t, chunk=128, queries_per_group=8, span=1024), again)
    chosen = planning_ms(plan_tree, again)
    step = planning_ms(lambda t: replan_after_append(plan, t), lambda: tree.append_to_leaves(1))
    # the speculative form of the same size: a 248-token tree over an 8000-token prefix
    # (spec_8k_248), where the prefix's chunks add thousands of (chunk, query) pairs; each
    # step brings a new token tree, planned at the previous step's parameters
    spec, heads = WORKLOADS["spec_8k_248"]().tree, HeadLayout(heads_q=32, heads_kv=8)
    spec_plan = plan_tree(spec, heads=heads)
    chunk, qg, span = spec_plan.chunk, spec_plan.queries_per_group, spec_plan.span
    spec_fixed = planning_ms(lambda t: plan_tree(t, heads=heads, chunk=chunk, queries_per_group=qg, span=span),
                            lambda: replace(spec))
    spec_chosen = planning_ms(lambda t: plan_tree(t, heads=heads), lambda: replace(spec))
    print(
        f"\nplanning 256 nodes / 256 queries: {fixed:.3f} ms (chunk 128, QG 8, span 1024), "
        f"{chosen:.3f} ms (cost-model choice of chunk, QG and span), "
        f"{step:.3f} ms (decode step: the incremental replan after a token appended to each leaf)"
        f"\nplanning spec_8k_248 (249 nodes / 248 token queries, GQA 32/8): {spec_fixed:.3f} ms "
        f"(the chosen parameters), {spec_chosen:.3f} ms (cost-model choice)"
    )
    # loose bounds, for regressions of several times (shared CI machines, slower hosts);
    # the target is under 1 ms on one core. The H200 machine's host (a 2.1 GHz
    # Xeon, Python 3.12) ran 1.3-2.5x the development machine's figures: spec_8k_248's choice took
    # 3.1-5.7 ms there, 2.4 here (session 58)
    for ms in (fixed, chosen, step, spec_fixed):
        assert ms < 5.0
    assert spec_chosen < 12.0


def _plan_instructions() -> Any:
    """scripts/plan_instructions.py, loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "plan_instructions.py"
    spec = importlib.util.spec_from_file_location("plan_instructions", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("case", [*_plan_instructions().CASES, "spec_1k_32/gqa"])
def test_plan_instructions_cases_run(case: str) -> None:
    """Each case of scripts/plan_instructions.py plans (outside valgrind), so that the counts
    the docs quote can be made again as the planner's functions change."""
    fresh, plan = _plan_instructions()._case(case)
    assert plan(fresh()) is not None


def test_plan_instructions_refuses_an_unknown_case() -> None:
    with pytest.raises(SystemExit, match="target-span-stage or WORKLOAD/LAYOUT"):
        _plan_instructions()._case("no-such-case")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=tree_batches(), chunks=st.lists(st.sampled_from([32, 64, 128, 512]), min_size=1, max_size=4))
def test_pair_counts_agree_with_the_pairs(tree: TreeBatch, chunks: list[int]) -> None:
    """The counts that rank candidate chunk sizes, taken from node ranges without listing
    the pairs (every chunk size side by side, as the chooser takes them), are the pairs'
    own counts; so is the one-launch test."""
    nodes = _KvNodes.of(tree)
    places = _places(nodes, tuple(chunks))
    counted = _queries_per_chunk(_Sight.of(tree, nodes), places)
    assert len(counted) == len(places.start)
    for k in range(len(chunks)):
        place = places.one(k)
        pairs = _pairs(tree, _pieces(nodes, place))
        per_chunk = np.bincount(pairs.chunk, minlength=len(place.start))
        np.testing.assert_array_equal(counted[places.bounds[k] : places.bounds[k + 1]], per_chunk)
        per_query = np.bincount(pairs.query, minlength=tree.n_queries)
        assert (per_chunk.sum() <= tree.n_seeing) == (per_query.max(initial=0) <= 1)


def _placement_by_the_rule(sizes: list[int], chunk: int) -> tuple[list[int], list[int], list[int]]:
    """The packing rule of :mod:`attngen.plan.layout`, node by node: first chunk, offset in it
    and piece count of each (non-empty) node."""
    first, local, pieces = [], [], []
    n_chunks, fill = 0, 0
    for t in sizes:
        if fill > 0 and fill + t <= chunk:
            first.append(n_chunks - 1)
            local.append(fill)
            pieces.append(1)
            fill += t
        else:
            count = -(-t // chunk)
            first.append(n_chunks)
            local.append(0)
            pieces.append(count)
            n_chunks += count
            fill = t - (count - 1) * chunk
        if fill == chunk:
            fill = 0
    return first, local, pieces


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(1, 40), st.integers(1, 600), st.sampled_from([32, 64])),
        min_size=1,
        max_size=60,
    )
)
def test_placement_follows_the_packing_rule(sizes: list[int]) -> None:
    """Every chunk size placed side by side (as the chooser does) follows the rule."""
    chunks = (32, 64, 128, 512)
    places = _places(_KvNodes.of(TreeBatch.from_parents([-1] * len(sizes), sizes)), chunks)
    assert places.chunks == chunks and places.bounds[-1] == len(places.start)
    for k, chunk in enumerate(chunks):
        place = places.one(k)
        first, local, pieces = _placement_by_the_rule(sizes, chunk)
        assert place.chunks == (chunk,)
        assert place.first.tolist() == [first]
        assert place.local.tolist() == [local]
        assert place.pieces.tolist() == [pieces]
        # the chunks tile the flattened KV in order, none longer than ``chunk``
        assert place.start.tolist() == (np.cumsum(place.length) - place.length).tolist()
        assert int(place.length.sum()) == sum(sizes) and (place.length <= chunk).all()


def test_device_plan_tensors_share_one_aligned_buffer() -> None:
    """Off the CPU the plan tensors travel as one buffer: each a view at a 16-byte
    boundary with its own shape ('meta' stands in for a GPU here; the GPU tests run it)."""
    tree = TreeBatch.from_parents([-1, 0, 0, 1], [70, 9, 33, 5], [1, 2, 3])
    cpu = plan_tree(tree, chunk=32, queries_per_group=2)
    host = {name: t.numpy() for name, t in cpu.tensors().items()}
    moved = _int32_tensors(host, "meta")
    offsets = [moved[name].storage_offset() for name in TENSOR_NAMES]
    assert offsets == sorted(set(offsets)) and all(o % 4 == 0 for o in offsets)
    for name, t in moved.items():
        assert t.shape == host[name].shape and t.dtype == torch.int32 and t.is_contiguous(), name
        assert t.untyped_storage().nbytes() >= 4 * (offsets[-1] + moved["dense_count"].numel()), name


@pytest.mark.parametrize("bound", [1, 300, 1 << 16, (1 << 16) + 1, 1 << 40])
def test_stable_argsort_of_bounded_keys_is_numpys(bound: int) -> None:
    keys = np.random.default_rng(bound).integers(0, bound, 3000)
    np.testing.assert_array_equal(_stable_argsort(keys, bound), keys.argsort(kind="stable"))
