"""Plan tensors of fixed capacity (CUDA-graph capture) and :func:`plan_into`, which plans
into them in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from attngen.cost import DEFAULT_HEADS, HeadLayout, Machine
from attngen.errors import PlanError, plan_int
from attngen.plan.choice import _check_params, _check_span, _choose
from attngen.plan.fold import _n_folded
from attngen.plan.groups import _layout_rows
from attngen.plan.spans import _span_groups
from attngen.plan.tensors import TENSOR_NAMES, _host_arrays, _starts, _views
from attngen.plan.visibility import WORD
from attngen.tree import MAX_KV_TOKENS, TreeBatch


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
        heads = heads or DEFAULT_HEADS
        _check_params(chunk, queries_per_group, heads)
        _check_span(span)
        for name, value, top in (
            ("max_groups", max_groups, _MAX_BITS // (queries_per_group * (chunk // WORD))),
            ("max_queries", max_queries, MAX_KV_TOKENS),
            ("max_kv", max_kv, MAX_KV_TOKENS),
        ):
            plan_int(value, f"PlanBuffers.allocate: {name}")
            if not 1 <= value <= top:
                raise PlanError(
                    f"PlanBuffers.allocate: {name} {value} must be a positive capacity up to {top} "
                    f"(allowed: 1..{top}; {_CAPACITY_WHY[name]})."
                )
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


#: Elements group_bits may hold: stage 1 finds a slot's words at (group * QG + slot) *
#: (chunk // 32) in int32 (tree_triton.py.j2, ``Bits + part * n_words``), so every
#: element must have an int32 index.
_MAX_BITS = 2**31 - 1

#: Why each capacity has its upper bound, for the error.
_CAPACITY_WHY = {
    "max_groups": "group_bits, max_groups x queries_per_group x chunk / 32 words, is indexed in int32",
    "max_queries": "query ids (group_q) and merge offsets (merge_ptr) are int32",
    "max_kv": "KV offsets are int32 (tree.MAX_KV_TOKENS)",
}


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
