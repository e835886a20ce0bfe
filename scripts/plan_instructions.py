"""Instructions per plan, counted by valgrind's callgrind: the planner's cost without the
noise of a shared machine's clock.

Wall-clock planning times on a shared development machine moved by up to 2x from one
minute to the next in session 62 (the same code, 1.0-1.6 ms at given parameters), which
hides any change under ~10%. The instructions a plan executes do not move: two runs of the
same code from one shell counted the same number, to the instruction (another shell's
environment variables moved it by 0.05%). So a planner change is measured
here as instructions per plan, before and after; what a plan takes in time still has to
be timed, on a quiet machine.

callgrind counts only the plans: they run inside a call to libc's ``qsort`` (through
ctypes, as the comparison callback of a two-element sort), and callgrind collects only
within ``qsort`` (``--toggle-collect``), which planning itself never calls; the way
to mark a region of a Python program for callgrind without a C extension. Each plan is of a
tree built afresh beforehand (outside the count), after one plan to warm up; the string
hash is fixed, address randomization and the cyclic garbage collector off, so that two
runs do the same work. Cases: ``target`` (issue 3's 256-node planning tree, the cost
model's choice), ``target-fixed`` (at chunk 128, QG 8, span 1024), ``target-chosen`` (at
the parameters the choice picks, without choosing: what the plan itself costs), ``target-step`` (a token
appended to each leaf, then the incremental replan), ``one-node`` and ``one-node-fixed``
(``target`` and ``target-fixed`` on a tree of one 100-token node with one query: the part of
a plan that does not grow with the tree), ``target-chunk-stage`` and ``one-node-chunk-stage``
(the choice's first stage alone: every chunk size and QG compared on counts),
``target-span-stage`` (its second stage alone, at the first stage's chunking: the pairs,
which the plan then uses, and the QG and span compared on the exact groups), and
``WORKLOAD/mha`` or ``WORKLOAD/gqa`` (the choice on a named workload). Needs valgrind; a case takes about a
minute::

    python scripts/plan_instructions.py target target-fixed spec_8k_248/gqa
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

#: The named cases (the module docstring says what each counts); besides them, WORKLOAD/LAYOUT.
CASES = ("target", "target-fixed", "target-chosen", "target-step", "one-node", "one-node-fixed",
         "target-chunk-stage", "one-node-chunk-stage", "target-span-stage")


def _case(name: str) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """(a maker of fresh trees, the planning call) of case ``name``: one of :data:`CASES`
    or WORKLOAD/LAYOUT."""
    from attngen.bench_tree import LAYOUTS
    from attngen.cost import DEFAULT_HEADS, HeadLayout, Machine
    from attngen.plan import plan_tree, replan_after_append
    from attngen.plan.choice import _choose_qg_span, _chunk_candidates
    from attngen.tree import TreeBatch
    from attngen.workloads import WORKLOADS, planning_target_tree

    def fixed(t: TreeBatch) -> Any:  # item 5's test's given parameters
        return plan_tree(t, chunk=128, queries_per_group=8, span=1024)

    tree = planning_target_tree()
    one = TreeBatch.from_parents([-1], [100], [0])  # what a plan costs whatever its tree
    if name == "target":
        return lambda: replace(tree), plan_tree
    if name == "target-fixed":
        return lambda: replace(tree), fixed
    if name == "target-chosen":  # the plan the choice makes, at its parameters, without the choice
        chosen = plan_tree(tree)
        return lambda: replace(tree), lambda t: plan_tree(t, chunk=chosen.chunk, queries_per_group=chosen.queries_per_group,
                                                          span=chosen.span)
    if name == "target-step":
        plan = fixed(tree)
        return lambda: tree.append_to_leaves(1), lambda t: replan_after_append(plan, t)
    if name == "one-node":
        return lambda: replace(one), plan_tree
    if name == "one-node-fixed":
        return lambda: replace(one), fixed
    machine = Machine()
    if name in ("target-chunk-stage", "one-node-chunk-stage"):
        source = tree if name.startswith("target") else one
        return lambda: replace(source), lambda t: _chunk_candidates(t, None, None, DEFAULT_HEADS, machine, True)
    if name == "target-span-stage":
        layout, qg = _chunk_candidates(tree, None, None, DEFAULT_HEADS, machine, True)[0]
        return lambda: replace(tree), lambda t: _choose_qg_span(t, layout, qg, False, None, DEFAULT_HEADS, machine)
    workload, _, layout = name.partition("/")
    if workload not in WORKLOADS or layout not in LAYOUTS:
        raise SystemExit(f"unknown case {name!r}: {', '.join(CASES)} or WORKLOAD/LAYOUT "
                         f"(workloads: {', '.join(WORKLOADS)}; layouts: {', '.join(LAYOUTS)})")
    heads_q, heads_kv = LAYOUTS[layout]
    heads = HeadLayout(heads_q=heads_q, heads_kv=heads_kv)
    wl = WORKLOADS[workload]().tree
    return lambda: replace(wl), lambda t: plan_tree(t, heads=heads)


def _child(name: str, plans: int) -> None:
    fresh, plan = _case(name)
    plan(fresh())  # the first plan's one-time costs, not counted
    trees = [fresh() for _ in range(plans)]
    gc.collect()
    gc.disable()  # it runs at points that depend on every allocation before

    def counted(a: int, b: int) -> int:  # the comparison callback: every plan, once
        for tree in trees:
            plan(tree)
        return 0

    pair = (ctypes.c_int * 2)(0, 1)
    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(counted)
    ctypes.CDLL(None).qsort(pair, 2, ctypes.sizeof(ctypes.c_int), callback)


def _count(name: str, plans: int) -> int:
    """Instructions of ``plans`` plans of case ``name``."""
    cmd = ["setarch", "-R", "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
           "--collect-atstart=no", "--toggle-collect=*qsort*", sys.executable, __file__, "--child", name, str(plans)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode or not found:
        raise SystemExit(f"{name}: callgrind run failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", default=["target", "target-fixed", "target-step"])
    parser.add_argument("--plans", type=int, default=20, help="plans counted (default 20)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "PLANS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return
    for i, name in enumerate(args.cases, 1):
        _case(name)  # a bad name fails here, not after a minute under valgrind
        print(f"[{i}/{len(args.cases)}] {name}: under callgrind ...", file=sys.stderr, flush=True)
        total = _count(name, args.plans)
        print(f"{name}: {total / args.plans / 1e6:.3f} M instructions per plan ({total:,} in {args.plans})",
              flush=True)


if __name__ == "__main__":
    main()
