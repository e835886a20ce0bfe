"""``attngen check SPEC``: property tests of one generated kernel against the reference.

Each case draws a batch (sizes and lengths including 0, 1 and non-multiples of the
tile; chunked prefill where q_len < kv_len; where the mask has constants, such as a
window's width, one case at the lengths where it changes shape, however far: see
:func:`mask_boundaries`), fresh random data (never zeros), user
tensors that fit their declared dims, and a launch config with tiles valid for the
shapes. The output buffer is poisoned with NaN before the launch. O and LSE are compared
with :func:`attngen.reference.sequence_reference` at the tolerances of
:data:`TOLERANCES`, the single table of per-dtype tolerances (tests import it from here).
Tree-family specs (``tree``, ``shared_prefix``) draw random forests instead; their half
lives in :mod:`attngen.check_tree` and reports through the same :class:`CheckReport`.

Under the Triton interpreter (no CUDA) shapes and tiles are small so a case takes about
a second, and **bf16 specs are checked through their fp16 twin** (same spec, dtype fp16):
``tl.dot`` on bf16 is wrong under the interpreter (Triton issue 11584), so a bf16 run
there would test the interpreter, not the kernel. The report says so.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from attngen.errors import AttngenError
from attngen.ir import pow2
from attngen.reference import Reference, sequence_reference, to_numpy
from attngen.spec import DTYPE_BYTES, Spec, torch_dtype


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Accepted error of one dtype: relative ‖out−ref‖/‖ref‖ and max-abs, for O and LSE.
    LSE's max error is taken relative to |LSE| where that exceeds 1 (:func:`compare_lse`):
    an fp32 LSE of 1e7 is only good to about 1."""

    out_rel: float
    out_abs: float
    lse_rel: float
    lse_abs: float


#: The one table of per-dtype tolerances (kernel input/output dtype; fp32 accumulation).
#: fp32 allows TF32 matrix units on GPUs; fp16/bf16 are dominated by rounding P to the
#: input dtype for the P·V product and by the rounding of O itself.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(out_rel=2e-3, out_abs=1e-2, lse_rel=1e-3, lse_abs=1e-2),
    "fp16": Tolerance(out_rel=5e-3, out_abs=2e-2, lse_rel=1e-3, lse_abs=1e-2),
    "bf16": Tolerance(out_rel=2e-2, out_abs=8e-2, lse_rel=2e-3, lse_abs=3e-2),
}



# ---------------------------------------------------------------------------------------
# Error figures


@dataclass(frozen=True, slots=True)
class Errors:
    """Error figures of one output against its reference (NaN-aware)."""

    rel: float
    max_abs: float
    nan: bool
    inf_mismatch: bool = False
    reference_nan: bool = False

    def within(self, rel: float, max_abs: float) -> bool:
        return not self.problems(rel, max_abs)

    def problems(self, rel: float, max_abs: float) -> list[str]:
        """What exceeds the tolerance, in words (empty when within it)."""
        found = ["NaN"] if self.nan else []
        if self.reference_nan:
            found.append("NaN in the float64 reference too: the modified score is not finite "
                         "somewhere a query looks, so the spec has no answer there")
        if self.inf_mismatch:
            found.append("infinities where the reference has none, or the other way round")
        if self.rel > rel:
            found.append(f"rel {self.rel:.2e} > {rel:g}")
        if self.max_abs > max_abs:
            found.append(f"max {self.max_abs:.2e} > {max_abs:g}")
        return found


