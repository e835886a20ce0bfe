"""KV-guided tree planning (DeFT-style, with tree split) for the tree kernels.

The planner flattens a :class:`~attngen.tree.TreeBatch`'s KV (preorder, node tokens
contiguous), cuts it into chunks, pairs each chunk with every query that sees any of its
tokens and splits each chunk's queries into groups of at most ``queries_per_group``.
Stage 1 of the kernel computes one partial (O, LSE) per (group, query slot); stage 2
merges each query's partials by log-sum-exp in plan order: stage 1 writes partial
``(g, s)`` at row ``merge_row[g, s]``, and query ``i``'s partials are rows
``merge_ptr[i]`` to ``merge_ptr[i + 1]``, ascending group.

Chunks are cut by the packing rule of :mod:`attngen.plan.layout`.

**Plan format** (the contract with the kernels; int32 tensors on the requested device):
``group_kv_start[G]``, ``group_kv_len[G]``, ``group_q[G, QG]`` (-1 padded),
``group_full[G]``, ``group_slots[G]`` (slots up to the group's last filled one: stage 1
runs the group at the tile height they need), ``group_bits[G, QG, chunk // 32]`` (bit
``j % 32`` of word ``j // 32``: chunk token ``j`` is visible to the slot's query),
``merge_ptr[NQ + 1]``,
``merge_row[G, QG]`` (-1 for an empty slot), ``q_pos[NQ]``,
``kv_pos[n_kv]``, ``q_tree[NQ]``, ``dense_count[1]``, ``group_fold[G]`` and
``group_lead[G]`` (see :mod:`attngen.plan.fold`). Groups are ordered by chunk, slots by
query id, except that the ``n_dense`` dense groups (full, with filled rows in
:data:`~attngen.cost.DENSE_ROWS` for the plan's heads) come first, in the same order:
kernels may run them apart (the Gluon stage 1 on Hopper), and there run each group that
``group_fold`` folds into one as its tail.

>>> from attngen.tree import TreeBatch
>>> p = plan_tree(TreeBatch.from_parents([-1, 0, 0], [40, 30, 50]), chunk=64, queries_per_group=2)
>>> p.n_groups, p.group_q.tolist(), p.merge_ptr.tolist()
(3, [[0, 1], [0, -1], [1, -1]], [0, 2, 4])

The package follows the planner's steps, each a module: ``layout`` (chunks), ``visibility``
((chunk, query) pairs and their bits), ``groups`` (a chunk's queries in groups of at most
QG), ``spans`` (a long node's groups coalesced), ``choice`` (chunk, QG and span from the
cost model), ``fold`` and ``tensors`` (the plan format), ``planner`` (:func:`plan_tree`,
:func:`replan_after_append`) and ``buffers`` (:class:`PlanBuffers`, :func:`plan_into`).
What this module exports is the API; the rest is the planner's own.
"""

from attngen.plan.buffers import PlanBuffers, PlanSizes, plan_into
from attngen.plan.choice import CHUNK_CHOICES, MAX_CHUNK, MAX_SPAN, SPAN_CHOICES
from attngen.plan.fold import FOLD_ALIGN
from attngen.plan.planner import Plan, plan_tree, replan_after_append
from attngen.plan.spans import SPLIT_ALIGN
from attngen.plan.tensors import TENSOR_NAMES

__all__ = [
    "CHUNK_CHOICES",
    "FOLD_ALIGN",
    "MAX_CHUNK",
    "MAX_SPAN",
    "SPAN_CHOICES",
    "SPLIT_ALIGN",
    "TENSOR_NAMES",
    "Plan",
    "PlanBuffers",
    "PlanSizes",
    "plan_into",
    "plan_tree",
    "replan_after_append",
]
