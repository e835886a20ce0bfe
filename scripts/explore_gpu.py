"""Exploratory GPU sweeps behind the tuning choices in BENCHMARKS.md (not the benchmark
itself: `python -m attngen.bench_tree` and `python -m attngen.bench` are). Prints one
line per measurement and a JSON file per part under $OUT (or ./explore_out).

    python scripts/explore_gpu.py tree plans merge decode prefill prefill_tuned fixed stream resources loop timeline epilogue

tree:    per workload and head layout, plan chunks x queries per group x spans x kernel
         configs, the cost model's plan through the autotuner, and the four fastest
         plans timed again against it in interleaved rounds (EXPLORE_CASES, e.g.
         "tot_d3_w3:gqa,fewshot_4k_x20:gqa", picks cases; EXPLORE_CHUNKS, e.g.
         "128,256,512", the chunks: default 512);
merge:   the tree merge kernel alone at several heads per program x warps;
prefill_tuned: the autotuned prefill launch against its config given explicitly;
decode:  the window + sinks decode case over splits and configs, and its merge alone;
prefill: the causal prefill case over configs, beside FlexAttention;
fixed:   the fixed cost of one tree call: a one-node tree (one launch, and forced to two)
         and a root with two leaves (two launches), MHA and GQA.
stream:  how fast stage 1's KV access pattern can be read at all: programs of one
         (span, KV head), head fastest, TMA tiles of K and V laid out [tokens, heads, 128]
         as the tree kernels see them (and [heads, tokens, 128] to compare), summed and
         nothing else, beside the device copy the benchmarks' floors use.
resources: per case (EXPLORE_CASES), the stage-1 kernels one call on the planner's plan
         compiled (Triton's autotuned candidates, the Gluon kernel), as launched: registers,
         spills, warps, shared memory, and how many fit on one SM. A compile outside a
         launch specializes its arguments differently and can report other counts
         (docs/benchmarks/HISTORY.md, session 32).
loop:    per case (EXPLORE_CASES; default the two with the most dense groups' work), the
         Gluon kernel alone with parts of its work removed from the rendered module's source
         (timing only: the outputs are garbage by design): no loads past the ring's first
         fill, every program loading the same L2-resident tiles, no softmax, one warpgroup
         computing (the others only wait for each tile and release it), and combinations.
         Each also runs ~1.5 s of graph replays while nvidia-smi samples the SM clock and
         power (read only), giving cycles per tile of the longest program.
timeline: per case (EXPLORE_CASES; default the reference cases with dense groups), where
         each Gluon program's time goes: its start (%globaltimer), then by its SM's %clock64
         the query gather, the wait for the ring's first tile, the tile loop and the
         epilogue (stores of partials and LSEs), from stamps that an edit of the rendered
         module writes past the partials. Medians and extremes over the programs.
epilogue: per case (EXPLORE_CASES; default six of the reference and token-tree cases),
         stage 1 with each program's merge rows loaded before its tile loop, beside its
         query ids, instead of after it: in the Triton program ("triton"), and in the Gluon
         warpgroups as well ("both"); outputs compared bit for bit with main's, whole calls
         timed in interleaved rounds (session 60: no case moved beyond its spread).
plans:   named plans of a case timed against each other through the autotuner, as a user
         calls them, in interleaved rounds (EXPLORE_PLANS, e.g.
         "spec_4k_92:gqa:32:1024,spec_4k_92:gqa:32:2048": workload, layout, queries per
         group, span; chunk 512), with each one's error against the first of its case.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

import attngen
from attngen.bench import measure_rates
from attngen.bench_tree import LAYOUTS, tree_spec
from attngen.cost import HeadLayout
from attngen.plan import SPAN_CHOICES, Plan, plan_tree
from attngen.spec import load_spec
from attngen.tree import TreeBatch
from attngen.workloads import REFERENCE_SHAPES, WORKLOADS

OUT = Path(os.environ.get("OUT", "explore_out"))
DEADLINE = time.monotonic() + float(os.environ.get("EXPLORE_SECONDS", "1e9"))


def bf16(*shape: int, gen=None) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)


def varlen_inputs(batch: int, q_len: int, kv_len: int, hq: int, hkv: int):
    """Random q, k, v (head dim 128) of equal-length sequences, and their cu_seqlens."""
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * kv_len
    return bf16(batch * q_len, hq, 128), bf16(batch * kv_len, hkv, 128), bf16(batch * kv_len, hkv, 128), cu


def tree_inputs(n_q: int, n_kv: int, hq: int, hkv: int, gen=None):
    """Random q [n_q, hq, 128] and flattened-tree k, v [n_kv, hkv, 128]."""
    return bf16(n_q, hq, 128, gen=gen), bf16(n_kv, hkv, 128, gen=gen), bf16(n_kv, hkv, 128, gen=gen)


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")) * 1e3


def eager_us(fn) -> float:
    fn()
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")) * 1e3


def out_of_time() -> bool:
    return time.monotonic() > DEADLINE


TREE_CONFIGS = {
    "n32w4s3": dict(block_n=32, num_warps=4, num_stages=3),
    "n32w4s4": dict(block_n=32, num_warps=4, num_stages=4),
    "n64w4s2": dict(block_n=64, num_warps=4, num_stages=2),
    "n64w4s3": dict(block_n=64, num_warps=4, num_stages=3),
    "n64w4s4": dict(block_n=64, num_warps=4, num_stages=4),
    "n64w8s3": dict(block_n=64, num_warps=8, num_stages=3),
    "n128w8s2": dict(block_n=128, num_warps=8, num_stages=2),
    "n128w8s3": dict(block_n=128, num_warps=8, num_stages=3),
}


def tree_config_fits(rows: int, cfg: dict) -> bool:
    """The sweep's tiles for a program of ``rows`` rows: 8 warps from 64 rows, 4 below
    128 rows with 128-key tiles."""
    if cfg["num_warps"] == 8:
        return rows >= 64
    return not (rows >= 128 and cfg["block_n"] == 128)


def kernel_us(fn, reps: int = 20) -> dict[str, float]:
    """Device time per call of each kernel ``fn`` launches (torch profiler), in us."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        total = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if total:
            out[e.key[:40]] = total / reps
    return out


