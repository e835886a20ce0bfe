"""``attngen bench``: time a generated kernel against the kernels a user would otherwise
pick, on the same inputs, in one run, beside its roofline floor.

Floors come from rates measured in the same run, once: HBM bandwidth (a large
device-to-device copy, bytes read + written) and the bf16 matrix rate (an 8192³ GEMM on
random data). Prefill is compute-bound: floor = FLOPs of the visible (query, key) pairs
only (2·Dqk + 2·Dv per pair, per query head) over the matrix rate. Decode is
memory-bound: floor = bytes (Q + each visible KV byte once + O) over the bandwidth.

Peers: torch SDPA (flash backend forced for plain causal/full prefill; efficient or math
with a dense mask where flash cannot express the spec) and FlexAttention (compiled, with
a BlockMask from a ``mask_mod`` written per mask rule; free mask expressions are marked
"not supported by peer"). How a spec becomes each peer's call lives in
:mod:`attngen.peers`; this module measures, counts, and reports.

Everything that needs a GPU imports torch lazily; pair counting and floor arithmetic
run on the CPU and are unit-tested there.

    python -m attngen.bench --preset all --out bench_out/
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attngen.errors import AttngenError
from attngen.peers import (
    PEERS,
    NotSupportedByPeer,
    Shape,
    batch_dependent,
    peer_inputs,
    semantic_mask_fn,
    visibility_depends_on,
)
from attngen.plotting import pyplot
from attngen.spec import DTYPE_BYTES, Spec, parse_spec, torch_dtype

# ---------------------------------------------------------------------------------------
# Shapes and presets


def parse_shape(text: str, spec: Spec) -> Shape:
    """``BxS`` (prefill, q_len = kv_len), ``BxQxKV`` (chunked prefill) or ``BxKV`` (decode).

    >>> from attngen.spec import spec_from_mapping
    >>> s = spec_from_mapping({"name": "a", "heads": {"q": 2, "kv": 1}, "head_dim": 64})
    >>> parse_shape("4x1024", s), parse_shape("2x128x1024", s)
    (Shape(batch=4, q_len=1024, kv_len=1024), Shape(batch=2, q_len=128, kv_len=1024))
    """
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    decode = spec.topology.queries == "decode"
    if decode and len(parts) == 2:
        return Shape(parts[0], 1, parts[1])
    if not decode and len(parts) == 2:
        return Shape(parts[0], parts[1], parts[1])
    if not decode and len(parts) == 3 and parts[1] <= parts[2]:
        return Shape(*parts)
    allowed = "BxKV (decode)" if decode else "BxS or BxQxKV with Q <= KV (prefill)"
    raise AttngenError(f"--shape {text!r}: not a shape for this spec; allowed: {allowed}")


def default_shapes(spec: Spec) -> list[Shape]:
    if spec.topology.queries == "decode":
        return [Shape(8, 1, 32768)]
    return [Shape(4, 4096, 4096)]


@dataclass(frozen=True, slots=True)
class Preset:
    """A named benchmark case (the figures BENCHMARKS.md records)."""

    name: str
    spec: dict[str, Any]
    shape: Shape


PRESETS: dict[str, Preset] = {
    "prefill_causal": Preset(
        "prefill_causal",
        {"name": "causal_prefill", "description": "Causal self-attention prefill, Llama-2-7B-like heads (32 q / 32 kv, D=128).",
         "heads": {"q": 32, "kv": 32}, "head_dim": 128, "dtype": "bf16",
         "topology": {"kind": "sequence", "queries": "prefill"}, "mask": ["causal"],
         "tune": {"block_m": [128, 64], "block_n": [128], "num_warps": [8, 4], "num_stages": [3]}},
        Shape(4, 4096, 4096),
    ),
    "decode_window_sinks_32k": Preset(
        "decode_window_sinks_32k",
        {"name": "sliding_window_sinks_decode",
         "description": "Decode with a 4096-token sliding window plus 4 attention sinks (StreamingLLM), Llama-3-8B heads.",
         "heads": {"q": 32, "kv": 8}, "head_dim": 128, "dtype": "bf16",
         "topology": {"kind": "sequence", "queries": "decode"},
         "mask": ["causal", {"any": [{"window": {"left": 4095, "right": 0}}, {"sink": 4}]}]},
        Shape(8, 1, 32768),
    ),
}


# ---------------------------------------------------------------------------------------
# Counting and floors (CPU)


@dataclass(frozen=True, slots=True)
class VisibleCounts:
    """Exact visible (query, key) pairs summed over batch and query heads, and for the
    floor of decode, the visible KV positions summed over (batch, kv head), each once."""

    pairs: int
    kv_positions: int


def count_visible(spec: Spec, shape: Shape, tensors: dict[str, Any], *, rows: int = 256) -> VisibleCounts:
    """Count from the mask on the CPU, evaluating blocks of ``rows`` query rows at a time.
    A mask that does not involve ``head`` (or ``batch`` and tensors) is evaluated once
    and multiplied."""
    import torch

    visible = semantic_mask_fn(spec, shape, tensors)
    per_head = visibility_depends_on(spec, "head")
    per_batch = batch_dependent(spec)
    heads = range(spec.heads.q) if per_head else range(1)
    batches = range(shape.batch) if per_batch else range(1)
    kv = torch.arange(shape.kv_len)
    pairs = 0
    kv_positions = 0
    for b in batches:
        seen = torch.zeros(len(heads), shape.kv_len, dtype=torch.bool)
        for start in range(0, shape.q_len, rows):
            q = torch.arange(start, min(start + rows, shape.q_len)) + shape.q_offset
            for hi, h in enumerate(heads):
                grid = torch.as_tensor(visible(torch.tensor(b), torch.tensor(h), q[:, None], kv[None, :]))
                grid = grid.expand(len(q), shape.kv_len)
                pairs += int(grid.sum())
                seen[hi] |= grid.any(dim=0)
        if per_head:
            groups = seen.view(spec.heads.kv, spec.heads.group, shape.kv_len).any(dim=1)
            kv_positions += int(groups.sum())
        else:
            kv_positions += int(seen[0].sum()) * spec.heads.kv
    pairs *= 1 if per_head else spec.heads.q
    if not per_batch:
        pairs *= shape.batch
        kv_positions *= shape.batch
    return VisibleCounts(pairs, kv_positions)


@dataclass(frozen=True, slots=True)
class Work:
    """What the kernel must do at least: FLOPs of visible pairs, bytes it must move."""

    flops: int
    bytes: int


def required_work(spec: Spec, shape: Shape, counts: VisibleCounts) -> Work:
    """FLOPs (2·Dqk + 2·Dv per visible pair and query head) and bytes (Q + visible KV,
    each byte once + O)."""
    es = DTYPE_BYTES[spec.dtype]
    dqk, dv = spec.head_dim.qk, spec.head_dim.v
    flops = counts.pairs * (2 * dqk + 2 * dv)
    q_rows = shape.batch * shape.q_len * spec.heads.q
    nbytes = es * (q_rows * dqk + counts.kv_positions * (dqk + dv) + q_rows * dv)
    return Work(flops, nbytes)


@dataclass(frozen=True, slots=True)
class DeviceRates:
    """Rates measured once per run."""

    gpu: str
    hbm_gbps: float
    matmul_tflops: float
    torch_version: str
    triton_version: str


def floor_us(spec: Spec, work: Work, rates: DeviceRates) -> tuple[float, str]:
    """(floor in µs, which bound): decode is bandwidth-bound, prefill matrix-bound."""
    if spec.topology.queries == "decode":
        return work.bytes / (rates.hbm_gbps * 1e9) * 1e6, "hbm"
    return work.flops / (rates.matmul_tflops * 1e12) * 1e6, "matmul"


# ---------------------------------------------------------------------------------------
# GPU measurement


def _need_cuda() -> Any:
    try:
        import torch
    except ImportError:
        raise AttngenError("attngen bench needs torch with CUDA; torch is not installed") from None
    if not torch.cuda.is_available():
        raise AttngenError(
            "attngen bench measures on a CUDA GPU and none is available here "
            f"(torch {torch.__version__}); run it on a GPU host, or use 'attngen check' on the CPU")
    return torch


def measure_rates() -> DeviceRates:
    """HBM bandwidth from a 2 GiB device copy, bf16 rate from an 8192³ GEMM."""
    torch = _need_cuda()
    import triton
    from triton.testing import do_bench

    def copy_gbps(n: int = 1 << 30) -> float:
        src = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_()
        dst = torch.empty_like(src)
        ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
        return 2 * n * src.element_size() / (ms * 1e-3) / 1e9

    def matmul_tflops(m: int = 8192) -> float:
        a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
        return 2 * m**3 / (ms * 1e-3) / 1e12

    hbm = copy_gbps()
    torch.cuda.empty_cache()
    tflops = matmul_tflops()
    torch.cuda.empty_cache()
    return DeviceRates(torch.cuda.get_device_name(), hbm, tflops, torch.__version__, triton.__version__)


#: Interleaved timing rounds per variant (see run_bench).
ROUNDS = 3


def _time(fn: Callable[[], Any], graph: bool) -> float:
    """Median µs; CUDA-graph replay for small launches (decode), where launch overhead
    would otherwise be timed."""
    from triton.testing import do_bench, do_bench_cudagraph

    fn()
    if graph:
        try:
            return float(do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3
        except Exception:  # capture can fail (e.g. host sync in a peer); time eagerly
            pass
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3


def make_tensors(spec: Spec, shape: Shape, device: str, seed: int = 0) -> dict[str, Any]:
    """Plausible values for the spec's user tensors, padded layout (a per-token axis
    becomes [batch, kv_len]): ALiBi-like slopes for per-head floats, 4 sorted documents per
    sequence for per-token ints, prefix lengths in [0, kv_len] for per-batch ints."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name in sorted(spec.tensors):
        decl = spec.tensors[name]
        named = {"head": spec.heads.q, "batch": shape.batch, "token": shape.kv_len}
        dims = [d if isinstance(d, int) else named[d] for d in decl.dims]
        if "token" in decl.dims:  # a batch axis just before the token axis
            at = decl.dims.index("token")
            dims = [*dims[:at], shape.batch, *dims[at:]]
        if decl.is_float:
            if decl.dims == ("head",):
                t = torch.tensor([2.0 ** (-8.0 * (h + 1) / spec.heads.q) for h in range(spec.heads.q)])
            else:
                t = torch.randn(dims, generator=gen) * 0.5
        elif "token" in decl.dims:
            cuts = torch.rand(dims, generator=gen) < 4.0 / max(shape.kv_len, 1)
            t = torch.cumsum(cuts.long(), dim=decl.dims.index("token") + 1)
        elif decl.dims == ("batch",):
            t = torch.randint(0, shape.kv_len + 1, dims, generator=gen)
        else:
            t = torch.randint(0, 4, dims, generator=gen)
        out[name] = t.to(torch_dtype(decl.dtype)).to(device)
    return out


