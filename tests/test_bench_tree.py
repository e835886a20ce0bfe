"""The parts of the tree benchmark that need no GPU: which specs it takes, which
workloads fit a spec, the spec it builds for a head layout, the table and the saved results."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from attngen import bench_tree
from attngen.cost import HeadLayout
from attngen.errors import AttngenError
from attngen.paging import node_paged_cache
from attngen.spec import load_spec
from attngen.workloads import WORKLOADS

SPECS = Path(__file__).resolve().parents[1] / "specs"


def test_workloads_follow_the_query_mode() -> None:
    node = bench_tree.workloads_for(load_spec(SPECS / "tree_fewshot.yaml"))
    token = bench_tree.workloads_for(load_spec(SPECS / "tree_speculative.yaml"))
    assert node == ["fewshot_4k_x20", "fewshot_32k_x64", "tot_d3_w3"]
    assert token == ["spec_4k_92", "spec_16k_184"]
    for name in node + token:
        assert name in WORKLOADS


@pytest.mark.parametrize(
    ("spec_file", "message"),
    [
        ("causal_prefill", "takes tree specs"),
    ],
)
def test_unsupported_specs_are_refused_before_any_gpu_work(spec_file: str, message: str) -> None:
    with pytest.raises(AttngenError, match=message):
        bench_tree.check_benchable(load_spec(SPECS / f"{spec_file}.yaml"))


def test_a_paged_spec_is_timed_on_pages_that_belong_to_nodes() -> None:
    spec = load_spec(SPECS / "tree_paged_gqa.yaml")
    bench_tree.check_benchable(spec)
    tree = WORKLOADS["tot_d3_w3"]().tree
    k, v = torch.randn(tree.n_kv, 2, 16), torch.randn(tree.n_kv, 2, 8)
    k_cache, v_cache, slots = node_paged_cache(tree, k, v, 16)
    assert k_cache.shape[1:] == (16, 2, 16) and v_cache.shape[1:] == (16, 2, 8)
    assert torch.equal(k_cache.flatten(0, 1)[slots.long()], k)
    assert torch.equal(v_cache.flatten(0, 1)[slots.long()], v)
    first = slots[tree.node_kv_start[tree.order]].long()  # every node starts a page of its own
    assert (first % 16 == 0).all() and first.unique().numel() == tree.n_nodes


def test_built_spec_matches_the_layout() -> None:
    spec = bench_tree.tree_spec("token", 32, 8)
    assert (spec.heads.q, spec.heads.kv, spec.topology.queries, spec.dtype) == (32, 8, "token", "bf16")
    assert bench_tree.layout_name(spec) == "gqa"
    bench_tree.check_benchable(spec)


def _row(**changes: object) -> bench_tree.TreeRow:
    values: dict = dict(
        workload="fewshot_4k_x20", layout="mha", n_queries=20, n_kv=12000, floor_us=46.0,
        attngen_us=69.0, flex_us=101.0, sdpa_dense_us=None, per_branch_us=355.0, plan_ms=0.3,
        replan_ms=0.34, rel_err=2e-3, plan="chunk 512, QG 32, span 2048",
        config="block_n 64, 4 warps, 3 stages")
    return bench_tree.TreeRow(**(values | changes))


def test_results_are_saved_after_every_case(tmp_path: Path) -> None:
    bench_tree.save_rows([_row()], tmp_path)
    bench_tree.save_rows([_row(), _row(layout="gqa", floor_us=11.5, attngen_us=23.0)], tmp_path)
    saved = json.loads((tmp_path / "tree_results.json").read_text())
    assert [(r["layout"], r["ratio"]) for r in saved] == [("mha", pytest.approx(1.5)), ("gqa", pytest.approx(2.0))]
    assert saved[0]["best_peer_us"] == 101.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree_results.json"]  # no temporary left


def test_table_reports_ratio_and_best_peer() -> None:
    row = _row(flex_kernel="decoding")
    assert row.ratio == pytest.approx(1.5)
    assert row.best_peer_us == 101.0
    table = bench_tree.format_table([row])
    assert "fewshot_4k_x20" in table and "1.50x" in table and "n/a" in table
    assert "plan: chunk 512, QG 32, span 2048; autotuner: block_n 64, 4 warps, 3 stages; flex: decoding kernel" in table


def test_table_columns_stay_aligned_for_a_long_workload_name() -> None:
    """shared_prefix_32k_x64 (21 characters) pushed its row right of the header."""
    rows = [_row(), _row(workload="shared_prefix_32k_x64", layout="gqa")]
    head, _, first, second = bench_tree.format_table(rows).splitlines()[:4]
    assert second.startswith("shared_prefix_32k_x64 gqa")
    assert len(first) == len(second) == len(head)  # each column ends where its header does
    end = head.index("x floor") + len("x floor")  # right-aligned under its header
    assert first.index("1.50x") + len("1.50x") == second.index("1.50x") + len("1.50x") == end


def test_plot_draws_every_case(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [_row(), _row(layout="gqa", floor_us=11.5, attngen_us=23.0, flex_us=None, triton_only_us=25.0)]
    path = tmp_path / "tree_plot.png"
    bench_tree.plot(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("name", "mode"), [("tot_d3_w3", "node"), ("spec_4k_92", "token")])
def test_planning_columns(name: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planning columns: a positive median at the chosen parameters, and a decode step's
    (append, then replan) for branch trees only (a token tree's step brings a new tree)."""
    monkeypatch.setattr(bench_tree, "PLANNING_REPEATS", 3)
    workload = WORKLOADS[name]()
    assert workload.tree.query_mode == mode
    fixed, replan = bench_tree._planning_ms(workload, HeadLayout(heads_q=32, heads_kv=8))
    assert fixed > 0
    assert (replan is None) == (mode == "token") and (replan is None or replan > 0)


