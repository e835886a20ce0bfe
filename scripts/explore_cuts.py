"""Where a long prompt is cut into dense pieces (session 56; docs/benchmarks/HISTORY.md): at chunk
boundaries, as the planner cuts a span of two chunks or more, against evenly at
multiples of SPLIT_ALIGN tokens, as it cuts shorter spans. The cases are those whose
longest dense piece the even cut shortens; each is timed at the planner's chunk, QG and
span both ways, in interleaved rounds, and the even plan's output is checked against
the chunk-cut one. Prints a line per plan and a table last; writes cuts.json under $OUT.
Needs a CUDA GPU::

    python scripts/explore_cuts.py
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore_split import case, interleaved, rel, selected, versions

from attngen.plan import plan_tree, spans

OUT = Path(os.environ.get("OUT", "explore_out"))
CASES = ("spec_16k_184 mha", "spec_16k_184 gqa", "spec_8k_248 mha", "spec_8k_248 gqa", "spec_4k_92 gqa")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    print(versions(), flush=True)
    results, table = [], []
    for key, name, layout in selected(CASES):
        tree, _, module, heads, chunked, q, k, v = case(name, layout, 3)
        saved = spans.EVEN_BELOW
        spans.EVEN_BELOW = 1 << 30  # every span cuts evenly
        try:
            even = plan_tree(tree, chunk=chunked.chunk, queries_per_group=chunked.queries_per_group,
                             span=chunked.span, heads=heads, device="cuda")
        finally:
            spans.EVEN_BELOW = saved
        plans = {"chunk cuts": chunked, "even cuts": even}
        ref = module.attention(q, k, v, chunked).float()
        errs = {label: rel(module.attention(q, k, v, p), ref) for label, p in plans.items()}
        times = interleaved({label: partial(module.attention, q, k, v, p) for label, p in plans.items()}, rounds=5)
        for label, p in plans.items():
            longest = int(p.group_kv_len[: p.n_dense].max()) if p.n_dense else 0
            print(f"{key:20} {label:10} {p.chunk}/{p.queries_per_group}/{p.span} dense {p.n_dense:3} longest "
                  f"{longest:5} {times[label]:7.2f} us  err {errs[label]:.1e}", flush=True)
            results.append(dict(case=key, label=label, chunk=p.chunk, qg=p.queries_per_group, span=p.span,
                                dense=p.n_dense, longest=longest, us=times[label], err=errs[label]))
        table.append((key, times["chunk cuts"], times["even cuts"]))
        (OUT / "cuts.json").write_text(json.dumps(results, indent=1))
    print("\n| case | chunk cuts µs | even cuts µs | even/chunk |\n|---|---|---|---|")
    for key, t_chunk, t_even in table:
        print(f"| {key} | {t_chunk:.1f} | {t_even:.1f} | {t_even / t_chunk:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
