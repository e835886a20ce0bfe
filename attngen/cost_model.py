"""The tree-attention cost model, written as sympy formulas.

The formulas describe one launch of the two-stage tree kernel over a plan: stage 1
reads each group's KV chunk once for all its queries and all query heads of a KV head
(GQA), writes one fp32 partial (O and LSE) per (group, query slot, head); stage 2 reads
the partials back and merges them per query.

The planner does not import sympy. ``python -m attngen.cost_model`` prints every formula
as plain Python into :mod:`attngen.cost_formulas` (over numpy arrays, so that evaluating
many candidate plans is one vectorized call; over Python numbers, for a few; and the
products of the layout's and the machine's constants apart, evaluated once per layout
and machine), which :mod:`attngen.cost` evaluates; ``--check`` (and a test) fails while
that file differs from what these formulas print. Compiling ``time_s`` with sympy took
0.25 s of a process's first plan.

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

>>> int(KV_TOKEN_BYTES.subs({Hkv: 8, Dqk: 128, Dv: 128, E: 2}))  # bytes of one token's K and V
4096
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import sympy as sp
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.pycode import PythonCodePrinter

from attngen.render import write_atomic

C, QG, G, T, RT, P, NQ, L, W, NW = sp.symbols("C QG G T RT P NQ L W NW", positive=True)
TD, RTD, WD = sp.symbols("TD RTD WD", nonnegative=True)
Hq, Hkv, Dqk, Dv, E = sp.symbols("Hq Hkv Dqk Dv E", positive=True)
T_branch, T_unique = sp.symbols("T_branch T_unique", positive=True)
BW, RATE, LAUNCH, SMS, OVH, POVH, EFF = sp.symbols("BW RATE LAUNCH SMS OVH POVH EFF", positive=True)
TOK, DRAM, R_wg, NARROW, SLOTS = sp.symbols("TOK DRAM R_wg NARROW SLOTS", positive=True)
PBW, PSLOTS, POWER, DOVH, SHARE = sp.symbols("PBW PSLOTS POWER DOVH SHARE", positive=True)
DG, DK, FO = sp.symbols("DG DK FO", nonnegative=True)

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


class _VectorPrinter(NumPyPrinter):
    """numpy, with every name qualified (the generated module imports numpy alone), Min
    and Max as nested two-argument calls, and Piecewise (whose last condition is
    ``True``) as nested ``numpy.where``: numpy.select broadcasts and stacks every choice
    first, which costs more than the rest of the time formula."""

    def _print_Min(self, expr: sp.Min) -> str:
        return self._fold("numpy.minimum", expr.args)

    def _print_Max(self, expr: sp.Max) -> str:
        return self._fold("numpy.maximum", expr.args)

    def _fold(self, function: str, args: tuple[sp.Basic, ...]) -> str:
        out = self._print(args[0])
        for arg in args[1:]:
            out = f"{function}({out}, {self._print(arg)})"
        return out

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        *pieces, (last, otherwise) = expr.args
        if otherwise is not sp.true:
            raise TypeError(f"a Piecewise without a final True condition: {expr}")
        out = self._print(last)
        for value, condition in reversed(pieces):
            out = f"numpy.where({self._print(condition)}, {self._print(value)}, {out})"
        return out


_SETTINGS = {"fully_qualified_modules": True, "inline": True, "allow_unknown_functions": False}


def _function(name: str, doc: str, args: tuple[sp.Symbol, ...], expr: object, scalar: bool, cse: bool) -> str:
    """The source of ``def name(*args)`` returning ``expr``, as lambdify prints it."""
    printer = PythonCodePrinter(_SETTINGS) if scalar else _VectorPrinter(_SETTINGS)
    source = inspect.getsource(sp.lambdify(args, expr, printer=printer, cse=cse))
    head, body = source.split("\n", 1)
    if not head.startswith("def _lambdifygenerated("):
        raise RuntimeError(f"unexpected lambdify output for {name}: {head}")
    return f'def {name}({head.split("(", 1)[1]}\n    """{doc}"""\n{body.rstrip()}\n'


def render() -> str:
    """The text of :mod:`attngen.cost_formulas`: for each formula ``name``, ``name`` over
    numpy, ``name_scalar`` over Python numbers (both of the plan's values, then of
    ``k0, k1, ...``) and ``name_constants`` (those ``k`` of the layout's and machine's
    values); then ``every_formula``, all of them at once on Python numbers."""
    parts = []
    printer = PythonCodePrinter(_SETTINGS)
    for name, expr in _FORMULAS.items():
        hoisted, constants = _hoisted(expr)
        args = (*_PLAN_ARGS, *(sp.Symbol(f"k{i}") for i in range(len(constants))))
        parts.append(_function(name, f"{name} of candidate plans (numpy arrays broadcast together).", args,
                               hoisted, scalar=False, cse=True))
        parts.append(_function(f"{name}_scalar", f"{name} of one plan (Python numbers).", args, hoisted,
                               scalar=True, cse=True))
        lines = "".join(f"        {printer.doprint(c)},  # k{i}\n" for i, c in enumerate(constants))
        parts.append(f"def {name}_constants({', '.join(map(str, _CONSTANT_ARGS))}):\n"
                     f'    """The constants k of {name} for one head layout and machine."""\n'
                     f"    return [\n{lines}    ]\n")
    parts.append(_function("every_formula", "Every formula of NAMES, in order, of one plan (Python numbers).", _ARGS,
                           list(_FORMULAS.values()), scalar=True, cse=False))
    body = "\n\n".join(parts)
    # the modules the printed functions name (a printer qualifies every name it takes from one)
    imports = "\n".join(f"import {m}\n" for m in ("math", "numpy") if f"{m}." in body)
    return f"{_HEADER}\n{PRINTED_BY.format(sp.__version__)}\n\n{imports}\n#: The formulas, in the order every_formula returns them.\nNAMES = {tuple(_FORMULAS)!r}\n\n\n{body}"


_HEADER = """\
\"\"\"The formulas of attngen.cost_model as plain Python, for the planner (which then needs
no sympy). Generated by ``python -m attngen.cost_model``, which rewrites this file from
the formulas; do not edit it by hand. Arguments: the plan's symbols, then the constants
``k0, k1, ...`` that ``<name>_constants`` computes from the head layout's and the
machine's symbols (see attngen.cost_model for what each symbol means).
\"\"\"
"""

#: The header line that names the sympy whose printers wrote the file: another sympy may
#: print the same formulas in another order (tests/test_cost.py compares the text only
#: under the same sympy, and the values under any).
PRINTED_BY = "#: Printed by sympy {}."


PATH = Path(__file__).with_name("cost_formulas.py")


def main(argv: list[str] | None = None) -> int:
    """Write :mod:`attngen.cost_formulas` from the formulas (only if it changed), or with
    ``--check`` write nothing and exit 1 if it is stale."""
    parser = argparse.ArgumentParser(prog="python -m attngen.cost_model", description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale; write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PATH.read_text(encoding="utf-8") if PATH.is_file() else None
        if current != text:
            print(f"{PATH} is stale: run python -m attngen.cost_model", file=sys.stderr)
            return 1
        return 0
    changed = write_atomic(PATH, text)
    print(f"{PATH}: {'written' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
