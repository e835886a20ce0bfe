"""The tree-attention cost model at run time: the head layout and the machine a plan is
costed for, a plan's quantities (:class:`PlanStats`), and the formulas evaluated at them.

The formulas and what each symbol means are in :mod:`attngen.cost_model`, written in
sympy; the planner evaluates them as the plain Python that ``python -m
attngen.cost_model`` prints into :mod:`attngen.cost_formulas`, so planning imports no
sympy and compiles nothing.

>>> from attngen.cost import HeadLayout, PlanStats, plan_cost
>>> stats = PlanStats(chunk=512, queries_per_group=16, groups=1, tokens_read=512, row_tokens=512 * 64,
...                   longest=512, n_longest=1, partials=16, queries=16, launches=2, branch_tokens=16 * 512,
...                   unique_tokens=512)
>>> cost = plan_cost(stats, HeadLayout(heads_q=32, heads_kv=8))
>>> int(cost.kv_bytes), round(cost.io_saved, 2)  # one read of the 512 tokens' K and V
(2097152, 0.91)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from attngen import cost_formulas
from attngen.errors import PlanError, plan_int

#: Tile heights below a plan's full one that stage 1 runs a group at when its filled
#: slots fit (the per-warp matrix instructions' 16 rows, one warpgroup instruction's 64).
ROW_TIERS = (16, 64)
#: The tallest tile of one stage-1 program: two 64-row warpgroup halves. A plan whose
#: groups have more rows (up to :data:`TALL_ROWS`) runs each group's rows as row blocks
#: of this height in Triton, and its dense groups as one tile of three warpgroups.
BLOCK_ROWS = 128
#: The rows of a tall plan's tile: three 64-row warpgroups share each K/V tile. A plan
#: of more rows than :data:`BLOCK_ROWS` gets this height (one non-power-of-two QG per
#: head layout, :meth:`HeadLayout.queries_per_group_choices`): 184 speculative tokens
#: then fill 96% of one tile instead of 72% of two (session 19, docs/benchmarks/HISTORY.md).
TALL_ROWS = 192
#: A full group (every slot sees its whole KV range) whose filled rows (slots x query
#: heads per KV head) fall in ``(DENSE_ROWS[0], DENSE_ROWS[1]]`` is *dense*: pure matrix
#: work filling at least two 64-row warpgroups, no visibility bits. The planner lists
#: dense groups first, and on Hopper a generated module runs them in its Gluon stage-1
#: kernel (one warpgroup per 64 rows). Counting groups from 17 rows up as dense was
#: slower on 4 of the 10 reference cases with one warpgroup idle (session 15), and
#: slower still with the two warpgroups taking alternate KV tiles (session 17; see
#: docs/benchmarks/HISTORY.md).
DENSE_ROWS = (ROW_TIERS[-1], TALL_ROWS)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One formula over numpy: ``formula`` of the plan's values, then of the values of
    ``constants`` (a function of the layout's and machine's); ``scalar`` the same on
    Python numbers, for a few candidates (:data:`SCALAR_UP_TO`)."""

    formula: Callable[..., np.ndarray]
    scalar: Callable[..., float]
    constants: Callable[..., list[float]]


@functools.cache
def _compiled(name: str) -> _Compiled:
    """Formula ``name`` (one of ``cost_formulas.NAMES``) as :mod:`attngen.cost_formulas` holds it."""
    if name not in cost_formulas.NAMES:
        raise KeyError(f"no cost formula {name!r}; allowed: {', '.join(cost_formulas.NAMES)}")
    return _Compiled(
        getattr(cost_formulas, name), getattr(cost_formulas, f"{name}_scalar"), getattr(cost_formulas, f"{name}_constants")
    )


@functools.cache
def _tile_rows_table(group: int) -> np.ndarray:
    """:meth:`HeadLayout.tile_rows` of every ``[qg, filled]`` up to :data:`TALL_ROWS` (no
    QG choice exceeds it), for ``group`` query heads per KV head."""
    qg, filled = np.ogrid[: TALL_ROWS + 1, : TALL_ROWS + 1]
    qg_rows = qg * group
    full = np.maximum(ROW_TIERS[0], 1 << np.ceil(np.log2(np.maximum(qg_rows, 1))).astype(np.int64))
    full = np.where(qg_rows > BLOCK_ROWS, TALL_ROWS, full)
    used = filled * group
    rows = np.broadcast_to(full, (TALL_ROWS + 1, TALL_ROWS + 1))
    for tier in reversed((*ROW_TIERS, BLOCK_ROWS)):
        rows = np.where((used <= tier) & (tier < full), tier, rows)
    rows.flags.writeable = False
    return rows


