"""What reading a paged tree cache costs, on the H200: the contiguous module (its dense
groups in the Gluon kernel, by TMA; and with gluon off, all in Triton) against a paged
module read through a page table over the flattened order (pages of 16 shuffled; pages
of 64 shuffled) and through slots into pages of 16 that each node owns
(attngen.paging.node_page_slots): with its dense groups in the Gluon kernel (TMA boxes
where a tile's slots run on, cp.async where not), and with gluon off. CUDA-graph replays,
medians, µs; every output is compared with the contiguous one.

    PYTHONPATH=. python scripts/explore_paged.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import attngen
from attngen.bench_tree import _graph_time_us
from attngen.cost import HeadLayout
from attngen.paging import node_paged_cache, table_paged_cache
from attngen.plan import plan_tree
from attngen.spec import Spec, parse_spec
from attngen.workloads import WORKLOADS

PAGE = 16
# the reference shapes whose plans have dense groups (the others run no Gluon kernel)
CASES = [("spec_16k_184", 32), ("fewshot_32k_x64", 8), ("spec_4k_92", 8), ("spec_4k_92", 32), ("spec_16k_184", 8)]
if os.environ.get("EXPLORE_CASES"):  # e.g. "fewshot_4k_x20:8,tot_d3_w3:32"
    CASES = [(c.split(":")[0], int(c.split(":")[1])) for c in os.environ["EXPLORE_CASES"].split(",")]


def spec(mode: str, heads_kv: int, page: int | None) -> Spec:
    topology: dict[str, Any] = {"kind": "tree", "queries": mode}
    if page:
        topology |= {"kv_layout": "paged", "page_size": page}
    return parse_spec({"name": f"explore_paged_{mode}_{heads_kv}_{page or 0}", "heads": {"q": 32, "kv": heads_kv},
                       "head_dim": 128, "dtype": "bf16", "topology": topology})


def measure(name: str, heads_kv: int) -> dict:
    """One case: each layout's time and its output's distance from the contiguous call."""
    tree = WORKLOADS[name]().tree
    dev = torch.device("cuda")
    plan = plan_tree(tree, heads=HeadLayout(heads_q=32, heads_kv=heads_kv), device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(tree.n_queries, 32, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(tree.n_kv, heads_kv, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    flat, paged = attngen.load(spec(tree.query_mode, heads_kv, None)), attngen.load(spec(tree.query_mode, heads_kv, PAGE))
    paged64 = attngen.load(spec(tree.query_mode, heads_kv, 64))
    kt, vt, table = table_paged_cache(k, v, PAGE, seed=1)
    k64, v64, table64 = table_paged_cache(k, v, 64, seed=1)
    ks, vs, slots = node_paged_cache(tree, k, v, PAGE)
    triton_only = {"gluon": False}
    calls = {
        "contiguous": lambda: flat.attention(q, k, v, plan),
        "contiguous, triton": lambda: flat.attention(q, k, v, plan, config=triton_only),
        "paged, table": lambda: paged.attention(q, kt, vt, plan, page_table=table),
        "paged 64, table": lambda: paged64.attention(q, k64, v64, plan, page_table=table64),
        "paged, slots": lambda: paged.attention(q, ks, vs, plan, slots=slots),
        "paged, slots, triton": lambda: paged.attention(q, ks, vs, plan, slots=slots, config=triton_only),
    }
    ref = calls["contiguous"]().float()
    row: dict = {"workload": name, "heads_kv": heads_kv}
    for label, call in calls.items():
        row[label + " diff"] = float((call().float() - ref).norm() / ref.norm())
        row[label] = round(_graph_time_us(call), 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name, heads_kv in CASES:
        rows.append(measure(name, heads_kv))
        print(json.dumps(rows[-1]), flush=True)
    labels = [x for x in rows[0] if x not in ("workload", "heads_kv") and not x.endswith(" diff")]
    print("| case | " + " | ".join(labels) + " | slots / contiguous |")
    print("|---|" + "---|" * (len(labels) + 1))
    for r in rows:
        print(f"| {r['workload']} kv={r['heads_kv']} | " + " | ".join(f"{r[x]:.1f}" for x in labels)
              + f" | {r['paged, slots'] / r['contiguous']:.3f} |")
    worst = max(r[x + " diff"] for r in rows for x in labels)
    print(f"largest relative difference from the contiguous output: {worst:.2e}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "paged.json").write_text(json.dumps(rows, indent=1))
    return 0 if worst < 1e-2 and np.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
