"""Folding: a group that continues a dense group, with the same query slots, runs as that
dense group's tail (plan tensors ``group_fold`` and ``group_lead``).
"""

from __future__ import annotations

import numpy as np

from attngen.cost import HeadLayout, Machine
from attngen.plan.groups import _programs
from attngen.plan.visibility import WORD

#: A group is folded into a dense one only if the dense one's length is a multiple of
#: this: the Gluon stage 1's largest K/V tile, so that the folded range starts on a tile.
FOLD_ALIGN = 128


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
    beside) 1.7 in a scratch run (session 37, docs/benchmarks/HISTORY.md).

    ``group_fold[g]``: for a dense group, the group folded into it; for a folded group,
    its dense group; -1 elsewhere. ``group_lead[g]``: for a folded group, its leading
    keys that every filled slot sees; 0 elsewhere."""
    n, n_dense = len(host["group_kv_start"]), int(host["dense_count"][0])
    fold, lead = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    if not machine.dense_apart or n_dense in (0, n):
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