@functools.cache
def _qg_choices(group: int, max_rows: int) -> tuple[int, ...]:
    """:meth:`HeadLayout.queries_per_group_choices` of a layout's ``group`` and
    ``max_rows`` (the planner asks for them twice a plan)."""
    limit = min(max_rows, BLOCK_ROWS)
    choices, qg = [], 1
    while qg == 1 or qg * group <= limit:
        choices.append(qg)
        qg *= 2
    tall = TALL_ROWS // group
    if BLOCK_ROWS < tall * group <= max_rows:
        choices.append(tall)
    return tuple(choices)


@dataclass(frozen=True, slots=True)
class HeadLayout:
    """Head counts, head dims and element size of the attention a plan serves.

    ``max_rows`` bounds the rows of one group (queries per group x query heads per KV
    head); :data:`TALL_ROWS` at most.
    """

    heads_q: int = 32
    heads_kv: int = 32
    head_dim_qk: int = 128
    head_dim_v: int = 128
    dtype_bytes: int = 2
    max_rows: int = TALL_ROWS

    def __post_init__(self) -> None:
        for name in ("heads_q", "heads_kv", "head_dim_qk", "head_dim_v", "dtype_bytes", "max_rows"):
            if plan_int(getattr(self, name), f"HeadLayout: {name}") < 1:
                raise PlanError(f"HeadLayout: {name} must be at least 1, got {getattr(self, name)}.")
        if self.heads_q % self.heads_kv:
            raise PlanError(
                f"HeadLayout: heads_kv {self.heads_kv} must divide heads_q {self.heads_q} (each KV "
                "head serves the same number of query heads: MHA, GQA or MQA)."
            )

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads_q // self.heads_kv

    def tile_rows(self, filled: np.ndarray, qg: int | np.ndarray) -> np.ndarray:
        """Rows stage 1 runs a group at, from its filled query slots (a prefix of its
        ``qg``): the plan's full height (``max(16, next_pow2(qg * group))``, or
        :data:`TALL_ROWS` above :data:`BLOCK_ROWS`), or the lowest of :data:`ROW_TIERS`
        (and, in a tall plan, :data:`BLOCK_ROWS`) below it that holds the filled rows.
        A lookup: the planner asks this for every candidate plan's groups."""
        return _tile_rows_table(self.group)[qg, filled]

    def queries_per_group_choices(self) -> tuple[int, ...]:
        """The QG a plan may use: powers of two with QG * group <= min(max_rows,
        BLOCK_ROWS) (at least 1), then the tall QG, ``TALL_ROWS // group``, if its rows
        exceed BLOCK_ROWS and fit max_rows."""
        return _qg_choices(self.group, self.max_rows)


#: The layout a plan serves when none is given (Llama-style MHA, 32 heads of 128); one
#: instance, so a decode loop's plan calls do not each build and check one.
DEFAULT_HEADS = HeadLayout()


