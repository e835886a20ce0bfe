"""Stage 1 as persistent Gluon programs that stream K/V without stopping between groups
(session 43; measured and not kept, docs/benchmarks/HISTORY.md).

On the memory-bound GQA plans (fewshot_4k_x20, tot_d3_w3) stage 1 runs one program per
(group, KV head), all in one wave, two or three to an SM. The programs are uneven (a
prompt span of ~700 keys beside a branch of 400), and each pays its own fill and drain.
Cutting equal-cost work on the host for a looped Triton kernel lost (docs/benchmarks/HISTORY.md,
session 13): each group's fill and drain then ran one after another inside a program.

Here each SM runs one program of WGS consumer warpgroups, each with a loader warp and a
TMA ring of its own. A warpgroup takes a list of (piece, KV head) items, dealt on the host
longest-first onto the least-loaded list (a piece: a group's key range, or a part of a
narrow group's), and its loader streams every item's K/V tiles through the ring without
stopping between items. The warpgroup loads the next item's queries and scalars, and the
current item's merge rows, while it works. Every tile costs one 64-row wgmma pair, so tiles
are the cost. The partials go to merge rows of the pieces, and the module's own merge
kernel combines them.

Prints a line per (case, variant): the call's time, stage 1's alone, the error against the
module's call; with EXPLORE_SYNTHETIC=1, stage 1 on equal items first. Writes stream.json
under $OUT. Needs an sm_90 GPU and Triton 3.6 or newer.

    EXPLORE_CASES=fewshot_4k_x20:gqa,tot_d3_w3:gqa python scripts/explore_stream.py
    EXPLORE_SYNTHETIC=1 EXPLORE_CASES= python scripts/explore_stream.py
"""

from __future__ import annotations

import heapq
import json
import os
import statistics
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

import attngen
from attngen.bench_tree import LAYOUTS, tree_spec
from attngen.cost import HeadLayout
from attngen.plan import plan_tree
from attngen.workloads import WORKLOADS

