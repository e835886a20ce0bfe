"""How fast can an attention tile loop run on Hopper, written in Triton or in Gluon?

The tree kernels' speculative-tree cases are bound by the matrix units, and Triton's
generated loop keeps both warpgroups of a 128-row tile in lockstep (a CTA-wide barrier per
tile), so the softmax never overlaps a matrix product. This script measures, on the same
inputs and in the same process:

- ``triton``: the loop as the tree kernel writes it (128 x 128 tiles, 8 warps, 3 stages,
  TMA loads), one program per (row tile, head, KV span);
- ``gluon``: the same tile loop in Gluon with warp specialization: one TMA producer warp
  and two consumer warpgroups of 64 rows that share the K/V ring and never wait for each
  other. Each consumer issues q·kᵀ of tile j and p·v of tile j−1 together, then runs tile
  j's softmax while p·v is still in flight (FlashAttention-3's intra-warpgroup overlap);
- ``torch.mm``: the bf16 matrix rate the benchmark floors use.

Shapes: a dense 16-head 4096 x 8192 attention, and the speculative-tree case
spec_16k_184 gqa's prompt part (8 KV heads, 768 rows = 192 queries x 4 heads, 16384 keys)
cut into KV spans, as the planner cuts it. Prints a table and writes gluon_loop.json under
$OUT (or ./explore_out). Needs an sm_90 GPU; Triton 3.6 or newer.

    python scripts/explore_gluon.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.tools.tensor_descriptor import TensorDescriptor

OUT = Path(os.environ.get("OUT", "explore_out"))
D = 128
# Triton 3.6 calls the TMA load async_copy_global_to_shared; 3.9 renamed it async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


# ---- Triton: the tree kernel's interior loop -------------------------------------------

@triton.jit
def _triton_span(Q, K_desc, V_desc, Out, LSE, M_rows, n_mt, n_sp, SPAN,
                 DH: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """One (row tile, head, KV span): normalized fp32 partial and base-2 LSE."""
    pid = tl.program_id(0)
    mt = pid % n_mt
    sp = (pid // n_mt) % n_sp
    h = pid // (n_mt * n_sp)
    rows = mt * BM + tl.arange(0, BM)
    d = tl.arange(0, DH)
    q = tl.load(Q + (h * M_rows + rows)[:, None].to(tl.int64) * DH + d[None, :])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DH], tl.float32)
    for lo in range(sp * SPAN, (sp + 1) * SPAN, BN):
        k = K_desc.load([lo, h * DH])
        v = V_desc.load([lo, h * DH])
        s = 0.12751743082459868 * tl.dot(q, tl.trans(k))  # log2(e) / sqrt(128)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    r = (pid * BM + tl.arange(0, BM)).to(tl.int64)
    tl.store(Out + r[:, None] * DH + d[None, :], acc / l_i[:, None])
    tl.store(LSE + r, m_i + tl.log2(l_i))


def triton_call(q, k, v, splits):
    """q [H, M, D]; k, v [N, H, D]; partials [H * splits * M, D] in program order."""
    H, M, _ = q.shape
    N = k.shape[0]
    bm, bn = 128, 128
    n_mt, span = M // bm, N // splits
    o = torch.empty(H * splits * M, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(H * splits * M, device=q.device, dtype=torch.float32)
    kd = TensorDescriptor.from_tensor(k.view(N, -1), [bn, D])
    vd = TensorDescriptor.from_tensor(v.view(N, -1), [bn, D])

    def call():
        _triton_span[(n_mt * splits * H,)](q, kd, vd, o, lse, M, n_mt, splits, span, DH=D, BM=bm, BN=bn,
                                           num_warps=8, num_stages=3)

    def result():
        ov = o.view(H, splits, n_mt, bm, D).permute(2, 3, 0, 1, 4).reshape(M, H, splits, D)
        lv = lse.view(H, splits, n_mt, bm).permute(2, 3, 0, 1).reshape(M, H, splits)
        return merge_partials(ov, lv)
    return call, result


# ---- Gluon: producer warp + two overlapped consumer warpgroups --------------------------

@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, row0, col, n_tiles, kv0):
    # tile shapes come from the buffers: constexpr arguments do not survive warp_specialize
    NS: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    HM: gl.constexpr = q_smem.shape[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [row0, col], q_bar, q_smem.index(0))
    _tma_load(q_desc, [row0 + HM, col], q_bar, q_smem.index(1))
    for j in range(n_tiles):
        s = j % NS
        # slot s is free once both consumers released it (a fresh barrier passes parity 1)
        mbarrier.wait(empty.index(s), ((j // NS) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [kv0 + j * BN, col], ready.index(s), k_smem.index(s))
        _tma_load(v_desc, [kv0 + j * BN, col], ready.index(s), v_smem.index(s))


@gluon.jit
def _softmax_step(sc, m_i, l_i):
    m_new = gl.maximum(m_i, gl.max(sc, axis=1) * 0.12751743082459868)
    p = gl.exp2(sc * 0.12751743082459868 - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _consumer(C: gl.constexpr, Out, LSE, q_smem, k_smem, v_smem, q_bar, ready, empty, row0, col, n_tiles):
    """Rows [C * 64, C * 64 + 64) of the program's 128-row tile."""
    NS: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    DH: gl.constexpr = k_smem.shape[2]
    HM: gl.constexpr = q_smem.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DH, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i = gl.full([HM], float("-inf"), gl.float32, row_l)
    l_i = gl.full([HM], 0.0, gl.float32, row_l)
    acc = gl.zeros([HM, DH], gl.float32, o_layout)
    zero_s = gl.zeros([HM, BN], gl.float32, s_layout)
    q = q_smem.index(C)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(ready.index(0), 0)
    tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    sc = warpgroup_mma_wait(0, deps=[tok])
    p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i)
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    for j in range(1, n_tiles):
        s = j % NS
        sp = (j - 1) % NS
        mbarrier.wait(ready.index(s), (j // NS) & 1)
        # q·kᵀ of tile j, then p·v of tile j - 1; tile j's softmax runs while p·v is in flight
        tok_s = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        tok_o = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
        sc = warpgroup_mma_wait(1, deps=[tok_s])
        p, alpha, m_i, l_i = _softmax_step(sc, m_i, l_i)
        acc = warpgroup_mma_wait(0, deps=[tok_o])
        mbarrier.arrive(empty.index(sp))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_l), 1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    sl = (n_tiles - 1) % NS
    tok_o = warpgroup_mma(p_op, v_smem.index(sl), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=[tok_o])
    mbarrier.arrive(empty.index(sl))
    o = acc / gl.expand_dims(gl.convert_layout(l_i, orow_l), 1)
    # partial of KV span program_id(2): Out [splits, M, H * D], LSE [splits, M, H] (base 2)
    n_heads = gl.num_programs(1)
    base = gl.program_id(2).to(gl.int64) * (gl.num_programs(0) * 2 * HM)
    rows = row0 + C * HM + gl.arange(0, HM, layout=orow_l)
    cols = gl.arange(0, DH, layout=gl.SliceLayout(0, o_layout))
    gl.store(Out + gl.expand_dims((base + rows) * (n_heads * DH), 1) + col + gl.expand_dims(cols, 0),
             o.to(Out.dtype.element_ty))
    lrows = row0 + C * HM + gl.arange(0, HM, layout=row_l)
    gl.store(LSE + (base + lrows) * n_heads + gl.program_id(1), m_i + gl.log2(l_i))


@gluon.jit
def _consumer0(Out, LSE, q_smem, k_smem, v_smem, q_bar, ready, empty, row0, col, n_tiles):
    _consumer(0, Out, LSE, q_smem, k_smem, v_smem, q_bar, ready, empty, row0, col, n_tiles)


@gluon.jit
def _consumer1(Out, LSE, q_smem, k_smem, v_smem, q_bar, ready, empty, row0, col, n_tiles):
    _consumer(1, Out, LSE, q_smem, k_smem, v_smem, q_bar, ready, empty, row0, col, n_tiles)


@gluon.jit
def _gluon_span(q_desc, k_desc, v_desc, Out, LSE, N_keys,
                BM: gl.constexpr, BN: gl.constexpr, DH: gl.constexpr, NS: gl.constexpr):
    row0 = gl.program_id(0) * BM
    col = gl.program_id(1) * DH
    n_tiles = N_keys // BN // gl.num_programs(2)
    kv0 = gl.program_id(2) * n_tiles * BN
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BM // 2, DH], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [NS, BN, DH], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [NS, BN, DH], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers release a slot
    args = (Out, LSE, q_smem, k_smem, v_smem, q_bar, ready, empty, row0, col, n_tiles)
    gl.warp_specialize([
        (_consumer0, args),
        (_consumer1, args),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, ready, empty, row0, col, n_tiles,
                     kv0)),
    ], [4, 1], [232, 40])


