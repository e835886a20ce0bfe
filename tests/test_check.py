"""``attngen check`` (:func:`attngen.check.check_spec`): it passes on the shipped specs of
both families, and it reports a broken kernel as FAILED instead of passing it.

Three examples are the fixed edge cases of each family (one token; empty sequences or an
empty root among others; a length one past the tile), a few seconds per spec under the
interpreter. The tree drawing itself is checked without launching anything.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from attngen import runtime
from attngen.check import (
    SURE_FIT_TILE_BYTES,
    TOLERANCES,
    CheckReport,
    Shape,
    check_spec,
    checked_spec,
    compare,
    compare_lse,
    draw_config,
    kv_tile_bytes,
)
from attngen.check_tree import INTERPRETER_SIZES, draw_forest
from attngen.spec import load_spec, parse_spec
from attngen.tree import TreeBatch

SPECS = Path(__file__).resolve().parents[1] / "specs"
#: Every shipped spec: each one's generated kernel is checked (its first cases are the
#: fixed edge cases: single token, empty sequence or node, ragged tile ends).
SHIPPED = sorted(p.stem for p in SPECS.glob("*.yaml"))


def run_check(name: str, device: str, examples: int = 3) -> CheckReport:
    return check_spec(load_spec(SPECS / f"{name}.yaml"), examples=examples, seed=0, device=device)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", SHIPPED)
def test_check_passes_on_shipped_specs(name: str, device: str) -> None:
    report = run_check(name, device)
    assert report.passed, report.summary()
    assert len(report.cases) == 3
    assert report.summary().splitlines()[-1].startswith(f"{name}: PASSED on {device}")


@pytest.mark.interpreter
def test_random_tree_cases_pass(device: str) -> None:
    """Past the fixed edges: random forests on a paged spec."""
    report = run_check("tree_paged_gqa", device, examples=5)
    assert report.passed, report.summary()


def _zeros(q: torch.Tensor, *args: Any, out: Any = None, **kwargs: Any) -> Any:
    """A broken kernel: writes zeros and returns a zero LSE."""
    out.zero_()
    return out, torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)


def _untouched(q: torch.Tensor, *args: Any, out: Any = None, **kwargs: Any) -> Any:
    """A broken kernel that writes nothing (the poisoned NaN stays)."""
    return out, torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)


def _raises(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("launch failed")


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["tree_speculative", "shared_prefix_sampling", "causal_prefill"])
@pytest.mark.parametrize("broken", [_zeros, _untouched, _raises])
def test_broken_module_is_reported_failed(
    name: str, broken: Any, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(SPECS / f"{name}.yaml")
    module = runtime.load(checked_spec(spec, device)[0])  # the cached module check_spec uses
    monkeypatch.setattr(module, "attention", broken)
    report = check_spec(spec, examples=2, seed=0, device=device)
    assert not report.passed
    summary = report.summary()
    assert all(
        " FAILED (" in line or ": FAILED: " in line for line in summary.splitlines()[-3:-1]
    )
    if broken is _untouched:  # the poisoned output: the line says what was wrong
        assert "(O NaN" in summary
    assert f"{name}: FAILED (2 of 2 cases)" in summary
    if broken is _raises:
        assert "RuntimeError: launch failed" in summary


@pytest.mark.interpreter
def test_same_seed_draws_same_cases(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(SPECS / "tree_speculative.yaml")
    monkeypatch.setattr(runtime.load(checked_spec(spec, device)[0]), "attention", _zeros)

    def drawn(seed: int) -> list[tuple[str, Any, int]]:
        report = check_spec(spec, examples=8, seed=seed, device=device)
        return [(c.shape.describe(), c.config, c.seed) for c in report.cases]

    assert drawn(3) == drawn(3)
    assert drawn(3) != drawn(4)


@pytest.mark.parametrize("kind", ["tree", "shared_prefix"])
@pytest.mark.parametrize("mode", ["node", "token"])
def test_drawn_forests_cover_the_edges(kind: str, mode: Any) -> None:
    rng = random.Random(0)
    forests = [draw_forest(rng, kind=kind, mode=mode, sizes=INTERPRETER_SIZES) for _ in range(200)]
    assert all(isinstance(f, TreeBatch) and f.n_queries >= 1 for f in forests)
    assert any(f.n_trees > 1 for f in forests) and any(f.n_trees == 1 for f in forests)
    tokens = np.concatenate([f.tokens for f in forests])
    assert (tokens == 0).any() and (tokens == 1).any()
    deep = [f for f in forests if any(p >= 0 and f.parent[p] >= 0 for p in f.parent.tolist())]
    assert deep, "no tree deeper than a star"
    if mode == "token":
        per_tree = [np.bincount(f.q_tree, minlength=f.n_trees) for f in forests]
        assert max(int(c.max()) for c in per_tree) <= INTERPRETER_SIZES.max_token_queries
    if kind == "shared_prefix":  # mostly a prefix with its samples as children
        stars = sum(bool((f.parent[f.parent >= 0] == 0).all()) for f in forests if f.n_trees == 1)
        assert stars > 0


@pytest.mark.parametrize(("dtype", "head_dim", "blocks"), [
    ("fp16", 128, {32, 64, 128}),  # 64 KiB of K and V at 128 keys
    ("fp32", 128, {32, 64}),
    ("fp32", 192, {32}),  # padded to 256: 128 KiB at 64 keys, 272 KiB in all at 128 (session 48)
])
def test_gpu_configs_drawn_fit_shared_memory(dtype: str, head_dim: int, blocks: set[int]) -> None:
    spec = parse_spec({"name": "fit", "heads": {"q": 2, "kv": 1}, "head_dim": head_dim,
                       "dtype": dtype, "topology": {"queries": "decode"}})
    rng = random.Random(0)
    shape = Shape(((1, 300),), decode=True)
    drawn = {draw_config(rng, spec, shape, interpreter=False)["block_n"] for _ in range(60)}
    assert drawn == blocks
    assert all(kv_tile_bytes(spec, b) <= SURE_FIT_TILE_BYTES for b in drawn)


def test_lse_max_error_counts_relative_to_a_large_lse() -> None:
    """An fp32 LSE of ~1e7 (a score_mod that adds exp(distance)) is only good to ~1;
    near 1 the same error is a failure."""
    tol = TOLERANCES["fp16"]
    ref = np.array([[8.9e6, 1.2e7], [0.5, -np.inf]])
    big = np.array([[8.9e6 + 0.75, 1.2e7 - 1.0], [0.5, -np.inf]])
    assert compare_lse(big, ref).within(tol.lse_rel, tol.lse_abs)
    off = np.array([[8.9e6, 1.2e7], [0.5 + 0.3, -np.inf]])
    errors = compare_lse(off, ref)
    assert not errors.within(tol.lse_rel, tol.lse_abs)
    assert errors.problems(tol.lse_rel, tol.lse_abs) == [f"max {0.3:.2e} > {tol.lse_abs:g}"]


def test_a_reference_with_nan_is_named_as_the_spec_s_problem() -> None:
    ref = np.array([[1.0, np.nan]])
    problems = compare(np.array([[1.0, np.nan]]), ref).problems(1e-3, 1e-2)
    assert problems[0] == "NaN" and "float64 reference too" in problems[1]