@dataclass(frozen=True, slots=True)
class Machine:
    """Rates of the target GPU (defaults: measured on an H200, bf16, see BENCHMARKS.md).

    The constants below the hardware rates were fitted to the H200 sweep of the tree
    kernels (scripts/explore_gpu.py tree; see the module docstring), refitted after the
    merge kernel became 3-5x faster (session 6): the planner's choice loses 2.8% on
    average (6.3% at worst, fewshot_32k_x64 GQA) against the best measured plan of the
    ten workload x head layout cases; the previous constants lost 6.4% (15.2%) on the
    same sweep. The fit weighs the choice over absolute time: on the ten reference cases
    the H200 measured 0.90-1.67x the predicted times (session 57), furthest on the
    memory-bound MHA ones (fewshot_4k_x20, tot_d3_w3), whose predictions fall under their
    floor. ``TIME`` has no term of the unique bytes over ``bandwidth``: one ties those
    cases' candidates and changed 11 of the 22 workload cases' choices (session 57).
    """

    bandwidth: float = 4.25e12  # device copy, read + write, measured on an H200
    matmul_rate: float = 6.9e14  # bf16 8192^3 GEMM on random data, same machine
    launch_overhead: float = 3.0e-6
    sms: int = 132
    warpgroup_rows: int = 64  # Hopper's warpgroup matrix instruction computes 64 rows
    # fitted to the H200 sweep, scripts/explore_gpu.py tree
    program_overhead: float = 0.38e-6
    partial_overhead: float = 0.32e-9
    # above 1: a busy SM overlaps a program's matrix work with its loads more than the
    # sum in TILE_TIME says
    matmul_efficiency: float = 1.62
    token_overhead: float = 4.6e-9  # ~0.3 us per 64-token tile besides the matrix work
    dram_exposed: float = 0.22
    narrow_slowdown: float = 4.1
    narrow_programs_per_sm: float = 5.24  # a fitted average: narrow programs' stages share an SM
    # session 22's per-program timeline of stage 1 on the H200 measured 28-37 GB/s per
    # program; like the constants above, the bound is set against the model's other
    # terms (which run low), to the middle of the range that keeps the choices the H200
    # measured best. With the list-scheduling bound (session 24) that range is 44.5-49 GB/s:
    # above it, tot_d3_w3 GQA keeps its 1000-token prompt whole (span 1024: 24.7 us against
    # 23.2 at span 512, same tile, interleaved rounds); below it, spec_4k_92 MHA moves to a
    # slower plan; fewshot_4k_x20 GQA's six prompt pieces (session 22) hold throughout.
    program_bandwidth: float = 47e9
    programs_per_sm: int = 2  # the 64-key tiles' 96 KB K/V ring: two per SM's 227 KB
    # the generated modules run dense groups in the Gluon stage 1 on Hopper (0 where a
    # machine has no such kernel: they then run in stage 1 itself)
    dense_kernel_launches: int = 1
    # a busy SM's clock under the power cap goes as (busy SMs / sms) ** -power_exponent;
    # fitted to the dense kernel alone on 64..128 programs (session 54; see DENSE_TIME)
    power_exponent: float = 0.4
    dense_program_overhead: float = 0.38e-6  # as program_overhead (not fitted apart)
    # above 1: beside the dense kernel the Triton programs take about 3x the SM time that
    # TILE_TIME gives them (session 54: ~3000 SM-us of branch work where it gives ~900);
    # 2.5-3 put every timed choice of session 55's sweep within 1% of the best
    split_triton_share: float = 3.0

    @property
    def dense_apart(self) -> bool:
        """Whether dense groups run in a kernel of their own, apart from the Triton stage 1."""
        return self.dense_kernel_launches > 0


@dataclass(frozen=True, slots=True)
class PlanStats:
    """The plan quantities the formulas need; numpy arrays evaluate many candidates."""

    chunk: int | np.ndarray
    queries_per_group: int | np.ndarray
    groups: int | np.ndarray
    tokens_read: int | np.ndarray
    row_tokens: int | np.ndarray  # sum over groups of tokens x tile_rows
    longest: int | np.ndarray
    n_longest: int | np.ndarray
    partials: int | np.ndarray
    queries: int
    launches: int | np.ndarray
    branch_tokens: int
    unique_tokens: int
    # the formulas ask only whether there are any (their kernel's launch)
    dense_groups: int | np.ndarray = 0
    # 1 where the plan folds every other group into its dense ones (their kernel alone)
    folded: int | np.ndarray = 0
    # the dense groups' tokens, row-tokens and longest group (their kernel's work)
    dense_tokens: int | np.ndarray = 0
    dense_row_tokens: int | np.ndarray = 0
    dense_longest: int | np.ndarray = 0


@dataclass(frozen=True, slots=True)
class PlanCost:
    """Predicted cost of a plan, and per-branch decoding of the same batch."""

    kv_bytes: float
    partial_bytes: float
    total_bytes: float
    flops: float
    launches: int
    time_s: float
    branch_bytes: float
    branch_kv_bytes: float  # the KV part of branch_bytes
    floor_bytes: float
    floor_s: float  # FLOOR_TIME at the machine's rates

    @property
    def io_saved(self) -> float:
        """Fraction of per-branch decoding's bytes this plan does not move; 0 when
        per-branch decoding reads no KV either. A plan saves KV reads: with none to save,
        what is left of the difference (the queries per-branch decoding loads, which an
        empty plan's merge does not) is no saving to report."""
        if not self.branch_kv_bytes:
            return 0.0
        return 1.0 - self.total_bytes / self.branch_bytes

    def summary(self) -> str:
        if self.branch_kv_bytes:
            versus = (
                f"per-branch decoding {self.branch_bytes / 1e6:.2f} MB -> "
                f"{100 * self.io_saved:.1f}% IO saved"
            )
        else:
            versus = (
                f"per-branch decoding reads no KV either ({self.branch_bytes / 1e6:.2f} MB of "
                "queries and outputs): no IO saved"
            )
        return (
            f"predicted {self.total_bytes / 1e6:.2f} MB ({self.kv_bytes / 1e6:.2f} MB KV, "
            f"{self.partial_bytes / 1e6:.2f} MB partials), {self.flops / 1e9:.2f} GFLOP, "
            f"{self.launches} launch(es), {self.time_s * 1e6:.1f} us; {versus}; floor "
            f"{self.floor_bytes / 1e6:.2f} MB, {self.floor_s * 1e6:.1f} us at the model's rates"
            + (" (the prediction is under it: the model ranks plans and has no bandwidth bound)"
               if self.time_s < self.floor_s else "")
        )


