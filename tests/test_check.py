"""``attngen check`` (:func:`attngen.check.check_spec`): it passes on the shipped specs of
both families, and it reports a broken kernel as FAILED instead of passing it.

Three examples are the fixed edge cases of each family (one token; empty sequences or an
empty root among others; a length one past the tile), a few seconds per spec under the
interpreter. The tree drawing itself is checked without launching anything.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from attngen import runtime
from attngen.check import (
    BOUNDARY_CASE,
    SURE_FIT_TILE_BYTES,
    TOLERANCES,
    CheckReport,
    Shape,
    boundary_notes,
    check_spec,
    checked_spec,
    compare,
    compare_lse,
    draw_config,
    kv_tile_bytes,
    mask_boundaries,
)
from attngen.check_tree import INTERPRETER_SIZES, boundary_tree, draw_forest
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


def test_a_config_ptxas_fails_on_runs_again_at_the_autotuners_choice() -> None:
    """Triton 3.6's ptxas 12.8 crashed (error -11) on some configs of prefill kernels whose
    mask is decided per element (session 52, docs/benchmarks/HISTORY.md). Such a case runs
    again with no config, as users call the kernel, and its line and the summary say so; a
    wrong answer there still fails, and a crash at no config is not retried."""
    from triton.runtime.errors import PTXASError

    from attngen.check import PTXAS_REFUSED, CaseResult, judge
    from attngen.errors import LaunchError
    from attngen.reference import Reference

    spec = parse_spec({"name": "t", "heads": {"q": 2, "kv": 2}, "head_dim": 16, "dtype": "fp16",
                       "topology": {"kind": "sequence", "queries": "prefill"}, "mask": "causal"})
    gen = torch.Generator().manual_seed(5)
    ref_o, ref_lse = torch.randn(3, 2, 16, generator=gen), torch.randn(3, 2, generator=gen)
    asked: list[dict[str, int] | None] = []

    def attempt(config: dict[str, int] | None, wrong: bool = False) -> Any:
        asked.append(config)
        if config is not None:
            raise PTXASError("PTXAS error: `ptxas` failed with error code -11")
        return ref_o + (1.0 if wrong else 0.0), ref_lse, Reference(ref_o, ref_lse, torch.zeros(3, 2, dtype=torch.bool))

    shape, forced = Shape(lengths=((3, 5),), decode=False), {"block_m": 64, "block_n": 32, "num_warps": 4}
    case = judge(CaseResult(0, shape, "fp16", forced, 0), spec, attempt)
    assert asked == [forced, None] and case.passed and case.ptxas_crashed and case.config == forced
    assert "stopped in ptxas, so at the autotuner's config" in case.line() and case.line().endswith(" ok")
    wrong = judge(CaseResult(1, shape, "fp16", forced, 1), spec, lambda c: attempt(c, wrong=True))
    assert not wrong.passed and wrong.ptxas_crashed
    report = CheckReport("t", "cuda", "fp16", 3, cases=[case, wrong])
    assert "note: case(s) 0, 1 stopped in ptxas" in report.summary() and not report.passed

    def always(config: dict[str, int] | None) -> Any:
        raise PTXASError("PTXAS error: `ptxas` failed with error code -11")

    unforced = judge(CaseResult(2, shape, "fp16", None, 2), spec, always)
    assert unforced.error is not None and unforced.error.startswith("PTXASError") and not unforced.ptxas_crashed

    # as a generated module's _launch_tile reports it: a LaunchError naming the tile
    def refused(config: dict[str, int] | None) -> Any:
        if config is not None:
            raise LaunchError(f"t: {PTXAS_REFUSED} (block_m=64, block_n=32, num_warps=4, num_stages=3) (...)")
        return attempt(None)

    named = judge(CaseResult(3, shape, "fp16", forced, 3), spec, refused)
    assert named.passed and named.ptxas_crashed and named.config == forced


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


def test_an_undecided_row_is_left_out_of_the_figures_but_must_still_be_written() -> None:
    ref = np.array([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]])  # [rows, heads, D]
    undecided = np.array([[False], [True], [False]])
    other_way = ref.copy()
    other_way[1] = [[-7.0, 9.0]]  # the tie decided the other way: any value goes
    assert compare(other_way, ref, skip=undecided).within(1e-9, 1e-9)
    assert not compare(other_way, ref).within(1e-9, 1e-9)
    unwritten = other_way.copy()
    unwritten[1, 0, 1] = np.nan  # the poison a kernel left
    assert compare(unwritten, ref, skip=undecided).nan
    wrong = other_way.copy()
    wrong[2, 0, 0] += 0.5  # a decided row
    assert not compare(wrong, ref, skip=undecided).within(1e-3, 1e-2)
    lse, lse_ref = np.array([[0.1], [-np.inf], [2.0]]), np.array([[0.1], [1.5], [2.0]])
    assert compare_lse(lse, lse_ref, skip=undecided).within(1e-9, 1e-9)
    # judged as a case: it passes, and its line and the report count the row and say why
    from attngen.check import CaseResult, judge
    from attngen.reference import Reference

    spec = parse_spec({"name": "t", "heads": {"q": 1, "kv": 1}, "head_dim": 16, "dtype": "fp16"})
    shape = Shape(lengths=((3, 3),), decode=False)
    case = judge(CaseResult(0, shape, "fp16", None, 0), spec,
                 lambda _: (other_way, lse, Reference(ref, lse_ref, undecided)))
    assert case.passed and case.undecided == 1 and "1 row(s) on a tie left out" in case.line()
    assert "note: a row on a tie" in CheckReport("t", "cpu", "fp16", 0, cases=[case]).summary()


#: Decode behind a window of 1000 tokens and 4 sinks: its mask changes shape at KV lengths
#: past what random draws reach (40 under the interpreter, 700 on a GPU).
WINDOW_SPEC = {
    "name": "check_window_boundaries", "heads": {"q": 2, "kv": 1}, "head_dim": 16, "dtype": "fp16",
    "topology": {"kind": "sequence", "queries": "decode"},
    "mask": {"all": ["causal", {"any": [{"window": {"left": 1000, "right": 0}}, {"sink": 4}]}]},
}


def test_mask_boundaries_are_the_predicate_s_constants_and_their_sums() -> None:
    spec = parse_spec(WINDOW_SPEC)
    assert mask_boundaries(spec) == [3, 4, 5, 999, 1000, 1001, 1003, 1004, 1005]
    assert mask_boundaries(load_spec(SPECS / "causal_prefill.yaml")) == []


@pytest.mark.interpreter
def test_the_boundary_case_catches_a_window_one_token_short(
    device: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A kernel whose window is 900 tokens instead of 1000 agrees with the reference on
    every length the random draws reach; the boundary case runs the lengths where the
    window fills and passes the sinks, and fails it. The right kernel passes it. (A
    window one token short drops one key of a thousand there, which the tolerances do
    not see.)"""
    spec = parse_spec(WINDOW_SPEC)
    assert check_spec(spec, examples=BOUNDARY_CASE + 1, seed=0, device=device).passed
    module = runtime.load(checked_spec(spec, device)[0])
    source = Path(module.__file__).read_text()
    assert "1000" in source and "900" not in source
    path = tmp_path / "window_900.py"
    path.write_text(source.replace("1000", "900"))
    loader = importlib.util.spec_from_file_location("window_900", path)
    assert loader is not None and loader.loader is not None
    short = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(short)
    monkeypatch.setattr(runtime, "load", lambda _: short)
    assert check_spec(spec, examples=BOUNDARY_CASE, seed=0, device=device).passed
    report = check_spec(spec, examples=BOUNDARY_CASE + 1, seed=0, device=device)
    assert not report.passed and [c.passed for c in report.cases] == [True] * BOUNDARY_CASE + [False]
    assert report.cases[-1].shape.describe() == "B=6 kv_len=[999, 1000, 1001, 1003, 1004, 1005]"


