"""The examples in attngen's docstrings run and print what they say, and the API the README
names exists (they are the first code a reader tries, so they must not go stale)."""

from __future__ import annotations

import contextlib
import doctest
import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import attngen

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(attngen.__path__, prefix="attngen.")
    if not info.name.startswith("attngen.templates")
)


def test_the_walk_finds_the_planner_package() -> None:
    assert {"attngen.spec", "attngen.plan", "attngen.plan.layout"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


# The README names attngen's API by dotted paths; each must still resolve. A first part
# that is not `attngen` is a name the README introduces short, mapped to its full path.
README = Path(__file__).resolve().parents[1] / "README.md"
SHORT_NAMES = {
    "TreeBatch": "attngen.tree.TreeBatch",
    "PlanBuffers": "attngen.plan.PlanBuffers",
    "HeadLayout": "attngen.cost.HeadLayout",
    "render": "attngen.render",
}
DOTTED = re.compile(r"`([A-Za-z_]\w*(?:\.\w+)+)`")


def readme_api_names() -> list[str]:
    names = {m.group(1) for m in DOTTED.finditer(README.read_text())}
    return sorted(n for n in names if n.split(".")[0] in {"attngen", *SHORT_NAMES})


def test_the_readme_names_api() -> None:
    assert {"attngen.plan.replan_after_append", "TreeBatch.from_networkx"} <= set(readme_api_names())


@pytest.mark.parametrize("dotted", readme_api_names())
def test_readme_api_names_resolve(dotted: str) -> None:
    first, _, rest = dotted.partition(".")
    parts = SHORT_NAMES.get(first, first).split(".") + rest.split(".")
    obj = importlib.import_module(parts[0])
    for n, part in enumerate(parts[1:], start=2):
        if isinstance(obj, ModuleType) and not hasattr(obj, part):
            with contextlib.suppress(ModuleNotFoundError):  # a submodule not imported yet
                importlib.import_module(".".join(parts[:n]))
        assert hasattr(obj, part), f"README names `{dotted}`, but {obj!r} has no {part!r}"
        obj = getattr(obj, part)