OUT = Path(os.environ.get("OUT", "explore_out"))
D = 128
# the kernels' own copies (a jit function reads only constexpr globals)
_D = gl.constexpr(D)
_SCALE = gl.constexpr(0.08838834764831845 * 1.4426950408889634)  # 1/sqrt(128) * log2(e)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _loader(k_desc, v_desc, k_smem, v_smem, ready, empty, ItemStart, ItemLen, ItemHead, first, last):
    """One warp: every item's K/V tiles, in order, into the ring; never waits between items."""
    NS: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    c = 0
    for it in range(first, last):
        kv_start = gl.load(ItemStart + it)
        col = gl.load(ItemHead + it) * _D
        n_tiles = gl.cdiv(gl.load(ItemLen + it), BN)
        for j in range(n_tiles):
            s = c % NS
            mbarrier.wait(empty.index(s), ((c // NS) & 1) ^ 1)
            mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            _tma_load(k_desc, [kv_start + j * BN, col], ready.index(s), k_smem.index(s))
            _tma_load(v_desc, [kv_start + j * BN, col], ready.index(s), v_smem.index(s))
            c += 1


@gluon.jit
def _load_q(Q, PieceQ, piece, kv_head, stride_qn, stride_qh, qg, GROUP: gl.constexpr, layout: gl.constexpr):
    """A (piece, KV head) item's 64 query rows (row = slot * GROUP + head), zeros past its slots."""
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, _D, layout=gl.SliceLayout(0, layout))
    slot = rows // GROUP
    qid = gl.load(PieceQ + piece * qg + gl.minimum(slot, qg - 1), mask=slot < qg, other=-1)
    head = kv_head * GROUP + rows % GROUP
    ptrs = Q + gl.expand_dims(gl.maximum(qid, 0).to(gl.int64) * stride_qn + head * stride_qh, 1) + gl.expand_dims(d, 0)
    return gl.load(ptrs, mask=gl.expand_dims(qid >= 0, 1), other=0.0)


@gluon.jit
def _softmax(s, m_i, l_i, j, n_tiles, kv_n):
    BN: gl.constexpr = s.shape[1]
    if j == n_tiles - 1:
        keys = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where(gl.expand_dims(keys < kv_n, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * _SCALE)
    p = gl.exp2(s * _SCALE - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _consumer(Q, O_part, LSE_part, ItemPiece, ItemHead, ItemLen, PieceQ, PieceRow, k_smem, v_smem, ready, empty,
              first, last, stride_qn, stride_qh, qg, GROUP: gl.constexpr, HEADS_Q: gl.constexpr):
    """One warpgroup: each item's 64 rows over its piece, q.k^T of tile j beside p.v of tile
    j - 1. The next item's queries and scalars, and this item's merge rows, load while this
    item runs, so that no item starts or ends on a global load."""
    NS: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = Q.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, _D, 16])
    q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    gather: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_zero = gl.zeros([64, BN], gl.float32, s_layout)
    rows = gl.arange(0, 64, layout=o_rows)
    slot = gl.minimum(rows // GROUP, qg - 1)
    c = 0
    piece_n = gl.load(ItemPiece + first)
    head_n = gl.load(ItemHead + first)
    len_n = gl.load(ItemLen + first)
    q_n = _load_q(Q, PieceQ, piece_n, head_n, stride_qn, stride_qh, qg, GROUP, gather)
    for it in range(first, last):
        piece = piece_n
        kv_head = head_n
        kv_n = len_n
        q = gl.convert_layout(q_n, q_layout)
        dst = gl.load(PieceRow + piece * qg + slot)
        nxt = gl.minimum(it + 1, last - 1)
        piece_n = gl.load(ItemPiece + nxt)
        head_n = gl.load(ItemHead + nxt)
        len_n = gl.load(ItemLen + nxt)
        q_n = _load_q(Q, PieceQ, piece_n, head_n, stride_qn, stride_qh, qg, GROUP, gather)
        n_tiles = gl.cdiv(kv_n, BN)
        m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.full([64], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([64, _D], gl.float32, o_layout)
        st = c % NS
        mbarrier.wait(ready.index(st), (c // NS) & 1)
        tok = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[tok])
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, 0, n_tiles, kv_n)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, n_tiles):
            cj = c + j
            st = cj % NS
            prev = (cj - 1) % NS
            mbarrier.wait(ready.index(st), (cj // NS) & 1)
            tok_s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            tok_o = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=[tok_s])
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, j, n_tiles, kv_n)
            acc = warpgroup_mma_wait(0, deps=[tok_o])
            mbarrier.arrive(empty.index(prev))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        st = (c + n_tiles - 1) % NS
        tok_o = warpgroup_mma(p_op, v_smem.index(st), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[tok_o])
        mbarrier.arrive(empty.index(st))
        c += n_tiles

        o = acc / gl.expand_dims(gl.convert_layout(l_i, o_rows), 1)
        ok = (rows // GROUP < qg) & (dst >= 0)
        row = gl.maximum(dst, 0).to(gl.int64) * HEADS_Q + kv_head * GROUP + rows % GROUP
        cols = gl.arange(0, _D, layout=gl.SliceLayout(0, o_layout))
        gl.store(O_part + gl.expand_dims(row * _D, 1) + gl.expand_dims(cols, 0), o, mask=gl.expand_dims(ok, 1))
        gl.store(LSE_part + row, gl.convert_layout(m_i + gl.log2(l_i), o_rows), mask=ok)


@gluon.jit
def _init_ring(ready, empty, NS: gl.constexpr):
    for i in gl.static_range(NS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)


@gluon.jit
def _stream_kernel(Q, k_desc, v_desc, O_part, LSE_part, ProgPtr, ItemPiece, ItemHead, ItemStart, ItemLen, PieceQ,
                   PieceRow, stride_qn, stride_qh, qg, NS: gl.constexpr, GROUP: gl.constexpr,
                   HEADS_Q: gl.constexpr, WGS: gl.constexpr):
    """WGS consumer warpgroups, each with a loader warp and a ring of its own: program
    pid's warpgroup w runs the items of schedule slot pid * WGS + w."""
    BN: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = Q.dtype.element_ty
    sub = gl.program_id(0) * WGS
    first0 = gl.load(ProgPtr + sub)
    last0 = gl.load(ProgPtr + sub + 1)
    # each warpgroup's ring is written out: Triton 3.6 cannot pass the descriptor's shared
    # layout to a helper that would allocate it (the layout is not an IR value)
    k0 = gl.allocate_shared_memory(dtype, [NS, BN, _D], k_desc.layout)
    v0 = gl.allocate_shared_memory(dtype, [NS, BN, _D], k_desc.layout)
    r0 = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    e0 = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    _init_ring(r0, e0, NS)
    c0 = (Q, O_part, LSE_part, ItemPiece, ItemHead, ItemLen, PieceQ, PieceRow, k0, v0, r0, e0,
          first0, last0, stride_qn, stride_qh, qg, GROUP, HEADS_Q)
    l0 = (k_desc, v_desc, k0, v0, r0, e0, ItemStart, ItemLen, ItemHead, first0, last0)
    if WGS == 1:
        gl.warp_specialize([(_consumer, c0), (_loader, l0)], [1], [40])
    else:
        first1 = gl.load(ProgPtr + sub + 1)
        last1 = gl.load(ProgPtr + sub + 2)
        k1 = gl.allocate_shared_memory(dtype, [NS, BN, _D], k_desc.layout)
        v1 = gl.allocate_shared_memory(dtype, [NS, BN, _D], k_desc.layout)
        r1 = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        e1 = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        _init_ring(r1, e1, NS)
        c1 = (Q, O_part, LSE_part, ItemPiece, ItemHead, ItemLen, PieceQ, PieceRow, k1, v1, r1, e1,
              first1, last1, stride_qn, stride_qh, qg, GROUP, HEADS_Q)
        l1 = (k_desc, v_desc, k1, v1, r1, e1, ItemStart, ItemLen, ItemHead, first1, last1)
        gl.warp_specialize([(_consumer, c0), (_consumer, c1), (_loader, l0), (_loader, l1)], [4, 1, 1],
                           [232, 40, 40])


# ---- the host side: pieces, merge rows, items dealt to programs -------------------------

def stream_schedule(plan, heads_kv: int, group: int, n_prog: int, block_n: int, max_tiles: int,
                    fixed_tiles: float, device) -> dict:
    """Pieces of at most ``max_tiles`` tiles cut from each group of at most 16 rows (evenly), a merge row per
    (piece, filled slot) in piece order per query, and the (piece, KV head) items dealt
    longest-first to the least-loaded of ``n_prog`` programs (cost: tiles + fixed_tiles),
    each program's items in key order."""
    qg = plan.queries_per_group
    start = plan.group_kv_start.cpu().numpy()
    length = plan.group_kv_len.cpu().numpy()
    full = plan.group_full.cpu().numpy()
    gq = plan.group_q.cpu().numpy().reshape(-1, qg)
    if not full.all():
        raise ValueError("a group with visibility bits: not in this experiment")
    if qg * group > 64:
        raise ValueError(f"{qg * group} rows a group: more than one warpgroup")
    p_start, p_len, p_q = [], [], []
    filled = (gq >= 0).sum(axis=1)
    for g in range(len(start)):
        nt = -(-int(length[g]) // block_n)
        # only narrow groups are cut: a piece's partial of a wide group costs as much to
        # write (and merge) as a tile of K/V to read
        k = -(-nt // max_tiles) if filled[g] * group <= 16 else 1
        off = 0
        for i in range(k):
            tiles = nt // k + (i < nt % k)
            lo = off * block_n
            p_start.append(int(start[g]) + lo)
            p_len.append(min(tiles * block_n, int(length[g]) - lo))
            p_q.append(gq[g])
            off += tiles
    n_pieces = len(p_start)
    p_q_arr = np.stack(p_q).astype(np.int32)
    # merge rows: each query's partials contiguous, in piece order
    counts = np.zeros(plan.n_queries, np.int64)
    for qid in p_q_arr[p_q_arr >= 0]:
        counts[qid] += 1
    merge_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    fill = merge_ptr[:-1].copy()
    p_row = np.full_like(p_q_arr, -1)
    for p in range(n_pieces):
        for s in range(qg):
            qid = p_q_arr[p, s]
            if qid >= 0:
                p_row[p, s] = fill[qid]
                fill[qid] += 1
    tiles = np.array([-(-n // block_n) for n in p_len])
    items = sorted(((tiles[p] + fixed_tiles, p, h) for p in range(n_pieces) for h in range(heads_kv)), reverse=True)
    heap = [(0.0, i) for i in range(n_prog)]
    dealt: list[list[tuple[int, int]]] = [[] for _ in range(n_prog)]
    for cost, p, h in items:
        load, i = heapq.heappop(heap)
        dealt[i].append((p, h))
        heapq.heappush(heap, (load + cost, i))
    loads = [sum(tiles[p] + fixed_tiles for p, _ in d) for d in dealt]
    order = [sorted(d, key=lambda ph: (p_start[ph[0]], ph[1])) for d in dealt]
    prog_ptr = np.concatenate([[0], np.cumsum([len(d) for d in order])]).astype(np.int32)
    flat = [ph for d in order for ph in d] + [(0, 0)]  # a program with no items reads one past its end

    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.int32), device=device)

    return dict(prog_ptr=t(prog_ptr), item_piece=t([p for p, _ in flat]), item_head=t([h for _, h in flat]),
                item_start=t([p_start[p] for p, _ in flat]), item_len=t([p_len[p] for p, _ in flat]),
                piece_start=t(p_start), piece_len=t(p_len), piece_q=t(p_q_arr.reshape(-1)),
                piece_row=t(p_row.reshape(-1)), merge_ptr=t(merge_ptr), n_rows=int(merge_ptr[-1]),
                n_pieces=n_pieces, n_prog=n_prog, busiest_over_mean=max(loads) / (sum(loads) / len(loads)))


def merge_partials(module, o_part, lse_part, out, merge_ptr) -> None:
    """The module's merge kernel over the partials, as its attention() launches it (no LSE)."""
    module._tree_merge_kernel[(out.shape[0], out.shape[1] // module.MERGE_HEADS)](
        o_part, lse_part, out, lse_part, merge_ptr, out.stride(0), out.stride(1),
        HB=module.MERGE_HEADS, D_V=D, RETURN_LSE=False)


def stream_call(module, q, k, v, sched, qg, group, block_n, stages, per_sm, merge=True):
    """Stage 1 in the persistent programs, then the module's merge; returns out."""
    hq = q.shape[1]
    n_rows = sched["n_rows"]
    o_part = torch.empty(n_rows, hq, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(n_rows, hq, device=q.device, dtype=torch.float32)
    layout = gl.NVMMASharedLayout.get_default_for([block_n, D], gl.bfloat16)
    k_desc = GluonDescriptor.from_tensor(k.view(k.shape[0], -1), [block_n, D], layout)
    v_desc = GluonDescriptor.from_tensor(v.view(v.shape[0], -1), [block_n, D], layout)
    out = torch.empty(q.shape[0], hq, D, device=q.device, dtype=q.dtype)

    def call():
        _stream_kernel[(sched["n_prog"] // per_sm,)](
            q, k_desc, v_desc, o_part, lse_part, sched["prog_ptr"], sched["item_piece"], sched["item_head"],
            sched["item_start"], sched["item_len"], sched["piece_q"], sched["piece_row"],
            q.stride(0), q.stride(1), qg, NS=stages, GROUP=group, HEADS_Q=hq, WGS=per_sm, num_warps=4)
        if merge:
            merge_partials(module, o_part, lse_part, out, sched["merge_ptr"])
        return out

    return call


def synthetic(results: list, sms: int) -> None:
    """Stage 1 alone on equal items: one (piece, KV head) item of ``tiles`` 64-key tiles per
    warpgroup slot (2 per SM, 8 KV heads), with 1 or 16 query slots (4 or 64 rows), against a
    plain read of the same K/V. Equal items have no imbalance, so the slope in tiles is the
    consumer's cost per tile, and the two widths show whether the rows cost anything."""
    hq, hkv, group, qg, bn, ns = 32, 8, 4, 16, 64, 3
    n_slots = 2 * sms
    n_pieces = n_slots // hkv
    for tiles in (4, 8, 16):
        n_kv = n_pieces * tiles * bn
        k = torch.randn(n_kv, hkv, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(n_kv, hkv, D, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(qg, hq, D, device="cuda", dtype=torch.bfloat16)
        for filled in (1, 16):
            piece_q = np.full((n_pieces, qg), -1, np.int32)
            piece_q[:, :filled] = np.arange(filled)
            piece_row = np.full((n_pieces, qg), -1, np.int32)
            piece_row[:, :filled] = np.arange(n_pieces * filled).reshape(n_pieces, filled)
            items = [(p, h) for p in range(n_pieces) for h in range(hkv)]

            def t(a):
                return torch.as_tensor(np.asarray(a, dtype=np.int32), device="cuda")

            sched = dict(prog_ptr=t(np.arange(len(items) + 1)), item_piece=t([p for p, _ in items] + [0]),
                         item_head=t([h for _, h in items] + [0]),
                         item_start=t([p * tiles * bn for p, _ in items] + [0]),
                         item_len=t([tiles * bn] * len(items) + [0]), piece_q=t(piece_q.reshape(-1)),
                         piece_row=t(piece_row.reshape(-1)), n_rows=n_pieces * filled, n_prog=len(items))
            us = graph_us(stream_call(None, q, k, v, sched, qg, group, bn, ns, 2, merge=False))
            gb = 2 * k.numel() * 2 / 1e9
            print(f"synthetic {tiles:2} tiles an item, {filled * group:2} rows: {us:6.2f} us, "
                  f"{gb / us * 1e3:.2f} TB/s", flush=True)
            results.append(dict(case="synthetic", tiles=tiles, rows=filled * group, items=len(items), us=us,
                                kv_gb=gb))
        read_us = graph_us(partial(_sum_both, k, v))
        results.append(dict(case="synthetic", tiles=tiles, variant="torch sum of k and v", us=read_us))
        print(f"synthetic {tiles:2} tiles: torch k.sum(), v.sum() {read_us:6.2f} us", flush=True)


def _sum_both(k, v):
    return k.sum(), v.sum()


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")) * 1e3


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    named = os.environ.get("EXPLORE_CASES", "fewshot_4k_x20:gqa,tot_d3_w3:gqa")
    variants = [  # (consumer warpgroups per SM, block_n, stages, max tiles a narrow piece, fixed cost in tiles)
        (2, 64, 3, 1000, 1.0), (2, 64, 3, 4, 1.0), (2, 64, 3, 3, 1.0), (2, 64, 3, 2, 1.0),
    ]
    spans = [int(x) for x in os.environ.get("EXPLORE_SPANS", "0,512").split(",")]
    results: list = []
    if os.environ.get("EXPLORE_SYNTHETIC"):
        synthetic(results, sms)
    for case in filter(None, named.split(",")):
        name, layout = case.split(":")
        hq, hkv = LAYOUTS[layout]
        group = hq // hkv
        tree = WORKLOADS[name]().tree
        module = attngen.load(tree_spec(tree.query_mode, hq, hkv))
        heads = HeadLayout(heads_q=hq, heads_kv=hkv, head_dim_qk=D, head_dim_v=D)
        plan = plan_tree(tree, heads=heads, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(plan.n_queries, hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(plan.n_kv, hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(plan.n_kv, hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = module.attention(q, k, v, plan).float()
        call_main = partial(module.attention, q, k, v, plan)
        main_us = [graph_us(call_main)]
        row = dict(case=case, variant="main", us=main_us[0], err=0.0)
        print(f"{case:22} main {main_us[0]:7.2f} us", flush=True)
        results.append(row)
        planner = plan
        for span, (per_sm, bn, ns, max_tiles, fixed) in [(sp, v) for sp in spans for v in variants]:
            label = f"span {span or planner.span} P{per_sm}x bn{bn} s{ns} max{max_tiles}"
            plan = planner if not span else plan_tree(tree, chunk=planner.chunk, span=span, heads=heads, device="cuda",
                                                      queries_per_group=planner.queries_per_group)
            try:
                sched = stream_schedule(plan, hkv, group, per_sm * sms, bn, max_tiles, fixed, "cuda")
                call = stream_call(module, q, k, v, sched, plan.queries_per_group, group, bn, ns, per_sm)
                out = call()
                torch.cuda.synchronize()
                err = float((out.float() - ref).norm() / ref.norm())
                us = graph_us(call)
                s1 = graph_us(stream_call(module, q, k, v, sched, plan.queries_per_group, group, bn, ns, per_sm,
                                             merge=False))
                main_us.append(graph_us(call_main))
            except Exception as err_:  # an experiment's failure is reported, not fatal
                print(f"{case:22} {label}: failed: {type(err_).__name__}: {str(err_)[:300]}", flush=True)
                results.append(dict(case=case, variant=label, error=str(err_)[:2000]))
                continue
            print(f"{case:22} {label:24} {us:7.2f} us (stage 1 {s1:6.2f}) err {err:.2e} pieces {sched['n_pieces']} "
                  f"rows {sched['n_rows']} busiest/mean {sched['busiest_over_mean']:.2f}", flush=True)
            results.append(dict(case=case, variant=label, us=us, stage1_us=s1, err=err, pieces=sched["n_pieces"],
                                rows=sched["n_rows"], busiest_over_mean=sched["busiest_over_mean"]))
        results.append(dict(case=case, variant="main, every round", us=main_us, median=statistics.median(main_us)))
        print(f"{case:22} main over the rounds: {statistics.median(main_us):.2f} us "
              f"({min(main_us):.2f}-{max(main_us):.2f})", flush=True)
    (OUT / "stream.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