def compare(out: Any, ref: Any, *, scale_above: float | None = None, skip: Any = None) -> Errors:
    """Relative (‖out−ref‖/‖ref‖) and max-abs error in float64. Entries where the
    reference is -inf (empty rows' LSE) must be -inf in ``out`` too and are left out
    of the figures. With ``scale_above``, the max error of an entry whose |reference|
    exceeds it is taken relative to that |reference|. ``skip`` (bool, broadcast from
    the leading axes) marks rows left out of everything but the NaN test: rows a tie
    leaves undecided (:class:`~attngen.reference.Reference`), whose kernel output must
    still be written."""
    o, r = to_numpy(out), to_numpy(ref)
    if o.shape != r.shape:
        raise ValueError(f"shape {o.shape} != reference shape {r.shape}")
    nan = bool(np.isnan(o).any())
    compared = np.ones(o.shape, dtype=bool)
    if skip is not None:
        rows = to_numpy(skip).astype(bool)
        compared = ~np.broadcast_to(rows.reshape(rows.shape + (1,) * (o.ndim - rows.ndim)), o.shape)
    ref_inf = np.isneginf(r)
    inf_mismatch = bool(((np.isneginf(o) != ref_inf) & compared).any() or np.isposinf(o[compared]).any())
    keep = ~ref_inf & np.isfinite(o) & compared
    diff = np.where(keep, o - np.where(keep, r, 0.0), 0.0)
    norm = float(np.linalg.norm(np.where(keep, r, 0.0)))
    err = float(np.linalg.norm(diff))
    rel = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
    scaled = np.abs(diff)
    if scale_above is not None:
        scaled = scaled / np.maximum(np.abs(np.where(keep, r, 0.0)), scale_above)
    max_abs = float(scaled.max()) if diff.size else 0.0
    return Errors(rel=rel, max_abs=max_abs, nan=nan, inf_mismatch=inf_mismatch,
                  reference_nan=bool(np.isnan(r[compared]).any()))


def compare_lse(lse: Any, ref: Any, *, skip: Any = None) -> Errors:
    """:func:`compare` for log-sum-exps, whose max error counts relative to |LSE| > 1."""
    return compare(lse, ref, scale_above=1.0, skip=skip)


# ---------------------------------------------------------------------------------------
# Cases


class CaseShape(Protocol):
    """What a case ran on, as the report prints it (a sequence batch or a tree batch)."""

    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Shape:
    """One batch: per sequence (q_len, kv_len); decode has q_len 1 for every sequence."""

    lengths: tuple[tuple[int, int], ...]
    decode: bool

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def describe(self) -> str:
        if self.decode:
            return f"B={self.batch} kv_len={[kv for _, kv in self.lengths]}"
        return f"B={self.batch} (q_len,kv_len)={list(self.lengths)}"


def draw_shape(rng: random.Random, *, decode: bool, max_len: int, max_batch: int) -> Shape:
    """Lengths biased to the edges: 0, 1, a tile multiple, one off it, chunked prefill."""
    batch = rng.randint(1, max_batch)
    edges = [0, 1, 15, 16, 17, 31, 33, 63, 64, 65]
    lengths = []
    for _ in range(batch):
        kv = (
            rng.choice([e for e in edges if e <= max_len])
            if rng.random() < 0.4
            else rng.randint(0, max_len)
        )
        if decode:
            lengths.append((1, kv))
            continue
        kind = rng.random()
        q = kv if kind < 0.5 else rng.randint(0, kv) if kind < 0.9 else min(kv, 1)
        lengths.append((q, kv))
    return Shape(tuple(lengths), decode)


#: A K and V tile of at most this many bytes (one stage, head dims padded to powers of
#: two) fits a GPU's shared memory at every stage count drawn here; bigger ones may not
#: (fp32 with head dim 192 and 128 keys takes 272 KiB on an H200, which has 227), and a
#: generated module refuses a config that does not fit with a LaunchError.
SURE_FIT_TILE_BYTES = 64 * 1024


def kv_tile_bytes(spec: Spec, block_n: int) -> int:
    """Bytes of one stage of ``block_n`` keys and values of ``spec``, as the kernel holds them."""
    return block_n * (pow2(spec.head_dim.qk) + pow2(spec.head_dim.v)) * DTYPE_BYTES[spec.dtype]


def drawn_blocks(spec: Spec, *, interpreter: bool) -> list[int]:
    """Tile sizes a check draws: small under the interpreter; on a GPU, those sure to fit
    its shared memory (:data:`SURE_FIT_TILE_BYTES`)."""
    if interpreter:
        return [16, 32]
    return [32] + [b for b in (64, 128) if kv_tile_bytes(spec, b) <= SURE_FIT_TILE_BYTES]


def draw_config(
    rng: random.Random, spec: Spec, shape: Shape, *, interpreter: bool
) -> dict[str, int]:
    """A launch config with tiles valid for the head dims (:func:`drawn_blocks`)."""
    blocks = drawn_blocks(spec, interpreter=interpreter)
    config = {
        "block_n": rng.choice(blocks),
        "num_warps": 4,
        "num_stages": 1 if interpreter else rng.choice((2, 3)),
    }
    if shape.decode:
        config["num_splits"] = rng.choice((1, 2, 3))
    else:
        config["block_m"] = rng.choice(blocks)
    return config