def test_the_report_says_which_boundaries_a_check_does_not_reach() -> None:
    spec = parse_spec(WINDOW_SPEC)
    assert boundary_notes(spec, examples=BOUNDARY_CASE + 1, interpreter=True) == []
    assert boundary_notes(spec, examples=2, interpreter=True) == [
        f"note: the mask's far boundaries run in case {BOUNDARY_CASE}; --examples 2 stops before it"]
    wide = parse_spec({**WINDOW_SPEC, "mask": {"all": ["causal", {"window": {"left": 100_000, "right": 0}}]}})
    assert boundary_notes(wide, examples=20, interpreter=False) == [
        "note: the mask changes shape at KV lengths [99999, 100000, 100001], past the longest this check "
        "runs here (65536)"]


@pytest.mark.parametrize(("mode", "leaf"), [("node", 1), ("token", 3)])
def test_tree_boundary_case_runs_paths_as_long_as_the_boundaries(mode: Any, leaf: int) -> None:
    """A tree spec's window over tree positions: case BOUNDARY_CASE is one two-node tree
    per far boundary N, whose last query sees N tokens."""
    spec = parse_spec({
        "name": "check_tree_window", "heads": {"q": 4, "kv": 2}, "head_dim": 16, "dtype": "fp16",
        "topology": {"kind": "tree", "queries": mode}, "mask": {"window": {"left": 100, "right": 0}},
    })
    tree = boundary_tree(spec, mode, interpreter=True)
    assert tree is not None and tree.n_trees == 3
    assert tree.tokens.tolist() == [99 - leaf, leaf, 100 - leaf, leaf, 101 - leaf, leaf]
    assert boundary_tree(parse_spec({**WINDOW_SPEC, "topology": {"kind": "tree", "queries": mode},
                                     "mask": "causal"}), mode, interpreter=True) is None
