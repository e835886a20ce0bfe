"""What 16-bit partials would give (session 56; docs/benchmarks/HISTORY.md): stage 1's
partial outputs stored as fp16 or bf16 instead of fp32 (the LSE stays fp32), which halves
what stage 1 writes and the merge reads. Each variant is the generated tree module with its
partial buffer's dtype changed and the stores and the merge's load cast, imported beside the
module as generated, and timed against it on the planner's plan in interleaved rounds; its
output is compared with the fp32 module's. Prints a line per variant and a table last;
writes partials.json under $OUT. Needs a CUDA GPU::

    python scripts/explore_partials.py
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore_split import case, interleaved, rel, selected, versions

from attngen.runtime import cache_key, cached_source, import_path

OUT = Path(os.environ.get("OUT", "explore_out"))
CASES = ("spec_16k_184 mha", "spec_16k_184 gqa", "spec_4k_92 gqa", "fewshot_32k_x64 gqa", "fewshot_4k_x20 gqa")
#: (text in the generated module, its replacement with {t} the partials' torch dtype and {g}
#: its Triton one)
EDITS = (
    ("o_part = torch.empty(rows, HEADS_Q, 128, device=device, dtype=torch.float32)",
     "o_part = torch.empty(rows, HEADS_Q, 128, device=device, dtype=torch.{t})"),
    ("tl.store(O_part + row[:, None] * D_V + d_v[None, :], o, mask=row_ok[:, None])",
     "tl.store(O_part + row[:, None] * D_V + d_v[None, :], o.to(tl.{g}), mask=row_ok[:, None])"),
    ("gl.store(O_part + gl.expand_dims(row * D, 1) + gl.expand_dims(cols, 0), o, mask=gl.expand_dims(ok, 1))",
     "gl.store(O_part + gl.expand_dims(row * D, 1) + gl.expand_dims(cols, 0), o.to(gl.{g}), "
     "mask=gl.expand_dims(ok, 1))"),
    ('o = tl.load(O_part + row[:, None] * D_V + d_v[None, :], mask=(lse > float("-inf"))[:, None], other=0.0)',
     'o = tl.load(O_part + row[:, None] * D_V + d_v[None, :], mask=(lse > float("-inf"))[:, None], '
     'other=0.0).to(tl.float32)'),
)


def variant(spec, dtype: str):
    """The spec's generated module with ``dtype`` partials, imported from $OUT."""
    text = cached_source(spec).read_text()
    for old, new in EDITS:
        assert text.count(old) == 1, f"{spec.name}: expected one {old!r}"
        text = text.replace(old, new.format(t=dtype, g=dtype))
    path = OUT / f"{spec.name}_{dtype}.py"
    path.write_text(text)
    return import_path(path, f"partials_{spec.name}_{cache_key(spec)}_{dtype}")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    print(versions(), flush=True)
    results, table = [], []
    for key, name, layout in selected(CASES):
        _, spec, module, _, plan, q, k, v = case(name, layout, 3)
        modules = {"float32": module, "float16": variant(spec, "float16"), "bfloat16": variant(spec, "bfloat16")}
        base = module.attention(q, k, v, plan).float()
        errs = {label: rel(m.attention(q, k, v, plan), base) for label, m in modules.items()}
        times = interleaved({label: partial(m.attention, q, k, v, plan) for label, m in modules.items()}, rounds=5)
        for label in modules:
            print(f"{key:22} {label:9} {times[label]:7.2f} us  rel. diff to fp32 {errs[label]:.1e}", flush=True)
            results.append(dict(case=key, partials=label, us=times[label], rel_diff=errs[label]))
        table.append((key, times))
        (OUT / "partials.json").write_text(json.dumps(results, indent=1))
    print("\n| case | fp32 µs | fp16 µs | bf16 µs | fp16/fp32 |\n|---|---|---|---|---|")
    for key, t in table:
        print(f"| {key} | {t['float32']:.1f} | {t['float16']:.1f} | {t['bfloat16']:.1f} | "
              f"{t['float16'] / t['float32']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