def user_tensor(spec: Spec, name: str, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Random values for one declared tensor of a sequence batch (see :func:`tensor_values`)."""
    kv_lens = [kv for _, kv in shape.lengths]
    return tensor_values(spec, name, kv_lens, rng)


def tensor_values(
    spec: Spec, name: str, kv_lens: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Random values for one declared tensor, in ranges that make its use meaningful.

    ``kv_lens`` holds one KV length per batch entry (a sequence, or a tree's depth).
    Per-token ints are sorted document ids within each sequence; per-batch ints are
    lengths within the entry; per-head floats are positive (slopes); other floats are
    N(0, 0.5²); other ints lie in [0, 8)."""
    decl = spec.tensors[name]
    sizes = {"head": spec.heads.q, "batch": len(kv_lens), "token": sum(kv_lens)}
    dims = tuple(sizes[d] if isinstance(d, str) else d for d in decl.dims)
    if decl.is_float:
        if decl.dims == ("head",):
            return rng.uniform(0.01, 0.5, size=dims)
        return rng.normal(0.0, 0.5, size=dims)
    if decl.dims == ("token",):
        runs = [np.cumsum(rng.random(n) < 0.15).astype(np.int64) for n in kv_lens]
        return np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)
    if decl.dims == ("batch",):
        return np.array([rng.integers(0, kv + 1) for kv in kv_lens], dtype=np.int64)
    return rng.integers(0, 8, size=dims)


@dataclass
class Inputs:
    """Everything one launch needs, on the device, plus the host copies the reference uses."""

    q: Any
    k: Any
    v: Any
    cu_seqlens_q: Any | None
    cu_seqlens_k: Any
    tensors: dict[str, Any]
    max_seqlen_q: int
    max_seqlen_k: int


def make_inputs(
    spec: Spec, shape: Shape, *, seed: int, device: str, dtype: str | None = None
) -> Inputs:
    """Fresh data for ``shape``: N(0,1) q/k/v in the spec dtype (never zeros), int32
    offsets, user tensors in their declared dtypes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    tdtype = torch_dtype(dtype or spec.dtype)
    total_q = sum(q for q, _ in shape.lengths)
    total_kv = sum(kv for _, kv in shape.lengths)
    n_q = shape.batch if shape.decode else total_q

    def randn(*dims: int) -> Any:
        return torch.randn(*dims, generator=gen, dtype=torch.float32).to(
            device=device, dtype=tdtype
        )

    def offsets(lens: Sequence[int]) -> Any:
        return torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32, device=device)

    tensors = {}
    for name, decl in spec.tensors.items():
        values = torch.from_numpy(np.asarray(user_tensor(spec, name, shape, rng)))
        tensors[name] = values.to(
            device=device, dtype=torch_dtype(decl.dtype)
        )
    return Inputs(
        q=randn(n_q, spec.heads.q, spec.head_dim.qk),
        k=randn(total_kv, spec.heads.kv, spec.head_dim.qk),
        v=randn(total_kv, spec.heads.kv, spec.head_dim.v),
        cu_seqlens_q=None if shape.decode else offsets([q for q, _ in shape.lengths]),
        cu_seqlens_k=offsets([kv for _, kv in shape.lengths]),
        tensors=tensors,
        max_seqlen_q=max((q for q, _ in shape.lengths), default=0),
        max_seqlen_k=max((kv for _, kv in shape.lengths), default=0),
    )


def launch(
    module: Any, inputs: Inputs, *, out: Any, config: dict[str, int] | None
) -> tuple[Any, Any]:
    """Call a generated module's ``attention`` (prefill or decode form) with LSE."""
    common = {"return_lse": True, "out": out, "config": config, **inputs.tensors}
    if inputs.cu_seqlens_q is None:
        return module.attention(
            inputs.q,
            inputs.k,
            inputs.v,
            inputs.cu_seqlens_k,
            max_seqlen_k=inputs.max_seqlen_k,
            **common,
        )
    return module.attention(
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.cu_seqlens_q,
        inputs.cu_seqlens_k,
        max_seqlen_q=inputs.max_seqlen_q,
        max_seqlen_k=inputs.max_seqlen_k,
        **common,
    )


def poisoned_out(spec: Spec, inputs: Inputs) -> Any:
    """An output buffer full of NaN: any element the kernel forgets to write shows up."""
    import torch

    shape = (inputs.q.shape[0], spec.heads.q, spec.head_dim.v)
    return torch.full(shape, math.nan, dtype=inputs.q.dtype, device=inputs.q.device)