def _cases(default: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """The (workload, layout) pairs EXPLORE_CASES names, else ``default``, else every
    reference one."""
    named = os.environ.get("EXPLORE_CASES")
    if named:
        pairs = [case.split(":") for case in named.split(",")]
        return [(name, layout) for name, layout in pairs]
    if default is not None:
        return default
    return [(name, layout) for name in REFERENCE_SHAPES for layout in LAYOUTS]


def _tree_case(name: str, layout: str, gen=None):
    """One (workload, layout) case: the workload, its generated module, the head layout, the
    planner's plan on the GPU and random q, k, v for it."""
    w = WORKLOADS[name]()
    hq, hkv = LAYOUTS[layout]
    module = attngen.load(tree_spec(w.tree.query_mode, hq, hkv))
    heads = HeadLayout(heads_q=hq, heads_kv=hkv, head_dim_qk=128, head_dim_v=128)
    plan = plan_tree(w.tree, heads=heads, device="cuda")
    return w, module, heads, plan, tree_inputs(plan.n_queries, plan.n_kv, hq, hkv, gen)


def _interleaved_us(fns: dict, rounds: int = 3) -> dict[str, float]:
    """Median of ``rounds`` rounds, each timing every fn once in turn."""
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            times[label].append(graph_us(fn))
    return {label: statistics.median(ts) for label, ts in times.items()}


def tree(results: list) -> None:
    dev = torch.device("cuda")
    chunks = [int(c) for c in os.environ.get("EXPLORE_CHUNKS", "512").split(",")]
    for name, layout in _cases():
        if out_of_time():
            return
        gen = torch.Generator(device=dev).manual_seed(0)
        w, module, heads, chosen, (q, k, v) = _tree_case(name, layout, gen)
        n_q = chosen.n_queries
        ref = module.attention(q, k, v, chosen).float()
        cap = triton.next_power_of_2(n_q)
        qgs = sorted({g for g in heads.queries_per_group_choices() if g * heads.group >= 16 and g <= cap}
                     | {chosen.queries_per_group})
        timed: list[tuple[float, str, Plan, dict[str, int]]] = []
        seen = set()
        for chunk in chunks:
            for qg in qgs:
                for span in (chunk, *(s_ for s_ in SPAN_CHOICES if s_ > chunk)):
                    plan = plan_tree(w.tree, chunk=chunk, queries_per_group=qg, span=span,
                                     heads=heads, device=dev)
                    # the same groups as a plan already timed (a shorter span, another chunk)
                    key = (qg, tuple(plan.group_kv_len.tolist()), tuple(plan.group_slots.tolist()))
                    if key in seen:
                        continue
                    seen.add(key)
                    rows = max(16, triton.next_power_of_2(qg * heads.group))
                    for cname, cfg in TREE_CONFIGS.items():
                        if not tree_config_fits(rows, cfg):
                            continue
                        if out_of_time():
                            return
                        try:
                            out = module.attention(q, k, v, plan, config=cfg)
                            err = float((out.float() - ref).norm() / ref.norm())
                            us = graph_us(partial(module.attention, q, k, v, plan, config=cfg))
                        except Exception as e:
                            print(f"tree {name} {layout} c{chunk} qg{qg} s{span} {cname}: {type(e).__name__} {e}"[:200])
                            continue
                        label = f"c{chunk} qg{qg} s{span} {cname}"
                        results.append(dict(part="tree", workload=name, layout=layout, chunk=chunk, qg=qg,
                                            span=span, config=cname, us=us, groups=plan.n_groups,
                                            partials=plan.n_partials, pred_us=plan.cost.time_s * 1e6, err=err,
                                            chosen=(chunk, qg, span) == (chosen.chunk, chosen.queries_per_group,
                                                                         chosen.span)))
                        timed.append((us, label, plan, cfg))
                        print(f"tree {name:15} {layout} {label:24} {us:8.1f} us  G={plan.n_groups:5} "
                              f"P={plan.n_partials:5} pred {plan.cost.time_s * 1e6:7.1f} err {err:.1e}", flush=True)
        # the cost model's plan through the autotuner, as a user calls it, against the
        # four fastest of the sweep in interleaved rounds
        auto = f"auto c{chosen.chunk} qg{chosen.queries_per_group} s{chosen.span}"
        ranked = sorted(timed, key=lambda t: t[0])
        fns = {auto: partial(module.attention, q, k, v, chosen)}
        for _, label, top, top_cfg in ranked[:4]:
            fns[label] = partial(module.attention, q, k, v, top, config=top_cfg)
        for label, us in _interleaved_us(fns).items():
            results.append(dict(part="tree_confirm", workload=name, layout=layout, plan=label, us=us))
            print(f"confirm {name:15} {layout} {label:28} {us:8.1f} us", flush=True)
        best: tuple[Plan, dict[str, int] | None] = (ranked[0][2], ranked[0][3]) if ranked else (chosen, None)
        for what, (p, p_cfg) in (("auto", (chosen, None)), ("best", best)):
            split = kernel_us(partial(module.attention, q, k, v, p, config=p_cfg))
            results.append(dict(part="tree_kernels", workload=name, layout=layout, which=what,
                                qg=p.queries_per_group, span=p.span, config=p_cfg, kernels=split))
            print(f"kernels {what} {name:15} {layout} " + "  ".join(f"{k_}={t:.1f}" for k_, t in split.items()),
                  flush=True)


def plans(results: list) -> None:
    dev = torch.device("cuda")
    named: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for item in os.environ["EXPLORE_PLANS"].split(","):
        name, layout, qg, span = item.split(":")
        named.setdefault((name, layout), []).append((int(qg), int(span)))
    for (name, layout), choices in named.items():
        gen = torch.Generator(device=dev).manual_seed(0)
        w, module, heads, chosen, (q, k, v) = _tree_case(name, layout, gen)
        fns, outs = {}, []
        for qg, span in choices:
            plan = plan_tree(w.tree, chunk=512, queries_per_group=qg, span=span, heads=heads, device=dev)
            label = f"qg{qg} s{span} G={plan.n_groups} dense={plan.n_dense} folded={plan.n_folded}"
            outs.append(module.attention(q, k, v, plan).float())
            fns[label] = partial(module.attention, q, k, v, plan)
        errs = [float((o - outs[0]).norm() / outs[0].norm()) for o in outs]
        for (label, us), err in zip(_interleaved_us(fns, rounds=5).items(), errs, strict=True):
            results.append(dict(part="plans", workload=name, layout=layout, plan=label, us=us, err=err,
                                chosen=label.startswith(f"qg{chosen.queries_per_group} s{chosen.span} ")))
            print(f"plans {name:15} {layout} {label:40} {us:8.1f} us  err {err:.1e}", flush=True)


def decode(results: list) -> None:
    spec = load_spec(Path("specs/sliding_window_sinks_decode.yaml"))
    module = attngen.load(spec)
    B, L, hq, hkv = 8, 32768, spec.heads.q, spec.heads.kv
    q, k, v, cu = varlen_inputs(B, 1, L, hq, hkv)
    ref = module.attention(q, k, v, cu, max_seqlen_k=L).float()
    us = graph_us(lambda: module.attention(q, k, v, cu, max_seqlen_k=L))
    split = kernel_us(lambda: module.attention(q, k, v, cu, max_seqlen_k=L))
    results.append(dict(part="decode_auto", us=us, kernels=split))
    print(f"decode auto {us:7.1f} us  " + "  ".join(f"{k_}={t:.1f}" for k_, t in split.items()), flush=True)
    for splits in (4, 8, 12, 16, 24):
        for bn, nw, ns in ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (64, 2, 3)):
            if out_of_time():
                return
            cfg = dict(block_m=16, block_n=bn, num_warps=nw, num_stages=ns, num_splits=splits)
            try:
                out = module.attention(q, k, v, cu, max_seqlen_k=L, config=cfg)
                err = float((out.float() - ref).norm() / ref.norm())
                us = graph_us(lambda cfg=cfg: module.attention(q, k, v, cu, max_seqlen_k=L, config=cfg))
            except Exception as e:
                print(f"decode {cfg}: {type(e).__name__} {e}"[:200])
                continue
            results.append(dict(part="decode", **cfg, us=us, err=err))
            print(f"decode splits {splits:3} n{bn} w{nw} s{ns} {us:7.1f} us err {err:.1e}", flush=True)
    for splits in (8, 16):
        o_part = torch.randn(B * hq * splits, 128, device="cuda")
        lse_part = torch.randn(B * hq * splits, device="cuda")
        out = torch.empty(B, hq, 128, device="cuda", dtype=torch.bfloat16)

        def merge(splits=splits, o_part=o_part, lse_part=lse_part, out=out):
            module._decode_merge_kernel[(hq, B)](o_part, lse_part, out, out, splits, out.stride(0), out.stride(1),
                                                 BLOCK_S=triton.next_power_of_2(splits), D_V=128,
                                                 RETURN_LSE=False)

        us = graph_us(merge)
        results.append(dict(part="decode_merge", num_splits=splits, us=us))
        print(f"decode merge alone, {splits} splits: {us:.1f} us", flush=True)


