"""Two stage-1 experiments on the compute-bound Gluon cases (session 54;
docs/benchmarks/HISTORY.md).

1. **The SMs split between the prompt and the branches** (fewshot_32k_x64 GQA). The
   planner's plan runs the prompt's dense groups as 128 Gluon programs (one an SM; their
   shared memory and registers take the whole SM) and the 512 narrow branch groups as
   Triton programs on a side stream. No Triton program fits beside a Gluon one (session
   32), so the branches run on the 4 free SMs and then after the prompt: about 62 µs of
   matrix work plus about 30 µs of streaming, in series. Here the prompt is cut into 7
   spans (112 programs) or 6 (96), and the branches go to the free SMs from the start, in
   the module's Triton kernel or in session 43's persistent streaming Gluon programs
   (``explore_stream.py``), which stream several times faster per SM. A branch group of
   chunk 256 holds one query and no bits, as those programs need.

2. **Lazy rescaling in the Gluon loop** (fewshot_32k_x64 GQA, spec_16k_184 MHA). Every
   tile multiplies each warpgroup's O accumulator (64 registers a thread) by exp2(m_old -
   m_new). Here the running max moves only when a row's tile max passes it by more than
   8 (P stays below 2^8), and the multiply is skipped when no row of the warpgroup moved,
   which after the first tiles is nearly always. Exact: O and l carry the same stale max.

Prints a line per variant and a table last; writes split.json under $OUT. Needs an sm_90
GPU and Triton 3.6 or newer::

    python scripts/explore_split.py
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore_stream import GluonDescriptor, _stream_kernel, gl, graph_us, merge_partials

import attngen
from attngen.bench_tree import LAYOUTS, tree_spec
from attngen.cost import HeadLayout
from attngen.plan import plan_tree
from attngen.workloads import WORKLOADS

OUT = Path(os.environ.get("OUT", "explore_out"))
D = 128


def versions() -> str:
    """The GPU and the versions a run's figures come from (its first line)."""
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"


def selected(keys) -> list[tuple[str, str, str]]:
    """(key, workload, layout) of each of ``keys`` ("workload layout") that EXPLORE_CASES
    names (e.g. "spec_8k_248 mha,spec_8k_248 gqa"), or of every one."""
    only = os.environ.get("EXPLORE_CASES")
    return [(key, *key.split()) for key in keys if not only or key in only.split(",")]


def interleaved(fns: dict, rounds: int = 3) -> dict[str, float]:
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            times[label].append(graph_us(fn))
    return {label: statistics.median(ts) for label, ts in times.items()}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def case(name: str, layout: str, seed: int):
    """A workload's tree and tree spec, its generated module, the head layout, the
    planner's plan on the GPU, and random bf16 q, k, v for it."""
    hq, hkv = LAYOUTS[layout]
    tree = WORKLOADS[name]().tree
    spec = tree_spec(tree.query_mode, hq, hkv)
    heads = HeadLayout(heads_q=hq, heads_kv=hkv, head_dim_qk=D, head_dim_v=D)
    plan = plan_tree(tree, heads=heads, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(n, h, D, device="cuda", dtype=torch.bfloat16, generator=gen)
               for n, h in ((plan.n_queries, hq), (plan.n_kv, hkv), (plan.n_kv, hkv)))
    return tree, spec, attngen.load(spec), heads, plan, q, k, v