# ---------------------------------------------------------------------------------------
# The check


@dataclass(frozen=True, slots=True)
class CaseResult:
    index: int
    shape: CaseShape
    dtype: str
    config: dict[str, int] | None
    seed: int
    out: Errors | None = None
    lse: Errors | None = None
    seconds: float = 0.0
    error: str | None = None
    passed: bool = False
    #: ptxas crashed compiling the kernel at ``config``; the case ran at the autotuner's
    ptxas_crashed: bool = False
    #: rows (query, head) left out of the figures: a real comparison there was within
    #: float32 rounding of its boundary, so the kernel may rightly decide it either way
    undecided: int = 0

    def line(self) -> str:
        head = f"case {self.index:3d} {self.dtype} {self.shape.describe()} config={self.config}"
        if self.ptxas_crashed:
            head += " stopped in ptxas, so at the autotuner's config"
        if self.error:
            return f"{head}: FAILED: {self.error}"
        assert self.out is not None and self.lse is not None
        tol = TOLERANCES[self.dtype]
        problems = [f"O {p}" for p in self.out.problems(tol.out_rel, tol.out_abs)]
        problems += [f"LSE {p}" for p in self.lse.problems(tol.lse_rel, tol.lse_abs)]
        mark = "ok" if self.passed else f"FAILED ({'; '.join(problems)})" if problems else "FAILED"
        ties = f"; {self.undecided} row(s) on a tie left out" if self.undecided else ""
        return (
            f"{head}: O rel {self.out.rel:.2e} max {self.out.max_abs:.2e}; LSE rel {self.lse.rel:.2e} "
            f"max {self.lse.max_abs:.2e}{ties}; {self.seconds:.2f}s {mark}"
        )


@dataclass
class CheckReport:
    spec_name: str
    device: str
    dtype_checked: str
    seed: int
    notes: list[str] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def failures(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed]

    def summary(self) -> str:
        tol = TOLERANCES[self.dtype_checked]
        lines = [*self.notes, *(c.line() for c in self.cases)]
        crashed = [c.index for c in self.cases if c.ptxas_crashed]
        if crashed:
            lines.append(
                f"note: case(s) {', '.join(map(str, crashed))} stopped in ptxas, NVIDIA's assembler, "
                "which failed on the kernel compiled at the config drawn, so each ran again at the "
                "autotuner's choice, which skips such a config (a launch given that config raises "
                "Triton's PTXASError; a newer ptxas may take it: Triton uses the one "
                "TRITON_PTXAS_PATH names)"
            )
        if any(c.undecided for c in self.cases):
            lines.append(
                "note: a row on a tie is one where a comparison of reals in the mask or the score "
                "modification has its two sides within float32 rounding of each other for some key; "
                "the reference decides it in float64 and a kernel in float32, so either answer is "
                "right there, and such rows are not compared (their output must still be written)"
            )
        verdict = (
            "PASSED" if self.passed else f"FAILED ({len(self.failures)} of {len(self.cases)} cases)"
        )
        lines.append(
            f"{self.spec_name}: {verdict} on {self.device}, {self.dtype_checked}, seed {self.seed} "
            f"(tolerance O rel {tol.out_rel:g} abs {tol.out_abs:g}, LSE rel {tol.lse_rel:g} abs {tol.lse_abs:g})"
        )
        return "\n".join(lines)


#: How a generated module's ``_launch_tile`` names a caller's tile that ptxas failed on
#: (templates/macros.j2; a LaunchError).
PTXAS_REFUSED = "ptxas could not compile config"

#: What one case produces: kernel O and LSE, and the reference.
Outputs = tuple[Any, Any, Reference]


def judge(base: CaseResult, spec: Spec, attempt: Callable[[dict[str, int] | None], Outputs]) -> CaseResult:
    """Run ``attempt(base.config)`` (launch, then reference) and compare at the spec
    dtype's tolerance; every exception is reported as a failed case. Where ptxas fails on
    the kernel at that config (Triton 3.6's ptxas 12.8 crashed on some configs of prefill
    kernels with a mask decided per element; session 52, docs/benchmarks/HISTORY.md), the case runs
    again at the autotuner's choice, and says so: a config that does not compile is no
    wrong answer, and the autotuner, which users call, skips it."""
    result = _judged(base, spec, attempt)
    error = result.error or ""
    if base.config is not None and (error.startswith("PTXASError") or PTXAS_REFUSED in error):
        result = replace(_judged(replace(base, config=None), spec, attempt), config=base.config, ptxas_crashed=True)
    return result


