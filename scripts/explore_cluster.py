"""What thread-block clusters give a Gluon kernel on this GPU and Triton (session 49).

BENCHMARKS.md ("Where it stands") names one direction for the small GQA cases that was
never tried: one launch, a cluster of programs per KV head, each streaming an equal share
of the head's KV, the partials merged inside the cluster behind a cluster barrier, so no
merge launch. It left open whether Triton 3.6's Gluon can launch clusters at all, how a
kernel tells its CTAs apart, whether a CTA's global writes are seen by the others after a
cluster barrier, and whether 16-CTA clusters (8 KV heads x 16 = 128 SMs) can all be
resident. This script answers those, and times an empty launch and a streaming read with
and without the barrier against the same grid without clusters. Last, it asks whether
today's single-CTA Gluon kernel could run in a cluster as it is: with replicated layouts
(every CTA holds the whole tensor), do TMA, mbarriers and wgmma run per CTA, and do every
CTA's stores land (gl.store, or inline PTX)? It changes nothing in attngen; the answers
are in docs/benchmarks/HISTORY.md, session 49.

Prints the API it finds, a line per (cluster size, barrier or "replicated") and writes
cluster.json under $OUT. Each row runs in a process of its own. Needs an sm_90 GPU.

    python scripts/explore_cluster.py
    EXPLORE_CASES=2:-1,16:-1 python scripts/explore_cluster.py   # the replicated rows only
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

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

OUT = Path(os.environ.get("OUT", "explore_out"))
THREADS = 128  # 4 warps, one element each in the layouts below
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


def api_facts() -> dict[str, object]:
    """The cluster-related names this Triton's Gluon has."""
    from triton.experimental.gluon.language.nvidia import hopper

    facts: dict[str, object] = {"triton": triton.__version__, "torch": torch.__version__}
    facts["BlockedLayout fields"] = [f.name for f in dataclasses.fields(gl.BlockedLayout)]
    facts["gl.num_ctas"] = hasattr(gl, "num_ctas")
    facts["gl.barrier"] = str(inspect.signature(gl.barrier)) if hasattr(gl, "barrier") else None
    facts["hopper.cluster"] = sorted(n for n in dir(getattr(hopper, "cluster", None) or object()) if not n.startswith("_")) \
        if hasattr(hopper, "cluster") else None
    desc = getattr(gl, "shared_memory_descriptor", None)
    facts["shared_memory_descriptor methods"] = sorted(n for n in dir(desc) if not n.startswith("_")) if desc else None
    facts["mbarrier"] = sorted(n for n in dir(hopper.mbarrier) if not n.startswith("_"))
    return facts


def split_layout(n_ctas: int) -> gl.BlockedLayout:
    """A 1-D layout of n_ctas * 128 elements, 128 to a CTA, one to a thread, CTA r holding
    elements [128 r, 128 (r + 1)). cga_layout's bases count CTA tiles: basis i is the tile
    that CTA bit i moves to (older Tritons spelled it ctas_per_cga / cta_split_num)."""
    fields = {f.name for f in dataclasses.fields(gl.BlockedLayout)}
    if "cga_layout" in fields:
        return gl.BlockedLayout([1], [32], [4], [0], cga_layout=[[1 << i] for i in range(n_ctas.bit_length() - 1)])
    return gl.BlockedLayout([1], [32], [4], [0], ctas_per_cga=[n_ctas], cta_split_num=[n_ctas], cta_order=[0])


