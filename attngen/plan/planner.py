""":class:`Plan`, :func:`plan_tree`, and the incremental replan of a decode step."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from attngen.cost import DEFAULT_HEADS, HeadLayout, Machine, PlanCost, plan_cost
from attngen.plan.choice import (
    _STATS_ARRAYS,
    _check_span,
    _choose,
    _choose_plan_params,
    _group_stats,
)
from attngen.plan.fold import _n_folded
from attngen.plan.groups import _alike_sources, _layout_rows, _own_pairs, _Rows, _rows
from attngen.plan.layout import _chunk_layout, _Chunking
from attngen.plan.spans import _Runs, _span_groups
from attngen.plan.tensors import TENSOR_NAMES, _host_arrays, _int32_tensors
from attngen.plan.visibility import _pairs
from attngen.tree import TreeBatch


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
    """A plan: the python ints and int32 tensors the tree kernels read (see :mod:`attngen.plan`)."""

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
        return self.cost_at(self.state.machine)

    def cost_at(self, machine: Machine) -> PlanCost:
        """:attr:`cost` at another machine's rates, for the same plan (the bench takes its
        floor from this at the bandwidth and matrix rate it measured)."""
        s = self.state
        stats = _group_stats(s.tree, self.chunk, self.queries_per_group, s.host, s.heads, machine)
        return plan_cost(stats, s.heads, machine)

    @property
    def group(self) -> int:
        """Query heads per KV head the plan was made for (its dense groups depend on it)."""
        return self.state.heads.group

    def tensors(self) -> dict[str, torch.Tensor]:
        """The plan tensors by contract name."""
        return {name: getattr(self, name) for name in TENSOR_NAMES}


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
    heads, machine = heads or DEFAULT_HEADS, machine or Machine()
    _check_span(span)
    if queries_per_group is not None and span is not None:
        layout, qg = _choose(tree, chunk, queries_per_group, heads, machine)
        return _make_plan(tree, layout, _layout_rows(tree, layout, qg), qg, max(span, layout.chunk), heads,
                          machine, device)
    best = _choose_plan_params(tree, chunk, queries_per_group, span, heads, machine)
    return _make_plan(tree, best.layout, best.rows(), best.qg, max(best.span, best.layout.chunk), heads, machine,
                      device, best.runs)


def replan_after_append(plan: Plan, tree: TreeBatch, device: torch.device | str = "cpu") -> Plan:
    """The plan of ``tree``, which is ``plan``'s tree with tokens appended to some nodes
    (e.g. :meth:`TreeBatch.append_to_leaves`), at ``plan``'s chunk, QG and span: equal to
    ``plan_tree`` with those. The groups of chunks whose content did not change are kept,
    and only the changed chunks' pairs and bits are made, unless a node fills several
    chunks (a long prompt): planning afresh makes its inner chunks' groups once, which
    costs less than copying the old ones (one core, a 100k-token prompt with 1000 leaves
    of 200 tokens: 5.3 ms afresh against 13.8 kept; a 256-node chain of 64-token nodes
    with a query at each keeps, 1.3 against 2.6). It plans afresh too when the structure,
    the query mode (token mode adds queries) or anything but appends changed."""
    old, qg = plan.state, plan.queries_per_group
    if not _is_append_only(old.tree, tree):
        return plan_tree(tree, chunk=plan.chunk, queries_per_group=qg, span=plan.span, heads=old.heads,
                         machine=old.machine, device=device)
    layout = _chunk_layout(tree, plan.chunk)
    source = _alike_sources(tree, layout)
    if source is not None:  # planned afresh, from the sources found here
        rows = _rows(_own_pairs(tree, layout, source), layout, qg, source)
    else:
        new_to_old = _matched(layout.keys(), old.layout.keys())
        fresh_chunk = new_to_old < 0
        pairs = _pairs(tree, layout, piece_mask=fresh_chunk[layout.piece_chunk])
        rows = _Rows.concat([_reused_rows(old.rows, new_to_old, old.layout.n_chunks), _rows(pairs, layout, qg)])
    return _make_plan(tree, layout, rows, qg, plan.span, old.heads, old.machine, device)


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
    return _Rows(new_chunk[keep], old.query[keep], old.bits.select(keep), old.full[keep], old.filled[keep])