def prefill(results: list) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    spec = load_spec(Path("specs/causal_prefill.yaml"))
    module = attngen.load(spec)
    B, S, H = 4, 4096, 32
    q, k, v, cu = varlen_inputs(B, S, S, H, H)
    pq, pk, pv = (x.view(B, S, H, 128).transpose(1, 2).contiguous() for x in (q, k, v))
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cuda")
    flex = torch.compile(flex_attention)
    flex_us = eager_us(lambda: flex(pq, pk, pv, block_mask=mask))
    results.append(dict(part="prefill_flex", us=flex_us))
    print(f"prefill flex {flex_us:.1f} us", flush=True)
    for bm, bn, nw, ns in ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                           (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (256, 64, 8, 3)):
        if out_of_time():
            return
        cfg = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        try:
            us = eager_us(lambda cfg=cfg: module.attention(q, k, v, cu, cu, max_seqlen_q=S, max_seqlen_k=S,
                                                           config=cfg))
        except Exception as e:
            print(f"prefill {cfg}: {type(e).__name__} {e}"[:200])
            continue
        results.append(dict(part="prefill", **cfg, us=us, vs_flex=flex_us / us))
        print(f"prefill m{bm} n{bn} w{nw} s{ns} {us:8.1f} us  flex/ours {flex_us / us:.3f}", flush=True)
    flex_us = eager_us(lambda: flex(pq, pk, pv, block_mask=mask))
    results.append(dict(part="prefill_flex", us=flex_us))
    print(f"prefill flex again {flex_us:.1f} us", flush=True)