@gluon.jit
def _sreg(like, ASM: gl.constexpr):
    """A special register's value (ASM moves it to $0), as a tensor like ``like``."""
    return gl.inline_asm_elementwise(ASM, "=r,r", [like], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _cluster_sync(like, HOW: gl.constexpr):
    """0: none; 1: Gluon's barrier(cluster=True); 2: PTX barrier.cluster arrive.release +
    wait.acquire. Returns zeros to add to addresses, so later loads depend on it."""
    if HOW == 1:
        gl.barrier(cluster=True)
    zero = like * 0
    if HOW == 2:
        zero = gl.inline_asm_elementwise(
            "barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\nmov.u32 $0, 0;",
            "=r,r", [like], dtype=gl.int32, is_pure=False, pack=1)
    return zero


@gluon.jit
def _ids_kernel(Ids, Seen, N: gl.constexpr, LAYOUT: gl.constexpr, HOW: gl.constexpr):
    """Each element records (cluster rank, cluster id, CTA id, program id) of the CTA that
    holds it; after the barrier each reads its right-hand neighbour CTA's rank back."""
    offs = gl.arange(0, N * 128, layout=LAYOUT)
    pid = gl.program_id(0)
    base = pid * (N * 128)
    rank = _sreg(offs, "mov.u32 $0, %cluster_ctarank;")
    gl.store(Ids + (base + offs) * 4 + 0, rank)
    gl.store(Ids + (base + offs) * 4 + 1, _sreg(offs, "mov.u32 $0, %clusterid.x;"))
    gl.store(Ids + (base + offs) * 4 + 2, _sreg(offs, "mov.u32 $0, %ctaid.x;"))
    gl.store(Ids + (base + offs) * 4 + 3, offs * 0 + pid)
    zero = _cluster_sync(offs, HOW)
    other = (offs + 128 + zero) % (N * 128)
    gl.store(Seen + base + offs, gl.load(Ids + (base + other) * 4))


@gluon.jit
def _empty_kernel(Out, N: gl.constexpr, LAYOUT: gl.constexpr, HOW: gl.constexpr):
    offs = gl.arange(0, N * 128, layout=LAYOUT)
    zero = _cluster_sync(offs, HOW)
    gl.store(Out + gl.program_id(0) * (N * 128) + offs, offs + zero)


def tile_layout(n_ctas: int) -> gl.BlockedLayout:
    """A [n_ctas * 32, 256] layout, 32 rows to a CTA (8 x 8 elements a thread)."""
    fields = {f.name for f in dataclasses.fields(gl.BlockedLayout)}
    if "cga_layout" in fields:
        return gl.BlockedLayout([8, 8], [1, 32], [4, 1], [1, 0],
                                cga_layout=[[1 << i, 0] for i in range(n_ctas.bit_length() - 1)])
    return gl.BlockedLayout([8, 8], [1, 32], [4, 1], [1, 0], ctas_per_cga=[n_ctas, 1], cta_split_num=[n_ctas, 1],
                            cta_order=[1, 0])


@gluon.jit
def _stream_kernel(X, Out, n_iter, N: gl.constexpr, LAYOUT: gl.constexpr, HOW: gl.constexpr):
    """Each CTA sums its 32-row share of each step's rows (two steps' loads in flight at a
    time), then (HOW) syncs the cluster, then stores its row sums."""
    R: gl.constexpr = N * 32
    rows = gl.arange(0, R, layout=gl.SliceLayout(1, LAYOUT))
    cols = gl.arange(0, 256, layout=gl.SliceLayout(0, LAYOUT))
    tile = gl.expand_dims(rows, 1) * 256 + gl.expand_dims(cols, 0)
    pid = gl.program_id(0)
    step = gl.num_programs(0) * R * 256
    acc = gl.zeros([R, 256], gl.float32, LAYOUT)
    for i in range(0, n_iter, 2):
        a = gl.load(X + pid * R * 256 + i * step + tile)
        b = gl.load(X + pid * R * 256 + (i + 1) * step + tile)
        acc += a.to(gl.float32) + b.to(gl.float32)
    total = gl.sum(acc, axis=1)
    zero = _cluster_sync(rows, HOW)
    gl.store(Out + pid * R + rows + zero, total)


def time_stream(n: int, clusters: int, how: int, mbytes: int) -> tuple[float, bool]:
    """µs of a streaming read of ``mbytes`` MB, and whether its sums are right."""
    rows_per_step = clusters * n * 32
    n_iter = max(2, (mbytes * 2**20 // 2 // (rows_per_step * 256)) // 2 * 2)
    x = torch.randn(n_iter * rows_per_step * 256, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(rows_per_step, dtype=torch.float32, device="cuda")
    fn = lambda: _stream_kernel[(clusters,)](x, out, n_iter, n, tile_layout(n), how, num_warps=4, num_ctas=n)
    fn()
    want = x.view(n_iter, rows_per_step, 256).float().sum(dim=(0, 2))
    ok = bool(torch.allclose(out, want, rtol=1e-3, atol=1e-1))
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1e3, ok


def replicated(n_ctas: int, rank: int) -> list[list[int]]:
    """cga_layout bases that give every CTA of the cluster the whole tensor (each CTA bit
    moves to tile 0): the layout an unchanged single-CTA kernel would need."""
    return [[0] * rank for _ in range(n_ctas.bit_length() - 1)]


@gluon.jit
def _replicated_kernel(Out, N: gl.constexpr, LAYOUT: gl.constexpr):
    """Every CTA holds all 128 elements and stores them at its own (cluster, rank) row:
    does Triton mask the stores of CTAs past the first, as copies of the same data?"""
    offs = gl.arange(0, 128, layout=LAYOUT)
    rank = _sreg(offs, "mov.u32 $0, %cluster_ctarank;")
    gl.store(Out + (gl.program_id(0) * N + rank) * 128 + offs, rank)


@gluon.jit
def _tma_mma_kernel(a_desc, b_desc, C, c_addr, N: gl.constexpr, LINE: gl.constexpr, ACC: gl.constexpr,
                    BAR: gl.constexpr, PTX_STORE: gl.constexpr):
    """Each CTA: its own 64 x 64 tiles of A and B by TMA (coordinates from its rank), one
    wgmma, C's tile stored; every layout replicated across the cluster. PTX_STORE: the
    store as inline st.global, which Triton cannot mask by CTA."""
    rank = gl.max(_sreg(gl.arange(0, 128, layout=LINE), "mov.u32 $0, %cluster_ctarank;"), axis=0)
    tile = gl.program_id(0) * N + rank
    a_smem = gl.allocate_shared_memory(gl.float16, [64, 64], a_desc.layout)
    b_smem = gl.allocate_shared_memory(gl.float16, [64, 64], b_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], BAR)
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    _tma_load(a_desc, [tile * 64, 0], bar, a_smem)
    _tma_load(b_desc, [tile * 64, 0], bar, b_smem)
    mbarrier.wait(bar, 0)
    tok = warpgroup_mma(a_smem, b_smem.permute((1, 0)), gl.zeros([64, 64], gl.float32, ACC), use_acc=False,
                        is_async=True)
    acc = warpgroup_mma_wait(0, deps=[tok])
    rows = tile * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, ACC))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, ACC))
    ptrs = C + gl.expand_dims(rows, 1) * 64 + gl.expand_dims(cols, 0)
    if PTX_STORE:
        at = c_addr + (gl.expand_dims(rows, 1) * 64 + gl.expand_dims(cols, 0)).to(gl.int64) * 4  # C as an address
        gl.inline_asm_elementwise("st.global.f32 [$1], $2;\nmov.u32 $0, 0;", "=r,l,f", [at, acc], dtype=gl.int32,
                                  is_pure=False, pack=1)
    else:
        gl.store(ptrs, acc)


