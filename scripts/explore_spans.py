"""The cost model's split bound on the H200 (session 55; docs/benchmarks/HISTORY.md): each
case whose planner choice moved when the model learnt how the dense kernel and the Triton
stage 1 share the SMs (``SPLIT`` in attngen/cost_model.py), and the dense cases besides, timed at
the previous choice, the new one and a grid of chunks and spans around them (the new
choice's QG; EXPLORE_GRID=0 leaves the grid out), in interleaved rounds. Cases whose choice
did not move are skipped.

``choices.json`` beside this script's output holds the previous choices (worked out on
the host with the previous planner); the new ones are the planner's here. Prints a line
per plan and a table last; writes spans.json under $OUT. Needs a CUDA GPU::

    python scripts/explore_spans.py
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore_split import case, interleaved, rel, selected, versions

from attngen.plan import plan_tree

OUT = Path(os.environ.get("OUT", "explore_out"))
#: EXPLORE_GRID=0: the previous and the new choice alone, where they differ.
GRID_ON = os.environ.get("EXPLORE_GRID", "1") != "0"
#: The previous planner's (chunk, QG, span) per case (scripts/explore_spans_previous.json).
PREVIOUS = json.loads((Path(__file__).resolve().parent / "explore_spans_previous.json").read_text())
#: Spans to time per prompt length (the case's longest node), each a distinct piece count.
GRID = {32000: (4096, 5120, 6144, 8192, 12288), 16000: (3072, 4096, 5120, 6144), 8000: (2048, 3072, 4096),
        4000: (768, 1024, 1536, 2048)}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    print(versions(), flush=True)
    results, table = [], []
    for key, name, layout in selected(PREVIOUS):
        old = PREVIOUS[key]
        tree, _, module, heads, new, q, k, v = case(name, layout, 3)
        prompt = min(GRID, key=lambda n: abs(n - int(tree.tokens.max())))
        plans = {"previous": plan_tree(tree, chunk=old["chunk"], queries_per_group=old["qg"], span=old["span"],
                                       heads=heads, device="cuda"), "new": new}
        if (new.chunk, new.queries_per_group, new.span) == (old["chunk"], old["qg"], old["span"]):
            continue  # the same plan
        for chunk in (256, 512) if GRID_ON else ():
            for span in GRID[prompt]:
                plans[f"{chunk}/{span}"] = plan_tree(tree, chunk=chunk, queries_per_group=new.queries_per_group,
                                                      span=span, heads=heads, device="cuda")
        ref = module.attention(q, k, v, plans["previous"]).float()
        errs = {label: rel(module.attention(q, k, v, p), ref) for label, p in plans.items()}
        times = interleaved({label: partial(module.attention, q, k, v, p) for label, p in plans.items()})
        for label, p in plans.items():
            desc = f"{p.chunk}/{p.queries_per_group}/{p.span}"
            print(f"{key:24} {label:10} {desc:14} dense {p.n_dense:3} {times[label]:7.2f} us  err {errs[label]:.1e}",
                  flush=True)
            results.append(dict(case=key, label=label, chunk=p.chunk, qg=p.queries_per_group, span=p.span,
                                dense=p.n_dense, us=times[label], err=errs[label]))
        best = min(times, key=times.get)
        table.append((key, plans["previous"], times["previous"], new, times["new"], plans[best], times[best]))
        (OUT / "spans.json").write_text(json.dumps(results, indent=1))
    print("\n| case | previous | µs | new | µs | new/previous | best of grid | µs |\n|---|---|---|---|---|---|---|---|")
    for key, old, t_old, new, t_new, best, t_best in table:
        def d(p):
            return f"{p.chunk}/{p.queries_per_group}/{p.span}"
        print(f"| {key} | {d(old)} | {t_old:.1f} | {d(new)} | {t_new:.1f} | {t_new / t_old:.3f} | {d(best)} | {t_best:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