def _judged(base: CaseResult, spec: Spec, attempt: Callable[[dict[str, int] | None], Outputs]) -> CaseResult:
    started = time.perf_counter()
    try:
        got, lse, ref = attempt(base.config)
        o_err, lse_err = compare(got, ref.out, skip=ref.undecided), compare_lse(lse, ref.lse, skip=ref.undecided)
    except Exception as err:  # report, do not stop the run
        return replace(
            base, error=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - started
        )
    tol = TOLERANCES[spec.dtype]
    passed = o_err.within(tol.out_rel, tol.out_abs) and lse_err.within(tol.lse_rel, tol.lse_abs)
    return replace(
        base, out=o_err, lse=lse_err, passed=passed, seconds=time.perf_counter() - started,
        undecided=int(to_numpy(ref.undecided).sum()),
    )


def check_case(
    module: Any,
    spec: Spec,
    shape: Shape,
    *,
    index: int,
    seed: int,
    device: str,
    config: dict[str, int] | None,
) -> CaseResult:
    """Run one sequence case and compare it with :func:`sequence_reference`."""

    def attempt(config: dict[str, int] | None) -> Outputs:
        inputs = make_inputs(spec, shape, seed=seed, device=device)
        out = poisoned_out(spec, inputs)
        got, lse = launch(module, inputs, out=out, config=config)
        if got.data_ptr() != out.data_ptr():
            raise AssertionError("the kernel did not write into the given `out`")
        ref = sequence_reference(
            spec,
            inputs.q,
            inputs.k,
            inputs.v,
            inputs.cu_seqlens_q,
            inputs.cu_seqlens_k,
            inputs.tensors,
        )
        return got, lse, ref

    base = CaseResult(index=index, shape=shape, dtype=spec.dtype, config=config, seed=seed)
    return judge(base, spec, attempt)