def _plan_values(stats: PlanStats) -> tuple[object, ...]:
    return (
        stats.chunk,
        stats.queries_per_group,
        stats.groups,
        stats.tokens_read,
        stats.row_tokens,
        stats.longest,
        stats.n_longest,
        stats.partials,
        stats.queries,
        stats.launches,
        stats.branch_tokens,
        stats.unique_tokens,
        stats.dense_groups,
        stats.folded,
        stats.dense_tokens,
        stats.dense_row_tokens,
        stats.dense_longest,
    )


def _constant_values(layout: HeadLayout, machine: Machine) -> tuple[float, ...]:
    return (
        layout.heads_q,
        layout.heads_kv,
        layout.head_dim_qk,
        layout.head_dim_v,
        layout.dtype_bytes,
        machine.bandwidth,
        machine.matmul_rate,
        machine.launch_overhead,
        machine.sms,
        machine.program_overhead,
        machine.partial_overhead,
        machine.matmul_efficiency,
        machine.token_overhead,
        machine.dram_exposed,
        machine.warpgroup_rows,
        machine.narrow_slowdown,
        machine.narrow_programs_per_sm,
        machine.program_bandwidth,
        machine.programs_per_sm,
        machine.dense_kernel_launches,
        machine.power_exponent,
        machine.dense_program_overhead,
        machine.split_triton_share,
    )


@functools.lru_cache(maxsize=64)
def _constants(name: str, layout: HeadLayout, machine: Machine) -> list[float]:
    """The hoisted constants of formula ``name`` (see :func:`_hoisted`) for one layout and
    machine."""
    return _compiled(name).constants(*_constant_values(layout, machine))


@functools.lru_cache(maxsize=64)
def _array_constants(name: str, layout: HeadLayout, machine: Machine) -> list[np.ndarray]:
    """:func:`_constants` as 0-d arrays, for the formulas' numpy form: numpy takes a 0-d
    array beside an array in about half the time it takes a Python number, which it must
    convert at every operation. Same dtypes as numpy gives the numbers (int64, float64),
    so the same results. Read-only, as every caller shares them."""
    constants = [np.asarray(k) for k in _constants(name, layout, machine)]
    for k in constants:
        k.flags.writeable = False
    return constants


#: Up to this many candidates, :func:`evaluate` takes them one by one in plain arithmetic:
#: each numpy call costs about half a microsecond whatever its size, and ``time_s`` makes
#: ~85 of them, while one candidate in Python costs ~2.7 us (the span choice's three QG
#: trials: 61 -> ~15 us, one core of the development machine).
SCALAR_UP_TO = 8


def evaluate(name: str, stats: PlanStats, layout: HeadLayout, machine: Machine) -> np.ndarray:
    """One compiled formula (``time_s``, ``total_bytes``, ...) at ``stats``, an array of
    the candidates' broadcast shape."""
    compiled, values = _compiled(name), _plan_values(stats)
    arrays = [v for v in values if isinstance(v, np.ndarray)]
    shape = np.broadcast(*arrays).shape if arrays else ()
    if math.prod(shape) > SCALAR_UP_TO:
        return np.asarray(compiled.formula(*values, *_array_constants(name, layout, machine)), dtype=np.float64)
    constants = _constants(name, layout, machine)
    out = [compiled.scalar(*plan, *constants) for plan in zip(*(_column(v, shape) for v in values), strict=True)]
    return np.asarray(out, dtype=np.float64).reshape(shape)


def _column(value: object, shape: tuple[int, ...]) -> list:
    """``value`` broadcast to ``shape``, as a flat list of Python numbers (without
    ``np.broadcast_to`` where it is not needed, which costs as much as the arithmetic)."""
    n = math.prod(shape)
    if not isinstance(value, np.ndarray):
        return [value] * n
    if value.size == n:
        return value.ravel().tolist()
    if value.size == 1:
        return [value.item()] * n
    return np.broadcast_to(value, shape).ravel().tolist()


def plan_cost(stats: PlanStats, layout: HeadLayout, machine: Machine | None = None) -> PlanCost:
    """Every formula at one concrete plan."""
    machine = machine or Machine()
    values = cost_formulas.every_formula(*_plan_values(stats), *_constant_values(layout, machine))
    value = {name: float(v) for name, v in zip(cost_formulas.NAMES, values, strict=True)}
    launches = int(value.pop("launches"))
    return PlanCost(launches=launches, **value)
