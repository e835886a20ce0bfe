"""Tree-decoding benchmark: attngen's tree kernels against the kernels a user would
otherwise pick, on DeFT's workloads, beside the hardware floor.

For each workload and head layout, in one run and on the same inputs:

* ``attngen`` — the generated tree module over a plan from :func:`attngen.plan.plan_tree`;
* ``flex`` — FlexAttention over the flattened tree with an ancestor BlockMask;
* ``sdpa_dense`` — torch SDPA over the flattened tree with a dense boolean mask;
* ``per_branch`` — what a sequence-based system does: every query's root path held as
  its own contiguous KV (built before timing), attended by SDPA with padding masks.

The floor is ``max((unique KV + Q + O bytes) / bandwidth, visible pairs' FLOPs / matmul
rate)``, the cost model's ``FLOOR_TIME`` (what ``attngen plan`` prints) at both rates
measured in the same run. Every timing is the median of CUDA-graph replays. GPU only::

    python -m attngen.bench_tree --out bench_out/
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from attngen.bench import measure_rates
from attngen.errors import AttngenError
from attngen.paging import node_paged_cache
from attngen.plan import plan_tree
from attngen.plotting import pyplot
from attngen.progress import Progress
from attngen.render import write_atomic
from attngen.spec import Spec, parse_spec, torch_dtype
from attngen.tree import TreeBatch
from attngen.workloads import REFERENCE_SHAPES, WORKLOADS, Workload

LAYOUTS = {"mha": (32, 32), "gqa": (32, 8)}
#: A peer whose output differs from attngen's by this much (relative) is not timed: both
#: are within ~2.3e-3 of the float64 reference on every reference case in bf16.
PEER_AGREEMENT = 2e-2
#: Inductor runs FlexAttention with its flex-decoding kernel under this many queries.
FLEX_DECODING_BELOW = 128
HEAD_DIM = 128
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TreeRow:
    workload: str
    layout: str
    n_queries: int
    n_kv: int
    floor_us: float
    attngen_us: float
    flex_us: float | None
    sdpa_dense_us: float | None
    per_branch_us: float | None
    plan_ms: float
    replan_ms: float | None
    rel_err: float
    plan: str = ""  # the cost model's choice: chunk, queries per group, span
    config: str = ""  # the autotuner's pick for that plan
    #: attngen with every group in the Triton kernel, where the plan has dense groups that
    #: the Gluon stage 1 ran (Hopper)
    triton_only_us: float | None = None
    cold_l2: bool = False  # every replay timed after L2 was overwritten
    #: FlexAttention's kernel that ``flex_us`` timed ("decoding" or "flex_attention";
    #: :func:`_flex_us`), "" where it did not run or in files written before session 57
    flex_kernel: str = ""

    @property
    def ratio(self) -> float:
        return self.attngen_us / self.floor_us

    @property
    def best_peer_us(self) -> float | None:
        peers = [t for t in (self.flex_us, self.sdpa_dense_us, self.per_branch_us) if t]
        return min(peers) if peers else None


def tree_spec(mode: str, heads_q: int, heads_kv: int) -> Spec:
    return parse_spec({
        "name": f"bench_tree_{mode}_{heads_q}_{heads_kv}",
        "description": f"Tree attention benchmark, {mode} queries, {heads_q}/{heads_kv} heads.",
        "heads": {"q": heads_q, "kv": heads_kv},
        "head_dim": HEAD_DIM,
        "dtype": "bf16",
        "topology": {"kind": "tree", "queries": mode},
    })


#: Timed replays per figure with ``--cold-l2``.
COLD_REPLAYS = 60


def _graph_time_us(fn: Callable[[], Any], cold: bool = False) -> float:
    """Median µs of CUDA-graph replays of ``fn``. Back to back, a KV smaller than L2 stays
    there from one replay to the next; with ``cold``, each replay follows (untimed) a
    read of a buffer larger than L2, so the KV comes from DRAM as in a decode step that
    runs between other layers. (A read leaves clean lines; a write would leave dirty
    ones, whose write-back would then be timed against the kernel.)"""
    import torch
    import triton

    fn()
    if not cold:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    scrub = torch.ones(256 * 2**20, dtype=torch.float16, device="cuda")  # 512 MB
    spans = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(COLD_REPLAYS)]
    for start, end in spans:
        scrub.sum()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in spans) * 1e3


def _checked_peer_us(run: Callable[[], Any], to_rows: Callable[[Any], Any], out: Any, cold: bool) -> float:
    """``run``'s time (:func:`_graph_time_us`), once its output (``to_rows``: as attngen's
    [n_q, H, D] ``out``) agrees with attngen's to :data:`PEER_AGREEMENT`: a peer that
    computes something else is reported as not run, not timed."""
    diff = float((to_rows(run()).double() - out.double()).norm() / out.double().norm())
    if not diff < PEER_AGREEMENT:
        raise AttngenError(f"output differs from attngen's by {diff:.1e} (relative)")
    return _graph_time_us(run, cold)


def _flex_us(run: Callable[[Any], Any], n_q: int, timed: Callable[[Callable[[], Any]], float]) -> tuple[float, str]:
    """FlexAttention's time and the kernel it came from ("decoding" or "flex_attention"):
    ``run(kernel_options)`` timed by ``timed``. From :data:`FLEX_DECODING_BELOW` queries
    Inductor runs its flex_attention kernel. Under it, Inductor picks its flex-decoding
    kernel, which splits the KV, but the flex_attention kernel can be the faster one there
    (spec_4k_92 GQA: 141 against ~1690 us), so a user would pick it: both are timed and
    the faster kept. In torch 2.11 the decoding kernel also finds no tile for short GQA
    query counts (92 queries x 4 heads: pytorch/pytorch#185349); it is then left out."""
    if n_q >= FLEX_DECODING_BELOW:
        return timed(lambda: run(None)), "flex_attention"
    try:
        decoding: float | None = timed(lambda: run(None))
    except Exception as err:
        if "NoValidChoicesError" not in str(err):
            raise
        print("  flex: the decoding kernel has no tile for this shape", file=sys.stderr)
        decoding = None
    attention = timed(lambda: run({"FORCE_USE_FLEX_ATTENTION": True}))
    print(f"  flex: decoding kernel {'n/a' if decoding is None else f'{decoding:.1f}'} us, "
          f"flex_attention kernel {attention:.1f} us", file=sys.stderr)
    if decoding is not None and decoding <= attention:
        return decoding, "decoding"
    return attention, "flex_attention"


def _try(fn: Callable[[], T], what: str) -> T | None:
    try:
        return fn()
    except Exception as err:  # a peer that cannot run this case is reported, not fatal
        print(f"  {what}: not run ({type(err).__name__}: {str(err).splitlines()[0][:120]})", file=sys.stderr)
        return None


#: Plans timed per case for the planning columns (a median; the first of each is a warm-up).
PLANNING_REPEATS = 50


def planning_ms(fn: Callable[[TreeBatch], Any], tree: Callable[[], TreeBatch],
                repeats: int = PLANNING_REPEATS) -> float:
    """Median host ms of ``fn`` (planning) over ``repeats`` calls, each on a tree from
    ``tree()`` made outside the timing: a tree never planned before, as a new tree or a
    decode step's is. A tree derives some arrays on first use and keeps them (kv_pos,
    q_pos, its unique tokens), which repeated plans of one tree object would not pay
    (0.05-0.09 ms of item 5's 256-node tree; session 61). One untimed call first."""
    fn(tree())
    times = []
    for _ in range(repeats):
        fresh = tree()
        t0 = time.perf_counter()
        fn(fresh)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _planning_ms(workload: Workload, heads: Any) -> tuple[float, float | None]:
    """Median host time of planning the workload at the cost model's chosen parameters
    (what a decode step that brings a new token tree pays) and, for branch trees, of a
    decode step: a token appended to each leaf, then ``replan_after_append``."""
    from attngen.plan import replan_after_append

    plan = plan_tree(workload.tree, heads=heads)
    fixed = planning_ms(lambda t: plan_tree(t, chunk=plan.chunk, queries_per_group=plan.queries_per_group,
                                            span=plan.span, heads=heads), lambda: replace(workload.tree))
    replan = None
    if workload.tree.query_mode == "node":
        replan = planning_ms(lambda t: replan_after_append(plan, t), lambda: workload.tree.append_to_leaves(1))
    return fixed, replan


def layout_name(spec: Spec) -> str:
    if spec.heads.kv == spec.heads.q:
        return "mha"
    return "mqa" if spec.heads.kv == 1 else "gqa"


def check_benchable(spec: Spec) -> None:
    """The peers express tree visibility only: a tree spec is benchmarked as it is when
    its own mask adds nothing and its score is plain. A paged spec reads a cache whose
    pages belong to nodes, through slots; the peers read the same KV flattened."""
    from attngen.masks import Full

    if spec.topology.kind == "sequence":
        raise AttngenError(f"{spec.name}: bench_tree takes tree specs; use 'attngen bench' for sequences")
    if not isinstance(spec.mask, Full) or spec.score_mod is not None:
        raise AttngenError(f"{spec.name}: the tree benchmark compares with peers that know only tree "
                           "visibility; it supports mask: full and no score_mod")


def workloads_for(spec: Spec) -> list[str]:
    """The reference workloads whose query mode is the spec's."""
    return [n for n in REFERENCE_SHAPES if WORKLOADS[n]().tree.query_mode == spec.topology.queries]


def bench_workload(spec: Spec, name: str, bandwidth: float, matmul_rate: float, *,
                   peers: bool = True, cold: bool = False) -> TreeRow:
    """Time ``spec``'s tree kernel and the peers on workload ``name`` (``cold``: with L2
    overwritten before every replay)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attngen
    from attngen.cost import HeadLayout, Machine

    check_benchable(spec)
    heads_q, heads_kv = spec.heads.q, spec.heads.kv
    d_qk, d_v = spec.head_dim.qk, spec.head_dim.v
    dtype = torch_dtype(spec.dtype)
    workload = WORKLOADS[name]()
    tree = workload.tree
    if tree.query_mode != spec.topology.queries:
        raise AttngenError(f"{spec.name}: workload {name} has {tree.query_mode} queries, the spec "
                           f"{spec.topology.queries}")
    dev = torch.device("cuda")
    module = attngen.load(spec)
    heads = HeadLayout(heads_q=heads_q, heads_kv=heads_kv, head_dim_qk=d_qk, head_dim_v=d_v,
                       dtype_bytes=torch.finfo(dtype).bits // 8)
    plan = plan_tree(tree, heads=heads, device=dev)
    plan_ms, replan_ms = _planning_ms(workload, heads)

    n_q, n_kv = plan.n_queries, plan.n_kv
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(n_q, heads_q, d_qk, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(n_kv, heads_kv, d_qk, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(n_kv, heads_kv, d_v, device=dev, dtype=dtype, generator=gen)
    visible = torch.from_numpy(tree.visible_matrix()).to(dev)

    k_cache, v_cache, layout, paged = k, v, {}, ""
    if spec.topology.kv_layout == "paged":
        k_cache, v_cache, layout["slots"] = node_paged_cache(tree, k, v, spec.topology.page_size or 1)
        paged = f"paged {spec.topology.page_size}, slots; "

    def ours(**config: Any) -> Any:
        return module.attention(q, k_cache, v_cache, plan, **layout, config=config or None)

    out = ours()  # autotunes once, outside the timing
    t_ours = _graph_time_us(ours, cold)
    picked = getattr(getattr(module, "_tree_partial_tuned", None), "best_config", None)
    t_triton = None
    if plan.n_dense > 0 and getattr(module, "_gluon_ready", lambda k, v: False)(k_cache, v_cache):
        ours(gluon=False)  # autotunes that path too
        t_triton = _graph_time_us(lambda: ours(gluon=False), cold)
    config = paged + (f"block_n {picked.kwargs['BLOCK_N']}, {picked.num_warps} warps, {picked.num_stages} stages"
                      if picked is not None else "")

    # dense references in [1, H, N, D] layout. The error is taken against float64, which
    # runs SDPA's math path: on the H200 (torch 2.11), float32 SDPA with this boolean mask
    # returned a wrong tot_d3_w3 reference (0.58 off, varying from run to run) in one
    # process of session 23, whose n_kv (12700) is not a multiple of 8.
    qd, kd, vd = (x.transpose(0, 1)[None] for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qd.double(), kd.double(), vd.double(), attn_mask=visible,
                                         enable_gqa=True)[0].transpose(0, 1)
    rel_err = float((out.double() - ref).norm() / ref.norm())
    del ref

    def peer(run: Callable[[], Any], to_rows: Callable[[Any], Any] = lambda o: o[0].transpose(0, 1)) -> float:
        """``run``'s time where its output, as [n_q, H, D], agrees with attngen's."""
        return _checked_peer_us(run, to_rows, out, cold)

    def dense() -> float:
        return peer(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=visible, enable_gqa=True))

    def flex() -> tuple[float, str]:
        def ancestor(b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return visible[qi, ki]

        block_mask = create_block_mask(ancestor, None, None, n_q, n_kv, device=dev)
        # Each case compiles afresh, at its own shapes. Without the reset, Dynamo recompiles
        # flex_attention for a process's second case with the changed sizes made dynamic,
        # and every later case reuses that dynamic-shape kernel: FlexAttention's figures
        # then depended on the order of the cases (up to 2.4x, session 56)
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        return _flex_us(lambda options: compiled(qd, kd, vd, block_mask=block_mask, enable_gqa=True,
                                                 kernel_options=options), n_q, peer)

    def per_branch() -> float:
        lengths = visible.sum(1)
        longest = int(lengths.max())
        order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)[:, :longest]
        kb = k[order].permute(0, 2, 1, 3).contiguous()  # [n_q, Hkv, L, D]: each branch's own copy
        vb = v[order].permute(0, 2, 1, 3).contiguous()
        pad = (torch.arange(longest, device=dev)[None] < lengths[:, None])[:, None, None, :]
        qb = q[:, :, None, :]
        return peer(lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=pad, enable_gqa=True),
                    lambda o: o[:, :, 0])

    # the cost model's FLOOR_TIME at the rates measured in this run
    floor_us = plan.cost_at(Machine(bandwidth=bandwidth, matmul_rate=matmul_rate)).floor_s * 1e6
    flex_us, flex_kernel = (_try(flex, "flex") if peers else None) or (None, "")
    return TreeRow(
        workload=name, layout=layout_name(spec), n_queries=n_q, n_kv=n_kv, floor_us=floor_us,
        attngen_us=t_ours,
        flex_us=flex_us,
        flex_kernel=flex_kernel,
        sdpa_dense_us=_try(dense, "sdpa_dense") if peers else None,
        per_branch_us=_try(per_branch, "per_branch") if peers else None,
        plan_ms=plan_ms, replan_ms=replan_ms,
        rel_err=rel_err,
        plan=f"chunk {plan.chunk}, QG {plan.queries_per_group}, span {plan.span}",
        config=config,
        cold_l2=cold,
        triton_only_us=t_triton,
    )


def bench_spec(spec: Spec, names: list[str] | None = None, *, peers: bool = True) -> list[TreeRow]:
    """``attngen bench`` of a tree spec: its kernel on the reference workloads of its
    query mode (or ``names``), rates measured once, progress shown."""
    check_benchable(spec)
    names = names or workloads_for(spec)
    rates = measure_rates()
    bandwidth, matmul_rate = rates.hbm_gbps * 1e9, rates.matmul_tflops * 1e12
    rows = []
    with Progress(len(names), f"bench {spec.name}") as progress:
        for name in names:
            progress.begin(name)
            rows.append(bench_workload(spec, name, bandwidth, matmul_rate, peers=peers))
            progress.step(name)
    print(f"GPU {rates.gpu}, torch {rates.torch_version}, triton {rates.triton_version}, "
          f"bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s")
    return rows


def format_table(rows: list[TreeRow]) -> str:
    def f(x: float | None) -> str:
        return f"{x:9.1f}" if x is not None else "      n/a"

    w = max([16, *(len(r.workload) for r in rows)])  # shared_prefix_32k_x64 is 21
    head = (f"{'workload':{w}} {'heads':5} {'floor':>9} {'attngen':>9} {'x floor':>7} {'triton':>9} {'flex':>9} "
            f"{'sdpa':>9} {'branch':>9} {'vs best':>7} {'plan ms':>7} {'err':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        best = r.best_peer_us
        speedup = f"{best / r.attngen_us:6.2f}x" if best else "    n/a"
        lines.append(f"{r.workload:{w}} {r.layout:5} {f(r.floor_us)} {f(r.attngen_us)} {r.ratio:6.2f}x "
                     f"{f(r.triton_only_us)} {f(r.flex_us)} {f(r.sdpa_dense_us)} {f(r.per_branch_us)} {speedup} "
                     f"{r.plan_ms:7.2f} {r.rel_err:8.1e}")
    lines.append("")
    lines += [f"{r.workload:{w}} {r.layout:5} plan: {r.plan}; autotuner: {r.config or 'n/a'}"
              + (f"; flex: {r.flex_kernel} kernel" if r.flex_kernel else "") for r in rows]
    return "\n".join(lines)


#: What the plot draws per case, each time over the floor: (label, TreeRow field, colour).
PLOTTED = (
    ("attngen", "attngen_us", "tab:green"),
    ("attngen, Triton only", "triton_only_us", "tab:olive"),
    ("FlexAttention", "flex_us", "tab:blue"),
    ("SDPA, dense mask", "sdpa_dense_us", "tab:purple"),
    ("per-branch SDPA", "per_branch_us", "tab:gray"),
)


def plot(rows: list[TreeRow], path: str | Path) -> None:
    """Each case's times over its floor, attngen beside the peers, on a log scale with the
    floor and the 1.5x target marked; a peer that did not run is left out of its case."""
    plt = pyplot("--plot")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2) + 2.5, 4.5))
    width = 0.8 / len(PLOTTED)
    for k, (label, name, color) in enumerate(PLOTTED):
        xs = [i + (k - (len(PLOTTED) - 1) / 2) * width for i, r in enumerate(rows) if getattr(r, name)]
        ys = [getattr(r, name) / r.floor_us for r in rows if getattr(r, name)]
        if ys:
            ax.bar(xs, ys, width, label=label, color=color)
    ax.axhline(1.0, color="black", linewidth=1, label="floor")
    ax.axhline(1.5, color="tab:red", linestyle="--", linewidth=1, label="1.5x the floor")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [f"{r.workload}\n{r.layout}" for r in rows], fontsize=8)
    ax.set_ylabel("time / floor (median of CUDA-graph replays)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_rows(rows: list[TreeRow], out: Path) -> None:
    """``out``/tree_results.json, rewritten whole after every case, so that a run cut
    short (a time limit on a lent GPU) keeps what it measured."""
    data = [dict(asdict(r), ratio=r.ratio, best_peer_us=r.best_peer_us) for r in rows]
    write_atomic(out / "tree_results.json", json.dumps(data, indent=1))


def load_rows(path: Path) -> list[TreeRow]:
    """The rows :func:`save_rows` wrote to ``path`` (a tree_results.json)."""
    try:
        data = json.loads(path.read_text())
        derived = {"ratio", "best_peer_us"}  # properties, saved for readers of the file
        return [TreeRow(**{k: v for k, v in row.items() if k not in derived}) for row in data]
    except (OSError, ValueError, TypeError) as err:
        raise AttngenError(f"{path}: not a tree_results.json that bench_tree wrote ({err})") from err


def _write_outputs(rows: list[TreeRow], out: Path | None) -> None:
    """The table on stdout; with ``out``, tree_results.json and tree_plot.png there."""
    print(format_table(rows))
    if out:
        save_rows(rows, out)
        try:
            plot(rows, out / "tree_plot.png")
        except AttngenError as err:  # no matplotlib: the table and the JSON are written
            print(f"bench_tree: no tree_plot.png ({err})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attngen.bench_tree", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                        help="workloads to run (default: the five reference shapes)")
    parser.add_argument("--layout", action="append", choices=sorted(LAYOUTS), help="default: mha and gqa")
    parser.add_argument("--out", type=Path, help="folder for tree_results.json and tree_plot.png")
    parser.add_argument("--no-peers", action="store_true", help="time attngen only (quick)")
    parser.add_argument("--cold-l2", action="store_true",
                        help="overwrite L2 before every timed replay (KV from DRAM, as between layers)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="no GPU: join the rows of tree_results.json files (runs cut into parts, "
                             "as scripts/gpu_session.sh does) into one table, and into --out")
    args = parser.parse_args(argv)
    if args.merge:
        try:
            rows = [row for path in args.merge for row in load_rows(path)]
        except AttngenError as err:
            print(f"bench_tree: {err}", file=sys.stderr)
            return 2
        _write_outputs(rows, args.out)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench_tree: needs a CUDA GPU", file=sys.stderr)
        return 2
    rates = measure_rates()
    bandwidth, matmul_rate = rates.hbm_gbps * 1e9, rates.matmul_tflops * 1e12
    names = args.workload or list(REFERENCE_SHAPES)
    layouts = args.layout or ["mha", "gqa"]
    cases = [(n, lay) for n in names for lay in layouts]
    rows = []
    with Progress(len(cases), "bench_tree") as progress:
        for name, layout in cases:
            progress.begin(f"{name}/{layout}")
            spec = tree_spec(WORKLOADS[name]().tree.query_mode, *LAYOUTS[layout])
            rows.append(bench_workload(spec, name, bandwidth, matmul_rate, peers=not args.no_peers,
                                      cold=args.cold_l2))
            if args.out:
                save_rows(rows, args.out)
            progress.step(f"{name}/{layout}")
    print(f"GPU {rates.gpu}, torch {rates.torch_version}, triton {rates.triton_version}, "
          f"bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s")
    _write_outputs(rows, args.out)
    return 0 if all(math.isfinite(r.rel_err) and r.rel_err < 2e-2 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