def _ensure_interpreter(device: str) -> None:
    if device.startswith("cuda"):
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise AttngenError(
            "checking on the CPU needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported (the attngen CLI does this when there is no GPU)"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def checked_spec(spec: Spec, device: str) -> tuple[Spec, list[str]]:
    """The spec actually run on ``device`` and a note when it differs (bf16 on the CPU)."""
    if spec.dtype == "bf16" and not device.startswith("cuda"):
        note = (
            "note: no GPU, so this bf16 spec is checked through its fp16 twin under the Triton "
            "interpreter (tl.dot on bf16 is wrong there, Triton issue 11584); "
            "run `attngen check` on a GPU to check bf16 itself"
        )
        return spec.model_copy(update={"dtype": "fp16"}), [note]
    return spec, []


class DrawCase(Protocol):
    """One family's case: draw from ``rng`` (in a fixed order, so a seed reproduces it),
    then run and judge case ``index`` of ``module``."""

    def __call__(
        self,
        module: Any,
        spec: Spec,
        rng: random.Random,
        *,
        index: int,
        device: str,
        interpreter: bool,
    ) -> CaseResult: ...


def check_spec(
    spec: Spec,
    *,
    examples: int = 20,
    seed: int | None = None,
    device: str = "cuda",
    progress: Callable[[int, int, CaseResult], None] | None = None,
) -> CheckReport:
    """Property-test ``spec``'s generated kernel against the float64 reference.

    ``device`` "cuda" runs the real kernel; anything else runs it under the Triton
    interpreter with small shapes and tiles. ``progress(done, total, case)`` is called
    after each case. The same ``seed`` reproduces the same cases. Sequence specs draw
    packed batches (:func:`sequence_case`); tree-family specs draw forests
    (:func:`attngen.check_tree.tree_case`).
    """
    _ensure_interpreter(device)
    from attngen import runtime

    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    run_spec, notes = checked_spec(spec, device)
    interpreter = not device.startswith("cuda")
    notes += boundary_notes(spec, examples=examples, interpreter=interpreter)
    module = runtime.load(run_spec)
    draw_case = _case_family(spec)
    rng = random.Random(seed)
    report = CheckReport(spec.name, device, run_spec.dtype, seed, notes=notes)
    for index in range(examples):
        case = draw_case(module, run_spec, rng, index=index, device=device, interpreter=interpreter)
        report.cases.append(case)
        if progress is not None:
            progress(index + 1, examples, case)
    return report


def _case_family(spec: Spec) -> DrawCase:
    if spec.topology.kind == "sequence":
        return sequence_case
    from attngen.check_tree import tree_case  # the tree half imports this module

    return tree_case


def sequence_case(
    module: Any, spec: Spec, rng: random.Random, *, index: int, device: str, interpreter: bool
) -> CaseResult:
    """Case ``index`` of a sequence spec: a fixed edge batch first, then random ones."""
    decode = spec.topology.queries == "decode"
    max_len, max_batch = RANDOM_REACH[interpreter], 3 if interpreter else 6
    shape = (
        _edge_shape(index, decode)
        or (_boundary_shape(spec, rng, interpreter=interpreter) if index == BOUNDARY_CASE else None)
        or draw_shape(rng, decode=decode, max_len=max_len, max_batch=max_batch)
    )
    config = draw_config(rng, spec, shape, interpreter=interpreter)
    return check_case(
        module,
        spec,
        shape,
        index=index,
        seed=rng.randrange(2**31),
        device=device,
        config=config,
    )


#: The case that runs the mask's far boundaries (:func:`mask_boundaries`), after the
#: fixed edges of :func:`_edge_shape`.
BOUNDARY_CASE = 3

#: The longest KV a boundary case runs (the interpreter's cost grows with it), and the
#: lengths past which random draws seldom go: (interpreter, GPU).
BOUNDARY_CAP = {True: 8192, False: 65536}
RANDOM_REACH = {True: 40, False: 700}


def mask_boundaries(spec: Spec) -> list[int]:
    """KV lengths where a spec's mask changes shape: each integer constant of its
    visibility predicate and each sum of two, and one either side (a 4095-token window
    behind 4 sinks: 3..5, 4094..4096 and 4098..4100, where the window's start passes the
    sinks). Random lengths, at most a few hundred tokens, would never reach the far ones."""
    import sympy as sp

    from attngen.ir import full_visibility

    constants = sorted({abs(int(c)) for c in full_visibility(spec).atoms(sp.Integer)} - {0})
    sums = {a + b for i, a in enumerate(constants) for b in constants[i + 1:]}
    return sorted({n + d for n in {*constants, *sums} for d in (-1, 0, 1) if n + d > 0})


def far_boundaries(spec: Spec, *, interpreter: bool) -> list[int]:
    """The mask's boundaries a check runs in case :data:`BOUNDARY_CASE`: those past
    :data:`RANDOM_REACH`, up to :data:`BOUNDARY_CAP`."""
    return _far(mask_boundaries(spec), interpreter)


def _far(boundaries: list[int], interpreter: bool) -> list[int]:
    return [n for n in boundaries if RANDOM_REACH[interpreter] < n <= BOUNDARY_CAP[interpreter]]


def _boundary_shape(spec: Spec, rng: random.Random, *, interpreter: bool) -> Shape | None:
    """One sequence at each far boundary of the mask (a prefill sequence's last few
    queries, so that the case stays cheap); None where there is none."""
    decode = spec.topology.queries == "decode"
    far = far_boundaries(spec, interpreter=interpreter)
    if not far:
        return None
    return Shape(tuple((1 if decode else rng.choice((1, 5, 17)), n) for n in far), decode)


def boundary_notes(spec: Spec, *, examples: int, interpreter: bool) -> list[str]:
    """What a check cannot reach of the mask's boundaries, said in its report."""
    boundaries = mask_boundaries(spec)
    beyond = [n for n in boundaries if n > BOUNDARY_CAP[interpreter]]
    notes = []
    if beyond:
        notes.append(f"note: the mask changes shape at KV lengths {beyond}, past the longest this check "
                     f"runs here ({BOUNDARY_CAP[interpreter]})")
    if examples <= BOUNDARY_CASE and _far(boundaries, interpreter):
        notes.append(f"note: the mask's far boundaries run in case {BOUNDARY_CASE}; "
                     f"--examples {examples} stops before it")
    return notes


def _edge_shape(index: int, decode: bool) -> Shape | None:
    """The first cases are fixed edges: one token; an empty sequence among others;
    chunked prefill with a length one past the tile."""
    fixed = [
        ((1, 1),),
        ((0, 0), (3, 5), (1, 1)) if not decode else ((1, 0), (1, 5), (1, 1)),
        ((7, 17),) if not decode else ((1, 17),),
    ]
    return Shape(fixed[index], decode) if index < len(fixed) else None