def test_a_peer_is_timed_only_where_it_agrees_with_attngen(monkeypatch: pytest.MonkeyPatch) -> None:
    timed: list[object] = []

    def graph_time_us(fn: object, cold: bool = False) -> float:
        timed.append(fn)
        return 7.0

    monkeypatch.setattr(bench_tree, "_graph_time_us", graph_time_us)
    out = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))

    def as_rows(o: torch.Tensor) -> torch.Tensor:  # a peer's [1, H, n_q, D] as [n_q, H, D]
        return o[0].transpose(0, 1)

    close = out + 1e-3 * noise * out.norm() / noise.norm()
    assert bench_tree._checked_peer_us(lambda: close.transpose(0, 1)[None], as_rows, out, False) == 7.0
    assert len(timed) == 1
    far = out + 0.1 * noise * out.norm() / noise.norm()
    with pytest.raises(AttngenError, match=r"differs from attngen's by 1\.0e-01"):
        bench_tree._checked_peer_us(lambda: far.transpose(0, 1)[None], as_rows, out, False)
    assert len(timed) == 1  # not timed


def test_flex_keeps_the_faster_kernel_under_128_queries() -> None:
    """Under FLEX_DECODING_BELOW queries both FlexAttention kernels are timed and the faster
    kept; the decoding kernel is left out where Inductor finds no tile for it, and any other
    failure is the peer's (not run); from FLEX_DECODING_BELOW, Inductor's own choice alone."""
    def timer(times: dict[str, float | Exception]) -> tuple[Callable[[Callable[[], str]], float], list[str]]:
        asked: list[str] = []

        def timed(fn: Callable[[], str]) -> float:
            kernel = fn()
            asked.append(kernel)
            value = times[kernel]
            if isinstance(value, Exception):
                raise value
            return value
        return timed, asked

    def run(options: object) -> str:
        return "attention" if options == {"FORCE_USE_FLEX_ATTENTION": True} else "default"

    timed, asked = timer({"default": 106.5, "attention": 383.2})
    assert bench_tree._flex_us(run, 20, timed) == (106.5, "decoding") and asked == ["default", "attention"]
    timed, asked = timer({"default": 1554.7, "attention": 384.2})
    assert bench_tree._flex_us(run, 20, timed) == (384.2, "flex_attention")
    no_tile = RuntimeError("LoweringException: NoValidChoicesError: No choices to select")
    timed, asked = timer({"default": no_tile, "attention": 339.3})
    assert bench_tree._flex_us(run, 92, timed) == (339.3, "flex_attention") and asked == ["default", "attention"]
    timed, asked = timer({"default": RuntimeError("out of resources"), "attention": 1.0})
    with pytest.raises(RuntimeError, match="out of resources"):
        bench_tree._flex_us(run, 92, timed)
    timed, asked = timer({"default": 1561.3, "attention": 1.0})
    assert bench_tree._flex_us(run, bench_tree.FLEX_DECODING_BELOW, timed) == (1561.3, "flex_attention") and asked == ["default"]


def test_merge_joins_the_parts_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--merge (no GPU) joins tree_results.json files that runs cut into parts wrote: the
    rows read back equal the rows saved, in order, into one JSON (and a plot where
    matplotlib is installed); a file bench_tree did not write is refused by name."""
    first, second, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    rows = [_row(), _row(layout="gqa", floor_us=11.5, attngen_us=23.0, flex_us=None),
            _row(workload="spec_4k_92", n_queries=92, replan_ms=None, triton_only_us=30.8)]
    bench_tree.save_rows(rows[:2], first)
    bench_tree.save_rows(rows[2:], second)
    assert bench_tree.load_rows(first / "tree_results.json") == rows[:2]
    argv = ["--merge", str(first / "tree_results.json"), str(second / "tree_results.json"), "--out", str(out)]
    assert bench_tree.main(argv) == 0
    assert bench_tree.load_rows(out / "tree_results.json") == rows
    assert "spec_4k_92" in capsys.readouterr().out
    (tmp_path / "other.json").write_text('[{"workload": "x"}]')
    assert bench_tree.main(["--merge", str(tmp_path / "other.json")]) == 2
    assert "other.json: not a tree_results.json" in capsys.readouterr().err
    # a file written before rows said which FlexAttention kernel ran (sessions 55-56) loads
    older = json.loads((first / "tree_results.json").read_text())
    for row in older:
        del row["flex_kernel"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert bench_tree.load_rows(tmp_path / "older.json") == rows[:2]