def _packed(t: Any, decl_dims: tuple[Any, ...]) -> Any:
    """Per-token tensors go to the kernel packed like the KV: [batch*kv_len, ...]."""
    if "token" not in decl_dims:
        return t
    at = decl_dims.index("token")
    return t.flatten(at, at + 1)


@dataclass(slots=True)
class Timing:
    variant: str
    us: float | None
    tflops: float | None = None
    gbps: float | None = None
    note: str = ""
    max_err: float | None = None


@dataclass(slots=True)
class BenchResult:
    """One (spec, shape) measured: every variant, the floor and the ratios."""

    spec: str
    shape: Shape
    rates: DeviceRates
    work: Work
    floor_us: float
    floor_kind: str
    timings: list[Timing] = field(default_factory=list)

    def attngen_us(self) -> float | None:
        return next((t.us for t in self.timings if t.variant == "attngen"), None)

    def ratio(self) -> float | None:
        us = self.attngen_us()
        return us / self.floor_us if us and self.floor_us else None

    def speedups(self) -> dict[str, float]:
        """peer µs / attngen µs for every peer that ran."""
        ours = self.attngen_us()
        return {t.variant: t.us / ours for t in self.timings
                if ours and t.us and t.variant != "attngen"}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio()
        data["speedups"] = self.speedups()
        return data


