"""Test set-up: the Triton interpreter on machines without CUDA, a ``device`` fixture,
and ``gpu``-marked tests skipped where there is no GPU."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # Must happen before anything imports triton: the interpreter is chosen at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernels run: "cuda" with a GPU, otherwise "cpu" (Triton interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"