def prefill_tuned(results: list) -> None:
    """The autotuned launch against the same config given explicitly, interleaved."""
    from attngen.bench import PRESETS
    from attngen.spec import parse_spec

    spec = parse_spec(PRESETS["prefill_causal"].spec)
    module = attngen.load(spec)
    B, S, H = 4, 4096, 32
    q, k, v, cu = varlen_inputs(B, S, S, H, H)
    tuned = partial(module.attention, q, k, v, cu, cu, max_seqlen_q=S, max_seqlen_k=S)
    tuned()
    best = module._prefill_tuned.best_config
    cfg = dict(block_m=best.kwargs["BLOCK_M"], block_n=best.kwargs["BLOCK_N"], num_warps=best.num_warps,
               num_stages=best.num_stages)
    explicit = partial(tuned, config=cfg)
    for i in range(3):
        for name, fn in (("tuned", tuned), ("explicit", explicit)):
            us = eager_us(fn)
            results.append(dict(part="prefill_tuned", variant=name, us=us, config=cfg, round=i))
            print(f"prefill {name:8} {cfg} {us:8.1f} us", flush=True)


def merge(results: list) -> None:
    """The merge kernel alone at several (heads, partials) per program, and the whole
    call (autotuned, and with an explicit config), on the cost model's plans."""
    dev = torch.device("cuda")
    cases = [("tot_d3_w3", "mha"), ("spec_16k_184", "mha"), ("fewshot_32k_x64", "gqa"), ("spec_4k_92", "gqa"),
             ("fewshot_4k_x20", "mha")]
    for name, layout in cases:
        _, module, heads, plan, (q, k, v) = _tree_case(name, layout)
        n_q, hq = plan.n_queries, heads.heads_q
        t = plan.tensors()
        o_part = torch.randn(plan.n_partials, hq, 128, device=dev)
        lse_part = torch.randn(plan.n_partials, hq, device=dev)
        out = torch.empty(n_q, hq, 128, device=dev, dtype=torch.bfloat16)
        for hb, nw in ((8, 4), (8, 2), (4, 1), (4, 2), (4, 4), (2, 1)):
            fn = partial(module._tree_merge_kernel[(n_q, hq // hb)], o_part, lse_part, out, out, t["merge_ptr"],
                         out.stride(0), out.stride(1), HB=hb, D_V=128, RETURN_LSE=False,
                         num_warps=nw)
            us = graph_us(fn)
            results.append(dict(part="merge", workload=name, layout=layout, hb=hb, warps=nw, us=us,
                                partials=plan.n_partials))
            print(f"merge {name:15} {layout} HB{hb} w{nw} {us:7.1f} us  P={plan.n_partials}", flush=True)
        auto = graph_us(partial(module.attention, q, k, v, plan))
        fixed = graph_us(partial(module.attention, q, k, v, plan,
                                 config=dict(block_n=64, num_warps=4, num_stages=3)))
        results.append(dict(part="call", workload=name, layout=layout, auto=auto, n64w4s3=fixed,
                            qg=plan.queries_per_group, span=plan.span))
        print(f"call  {name:15} {layout} qg{plan.queries_per_group} s{plan.span} auto {auto:7.1f} "
              f"n64w4s3 {fixed:7.1f}", flush=True)


def fixed(results: list) -> None:
    for layout, (hq, hkv) in LAYOUTS.items():
        mod = attngen.load(tree_spec("node", hq, hkv))
        for label, parents, counts in (("one node", [-1], [64]), ("two leaves", [-1, 0, 0], [64, 64, 64])):
            tree = TreeBatch.from_parents(parents, counts)
            plan = plan_tree(tree, chunk=64, queries_per_group=2, device="cuda")
            q, k, v = tree_inputs(plan.n_queries, plan.n_kv, hq, hkv)
            single = mod._single_partial(plan, plan.n_queries)  # the launch's own rule
            for fused in (True, False):
                cfg = dict(block_n=64, num_warps=4, num_stages=3, fused=fused)
                us = graph_us(partial(mod.attention, q, k, v, plan, config=cfg))
                launches = 1 if fused and single else 2
                results.append(dict(part="fixed", layout=layout, tree=label, launches=launches, us=us))
                print(f"fixed {layout} {label:10} {launches} launch(es) {us:6.2f} us", flush=True)


@triton.jit
def _stream_kernel(K_desc, V_desc, Out, span_len, n_tok, HEADS: tl.constexpr, BN: tl.constexpr,
                   D: tl.constexpr, HEAD_MAJOR: tl.constexpr, STAGES: tl.constexpr):
    """Program (span, head), head fastest: the span's K and V tiles read and reduced, as
    stage 1 reads them, with no attention work."""
    pid = tl.program_id(0)
    head = pid % HEADS
    start = (pid // HEADS) * span_len
    acc = tl.zeros([BN, D], tl.float32)
    for t in tl.range(0, span_len, BN, num_stages=STAGES):
        if HEAD_MAJOR:
            k = K_desc.load([head * n_tok + start + t, 0])
            v = V_desc.load([head * n_tok + start + t, 0])
        else:
            k = K_desc.load([start + t, head * D])
            v = V_desc.load([start + t, head * D])
        acc += k.to(tl.float32) * v.to(tl.float32)
    tl.store(Out + pid, tl.sum(acc))


def stream(results: list) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    rates = measure_rates()  # the bandwidth the benchmarks' floors use
    results.append(dict(part="rates", hbm_gb_s=rates.hbm_gbps, bf16_tflops=rates.matmul_tflops))
    print(f"device copy {rates.hbm_gbps / 1e3:.2f} TB/s (the floors' bandwidth)", flush=True)
    # about the KV of spec_4k_92 mha (32 heads x 4092 tokens), fewshot_4k_x20 gqa (8 x 12000), and a longer GQA one
    for heads, n_tok in ((32, 4096), (8, 12288), (8, 32768)):
        for head_major in (False, True):
            shape = (heads, n_tok, 128) if head_major else (n_tok, heads, 128)
            flat = (heads * n_tok, 128) if head_major else (n_tok, heads * 128)
            k, v = bf16(*shape), bf16(*shape)
            for bn in (64, 128):
                k_desc = TensorDescriptor.from_tensor(k.view(flat), [bn, 128])
                v_desc = TensorDescriptor.from_tensor(v.view(flat), [bn, 128])
                for span in (256, 512, 1024, 2048):
                    for stages, warps in ((3, 4), (4, 4), (3, 8)):
                        n_prog = heads * (n_tok // span)
                        out = torch.empty(n_prog, device="cuda")
                        us = graph_us(partial(_stream_kernel[(n_prog,)], k_desc, v_desc, out, span, n_tok,
                                              HEADS=heads, BN=bn, D=128, HEAD_MAJOR=head_major,
                                              STAGES=stages, num_warps=warps))
                        tbs = 2 * k.numel() * 2 / us / 1e6
                        order = "head-major" if head_major else "token-major"
                        results.append(dict(part="stream", heads=heads, tokens=n_tok, layout=order, block_n=bn,
                                            span=span, stages=stages, warps=warps, programs=n_prog, us=us,
                                            tb_s=tbs))
                        print(f"stream {heads:2} heads {n_tok:5} tokens {order:11} bn {bn:3} span {span:4} "
                              f"s{stages} w{warps} {n_prog:4} programs {us:6.1f} us {tbs:.2f} TB/s", flush=True)


#: An H200 SM's limits that bound how many programs share it (per SM: registers, shared
#: memory with the 1 KB the driver reserves per block, and warps).
SM_REGISTERS, SM_SHARED, SM_WARPS, BLOCK_RESERVED = 65536, 233472, 64, 1024


def _compiled(fn) -> dict:
    """The kernels ``fn`` (a Triton or Gluon JIT function) has compiled, by cache key."""
    return {(device, key): kernel for device, caches in fn.device_caches.items() for key, kernel in caches[0].items()}


def kernel_resources(kernel) -> dict:
    """A compiled kernel as launched: registers, spills, warps, stages, shared memory and how
    many fit on one SM; one that cannot load (an autotuner candidate that overflows shared
    memory) is marked as not fitting."""
    meta = kernel.metadata
    row = dict(warps=meta.num_warps, stages=meta.num_stages, shared=meta.shared)
    try:
        kernel._init_handles()
    except Exception as err:  # triton's OutOfResources
        return dict(row, fits=False, why=str(err)[:80])
    # registers are allocated per warp, 8 a thread at a time
    regs_per_warp = -(-kernel.n_regs // 8) * 8 * 32
    per_sm = min(SM_REGISTERS // (regs_per_warp * meta.num_warps), SM_SHARED // (meta.shared + BLOCK_RESERVED),
                 SM_WARPS // meta.num_warps)
    return dict(row, fits=True, registers=kernel.n_regs, spills=kernel.n_spills, per_sm=per_sm)


def resources(results: list) -> None:
    """Each case's call on the planner's plan; the kernels it compiled that no earlier case
    had (one spec's module serves several cases), and the autotuner's pick for it."""
    for name, layout in _cases():
        _, mod, _, plan, (q, k, v) = _tree_case(name, layout)
        fns = {"triton": mod._tree_partial_kernel, "gluon": getattr(mod, "_gluon_tree_kernel", None)}
        before = {kind: set(_compiled(fn)) for kind, fn in fns.items() if fn is not None}
        mod.attention(q, k, v, plan)
        torch.cuda.synchronize()
        best = mod._tree_partial_tuned.best_config
        pick = f"BLOCK_N {best.kwargs['BLOCK_N']}, {best.num_warps} warps, {best.num_stages} stages"
        results.append(dict(part="resources_pick", workload=name, layout=layout, qg=plan.queries_per_group, pick=pick))
        print(f"resources {name:16} {layout} QG {plan.queries_per_group:3} autotuned stage 1: {pick}", flush=True)
        for kind, seen in before.items():
            for key, kernel in _compiled(fns[kind]).items():
                if key in seen:
                    continue
                row = kernel_resources(kernel)
                results.append(dict(part="resources", workload=name, layout=layout, kernel=kind, **row))
                fit = (f"{row['registers']:3} registers, {row['spills']:4} B spilled, {row['per_sm']} per SM"
                       if row["fits"] else "does not fit")
                print(f"resources {name:16} {layout} {kind:6} {row['warps']:2} warps {row['stages']} stages "
                      f"{row['shared'] / 1024:6.1f} KB: {fit}", flush=True)


# The loop and timeline parts' edits of the rendered tree module, as (old, new) source
# replacements; a template change that moves the old text makes the part fail on the assert
# in _edited_module, not measure something else.
_LOAD = ("        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)\n"
         "        _tma_load(k_desc, [kv_start + j * BN, kv_head * D], ready.index(s), k_smem.index(s))\n"
         "        _tma_load(v_desc, [kv_start + j * BN, kv_head * D], ready.index(s), v_smem.index(s))\n")
_NO_LOAD = [(_LOAD, "        if j >= NS:\n            mbarrier.arrive(ready.index(s))\n        else:\n"
             + _LOAD.replace("        ", "            "))]
_HOT_LOAD = [(_LOAD, _LOAD.replace("kv_start + j * BN", "(j % 8) * BN"))]


def _no_softmax(spec) -> list[tuple[str, str]]:
    """The softmax step replaced by a pass-through; its text holds the spec's base-2 scale."""
    from attngen.tree_ir import lower_tree

    scale = lower_tree(spec).gluon_scale
    return [(f"""    m_new = gl.maximum(m_i, gl.max(s, axis=1) * {scale})
    p = gl.exp2(s * {scale} - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)
""", "    return s, gl.full_like(m_i, 1.0), m_i, l_i\n")]


_ONE_WG = [("\n\n@_gluon_jit\ndef _gluon_warpgroup(wg,", """

@_gluon_jit
def _gluon_warpgroup(wg, O_part, LSE_part, GroupQ, MergeRow, q_smem, k_smem, v_smem, ready, empty,
                     g, kv_head, kv_n, n_tiles, qg):
    NS: gl.constexpr = k_smem.shape[0]
    if wg > 0:
        for j in range(n_tiles):
            mbarrier.wait(ready.index(j % NS), (j // NS) & 1)
            mbarrier.arrive(empty.index(j % NS))
    else:
        _gluon_warpgroup_all(wg, O_part, LSE_part, GroupQ, MergeRow, q_smem, k_smem, v_smem, ready, empty,
                             g, kv_head, kv_n, n_tiles, qg)


@_gluon_jit
def _gluon_warpgroup_all(wg,""")]


def _loop_variants(spec) -> dict[str, list[tuple[str, str]]]:
    no_softmax = _no_softmax(spec)
    return {
        "main": [], "no loads": _NO_LOAD, "L2 loads": _HOT_LOAD, "no softmax": no_softmax,
        "no loads, no softmax": _NO_LOAD + no_softmax, "one wg, no loads": _ONE_WG + _NO_LOAD,
        "one wg, no loads, no softmax": _ONE_WG + _NO_LOAD + no_softmax,
    }


def _edited_module(spec, index: int, label: str, edits: list[tuple[str, str]], folder: Path):
    """The rendered module of ``spec`` with ``edits`` applied, imported from ``folder``."""
    from attngen.render import render_uncached
    from attngen.runtime import import_path

    src = render_uncached(spec)
    for old, new in edits:
        assert src.count(old) == 1, f"edit {label!r}: the template no longer has {old[:60]!r}"
        src = src.replace(old, new)
    path = folder / f"edited_{spec.name}_{index}.py"
    path.write_text(src)
    return import_path(path, path.stem)


def clock_and_power(fn, seconds: float = 1.5) -> tuple[float, float, str]:
    """Median SM MHz, W and throttle reasons (nvidia-smi, every 50 ms, read only) while
    ``fn`` replays in a CUDA graph of 20 calls for ~``seconds``."""
    import subprocess

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    query = "--query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active"
    smi = subprocess.Popen(["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
    smi.terminate()
    samples = [line.split(",") for line in smi.communicate()[0].strip().splitlines()][6:-1]  # past the warm-up
    if not samples:
        return float("nan"), float("nan"), ""
    return (statistics.median(float(x[0]) for x in samples), statistics.median(float(x[1]) for x in samples),
            " ".join(sorted({x[2].strip() for x in samples})))


def _gluon_cases(part: str, default: list[tuple[str, str]]):
    """The cases EXPLORE_CASES names (else ``default``) whose plans have dense groups, as
    (name, layout, heads, plan, (q, k, v), tree spec); the others are only reported."""
    for name, layout in _cases(default):
        gen = torch.Generator(device="cuda").manual_seed(0)
        w, _, heads, plan, qkv = _tree_case(name, layout, gen)
        if not plan.n_dense:
            print(f"{part} {name} {layout}: no dense groups, no Gluon kernel", flush=True)
            continue
        yield name, layout, heads, plan, qkv, tree_spec(w.tree.query_mode, heads.heads_q, heads.heads_kv)


def loop(results: list) -> None:
    default = [("fewshot_32k_x64", "gqa"), ("spec_16k_184", "mha")]
    for name, layout, heads, plan, (q, k, v), spec in _gluon_cases("loop", default):
        folder = Path(tempfile.mkdtemp(prefix="attngen_loop_"))
        mods = {label: _edited_module(spec, i, label, edits, folder)
                for i, (label, edits) in enumerate(_loop_variants(spec).items())}
        t = plan.tensors()
        o_part = torch.empty(plan.n_partials, heads.heads_q, 128, device="cuda", dtype=torch.float32)
        lse_part = torch.empty(plan.n_partials, heads.heads_q, device="cuda", dtype=torch.float32)
        qg = plan.queries_per_group
        wg, block_n, _ = mods["main"]._gluon_tile(qg)
        tiles = max(-(-int(n) // block_n) for n in t["group_kv_len"][: plan.n_dense].tolist())
        fns = {label: partial(m._launch_gluon, q, k, v, t, o_part, lse_part, plan.n_dense, qg)
               for label, m in mods.items()}
        times = _interleaved_us(fns)
        for label, fn in fns.items():
            mhz, watts, throttle = clock_and_power(fn)
            cycles = times[label] * mhz / tiles
            results.append(dict(part="loop", workload=name, layout=layout, variant=label, warpgroups=wg,
                                block_n=block_n, tiles=tiles, us=times[label], mhz=mhz, watts=watts,
                                throttle=throttle, cycles_per_tile=cycles))
            print(f"loop {name:16} {layout} {wg} wg x 64 rows, {block_n}-key tiles, {tiles} tiles  {label:28} "
                  f"{times[label]:6.1f} us {mhz:5.0f} MHz {watts:4.0f} W {cycles:5.0f} cycles/tile {throttle}",
                  flush=True)


# The timeline part's stamps: slot k of program (g, kv_head) is int64 word 8 * program + k
# past the partials; slots 0-4 read %clock64 (start, query rows gathered, tile 0 landed,
# loop done, partials stored; 2-4 in warpgroup 0) and 5-6 %globaltimer (start, end).
_STAMP = ("    _t = gl.inline_asm_elementwise(\"mov.u64 $0, %{reg};\", \"=l,r\", [kv_head], dtype=gl.int64,\n"
          "                                   is_pure=False, pack=1)\n"
          "    gl.store((O_part + {offset}).to(gl.pointer_type(gl.int64)) + (g * {heads_kv} + kv_head) * 8 + {slot}, _t)\n")


def _timeline_edits(offset: int, heads_kv: int) -> list[tuple[str, str]]:
    def stamp(slot: int, reg: str = "clock64", indent: str = "") -> str:
        text = _STAMP.format(reg=reg, offset=offset, heads_kv=heads_kv, slot=slot)
        return "".join(indent + line + "\n" for line in text.splitlines())

    in_wg0 = "    if wg == 0:\n"
    lse = "    gl.store(LSE_part + row, gl.convert_layout(m_i + gl.log2(l_i), o_rows), mask=ok)\n"
    return [
        ("    kv_n = gl.load(GroupKvLen + g)\n",
         "    kv_n = gl.load(GroupKvLen + g)\n" + stamp(0) + stamp(5, "globaltimer")),
        ("    fence_async_shared()\n\n    k_smem", "    fence_async_shared()\n" + stamp(1) + "\n    k_smem"),
        ("    mbarrier.wait(ready.index(0), 0)\n",
         "    mbarrier.wait(ready.index(0), 0)\n" + in_wg0 + stamp(2, indent="    ")),
        ("    mbarrier.arrive(empty.index(last))\n", "    mbarrier.arrive(empty.index(last))\n" + in_wg0 + stamp(3, indent="    ")),
        (lse, lse + in_wg0 + stamp(4, indent="    ") + stamp(6, "globaltimer", "    ")),
    ]


def timeline(results: list) -> None:
    default = [("fewshot_32k_x64", "gqa"), ("spec_4k_92", "gqa"), ("spec_16k_184", "mha"), ("spec_16k_184", "gqa")]
    for name, layout, heads, plan, (q, k, v), spec in _gluon_cases("timeline", default):
        offset = plan.n_partials * heads.heads_q * 128  # fp32 words of the partials
        programs = plan.n_dense * heads.heads_kv
        module = _edited_module(spec, 0, "timeline", _timeline_edits(offset, heads.heads_kv),
                                Path(tempfile.mkdtemp(prefix="attngen_timeline_")))
        buf = torch.zeros(offset + 16 * programs, device="cuda", dtype=torch.float32)
        o_part = buf[:offset].view(plan.n_partials, heads.heads_q, 128)
        lse_part = torch.empty(plan.n_partials, heads.heads_q, device="cuda", dtype=torch.float32)
        fn = partial(module._launch_gluon, q, k, v, plan.tensors(), o_part, lse_part, plan.n_dense,
                     plan.queries_per_group)
        us = graph_us(fn)
        for _ in range(5):  # the stamps of the last of a few back-to-back calls
            fn()
        torch.cuda.synchronize()
        stamps = buf[offset:].view(torch.int64).view(programs, 8).cpu().double()
        clock, timer = stamps[:, :5], stamps[:, 5:7]
        ghz = statistics.median(((clock[:, 4] - clock[:, 0]) / (timer[:, 1] - timer[:, 0])).tolist())
        start = (timer[:, 0] - timer[:, 0].min()) / 1e3
        at = (clock - clock[:, :1]) / (ghz * 1e3)  # us since the program's start
        spans = {"start": start, "gather": at[:, 1], "tile 0 wait": at[:, 2] - at[:, 1],
                 "loop": at[:, 3] - at[:, 2], "epilogue": at[:, 4] - at[:, 3], "end": start + at[:, 4]}
        row = {label: (float(x.min()), statistics.median(x.tolist()), float(x.max())) for label, x in spans.items()}
        results.append(dict(part="timeline", workload=name, layout=layout, programs=programs, us=us,
                            clock_ghz=ghz, **{label: list(v) for label, v in row.items()}))
        print(f"timeline {name:16} {layout} {programs} programs, {us:.1f} us alone, SMs at {ghz:.2f} GHz; "
              "min / median / max, us:", flush=True)
        for label, (lo, mid, hi) in row.items():
            print(f"    {label:12} {lo:6.2f} {mid:6.2f} {hi:6.2f}", flush=True)


_QID = "    qid = tl.maximum(qid, 0)\n"
_TRITON_DST = "        dst = tl.load(MergeRow + part, mask=row_ok, other=0)\n"
_GLUON_Q = "    q = q_smem.index(wg)\n"


def _epilogue_variants(spec) -> dict[str, list[tuple[str, str]]]:
    """The epilogue part's edits of the rendered module: the Triton program's merge-row
    load moved up beside its query ids; the Gluon warpgroup's epilogue rows (slot, part,
    ok, merge row) moved up to before its first tile."""
    from attngen.render import render_uncached

    src = render_uncached(spec)
    first = src.index("    rows = wg * HM + gl.arange(0, HM, layout=o_rows)\n")
    end = src.index("    dst = gl.load(MergeRow + part, mask=ok, other=0)\n", first)
    block = src[first : src.index("\n", end) + 1]
    triton_edits = [(_QID, _QID + _TRITON_DST[4:]), (_TRITON_DST, "")]
    return {"main": [], "triton": triton_edits, "both": [*triton_edits, (block, ""), (_GLUON_Q, _GLUON_Q + block)]}


def epilogue(results: list) -> None:
    cases = _cases([("fewshot_4k_x20", "gqa"), ("tot_d3_w3", "gqa"), ("spec_1k_32", "gqa"), ("spec_4k_92", "mha"),
                    ("spec_16k_184", "mha"), ("fewshot_32k_x64", "gqa")])
    for index, (name, layout) in enumerate(cases):
        if out_of_time():
            return
        gen = torch.Generator(device="cuda").manual_seed(0)
        w, main_module, heads, plan, (q, k, v) = _tree_case(name, layout, gen)
        spec = tree_spec(w.tree.query_mode, heads.heads_q, heads.heads_kv)
        folder = Path(tempfile.mkdtemp(prefix="attngen_epilogue_"))
        mods = {label: main_module if not edits else _edited_module(spec, 10 * index + i, label, edits, folder)
                for i, (label, edits) in enumerate(_epilogue_variants(spec).items())}
        outs = {}
        for label, mod in mods.items():
            out = torch.full_like(q, float("nan"))
            mod.attention(q, k, v, plan, out=out)
            outs[label] = out
        equal = {label: bool(torch.equal(o, outs["main"])) for label, o in outs.items()}
        times = _interleaved_us({label: partial(mod.attention, q, k, v, plan) for label, mod in mods.items()},
                                rounds=7)
        results.append(dict(part="epilogue", workload=name, layout=layout, n_dense=plan.n_dense,
                            us=times, bitwise_equal=equal))
        print(f"epilogue {name:16} {layout} dense {plan.n_dense:3}  "
              + "  ".join(f"{label} {us:7.2f} us{'' if equal[label] else ' (DIFFERS)'}" for label, us in times.items()),
              flush=True)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for part in sys.argv[1:] or ["tree", "decode", "prefill"]:
        results: list = []
        try:
            {"tree": tree, "plans": plans, "decode": decode, "prefill": prefill, "prefill_tuned": prefill_tuned,
             "merge": merge, "fixed": fixed, "stream": stream, "resources": resources,
             "loop": loop, "timeline": timeline, "epilogue": epilogue}[part](results)
        finally:
            (OUT / f"{part}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