def check_replicated(n: int) -> dict[str, object]:
    clusters = 128 // n
    out = torch.full((clusters * n, 128), -7, dtype=torch.int32, device="cuda")
    layout = gl.BlockedLayout([1], [32], [4], [0], cga_layout=replicated(n, 1))
    _replicated_kernel[(clusters,)](out, n, layout, num_warps=4, num_ctas=n)
    torch.cuda.synchronize()
    ranks = torch.arange(clusters * n, device="cuda")[:, None] % n
    result: dict[str, object] = {"every CTA's stores land": bool((out == ranks).all()),
                                 "rows written": int((out != -7).all(dim=1).sum())}
    tiles = clusters * n
    a = torch.randn(tiles * 64, 64, dtype=torch.float16, device="cuda")
    b = torch.randn(tiles * 64, 64, dtype=torch.float16, device="cuda")
    c = torch.full((tiles * 64, 64), float("nan"), dtype=torch.float32, device="cuda")
    shared = dataclasses.replace(gl.NVMMASharedLayout.get_default_for([64, 64], gl.float16),
                                 cga_layout=replicated(n, 2))
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16],
                                    cga_layout=replicated(n, 2))
    bar = mbarrier.MBarrierLayout(cga_layout=replicated(n, 1)) if n > 1 else mbarrier.MBarrierLayout()
    want = torch.bmm(a.view(tiles, 64, 64).float(), b.view(tiles, 64, 64).float().transpose(1, 2))
    for ptx in (False, True):
        c.fill_(float("nan"))
        _tma_mma_kernel[(clusters,)](GluonDescriptor.from_tensor(a, [64, 64], shared),
                                     GluonDescriptor.from_tensor(b, [64, 64], shared), c, c.data_ptr(), n, layout, acc,
                                     bar, ptx,
                                     num_warps=4, num_ctas=n)
        torch.cuda.synchronize()
        right = (c.view(tiles, 64, 64) - want).abs().amax(dim=(1, 2)) < 1e-2
        result["TMA + wgmma tiles right" + (", stored by PTX" if ptx else "")] = f"{int(right.sum())} of {tiles}"
    return result


