"""Showing a plan: the text summary, the Graphviz graph and the picture."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attngen.cost import HeadLayout
from attngen.plan import plan_tree
from attngen.plan_show import describe, draw_png, runs, to_dot
from attngen.tree import TreeBatch
from attngen.workloads import WORKLOADS


def test_describe_dot_png(tmp_path: Path) -> None:
    tree = TreeBatch.from_parents([-1, 0, 0], [100, 30, 40])
    plan = plan_tree(tree, chunk=64, queries_per_group=2)
    text = describe(plan)
    assert "groups" in text and "IO saved" in text and "group 0: kv [0, 64) 2 queries [0..1] full" in text
    dot = to_dot(tree, plan)
    assert dot.startswith("digraph plan {") and "n0 -> n1;" in dot
    pytest.importorskip("matplotlib")
    assert draw_png(tree, plan, str(tmp_path / "plan.png"))
    assert (tmp_path / "plan.png").stat().st_size > 0


def test_describe_shows_dense_and_folded_groups() -> None:
    plan = plan_tree(WORKLOADS["spec_16k_184"]().tree, heads=HeadLayout(heads_q=32, heads_kv=8))
    assert plan.n_folded == 4
    text = describe(plan, max_groups=plan.n_groups)
    assert f"({plan.n_dense} dense, 4 folded into them)" in text
    # the report counts the folded plan's launches: the dense kernel alone, then the merge
    assert "2 launch(es)" in text
    tails = [int(t) for t in plan.group_fold[: plan.n_dense] if t >= 0]
    for tail in tails:
        host = int(plan.group_fold[tail])
        assert f"group {host}: " in text and f"dense, then group {tail} as its tail" in text
        assert f"folded into group {host} (its first 128 keys seen by every query)" in text


def test_query_lists_print_as_runs() -> None:
    assert runs([]) == "[]"
    assert runs([5]) == "[5]"
    assert runs(list(range(184))) == "[0..183]"
    assert runs([0, 1, 2, 3, 7, 9, 10]) == "[0..3, 7, 9..10]"


def test_a_plan_with_no_groups_is_shown(tmp_path: Path) -> None:
    """Nodes that hold no tokens yet plan to no groups: described, drawn and graphed as
    such, not a reshape error from counting the visibility bits of no groups."""
    tree = TreeBatch.from_parents([-1, 0, 0], [0, 0, 0])
    plan = plan_tree(tree)
    assert plan.n_groups == 0
    text = describe(plan)
    assert "0 groups" in text and "no groups: the queries see no KV tokens" in text
    assert to_dot(tree, plan).count(" -> ") == 2
    pytest.importorskip("matplotlib")
    assert draw_png(tree, plan, str(tmp_path / "empty"))  # PNG whatever the name's ending
    assert (tmp_path / "empty").read_bytes().startswith(b"\x89PNG")


def test_the_cost_line_of_an_empty_plan_says_what_runs_and_that_nothing_is_saved() -> None:
    """An empty plan launches the merge alone, and per-branch decoding reads no KV either:
    no percentage made of query and output bytes (it printed '50.0% IO saved'). Other
    plans keep their line as it was."""
    empty = describe(plan_tree(TreeBatch.from_parents([-1, 0, 0], [0, 0, 0]))).splitlines()
    assert empty[1] == (
        "predicted 0.02 MB (0.00 MB KV, 0.00 MB partials), 0.00 GFLOP, 1 launch(es), 3.0 us; "
        "per-branch decoding reads no KV either (0.03 MB of queries and outputs): no IO saved; floor 0.00 MB, "
        "0.0 us at the model's rates"
    )
    assert empty[2].endswith("stage 1 does not run and the merge alone writes their outputs (0, LSE -inf)")
    none = describe(plan_tree(TreeBatch.from_parents([-1], [0], []))).splitlines()
    assert "0 launch(es), 0.0 us" in none[1] and none[2].endswith("; nothing is launched")
    ordinary = describe(plan_tree(TreeBatch.from_parents([-1, 0, 0], [100, 30, 40]), chunk=64)).splitlines()[1]
    assert re.fullmatch(
        r"predicted \d+\.\d\d MB \(\d+\.\d\d MB KV, \d+\.\d\d MB partials\), \d+\.\d\d GFLOP, 2 launch\(es\), "
        r"\d+\.\d us; per-branch decoding \d+\.\d\d MB -> -?\d+\.\d% IO saved; floor \d+\.\d\d MB, "
        r"\d+\.\d us at the model's rates( \(the prediction is under it: .*\))?",
        ordinary,
    ), ordinary