def bench_spec(spec: Spec, shape: Shape, rates: DeviceRates, *, seed: int = 0) -> BenchResult:
    """Time attngen's kernel for ``spec`` and each peer on the same inputs, in
    :data:`ROUNDS` interleaved rounds."""
    torch = _need_cuda()
    from attngen import runtime

    if spec.topology.kind != "sequence":
        raise AttngenError(f"{spec.name}: attngen bench handles sequence specs; "
                           f"topology {spec.topology.kind!r} is benchmarked per workload")
    decode = spec.topology.queries == "decode"
    dtype = torch_dtype(spec.dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, Hq, Hkv = shape.batch, spec.heads.q, spec.heads.kv

    def rand(*size: int) -> Any:
        return torch.randn(*size, generator=gen, device="cuda", dtype=dtype)

    q = rand(B * shape.q_len, Hq, spec.head_dim.qk)
    k = rand(B * shape.kv_len, Hkv, spec.head_dim.qk)
    v = rand(B * shape.kv_len, Hkv, spec.head_dim.v)
    cu_q = torch.arange(0, B + 1, device="cuda", dtype=torch.int32) * shape.q_len
    cu_k = torch.arange(0, B + 1, device="cuda", dtype=torch.int32) * shape.kv_len
    tensors_cpu = make_tensors(spec, shape, "cpu", seed)
    tensors = {n: t.cuda() for n, t in tensors_cpu.items()}
    kernel_tensors = {n: _packed(t, spec.tensors[n].dims) for n, t in tensors.items()}

    counts = count_visible(spec, shape, tensors_cpu)
    work = required_work(spec, shape, counts)
    floor, kind = floor_us(spec, work, rates)
    result = BenchResult(spec.name, shape, rates, work, floor, kind)

    module = runtime.load(spec)
    if decode:
        def ours() -> Any:
            return module.attention(q, k, v, cu_k, max_seqlen_k=shape.kv_len, **kernel_tensors)
    else:
        def ours() -> Any:
            return module.attention(q, k, v, cu_q, cu_k, max_seqlen_q=shape.q_len,
                                    max_seqlen_k=shape.kv_len, **kernel_tensors)
    reference = ours()
    tuned = getattr(module, "_decode_split_tuned" if decode else "_prefill_tuned", None)
    picked = getattr(tuned, "best_config", None)

    pq, pk, pv = peer_inputs(q, k, v, shape)
    ref_padded = reference.view(B, shape.q_len, Hq, -1).transpose(1, 2)
    runs: dict[str, tuple[Callable[[], Any], str, float | None]] = {
        "attngen": (ours, f"autotuner picked {picked}" if picked else "", None)
    }
    failed: dict[str, Timing] = {}
    for name, make in PEERS:
        try:
            run, how = make(spec, shape, pq, pk, pv, tensors)
            max_err = (run().float() - ref_padded.float()).abs().nan_to_num(0.0).max().item()
            runs[name] = (run, how, max_err)
        except NotSupportedByPeer as why:
            failed[name] = Timing(name, None, note=f"not supported by peer: {why}")
        except Exception as err:  # a peer failing must not hide the other figures
            failed[name] = Timing(name, None, note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
    # Rounds interleave the variants, so that clock and thermal drift over the run do
    # not favour whichever is timed first; each variant's figure is its median round.
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, (run, _, _) in runs.items():
            rounds[name].append(_time(run, decode))
    for name in ["attngen", *(peer for peer, _ in PEERS)]:
        if name in failed:
            result.timings.append(failed[name])
            continue
        _, how, max_err = runs[name]
        timing = _timing(name, statistics.median(rounds[name]), work, how)
        timing.max_err = max_err
        result.timings.append(timing)
    torch.cuda.empty_cache()
    return result


def _timing(variant: str, us: float, work: Work, note: str = "") -> Timing:
    return Timing(variant, us, work.flops / (us * 1e-6) / 1e12, work.bytes / (us * 1e-6) / 1e9, note)


# ---------------------------------------------------------------------------------------
# Reporting


def format_table(results: Sequence[BenchResult]) -> str:
    """One row per (case, variant): µs, TFLOP/s, GB/s, floor, time/floor, speedup of
    attngen over that variant."""
    head = f"{'case':<34} {'variant':<14} {'µs':>9} {'TFLOP/s':>8} {'GB/s':>8} {'floor µs':>9} {'t/floor':>8} {'attngen ×':>9}  note"
    lines = [head, "-" * len(head)]
    for r in results:
        case = f"{r.spec} {r.shape}"
        speed = r.speedups()
        for t in r.timings:
            if t.us is None:
                lines.append(f"{case:<34} {t.variant:<14} {'—':>9} {'':>8} {'':>8} {'':>9} {'':>8} {'':>9}  {t.note}")
                continue
            x = f"{speed[t.variant]:.2f}" if t.variant in speed else ""
            note = t.note + (f" max|Δ|={t.max_err:.2e}" if t.max_err is not None else "")
            lines.append(f"{case:<34} {t.variant:<14} {t.us:>9.1f} {t.tflops or 0:>8.1f} {t.gbps or 0:>8.0f} "
                         f"{r.floor_us:>9.1f} {t.us / r.floor_us:>8.2f} {x:>9}  {note}")
    if results:
        rates = results[0].rates
        lines.append(f"{rates.gpu}: measured HBM {rates.hbm_gbps:.0f} GB/s, bf16 matmul {rates.matmul_tflops:.0f} "
                     f"TFLOP/s; torch {rates.torch_version}, triton {rates.triton_version}")
    return "\n".join(lines)


def markdown_rows(results: Sequence[BenchResult], command: str) -> str:
    """Rows for BENCHMARKS.md, each with the command that produced it."""
    out = []
    for r in results:
        cells = {t.variant: (f"{t.us:.1f}" if t.us else "n/a") for t in r.timings}
        ratio = r.ratio()
        out.append(f"| {r.spec} | {r.shape} | {cells.get('attngen', 'n/a')} | {r.floor_us:.1f} ({r.floor_kind}) | "
                   f"{ratio:.2f} | {cells.get('torch SDPA', 'n/a')} | {cells.get('FlexAttention', 'n/a')} | "
                   f"{r.rates.gpu}, torch {r.rates.torch_version}, triton {r.rates.triton_version} | `{command}` |"
                   if ratio else f"| {r.spec} | {r.shape} | n/a | | | | | | `{command}` |")
    return "\n".join(out)


def plot(results: Sequence[BenchResult], path: str | Path) -> None:
    """Bar chart of µs per variant per case with the floor marked (needs matplotlib)."""
    plt = pyplot("--plot")
    fig, axes = plt.subplots(1, max(len(results), 1), figsize=(4.5 * max(len(results), 1), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=False):
        ran = [t for t in r.timings if t.us is not None]
        ax.bar([t.variant for t in ran], [t.us for t in ran], color=["tab:green"] + ["tab:gray"] * (len(ran) - 1))
        ax.axhline(r.floor_us, color="tab:red", linestyle="--", label=f"floor ({r.floor_kind})")
        ax.set_title(f"{r.spec}\n{r.shape}", fontsize=9)
        ax.set_ylabel("µs (median)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cases(cases: Sequence[tuple[Spec, Shape]], *, seed: int = 0, progress: bool = True) -> list[BenchResult]:
    """Measure the rates once, then every case."""
    from attngen.progress import Progress

    _need_cuda()
    rates = measure_rates()
    results = []
    with Progress(len(cases), "bench", enabled=progress) as bar:
        for spec, shape in cases:
            bar.begin(f"{spec.name} {shape}")
            results.append(bench_spec(spec, shape, rates, seed=seed))
            bar.step(f"{spec.name} {shape}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attngen.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", choices=[*PRESETS, "all"], default=None,
                        help="named case (repeatable); 'all' runs every preset")
    parser.add_argument("--out", type=Path, default=None, help="write results.json, table.txt, rows.md, plot.png here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.preset or ["all"]
    chosen = list(PRESETS) if "all" in names else names
    try:
        cases = [(parse_spec(PRESETS[n].spec), PRESETS[n].shape) for n in chosen]
        results = run_cases(cases, seed=args.seed)
    except AttngenError as err:
        print(f"attngen bench: {err}", file=sys.stderr)
        return 2
    table = format_table(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python -m attngen.bench " + " ".join(argv if argv is not None else sys.argv[1:])
        (args.out / "results.json").write_text(json.dumps([r.to_json() for r in results], indent=2, default=str))
        (args.out / "table.txt").write_text(table + "\n")
        (args.out / "rows.md").write_text(markdown_rows(results, command) + "\n")
        try:
            plot(results, args.out / "plot.png")
        except AttngenError as err:
            print(f"attngen bench: {err}", file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
