"""The plan format: every plan tensor assembled as a numpy array, in one place, with the
merge order; then the int32 tensors on a device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attngen.cost import HeadLayout, Machine
from attngen.plan.arrays import _stable_argsort
from attngen.plan.fold import _fold
from attngen.plan.groups import _dense
from attngen.plan.spans import _Groups
from attngen.tree import TreeBatch

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


def _host_arrays(tree: TreeBatch, groups: _Groups, heads: HeadLayout, machine: Machine) -> dict[str, np.ndarray]:
    """Every plan tensor as a numpy array (the single place the format is assembled),
    the dense groups moved to the front. Merge rows are assigned before the move, so a
    query's partials still merge in KV order."""
    slots = groups.filled
    rows = slots * heads.group
    dense = _dense(rows, groups.full, groups.length)
    # without dense groups nothing moves: the group arrays are taken as they are
    order = np.argsort(~dense, kind="stable") if dense.any() else slice(None)
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
