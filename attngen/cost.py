"""The tree-attention cost model, written as sympy formulas.

The formulas describe one launch of the two-stage tree kernel over a plan: stage 1
reads each group's KV chunk once for all its queries and all query heads of a KV head
(GQA), writes one fp32 partial (O and LSE) per (group, query slot, head); stage 2 reads
the partials back and merges them per query. Each is compiled once, on first use
(``sympy.lambdify`` over numpy, and over Python numbers for a few candidates), so
evaluating many candidate plans is a vectorized call.

Symbols (all plain sympy Symbols, positive):

- plan: ``C`` chunk, ``QG`` queries per group, ``G`` groups, ``T`` KV tokens read
  (the sum of group KV lengths), ``RT`` row-tokens (the sum over groups of KV tokens
  times the rows stage 1 runs the group at, see :meth:`HeadLayout.tile_rows`), ``W``
  tokens of the longest group of the Triton stage 1 (every group but the dense ones
  where a machine runs those apart) and ``NW`` its programs per KV head of the groups
  of at least half that (a tall plan runs a group outside the dense kernel as two), ``P``
  partials, ``NQ`` queries, ``L`` launches of the two stages (stage 1 when there are
  groups, the merge unless every query has exactly one partial), ``DG`` dense groups,
  ``FO`` 1 where the plan folds every other group into the dense ones, ``TD``, ``RTD``
  and ``WD`` the dense groups' tokens, row-tokens and longest group;
- heads: ``Hq``, ``Hkv``, ``Dqk``, ``Dv``, ``E`` bytes per element;
- comparison: ``T_branch`` KV tokens read by per-branch decoding (the sum of each
  query's visible tokens), ``T_unique`` unique KV tokens (the floor);
- machine: ``BW`` bytes/s, ``RATE`` FLOP/s, ``LAUNCH`` s per launch, ``SMS`` SM count,
  ``OVH`` fixed seconds per program, ``POVH`` seconds per partial row, ``EFF`` the share
  of an SM's matrix rate a program gets while every SM is busy, ``TOK`` SM seconds per
  KV token of a program besides its matrix work, ``DRAM`` the share of the unique KV's
  DRAM time that tile work does not hide, ``R_wg`` the rows of a warpgroup's matrix
  instruction, ``NARROW`` how many times slower a program of fewer rows runs alone on
  an SM, ``SLOTS`` how many such narrow programs share an SM, ``PBW`` the bytes/s one
  program streams at most, ``PSLOTS`` the programs an SM holds at once, ``DK`` the
  launches a plan with dense groups adds (their own kernel), ``POWER`` how a busy SM's
  clock falls with the busy SMs under the power cap, ``DOVH`` fixed seconds per dense
  program, ``SHARE`` how many times its TILE_TIME a Triton program takes beside the dense
  kernel (:data:`SPLIT`).

The split terms (POWER, SHARE) were fitted to session 55's sweep on the H200
(scripts/explore_spans.py: the dense cases at chunks 256 and 512 and 4-12 spans each),
where every choice came within 1% of the best plan timed but spec_16k_184 mha, whose
chunk-256 plan (2.7% slower) the neighbour margin of the planner keeps out.

The machine constants that are not plain hardware rates were fitted to the tree
kernels' plan sweep on an H200 (scripts/explore_gpu.py tree: the five reference
workloads, MHA 32/32 and GQA 32/8 heads, chunk 512, every QG with at least 16 rows and
spans 512..16384, the best of up to five kernel configs), so that the planner's choices
lose least against the best measured plan; see :class:`Machine`.

>>> layout = HeadLayout(heads_q=32, heads_kv=8, head_dim_qk=128, head_dim_v=128)
>>> int(kv_bytes_of(tokens=1, layout=layout))
4096
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sympy as sp

from attngen.errors import PlanError, plan_int

C, QG, G, T, RT, P, NQ, L, W, NW = sp.symbols("C QG G T RT P NQ L W NW", positive=True)
TD, RTD, WD = sp.symbols("TD RTD WD", nonnegative=True)
Hq, Hkv, Dqk, Dv, E = sp.symbols("Hq Hkv Dqk Dv E", positive=True)
T_branch, T_unique = sp.symbols("T_branch T_unique", positive=True)
BW, RATE, LAUNCH, SMS, OVH, POVH, EFF = sp.symbols("BW RATE LAUNCH SMS OVH POVH EFF", positive=True)
TOK, DRAM, R_wg, NARROW, SLOTS = sp.symbols("TOK DRAM R_wg NARROW SLOTS", positive=True)
PBW, PSLOTS, POWER, DOVH, SHARE = sp.symbols("PBW PSLOTS POWER DOVH SHARE", positive=True)
DG, DK, FO = sp.symbols("DG DK FO", nonnegative=True)

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

#: Bytes of K and V per token over all KV heads.
KV_TOKEN_BYTES = Hkv * (Dqk + Dv) * E
#: Stage 1 KV reads: every group reads its chunk once, for all heads sharing a KV head.
KV_BYTES = T * KV_TOKEN_BYTES
#: Query rows loaded by stage 1: each group loads its filled slots' rows (one partial
#: each), not the empty slots of a group of fewer than QG queries.
Q_BYTES = P * Hq * Dqk * E
#: fp32 partial O and LSE per (partial, head), written by stage 1 and read by the merge.
PARTIAL_BYTES = 2 * P * Hq * (Dv + 1) * 4
#: The output.
OUT_BYTES = NQ * Hq * Dv * E
TOTAL_BYTES = KV_BYTES + Q_BYTES + PARTIAL_BYTES + OUT_BYTES
#: Per-branch (sequence-based) decoding: each query reads its whole root path's KV.
BRANCH_KV_BYTES = T_branch * KV_TOKEN_BYTES
#: Each query's Q row and output once (every head): what any kernel reads and writes
#: besides the KV.
QUERY_BYTES = NQ * Hq * (Dqk + Dv) * E
BRANCH_BYTES = BRANCH_KV_BYTES + QUERY_BYTES
#: The IO floor: each unique KV byte once.
FLOOR_BYTES = T_unique * KV_TOKEN_BYTES
#: The time floor, the one the bench measures against (:mod:`attngen.bench_tree`, at the
#: rates it measures): the unique KV bytes and each query's Q and O once over the
#: bandwidth, or the FLOPs of the visible (query, key) pairs over the matrix rate,
#: whichever takes longer. ``TIME`` has no such bound (see :class:`Machine`), so a report
#: shows the two side by side.
FLOOR_TIME = sp.Max((FLOOR_BYTES + QUERY_BYTES) / BW, 2 * T_branch * Hq * (Dqk + Dv) / RATE)

#: Rows of a full group's program: the query heads of a KV head times the queries of a
#: group. A group with fewer queries runs at a lower tile height (RT counts it so).
ROWS = QG * Hq / Hkv
#: Matrix-unit FLOPs: QK^T and PV over the rows each group's program runs at, per KV head.
FLOPS = 2 * RT * Hkv * (Dqk + Dv)
#: A narrow program (fewer rows than one warpgroup instruction) runs on the older
#: per-warp matrix instructions: alone on an SM it is NARROW times slower than a
#: warpgroup-wide one, but SLOTS of them share an SM without slowing each other (the
#: fit to the sweep: NARROW ~4.1, SLOTS ~5.2; see Machine).
IS_NARROW = sp.StrictLessThan(ROWS, R_wg)
NARROW_SLOWDOWN = sp.Piecewise((NARROW, IS_NARROW), (1, True))
NARROW_SLOTS = sp.Piecewise((SLOTS, IS_NARROW), (1, True))
#: SM seconds of one program while every SM is busy: per KV token a fixed part TOK
#: (softmax, masking, address arithmetic, issuing the tile loads), per row-token the
#: matrix work at EFF of the SM's share of the matrix rate.
ROW_TOKEN_TIME = 2 * (Dqk + Dv) * SMS / (EFF * RATE)
#: 1 where a machine runs the dense groups in a kernel of their own (the Gluon stage 1 on
#: Hopper): their programs are then costed apart (:data:`SPLIT`), and the terms below
#: count the Triton stage 1's groups alone (T_TRITON, RT_TRITON, G_TRITON; W and NW are
#: its longest programs). Where there is no such kernel, every group is a Triton one.
APART = sp.Min(DK, 1)
T_TRITON = T - APART * TD
RT_TRITON = RT - APART * RTD
G_TRITON = G - APART * DG
TILE_TIME = T_TRITON * TOK + RT_TRITON * ROW_TOKEN_TIME
#: All (group, KV head) programs spread over the SMs, each with a fixed cost OVH (query
#: load, pipeline fill, partial store); plus the part of the DRAM time of the unique KV
#: that the tile work does not hide (each tile's first reader waits for it; re-reads of
#: a chunk by its other groups come from L2 and cost only their tile work).
TRITON_WORK = (TILE_TIME + G_TRITON * OVH) * Hkv
SPREAD = TRITON_WORK / SMS + DRAM * FLOOR_BYTES / BW
#: Seconds one program alone on an SM spends per KV token: its matrix work at the SM's
#: share of the matrix rate, a warpgroup's rows at least, NARROW times longer if narrow.
#: (A lower bound: the fit prefers it to a measured lone time, which charged the plans
#: of long programs too much against the sweep.)
LONE_TOKEN_TIME = NARROW_SLOWDOWN * 2 * sp.Max(ROWS, R_wg) * (Dqk + Dv) * SMS / RATE
#: The longest programs (NW per KV head, of about W tokens) run in waves of one per SM
#: (SLOTS per SM if narrow): a plan of few or unequal programs cannot finish before they
#: do, and one just over a wave pays for a second. Counting a tall plan's groups outside
#: the dense kernel as their two row-block programs: spec_4k_92 GQA at QG 48, span 512
#: (112 dense programs and 32 Triton ones) ran 35.9 us against 22.1 for the choice, QG
#: 32 at span 1024 (session 38, docs/benchmarks/HISTORY.md).
WAVES = sp.ceiling(NW * Hkv / (NARROW_SLOTS * SMS)) * (W * LONE_TOKEN_TIME + OVH)
#: The same programs bound by their loads: one program streams its KV head's bytes at
#: most PBW (the loads its ring keeps in flight over the loaded latency), PSLOTS programs
#: share an SM (its shared memory holds that many K/V rings). Stage 1 then lasts at least
#: as long as its longest program, and at least as long as all its programs' streaming
#: spread over every slot (the bound of list scheduling). A plan whose longest programs
#: stream twice the bytes of the rest leaves most SMs idle for its second half
#: (fewshot_4k_x20 GQA: four 1024-token pieces of the prompt per KV head ran 18 us
#: while the 400-token branches finished by 12; session 22, docs/benchmarks/HISTORY.md). Counting
#: every program, not only the longest in waves, lets a plan of many short programs win
#: where it measures faster (tot_d3_w3 GQA at span 512; session 24). A plan of no groups
#: launches no stage 1 (templates/tree.py.j2), so it has no longest program: Min(NW, 1)
#: drops that program's fixed OVH, which the report of an empty plan charged.
PROGRAM_TOKEN_TIME = (Dqk + Dv) * E / PBW
STREAM = sp.Max((W * PROGRAM_TOKEN_TIME + OVH) * sp.Min(NW, 1), Hkv * (T_TRITON * PROGRAM_TOKEN_TIME + G_TRITON * OVH) / (PSLOTS * SMS))
#: Each partial row (per query head) costs POVH: stage 1's fp32 store of it and the
#: merge kernel's load (the merge alone, profiled: ~0.1 ns per row; the fit charges more).
MERGE = P * Hq * POVH
#: The dense groups, where a machine runs them in a kernel of their own (the Gluon stage
#: 1 on Hopper, beside the Triton one on a second stream), cost one more launch and the
#: streams' fork and join. Without it the model preferred plans of dense groups that
#: measured slower: tot_d3_w4 GQA at QG 32 (a 1000-token prompt in two 128-row dense
#: groups) ran 50.3 us against 33.6 at QG 16 (session 25, docs/benchmarks/HISTORY.md). A single
#: launch (L = 1: no merge) keeps every group in it. A plan that folds the other groups
#: into the dense ones (``group_fold``) launches the dense kernel alone. The choice of QG
#: and span does not know folds (FO = 0: counting them there changed no reference choice
#: and cost planning 0.18 ms, session 37); a built plan's report does. A plan whose
#: groups are all dense launches no Triton stage 1 (its grid is empty), one launch fewer
#: than counted here. Counting that (a factor Min(G - DG, 1)) moved spec_4k_92 GQA and
#: spec_16k_184 GQA to plans that measured 42% and 19% slower (23.0 -> 32.6 us, 92.8 ->
#: 110.8; session 52, docs/benchmarks/HISTORY.md): a candidate's DG is an upper bound, so candidates
#: whose groups are not all dense were credited with the launch they still make.
LAUNCHES = L + DK * sp.Min(DG, 1) * (L - 1) * (1 - FO)
#: The dense kernel's programs (one per dense group and KV head) each take a whole SM:
#: its shared memory and registers leave no room for a Triton program beside it (session
#: 32), so the Triton stage 1 gets the SMs they leave free, then every SM once they end.
DENSE_PROGRAMS = DG * Hkv
#: One dense program's time: its longest group's tokens (WD) at its rows' matrix work
#: (RTD / TD, the dense groups' mean tile rows) at one SM's share of the matrix rate,
#: times the clock the board runs at with that many SMs busy. The H200 runs at its power
#: cap here, so fewer busy SMs clock higher: the same dense work took 65.8 / 70.3 / 76.3 /
#: 83.4 / 99.0 us on 128 / 112 / 96 / 80 / 64 programs, about (busy / SMS)^POWER per
#: token with POWER ~0.4, where a fixed clock would give 65.8 / 75 / 88 / 105 / 132
#: (session 54, docs/benchmarks/HISTORY.md).
DENSE_TOKEN_TIME = 2 * RTD / sp.Max(TD, 1) * (Dqk + Dv) * SMS / RATE
DENSE_TIME = WD * DENSE_TOKEN_TIME * (sp.Min(DENSE_PROGRAMS, SMS) / SMS) ** POWER + DOVH
#: The Triton stage's longest program, alone on an SM: bound by its matrix work or its
#: streaming. Where its longest programs outnumber the slots of the SMs the dense
#: programs leave free, some wait for a dense program to end (WAITS 1): spec_4k_92 GQA's
#: prefix in 120 dense programs (span 768) left 12 SMs to 24 tree-chunk programs of 128
#: rows and ran 28.5-35.8 us, against 22.9 in 96 (span 1024; session 55).
LONGEST_TRITON = (W * sp.Max(LONE_TOKEN_TIME, PROGRAM_TOKEN_TIME) + OVH) * sp.Min(NW, 1)
WAITS = sp.Min(sp.ceiling(sp.Max(NW * Hkv - sp.Max(SMS - DENSE_PROGRAMS, 0) * NARROW_SLOTS, 0)), 1)
LATE = sp.Max(DENSE_TIME, LONGEST_TRITON) + WAITS * sp.Min(DENSE_TIME, LONGEST_TRITON)
#: Stage 1 of a plan with dense groups run apart: at least the dense programs' waves, at
#: least LATE, and at least their SM time plus the Triton work (SHARE times TILE_TIME's)
#: over every SM (the bound of list scheduling). So cutting a long prompt into fewer,
#: longer dense pieces pays where it leaves SMs to the rest from the start:
#: fewshot_32k_x64 GQA's prompt in 6 pieces (96 programs) ran 85.6 us against 94.1 in 8
#: (128 programs; session 54). (The dense kernel's loads are in its measured clock;
#: SPREAD's DRAM part is not added.) Zero without dense groups.
SPLIT = (APART * sp.Min(DG, 1)) * sp.Max(
    sp.ceiling(DENSE_PROGRAMS / SMS) * DENSE_TIME, LATE, (DENSE_PROGRAMS * DENSE_TIME + SHARE * TRITON_WORK) / SMS,
    evaluate=False,
)
#: Stage 1 is bound by the busy SMs or by its longest programs; the merge follows it.
#: (``evaluate=False`` on the two large maxima: sympy's evaluation compares their
#: arguments pairwise, 0.3 s of every import, to drop none; it only flattened STREAM's
#: own Max into this one. The plans and their predicted times are bitwise the same.)
TIME = sp.Max(SPREAD, WAVES, STREAM, SPLIT, evaluate=False) + MERGE + LAUNCHES * LAUNCH

#: The symbols a plan gives (:class:`PlanStats`), then the head layout's and the machine's.
_PLAN_ARGS = (C, QG, G, T, RT, W, NW, P, NQ, L, T_branch, T_unique, DG, FO, TD, RTD, WD)
_CONSTANT_ARGS = (
    Hq, Hkv, Dqk, Dv, E, BW, RATE, LAUNCH, SMS, OVH, POVH, EFF, TOK, DRAM, R_wg, NARROW, SLOTS, PBW, PSLOTS, DK, POWER, DOVH, SHARE
)
_ARGS = _PLAN_ARGS + _CONSTANT_ARGS
_PLAN_SYMBOLS = frozenset(_PLAN_ARGS)


def _select(conditions: list, choices: list, default: float = np.nan) -> np.ndarray:
    """``numpy.select`` for lambdified Piecewise, whose last condition is ``True``: nested
    ``where`` from the last choice back (numpy.select broadcasts and stacks every choice
    first, which costs more than the rest of a plan's time formula)."""
    if conditions[-1] is not True:
        return np.select(conditions, choices, default)
    out = choices[-1]
    for condition, choice in zip(conditions[-2::-1], choices[-2::-1], strict=True):
        out = np.where(condition, choice, out)
    return np.asarray(out)


def _hoisted(expr: sp.Expr) -> tuple[sp.Expr, list[sp.Expr]]:
    """``expr`` with each largest sum or product of constants (symbols of the head layout
    and the machine only) replaced by a symbol ``k<i>``, and those constants' expressions
    in order. Evaluated once per layout and machine, they leave the vectorized formula a
    few array operations, where the constants' arithmetic took one per candidate array
    each (``time_s`` at 36 candidates: 36 -> 24 us)."""
    constants: dict[sp.Expr, sp.Symbol] = {}

    def constant(e: sp.Expr) -> sp.Expr:
        if e.is_Number:
            return e
        return constants.setdefault(e, sp.Symbol(f"k{len(constants)}"))

    def walk(e: sp.Basic) -> sp.Basic:
        if not e.free_symbols & _PLAN_SYMBOLS:
            return constant(e) if isinstance(e, sp.Expr) else e
        if not e.args:
            return e
        if isinstance(e, (sp.Add, sp.Mul)):
            fixed = [a for a in e.args if not a.free_symbols & _PLAN_SYMBOLS]
            varying = [walk(a) for a in e.args if a.free_symbols & _PLAN_SYMBOLS]
            return e.func(*([constant(e.func(*fixed))] if fixed else []), *varying)
        if isinstance(e, (sp.Max, sp.Min)):  # as built: evaluating them again costs 0.4 s
            return e.func(*(walk(a) for a in e.args), evaluate=False)
        return e.func(*(walk(a) for a in e.args))

    return walk(expr), list(constants)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One formula over numpy: ``formula`` of the plan's values, then of the values of
    ``constants`` (a function of the layout's and machine's); ``scalar`` the same on
    Python numbers, for a few candidates (:data:`SCALAR_UP_TO`)."""

    formula: Callable[..., np.ndarray]
    scalar: Callable[..., float]
    constants: Callable[..., list[float]]


def _compile(expr: sp.Expr) -> _Compiled:
    hoisted, constants = _hoisted(expr)
    names = [sp.Symbol(f"k{i}") for i in range(len(constants))]
    return _Compiled(
        sp.lambdify((*_PLAN_ARGS, *names), hoisted, modules=[{"select": _select}, "numpy"], cse=True),
        sp.lambdify((*_PLAN_ARGS, *names), hoisted, modules="math", cse=True),
        sp.lambdify(_CONSTANT_ARGS, constants, modules="math"),
    )


_FORMULAS: dict[str, sp.Expr] = {
    "kv_bytes": KV_BYTES,
    "partial_bytes": PARTIAL_BYTES,
    "total_bytes": TOTAL_BYTES,
    "flops": FLOPS,
    "time_s": TIME,
    "launches": LAUNCHES,
    "branch_bytes": BRANCH_BYTES,
    "branch_kv_bytes": BRANCH_KV_BYTES,
    "floor_bytes": FLOOR_BYTES,
    "floor_s": FLOOR_TIME,
}


@functools.cache
def _compiled(name: str) -> _Compiled:
    """Formula ``name``, compiled on first use: importing this module compiles nothing (a
    command that plans nothing pays nothing), and a planner compiles ``time_s`` alone."""
    return _compile(_FORMULAS[name])


@functools.cache
def _all_scalar() -> Callable[..., list[float]]:
    """Every formula at once on python scalars (one concrete plan): plain arithmetic, with
    Piecewise as conditional expressions, in a fraction of the numpy calls' time."""
    return sp.lambdify(_ARGS, list(_FORMULAS.values()), modules="math")


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
        limit = min(self.max_rows, BLOCK_ROWS)
        choices, qg = [], 1
        while qg == 1 or qg * self.group <= limit:
            choices.append(qg)
            qg *= 2
        tall = TALL_ROWS // self.group
        if BLOCK_ROWS < tall * self.group <= self.max_rows:
            choices.append(tall)
        return tuple(choices)


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


def _constant_values(layout: HeadLayout, machine: Machine) -> tuple[object, ...]:
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


#: Up to this many candidates, :func:`evaluate` takes them one by one in plain arithmetic:
#: each numpy call costs about half a microsecond whatever its size, and ``time_s`` makes
#: ~85 of them, while one candidate in Python costs ~2.7 us (the span choice's three QG
#: trials: 61 -> ~15 us, one core of the development machine).
SCALAR_UP_TO = 8


def evaluate(name: str, stats: PlanStats, layout: HeadLayout, machine: Machine) -> np.ndarray:
    """One compiled formula (``time_s``, ``total_bytes``, ...) at ``stats``, an array of
    the candidates' broadcast shape."""
    compiled, values, constants = _compiled(name), _plan_values(stats), _constants(name, layout, machine)
    arrays = [v for v in values if isinstance(v, np.ndarray)]
    shape = np.broadcast(*arrays).shape if arrays else ()
    if math.prod(shape) > SCALAR_UP_TO:
        return np.asarray(compiled.formula(*values, *constants), dtype=np.float64)
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
    values = _all_scalar()(*_plan_values(stats), *_constant_values(layout, machine))
    value = {name: float(v) for name, v in zip(_FORMULAS, values, strict=True)}
    launches = int(value.pop("launches"))
    return PlanCost(launches=launches, **value)


def kv_bytes_of(tokens: int, layout: HeadLayout) -> float:
    """Bytes of K and V for ``tokens`` tokens (all KV heads)."""
    per = KV_TOKEN_BYTES.subs(
        {
            Hkv: layout.heads_kv,
            Dqk: layout.head_dim_qk,
            Dv: layout.head_dim_v,
            E: layout.dtype_bytes,
        }
    )
    return float(per) * tokens
