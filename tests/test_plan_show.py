"""Showing a plan: the text summary, the Graphviz graph and the picture."""

from __future__ import annotations

from pathlib import Path

import pytest

from attngen.plan import plan_tree
from attngen.plan_show import describe, draw_png, to_dot
from attngen.tree import TreeBatch


def test_describe_dot_png(tmp_path: Path) -> None:
    tree = TreeBatch.from_parents([-1, 0, 0], [100, 30, 40])
    plan = plan_tree(tree, chunk=64, queries_per_group=2)
    text = describe(plan)
    assert "groups" in text and "IO saved" in text and "group 0: kv [0, 64)" in text
    dot = to_dot(tree, plan)
    assert dot.startswith("digraph plan {") and "n0 -> n1;" in dot
    pytest.importorskip("matplotlib")
    assert draw_png(tree, plan, str(tmp_path / "plan.png"))
    assert (tmp_path / "plan.png").stat().st_size > 0