def gluon_alone(module, q, k, v, plan, fold: bool = False):
    """The module's Gluon kernel alone over ``plan``'s dense groups (partials only)."""
    o_part = torch.empty(plan.n_partials, q.shape[1], D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(plan.n_partials, q.shape[1], device=q.device, dtype=torch.float32)
    return partial(module._launch_gluon, q, k, v, plan.tensors(), o_part, lse_part, plan.n_dense,
                   plan.queries_per_group, fold=fold)


# ---- 1. the SMs split ------------------------------------------------------------------

def branch_schedule(plan, heads_kv: int, lists: int, device) -> dict:
    """The plan's groups past its dense ones (each full, one filled slot) as (group, KV
    head) items, dealt round-robin to ``lists`` warpgroup lists (the items are equal)."""
    nd, ng = plan.n_dense, int(plan.group_kv_start.shape[0])
    if not bool(plan.group_full[nd:].all()):
        raise ValueError("a branch group with visibility bits: not in this experiment")
    items = [(g, h) for g in range(nd, ng) for h in range(heads_kv)]
    dealt = [items[i::lists] for i in range(lists)]
    prog_ptr = np.concatenate([[0], np.cumsum([len(d) for d in dealt])]).astype(np.int32)
    flat = [gh for d in dealt for gh in d] + [(nd, 0)]
    start = plan.group_kv_start.cpu().numpy()
    length = plan.group_kv_len.cpu().numpy()

    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.int32), device=device)

    return dict(prog_ptr=t(prog_ptr), item_piece=t([g for g, _ in flat]), item_head=t([h for _, h in flat]),
                item_start=t([start[g] for g, _ in flat]), item_len=t([length[g] for g, _ in flat]))


