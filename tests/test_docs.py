"""The examples in attngen's docstrings run and print what they say (they are the first
code a reader tries, so they must not go stale)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

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