def gluon_call(q, k, v, splits, stages=3):
    """q [M, H, D]; k, v [N, H, D]; partials [splits, M, H * D]."""
    M, H, _ = q.shape
    N = k.shape[0]
    bm, bn = 128, 128
    o = torch.empty(splits, M, H * D, device=q.device, dtype=torch.float32)
    lse = torch.empty(splits, M, H, device=q.device, dtype=torch.float32)
    qd = GluonDescriptor.from_tensor(q.view(M, -1), [bm // 2, D],
                                     gl.NVMMASharedLayout.get_default_for([bm // 2, D], gl.bfloat16))
    kv_layout = gl.NVMMASharedLayout.get_default_for([bn, D], gl.bfloat16)
    kd = GluonDescriptor.from_tensor(k.view(N, -1), [bn, D], kv_layout)
    vd = GluonDescriptor.from_tensor(v.view(N, -1), [bn, D], kv_layout)

    def call():
        _gluon_span[(M // bm, H, splits)](qd, kd, vd, o, lse, N, BM=bm, BN=bn, DH=D, NS=stages, num_warps=4)

    def result():
        return merge_partials(o.view(splits, M, H, D).permute(1, 2, 0, 3), lse.permute(1, 2, 0))
    return call, result


# ---- measurement -----------------------------------------------------------------------

def merge_partials(o, lse):
    """o [M, H, splits, D] normalized partials, lse [M, H, splits] base 2 -> [M, H, D]."""
    w = torch.softmax(lse * 0.6931471805599453, -1)
    return (o * w[..., None]).sum(2)


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1e3


def main() -> int:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_tf = 2 * 8192**3 / graph_us(lambda: torch.mm(a, b)) / 1e6

    rows = []
    for H, M, N, splits_list in ((16, 4096, 8192, (1,)), (8, 768, 16384, (8, 4))):
        q = torch.randn(M, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1)).transpose(0, 1)
        flops = 4.0 * H * M * N * D
        for splits in splits_list:
            for name, (call, result) in (("triton", triton_call(q.transpose(0, 1).contiguous(), k, v, splits)),
                                         ("gluon", gluon_call(q, k, v, splits))):
                call()
                torch.cuda.synchronize()
                out = result()
                err = float((out - ref).norm() / ref.norm())
                us = graph_us(call)
                rows.append(dict(kernel=name, heads=H, rows=M, keys=N, splits=splits, us=us,
                                 tflops=flops / us / 1e6, of_mm=flops / us / 1e6 / mm_tf, rel_err=err))
                print(rows[-1], flush=True)
    (OUT / "gluon_loop.json").write_text(json.dumps(dict(mm_tflops=mm_tf, rows=rows), indent=1))
    print(f"\ntorch.mm bf16 8192^3: {mm_tf:.0f} TFLOP/s")
    print(f"{'kernel':8} {'H':>3} {'rows':>5} {'keys':>6} {'splits':>6} {'us':>8} {'TFLOP/s':>8} {'x mm':>6} {'rel err':>8}")
    for r in rows:
        print(f"{r['kernel']:8} {r['heads']:3} {r['rows']:5} {r['keys']:6} {r['splits']:6} {r['us']:8.1f} "
              f"{r['tflops']:8.1f} {r['of_mm']:6.2f} {r['rel_err']:8.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