def split_call(module, q, k, v, plan, n_sms: int, wgs: int, *, dense: bool = True, block_n: int = 64,
               stages: int = 3):
    """The plan's dense groups in the module's Gluon kernel on the caller's stream, its
    branch groups in ``n_sms`` persistent streaming programs of ``wgs`` warpgroups on a
    side stream, then the module's merge; without ``dense``, the streaming programs alone."""
    hq, hkv = q.shape[1], k.shape[1]
    group, qg = hq // hkv, plan.queries_per_group
    t = plan.tensors()
    sched = branch_schedule(plan, hkv, n_sms * wgs, q.device)
    o_part = torch.empty(plan.n_partials, hq, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(plan.n_partials, hq, device=q.device, dtype=torch.float32)
    out = torch.empty(q.shape[0], hq, D, device=q.device, dtype=q.dtype)
    layout = gl.NVMMASharedLayout.get_default_for([block_n, D], gl.bfloat16)
    k_desc = GluonDescriptor.from_tensor(k.view(k.shape[0], -1), [block_n, D], layout)
    v_desc = GluonDescriptor.from_tensor(v.view(v.shape[0], -1), [block_n, D], layout)
    piece_q, piece_row = t["group_q"].view(-1), t["merge_row"].view(-1)

    def stream():
        _stream_kernel[(n_sms,)](
            q, k_desc, v_desc, o_part, lse_part, sched["prog_ptr"], sched["item_piece"], sched["item_head"],
            sched["item_start"], sched["item_len"], piece_q, piece_row, q.stride(0), q.stride(1), qg,
            NS=stages, GROUP=group, HEADS_Q=hq, WGS=wgs, num_warps=4)

    def call():
        if not dense:
            stream()
            return out
        main = torch.cuda.current_stream()
        side = module._side_stream(main)
        side.wait_stream(main)
        module._launch_gluon(q, k, v, t, o_part, lse_part, plan.n_dense, qg)
        with torch.cuda.stream(side):
            stream()
        main.wait_stream(side)
        merge_partials(module, o_part, lse_part, out, t["merge_ptr"])
        return out

    return call


def split(results: list, table: list) -> None:
    name, layout = "fewshot_32k_x64", "gqa"
    hkv = LAYOUTS[layout][1]
    tree, _, module, heads, planner, q, k, v = case(name, layout, 0)
    ref = module.attention(q, k, v, planner).float()
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def plan(chunk, span):
        return plan_tree(tree, chunk=chunk, span=span, queries_per_group=32, heads=heads, device="cuda")

    p7, p6, p8 = plan(256, 4608), plan(256, 5376), plan(256, 4096)
    fns = {
        f"main (planner: {planner.chunk}/{planner.span}, {planner.n_dense * hkv} Gluon programs)":
            partial(module.attention, q, k, v, planner),
        f"module, 256/4608 ({p7.n_dense * hkv} Gluon + Triton beside)": partial(module.attention, q, k, v, p7),
        f"module, 256/5376 ({p6.n_dense * hkv} Gluon + Triton beside)": partial(module.attention, q, k, v, p6),
        f"split 256/4608: {p7.n_dense * hkv} Gluon + stream on {sms - p7.n_dense * hkv} SMs x2 wg":
            split_call(module, q, k, v, p7, sms - p7.n_dense * hkv, 2),
        f"split 256/4608: {p7.n_dense * hkv} Gluon + stream on {sms - p7.n_dense * hkv} SMs x1 wg":
            split_call(module, q, k, v, p7, sms - p7.n_dense * hkv, 1),
        f"split 256/5376: {p6.n_dense * hkv} Gluon + stream on {sms - p6.n_dense * hkv} SMs x2 wg":
            split_call(module, q, k, v, p6, sms - p6.n_dense * hkv, 2),
        f"split 256/4096: {p8.n_dense * hkv} Gluon + stream on {sms - p8.n_dense * hkv} SMs x2 wg":
            split_call(module, q, k, v, p8, sms - p8.n_dense * hkv, 2),
    }
    errs = {}
    for label, fn in fns.items():
        try:
            errs[label] = rel(fn(), ref)
            torch.cuda.synchronize()
        except Exception as exc:  # an experiment's failure is reported, not fatal
            print(f"split {label}: failed: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            results.append(dict(part="split", variant=label, error=str(exc)[:2000]))
    fns = {label: fn for label, fn in fns.items() if label in errs}
    parts = {
        f"alone: {p7.n_dense * hkv} Gluon programs (256/4608)": gluon_alone(module, q, k, v, p7),
        f"alone: {planner.n_dense * hkv} Gluon programs (planner)": gluon_alone(module, q, k, v, planner),
        f"alone: stream on {sms - p7.n_dense * hkv} SMs x2 wg": split_call(module, q, k, v, p7, sms - p7.n_dense * hkv,
                                                                         2, dense=False),
        f"alone: stream on {sms} SMs x2 wg": split_call(module, q, k, v, p7, sms, 2, dense=False),
    }
    times = interleaved({**fns, **parts})
    for label, us in times.items():
        err = errs.get(label)
        print(f"split {label:64} {us:7.2f} us" + (f"  err {err:.2e}" if err is not None else ""), flush=True)
        results.append(dict(part="split", workload=name, layout=layout, variant=label, us=us, err=err))
        table.append((f"{name} {layout}", label, us, err))


# ---- 2. lazy rescaling -----------------------------------------------------------------

def lazy_edits(src: str) -> str:
    """The rendered module with the Gluon loop's lazy rescale (see the docstring)."""
    scale = re.search(r"m_new = gl\.maximum\(m_i, gl\.max\(s, axis=1\) \* ([0-9.e-]+)\)", src).group(1)
    old_body = (f"    m_new = gl.maximum(m_i, gl.max(s, axis=1) * {scale})\n"
                f"    p = gl.exp2(s * {scale} - gl.expand_dims(m_new, 1))\n"
                f"    alpha = gl.exp2(m_i - m_new)\n"
                f"    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)\n")
    new_body = (f"    m_row = gl.max(s, axis=1) * {scale}\n"
                f"    grow = m_row > m_i + 8.0\n"
                f"    m_new = gl.where(grow, m_row, m_i)\n"
                f"    p = gl.exp2(s * {scale} - gl.expand_dims(m_new, 1))\n"
                f"    alpha = gl.exp2(m_i - m_new)\n"
                f"    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1), gl.max(grow.to(gl.int32), axis=0)\n")
    edits = [
        (old_body, new_body, 1),
        ("p, alpha, m_i, l_i = _gluon_softmax(", "p, alpha, m_i, l_i, grow = _gluon_softmax(", 3),
        ("    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1)\n",
         "    if grow > 0:\n"
         "        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1)\n", 1),
        ("            acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)\n",
         "            if grow > 0:\n"
         "                acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)\n", 1),
    ]
    for old, new, count in edits:
        assert src.count(old) == count, f"lazy edit: expected {count} of {old[:70]!r}, found {src.count(old)}"
        src = src.replace(old, new)
    return src


def lazy(results: list, table: list) -> None:
    from attngen.render import render_uncached
    from attngen.runtime import import_path

    folder = Path(tempfile.mkdtemp(prefix="attngen_lazy_"))
    for i, (name, layout) in enumerate((("fewshot_32k_x64", "gqa"), ("spec_16k_184", "mha"), ("spec_16k_184", "gqa"))):
        _, spec, module, _, plan, q, k, v = case(name, layout, 1)
        path = folder / f"lazy_{i}.py"
        path.write_text(lazy_edits(render_uncached(spec)))
        edited = import_path(path, path.stem)
        ref = module.attention(q, k, v, plan).float()
        # a float64 check of the edited module on a few queries is the reference's job; here
        # the main module (verified) stands in, and the edit must agree to rounding
        try:
            err = rel(edited.attention(q, k, v, plan), ref)
        except Exception as exc:
            print(f"lazy {name} {layout}: failed: {type(exc).__name__}: {str(exc)[:600]}", flush=True)
            results.append(dict(part="lazy", workload=name, layout=layout, error=str(exc)[:3000]))
            continue
        fold = bool(plan.n_folded) and plan.n_folded == int(plan.group_kv_start.shape[0]) - plan.n_dense
        fns = {
            "main: call": partial(module.attention, q, k, v, plan),
            "lazy: call": partial(edited.attention, q, k, v, plan),
            "main: Gluon alone": gluon_alone(module, q, k, v, plan, fold),
            "lazy: Gluon alone": gluon_alone(edited, q, k, v, plan, fold),
        }
        times = interleaved(fns)
        for label, us in times.items():
            e = err if label.startswith("lazy") else 0.0
            print(f"lazy {name:16} {layout} {label:20} {us:7.2f} us  err vs main {e:.2e}", flush=True)
            results.append(dict(part="lazy", workload=name, layout=layout, variant=label, us=us, err=e))
            table.append((f"{name} {layout}", label, us, e))


# ---- 3. how many pieces the prompt is cut into -------------------------------------------

def pieces(results: list, table: list) -> None:
    """fewshot_32k_x64 and shared_prefix_32k_x64 GQA, the 32000-token prompt cut into 8 to 4
    pieces (128 to 64 Gluon programs), at chunks 256 and 512: the module's call, and its
    Gluon kernel alone."""
    for name in ("fewshot_32k_x64", "shared_prefix_32k_x64"):
        hkv = LAYOUTS["gqa"][1]
        tree, _, module, heads, planner, q, k, v = case(name, "gqa", 2)
        ref = module.attention(q, k, v, planner).float()
        plans = {"planner": planner}
        for chunk in (256, 512):
            for n in (8, 7, 6, 5, 4):
                span = -(-32000 // n // chunk) * chunk
                plans[f"chunk {chunk}, {n} pieces (span {span})"] = plan_tree(
                    tree, chunk=chunk, span=span, queries_per_group=32, heads=heads, device="cuda")
        fns, errs = {}, {}
        for label, plan in plans.items():
            tag = f"{label}: {plan.n_dense * hkv} Gluon programs"
            fns[f"{tag}, call"] = partial(module.attention, q, k, v, plan)
            fns[f"{tag}, Gluon alone"] = gluon_alone(module, q, k, v, plan)
            errs[f"{tag}, call"] = rel(module.attention(q, k, v, plan), ref)
        times = interleaved(fns)
        for label, us in times.items():
            err = errs.get(label)
            print(f"pieces {name:22} gqa {label:64} {us:7.2f} us" + (f"  err {err:.2e}" if err is not None else ""),
                  flush=True)
            results.append(dict(part="pieces", workload=name, layout="gqa", variant=label, us=us, err=err))
            table.append((f"{name} gqa", label, us, err))


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    print(versions(), flush=True)
    results: list = []
    table: list = []
    parts = os.environ.get("EXPLORE_PARTS", "split,lazy,pieces").split(",")
    for part, fn in (("split", split), ("lazy", lazy), ("pieces", pieces)):
        if part in parts:
            try:
                fn(results, table)
            except Exception as exc:
                print(f"{part}: failed: {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
                results.append(dict(part=part, error=str(exc)[:3000]))
            (OUT / "split.json").write_text(json.dumps(results, indent=1))
    print("\n| case | variant | µs | rel. err vs main |\n|---|---|---|---|")
    for case, label, us, err in table:
        print(f"| {case} | {label} | {us:.1f} | {'' if err is None else f'{err:.1e}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