def check_ids(n: int, clusters: int, how: int) -> dict[str, object]:
    ids = torch.full((clusters, n * THREADS, 4), -7, dtype=torch.int32, device="cuda")
    seen = torch.full((clusters, n * THREADS), -7, dtype=torch.int32, device="cuda")
    compiled = _ids_kernel[(clusters,)](ids, seen, n, split_layout(n), how, num_warps=4, num_ctas=n)
    torch.cuda.synchronize()
    e = torch.arange(n * THREADS, device="cuda")
    c = torch.arange(clusters, device="cuda")[:, None]
    want_rank = (e // THREADS).expand(clusters, -1)
    result: dict[str, object] = {
        "rank is the element's CTA": bool((ids[..., 0] == want_rank).all()),
        "clusterid.x is the program id": bool((ids[..., 1] == ids[..., 3]).all()),
        "program id is the cluster": bool((ids[..., 3] == c).all()),
        "ctaid = cluster * n + rank": bool((ids[..., 2] == c * n + want_rank).all()),
        "every element written": bool((ids != -7).all()),
        "neighbour's rank seen after the barrier": bool((seen == (want_rank + 1) % n).all()),
        "registers": getattr(compiled, "n_regs", None),
    }
    try:
        occupancy = triton.runtime.driver.active.utils.cuOccupancyMaxActiveClusters
        compiled._init_handles()
        result["max active clusters (dyn smem 0 / 100 KB / 200 KB)"] = [
            occupancy(compiled.function, smem, n) for smem in (0, 100 * 1024, 200 * 1024)]
    except Exception as err:  # the occupancy query is Triton's private helper
        result["max active clusters"] = f"{type(err).__name__}: {err}"
    return result


def time_empty(n: int, clusters: int, how: int) -> float:
    out = torch.empty(clusters * n * THREADS, dtype=torch.int32, device="cuda")
    fn = lambda: _empty_kernel[(clusters,)](out, n, split_layout(n), how, num_warps=4, num_ctas=n)
    fn()
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1e3


def one_row(n: int, how: int) -> dict[str, object]:
    """how < 0: the replicated layouts (an unchanged kernel in a cluster); else the split
    layouts with barrier ``how``."""
    clusters = 128 // n
    if how < 0:
        row: dict[str, object] = {"cluster": n, "clusters": clusters, "barrier": "replicated"}
        try:
            row.update(check_replicated(n))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            row["trace"] = traceback.format_exc()[-1500:]
        return row
    row = {"cluster": n, "clusters": clusters, "barrier": ["none", "gl.barrier", "ptx"][how]}
    try:
        row.update(check_ids(n, clusters, how))
        row["empty launch us"] = round(time_empty(n, clusters, how), 2)
        for mb in (48, 192):
            us, ok = time_stream(n, clusters, how, mb)
            row[f"stream {mb} MB us"], row[f"stream {mb} MB right"] = round(us, 2), ok
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        row["trace"] = traceback.format_exc()[-1500:]
    return row


def main() -> None:
    """Each row in a process of its own: a layout the compiler rejects aborts in LLVM."""
    if len(sys.argv) == 4 and sys.argv[1] == "--row":
        print("ROW " + json.dumps(one_row(int(sys.argv[2]), int(sys.argv[3])), default=str))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"api": api_facts(), "device": torch.cuda.get_device_name()}
    print(json.dumps(report["api"], indent=1))
    rows = []
    cases = [(1, 0), (2, 2), (4, 2), (8, 2), (16, 2), (16, 1), (16, 0), (8, 0), (1, -1), (2, -1), (16, -1)]
    if os.environ.get("EXPLORE_CASES"):  # e.g. "16:-1,2:-1"
        cases = [tuple(int(x) for x in c.split(":")) for c in os.environ["EXPLORE_CASES"].split(",")]
    for n, how in cases:
        run = subprocess.run([sys.executable, __file__, "--row", str(n), str(how)], capture_output=True, text=True,
                             timeout=240)
        found = [line[4:] for line in run.stdout.splitlines() if line.startswith("ROW ")]
        row = json.loads(found[0]) if found else {
            "cluster": n, "barrier": ["none", "gl.barrier", "ptx", "replicated"][how],
            "error": f"exit {run.returncode}: " + next((ln for ln in run.stderr.splitlines() if "ERROR" in ln),
                                                        (run.stderr.strip().splitlines() or [""])[-1])[:200],
            "trace": run.stderr[-1500:]}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "trace"}, flush=True)
    report["rows"] = rows
    (OUT / "cluster.json").write_text(json.dumps(report, indent=1, default=str))
    print("\ncluster barrier    ids   seen  occupancy (0/100K/200K)  empty us  48 MB us  192 MB us  error")
    for r in rows:
        if r["barrier"] == "replicated":
            land = r.get("every CTA's stores land", "-")
            print(f"{r['cluster']:>7} replicated layouts: every CTA's stores land: {land}; TMA + wgmma tiles right: "
                  f"{r.get('TMA + wgmma tiles right', '-')}; by PTX stores: "
                  f"{r.get('TMA + wgmma tiles right, stored by PTX', '-')}  {str(r.get('error', ''))[:80]}")
            continue
        occ = r.get("max active clusters (dyn smem 0 / 100 KB / 200 KB)", r.get("max active clusters", "-"))
        ids, seen = r.get("rank is the element's CTA", "-"), r.get("neighbour's rank seen after the barrier", "-")
        print(f"{r['cluster']:>7} {r['barrier']:>10}  {ids!s:>5}  {seen!s:>5}  {occ!s:>23}  "
              f"{r.get('empty launch us', '-')!s:>8}  {r.get('stream 48 MB us', '-')!s:>8}  "
              f"{r.get('stream 192 MB us', '-')!s:>9}  {str(r.get('error', ''))[:80]}")


if __name__ == "__main__":
    main()
