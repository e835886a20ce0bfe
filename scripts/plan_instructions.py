"""Instructions per plan, counted by valgrind's callgrind: the planner's cost without the
noise of a shared machine's clock.

Wall-clock planning times on a shared development machine moved by up to 2x from one
minute to the next in session 62 (the same code, 1.0-1.6 ms at given parameters), which
hides any change under ~10%. The instructions a plan executes hardly move: two runs of the
same code agreed to 0.02% (9.268 and 9.266 M on ``target``). So a planner change is
measured here as instructions per plan, before and after; what a plan takes in time still
has to be timed, on a quiet machine.

Each case runs twice under callgrind, with no plans and with ``--plans`` plans (each of a
tree built afresh beforehand, after one plan to warm up), both in parallel; the difference
over ``--plans`` is one plan's instructions, whatever importing torch and numpy costs. The
runs are made alike: address randomization off, a fixed string hash, the cyclic garbage
collector off while planning (it runs at points that depend on every allocation before).
Cases: ``target`` (issue 3's 256-node planning tree, the cost model's choice),
``target-fixed`` (at chunk 128, QG 8, span 1024), ``target-step`` (a token appended to
each leaf, then the incremental replan), and ``WORKLOAD/mha`` or ``WORKLOAD/gqa`` (the
choice on a named workload). Needs valgrind; a case takes a few minutes::

    python scripts/plan_instructions.py target target-fixed spec_8k_248/gqa
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any


def _case(name: str) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """(a maker of fresh trees, the planning call) of case ``name``."""
    from attngen.cost import HeadLayout
    from attngen.plan import plan_tree, replan_after_append
    from attngen.workloads import WORKLOADS, planning_target_tree

    tree = planning_target_tree()
    if name == "target":
        return lambda: replace(tree), plan_tree
    if name == "target-fixed":
        return lambda: replace(tree), lambda t: plan_tree(t, chunk=128, queries_per_group=8, span=1024)
    if name == "target-step":
        plan = plan_tree(tree, chunk=128, queries_per_group=8, span=1024)
        return lambda: tree.append_to_leaves(1), lambda t: replan_after_append(plan, t)
    workload, _, layout = name.partition("/")
    if workload not in WORKLOADS or layout not in ("mha", "gqa"):
        raise SystemExit(f"unknown case {name!r}: target, target-fixed, target-step or WORKLOAD/mha|gqa "
                         f"(workloads: {', '.join(WORKLOADS)})")
    heads = HeadLayout(heads_q=32, heads_kv=32 if layout == "mha" else 8)
    wl = WORKLOADS[workload]().tree
    return lambda: replace(wl), lambda t: plan_tree(t, heads=heads)


def _child(name: str, plans: int) -> None:
    fresh, plan = _case(name)
    plan(fresh())  # the first plan's one-time costs, in both runs
    trees = [fresh() for _ in range(plans)]
    # the cyclic collector runs when allocations pass a threshold, so at points that
    # depend on everything before: a few percent either way from one count to the next
    gc.collect()
    gc.disable()
    for tree in trees:
        plan(tree)


def _collected(name: str, plans: int) -> int:
    cmd = ["setarch", "-R", "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
           "--child", name, str(plans)]
    # a fixed string hash, so that dicts and sets do the same work in every run
    run = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode or not found:
        raise SystemExit(f"{name}: callgrind run failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", default=["target", "target-fixed", "target-step"])
    parser.add_argument("--plans", type=int, default=100, help="plans per counted run (default 100)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "PLANS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return
    for i, name in enumerate(args.cases, 1):
        _case(name)  # a bad name fails here, not after minutes under valgrind
        print(f"[{i}/{len(args.cases)}] {name}: two callgrind runs ...", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(2) as pool:
            base, counted = pool.map(_collected, (name, name), (0, args.plans))
        print(f"{name}: {(counted - base) / args.plans / 1e6:.3f} M instructions per plan", flush=True)


if __name__ == "__main__":
    main()
