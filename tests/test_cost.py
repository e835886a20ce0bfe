"""The cost model: its formulas evaluate vectorized, its terms move the way the H200 sweep
says they should, and the planner's choices on the reference shapes are the ones the
sweep measured best (or within noise of it)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sympy as sp
import torch

from attngen import cost, cost_formulas, cost_model
from attngen.cost import HeadLayout, Machine, PlanStats, evaluate, plan_cost
from attngen.plan import plan_tree
from attngen.plan.choice import CHUNK_CHOICES, _chunk_stats
from attngen.plan.layout import _KvNodes, _places
from attngen.plan.visibility import _Sight
from attngen.runtime import load
from attngen.spec import parse_spec
from attngen.tree import TreeBatch
from attngen.workloads import REFERENCE_SHAPES, WORKLOADS

MHA = HeadLayout(heads_q=32, heads_kv=32)
GQA = HeadLayout(heads_q=32, heads_kv=8)


def stats(**changes: object) -> PlanStats:
    """A long shared prefix read by one group of 32 queries, 64 programs (MHA); every
    group runs at its full height unless ``row_tokens`` is given."""
    qg = np.asarray(changes.get("queries_per_group", 32))
    tokens = changes.get("tokens_read", 8192)
    changes.setdefault("row_tokens", tokens * MHA.tile_rows(qg, qg))
    base = PlanStats(
        chunk=512,
        queries_per_group=32,
        groups=2,
        tokens_read=8192,
        row_tokens=8192 * 32,
        longest=4096,
        n_longest=2,
        partials=64,
        queries=32,
        launches=2,
        branch_tokens=32 * 4096,
        unique_tokens=4096,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def time_us(s: PlanStats, layout: HeadLayout = MHA, machine: Machine | None = None) -> float:
    return float(evaluate("time_s", s, layout, machine or Machine())) * 1e6


def test_evaluate_vectorizes_like_plan_cost() -> None:
    qg = np.array([16, 32, 64])
    many = evaluate("time_s", stats(queries_per_group=qg), MHA, Machine())
    one = [plan_cost(stats(queries_per_group=int(q)), MHA).time_s for q in qg]
    assert many.shape == (3,)
    np.testing.assert_allclose(many, one, rtol=1e-12)


@pytest.mark.parametrize(("name", "layout"), [("fewshot_32k_x64", GQA), ("spec_4k_92", MHA), ("tot_d3_w3", GQA)])
def test_evaluate_takes_few_candidates_one_by_one_alike(name: str, layout: HeadLayout) -> None:
    """Up to SCALAR_UP_TO candidates, evaluate takes the formula in plain arithmetic; it
    agrees with the numpy formula, dense groups (SPLIT) and all, at every candidate of
    the chunk choice (four chunk sizes by every QG: more than SCALAR_UP_TO at once)."""
    machine = Machine()
    tree = WORKLOADS[name]().tree
    nodes = _KvNodes.of(tree)
    qgs = np.asarray(layout.queries_per_group_choices(), dtype=np.int64)
    grid = _chunk_stats(tree, _Sight.of(tree, nodes), _places(nodes, CHUNK_CHOICES), qgs, layout, machine)
    many = evaluate("time_s", grid, layout, machine)
    assert many.size > cost.SCALAR_UP_TO and (np.broadcast_to(grid.dense_groups, many.shape) > 0).any()
    for c, q in np.ndindex(many.shape):
        one = {
            f.name: v[min(c, v.shape[0] - 1), min(q, v.shape[1] - 1)] if isinstance(v, np.ndarray) else v
            for f in dataclasses.fields(grid)
            for v in [getattr(grid, f.name)]
        }
        alone = evaluate("time_s", PlanStats(**one), layout, machine)
        assert alone.shape == ()
        np.testing.assert_allclose(alone, many[c, q], rtol=1e-12)


def test_cost_formulas_are_current() -> None:
    """attngen/cost_formulas.py is what ``python -m attngen.cost_model`` prints from the
    formulas today (the planner evaluates that file, not the sympy formulas). Another
    sympy than the one that printed it may print the same formulas in another order: the
    text is compared under the same sympy, the values (next test) under any."""
    current = Path(cost_formulas.__file__).read_text(encoding="utf-8")
    printed_by = cost_model.PRINTED_BY.format(sp.__version__)
    if printed_by not in current.splitlines():
        pytest.skip(f"cost_formulas.py was printed by another sympy than {sp.__version__}")
    assert current == cost_model.render(), "stale: run python -m attngen.cost_model"
    assert cost_model.main(["--check"]) == 0


def test_printed_formulas_agree_with_sympy() -> None:
    """Every printed formula, over numpy and over Python numbers, against sympy's own
    evaluation of the formula at random positive values (with the branches of its Min,
    Max and Piecewise taken both ways across the draws): the printers' nested
    minimum/maximum and ``where`` mean what sympy means."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        plan = {s: float(rng.uniform(1, 5000)) for s in cost_model._PLAN_ARGS}
        # few query rows or many (narrow programs or not), none of some counts, folds or none
        plan[cost_model.QG] = float(rng.choice([1, 2, 4, 8, 16, 64, 192]))
        plan[cost_model.FO] = float(rng.integers(2))
        for s in (cost_model.DG, cost_model.TD, cost_model.RTD, cost_model.WD, cost_model.NW):
            plan[s] *= float(rng.integers(2))
        # the layout's and machine's values, each scaled at random, so that each term can win
        consts = {s: v * rng.uniform(0.2, 5) for s, v in
                  zip(cost_model._CONSTANT_ARGS, cost._constant_values(GQA, Machine()), strict=True)}
        values = [plan[s] for s in cost_model._PLAN_ARGS] + [consts[s] for s in cost_model._CONSTANT_ARGS]
        every = cost_formulas.every_formula(*values)
        for name, formula, value in zip(cost_formulas.NAMES, cost_model._FORMULAS.values(), every, strict=True):
            want = float(formula.xreplace({k: sp.Float(v) for k, v in {**plan, **consts}.items()}))
            ks = getattr(cost_formulas, f"{name}_constants")(*values[len(plan):])
            vector = getattr(cost_formulas, name)(*(np.array([v]) for v in values[: len(plan)]), *ks)
            scalar = getattr(cost_formulas, f"{name}_scalar")(*values[: len(plan)], *ks)
            for got in (float(np.asarray(vector).reshape(-1)[0]), float(scalar), float(value)):
                assert got == pytest.approx(want, rel=1e-9), name


def test_planning_imports_no_sympy() -> None:
    """A process that plans (and reports a plan's cost) never imports sympy: the first
    plan costs what the others do (compiling the time formula took 0.25 s of it)."""
    code = (
        "import sys\n"
        "from attngen.plan import plan_tree\n"
        "from attngen.tree import TreeBatch\n"
        "plan_tree(TreeBatch.from_parents([-1, 0, 0], [900, 40, 40])).cost\n"
        "sys.exit('sympy' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr or "sympy was imported"


@pytest.mark.parametrize("group", [1, 4, 8])
def test_tile_rows_follows_its_rule(group: int) -> None:
    """The lookup behind tile_rows against the rule, spelled out group by group: the
    plan's full height, or the lowest lower tier that holds the filled rows."""
    layout = HeadLayout(heads_q=32, heads_kv=32 // group)
    for qg in layout.queries_per_group_choices():
        full = cost.TALL_ROWS if qg * group > cost.BLOCK_ROWS else max(16, 1 << (qg * group - 1).bit_length())
        tiers = [t for t in (*cost.ROW_TIERS, cost.BLOCK_ROWS) if t < full]
        want = [next((t for t in tiers if f * group <= t), full) for f in range(qg + 1)]
        got = layout.tile_rows(np.arange(qg + 1), qg)
        np.testing.assert_array_equal(got, want, err_msg=f"QG {qg}")


def test_narrow_program_alone_is_slower_than_a_warpgroup_wide_one() -> None:
    # few long programs: the waves bound; 32 rows (MHA, QG 32) is below a warpgroup
    narrow = time_us(stats(queries_per_group=32))
    wide = time_us(stats(queries_per_group=64))
    assert narrow > 1.5 * wide


def test_narrow_programs_share_an_sm() -> None:
    # 200 long programs: two narrow ones fit an SM (one wave), wide ones take two waves
    m = Machine()
    values = {
        cost_model.Hq: 32, cost_model.Hkv: 8, cost_model.Dqk: 128, cost_model.Dv: 128, cost_model.NW: 25, cost_model.W: 8192,
        cost_model.SMS: m.sms, cost_model.RATE: m.matmul_rate, cost_model.OVH: m.program_overhead,
        cost_model.R_wg: m.warpgroup_rows, cost_model.NARROW: 1, cost_model.SLOTS: m.narrow_programs_per_sm,
    }  # fmt: skip
    narrow = float(cost_model.WAVES.subs({**values, cost_model.QG: 8}))  # 32 rows
    wide = float(cost_model.WAVES.subs({**values, cost_model.QG: 16}))  # 64 rows
    assert wide == pytest.approx(2 * narrow)


def test_streaming_bound_counts_every_program() -> None:
    # the longest program alone, or every program's stream over the SMs' slots
    m = Machine()
    values = {
        cost_model.Hkv: 8, cost_model.Dqk: 128, cost_model.Dv: 128, cost_model.E: 2, cost_model.PBW: m.program_bandwidth,
        cost_model.OVH: m.program_overhead, cost_model.PSLOTS: m.programs_per_sm, cost_model.SMS: m.sms,
        cost_model.NW: 8,  # programs of the longest: some (a plan of none has no longest)
        cost_model.DK: m.dense_kernel_launches, cost_model.DG: 0, cost_model.TD: 0,  # no dense groups
    }  # fmt: skip
    longest = 1024 * 512 / m.program_bandwidth + m.program_overhead
    few = float(cost_model.STREAM.subs({**values, cost_model.W: 1024, cost_model.T: 4096, cost_model.G: 8}))
    assert few == pytest.approx(longest)
    # 200 groups of 1000 tokens (1600 programs) take about six rounds of the 264 slots
    many = float(cost_model.STREAM.subs({**values, cost_model.W: 1024, cost_model.T: 200_000, cost_model.G: 200}))
    assert many == pytest.approx(8 * (200_000 * 512 / m.program_bandwidth + 200 * m.program_overhead) / 264)
    assert many > 5 * longest


def test_partials_and_programs_cost_time() -> None:
    assert time_us(stats(partials=640)) > time_us(stats(partials=64))
    assert time_us(stats(groups=200, n_longest=200, longest=512)) > time_us(stats())


def test_total_bytes_count_the_query_rows_stage_1_loads() -> None:
    """One group of QG 64 slots holds the one query that sees the 6 KV tokens: stage 1
    loads that query's rows, not 64 slots' (the kernels mask the empty ones). Counting
    every slot once reported -412.7% IO saved for this plan; what is left against
    per-branch decoding is the partial's write and read, a real cost of a tiny plan."""
    plan = plan_tree(TreeBatch.from_parents([-1, 0, -1], [6, 0, 0], queries=[1, 2]))
    assert (plan.queries_per_group, plan.n_partials) == (64, 1)
    e, hq, d = 2, 32, 128
    q_rows = 1 * hq * d * e
    out = plan.n_queries * hq * d * e
    assert plan.cost.total_bytes == pytest.approx(plan.cost.kv_bytes + q_rows + plan.cost.partial_bytes + out)
    assert -0.25 < plan.cost.io_saved < 0


def test_dense_groups_add_their_kernels_launch() -> None:
    m = Machine()
    plain, dense = plan_cost(stats(), MHA), plan_cost(stats(dense_groups=4), MHA)
    assert (plain.launches, dense.launches) == (2, 3)
    # the launch, and the dense programs' own time (SPLIT: here an empty program each)
    assert dense.time_s - plain.time_s == pytest.approx(m.launch_overhead + m.dense_program_overhead)
    # one launch (no merge) keeps every group in it; a machine without the kernel neither
    assert plan_cost(stats(dense_groups=4, launches=1), MHA).launches == 1
    assert plan_cost(stats(dense_groups=4), MHA, Machine(dense_kernel_launches=0)).launches == 2


@pytest.mark.parametrize("name", ["tot_d3_w4", "fewshot_4k_x50"])
def test_dense_kernel_launch_keeps_gqa_trees_off_slow_dense_plans(name: str) -> None:
    """Without the dense kernel's launch the planner took QG 32 for these GQA trees, whose
    dense groups run in Gluon beside Triton; QG 16 (no dense group) measured faster on the
    H200, through the autotuner, interleaved rounds: tot_d3_w4 32.9 us against 50.7,
    fewshot_4k_x50 39.2 against 46.0 (session 25, docs/benchmarks/HISTORY.md)."""
    tree = WORKLOADS[name]().tree
    plan = plan_tree(tree, heads=GQA)
    # fewshot_4k_x50 cuts its prompt at 1536 since session 55's finer spans: 40.5 us as at 1024
    assert (plan.chunk, plan.queries_per_group, plan.n_dense) == (512, 16, 0)
    assert plan.span == {"tot_d3_w4": 1024, "fewshot_4k_x50": 1536}[name]
    before = plan_tree(tree, heads=GQA, machine=Machine(dense_kernel_launches=0))
    assert before.queries_per_group == 32 and before.n_dense > 0


# (workload, layout) -> (queries per group, span) the planner chooses, chunk 512; in the
# H200 sweep of session 6 each was the best plan or within 6.3% of it (mean 2.8%). Since
# groups run at the tile height their slots need (session 10), tot_d3_w3 mha takes QG 32
# where it took 16: 59.8 us through the autotuner against 59.6 for the best fixed plan
# (docs/benchmarks/HISTORY.md); the rest chose as before. In session 10's sweeps every choice came
# within 10% of the best plan measured (worst: tot_d3_w3 gqa, 24.7 against 22.4 us at
# span 512); the constants were not refitted. Since tall plans (192 rows: three
# warpgroups share a tile, session 19), spec_16k_184 takes QG 192 (mha) and 48 (gqa):
# 116.1 and 101.2 us against 129.7 and 111.5 for its former choices, same run. Since
# the streaming bound (STREAM, session 22), fewshot_4k_x20 gqa cuts its prompt into
# six pieces (span 768): 20.2 us against 23.4 at span 1024, interleaved rounds; and
# fewshot_32k_x64 mha takes span 8192: 200.9 against 200.6 at 16384. Since that bound
# counts every program (list scheduling, session 24), tot_d3_w3 gqa cuts its 1000-token
# prompt in two (span 512): 23.2 us against 24.7 at span 1024, same tile, interleaved rounds.
# The dense kernel's launch (session 25) moves none of these choices. Since the span
# estimate rounds a piece up to where it is cut (session 38), spec_4k_92 mha takes QG 128
# at span 1024 (the prefix read once, the tree's chunk folded into the Gluon kernel):
# 31.2 us against 35.0 at QG 64, span 2048, interleaved rounds. Since the split bound
# (SPLIT, session 55: the dense kernel's programs and the Triton ones share the SMs), the
# finer spans (5120, 6144, 12288) and the neighbouring chunk: fewshot_32k_x64 gqa cuts its
# prompt into six pieces at chunk 256 (84.5 us against 93.9), fewshot_32k_x64 mha into
# three (193.5 against 198.6), spec_4k_92 at chunk 256 as fast as before (mha 30.0 against
# 30.5 at span 1536, gqa 22.9 against 23.0), interleaved rounds (docs/benchmarks/HISTORY.md).
CHOICES = {
    ("fewshot_4k_x20", "mha"): (512, 32, 1024),
    ("fewshot_4k_x20", "gqa"): (512, 16, 768),
    ("fewshot_32k_x64", "mha"): (512, 64, 12288),
    ("fewshot_32k_x64", "gqa"): (256, 32, 6144),
    ("tot_d3_w3", "mha"): (512, 32, 1024),
    ("tot_d3_w3", "gqa"): (512, 16, 512),
    ("spec_4k_92", "mha"): (256, 128, 1536),
    ("spec_4k_92", "gqa"): (256, 32, 1024),
    ("spec_16k_184", "mha"): (512, 192, 4096),
    ("spec_16k_184", "gqa"): (512, 48, 4096),
}


@pytest.mark.parametrize("name", REFERENCE_SHAPES)
@pytest.mark.parametrize("layout", ["mha", "gqa"])
def test_reference_choices(name: str, layout: str) -> None:
    plan = plan_tree(WORKLOADS[name]().tree, heads=MHA if layout == "mha" else GQA)
    assert (plan.chunk, plan.queries_per_group, plan.span) == CHOICES[(name, layout)]


def test_split_bound_leaves_sms_to_the_triton_groups() -> None:
    """The dense kernel's programs each take an SM; the Triton groups get the rest. With
    much Triton work, fewer and longer dense programs win (the power cap clocks fewer busy
    SMs higher); with none, the most programs that fit one wave do (session 54's sweep)."""
    def split_us(dense_groups: int, longest: int, triton_tokens: int) -> float:
        plan = stats(dense_groups=dense_groups, dense_tokens=dense_groups * longest,
                     dense_row_tokens=dense_groups * longest * 128, dense_longest=longest,
                     tokens_read=dense_groups * longest + triton_tokens, groups=dense_groups + 64,
                     row_tokens=dense_groups * longest * 128 + triton_tokens * 16, longest=256, n_longest=64)
        return time_us(plan, GQA)

    # a 32000-token prompt, two dense groups a piece, 8 KV heads: 8 pieces (128 programs)
    # against 6 (96), beside 64 branches of 256 tokens, and alone
    eight, six = split_us(16, 4000, 64 * 256), split_us(12, 5334, 64 * 256)
    assert six < eight
    assert split_us(16, 4000, 0) < split_us(12, 5334, 0)
    # a machine that runs dense groups in stage 1 itself has no split
    no_kernel = Machine(dense_kernel_launches=0)
    plan = stats(dense_groups=16, dense_tokens=64000, dense_row_tokens=64000 * 128, dense_longest=4000)
    bare = dataclasses.replace(plan, dense_tokens=0, dense_row_tokens=0, dense_longest=0)
    assert plan_cost(plan, GQA, no_kernel).time_s == plan_cost(bare, GQA, no_kernel).time_s


def _count_launches(module: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernels a generated tree module launches from now on, by name, each still run:
    stage 1 in Triton (a grid of no programs is not launched), in Gluon, and the merge."""
    launched: list[str] = []
    stage1, merge = module._launch_partial, module._tree_merge_kernel

    def launch_partial(grid: tuple[int, ...], *args: Any) -> None:
        if grid[0]:
            launched.append("stage 1")
        stage1(grid, *args)

    class Merge:
        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                launched.append("merge")
                return merge[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(module, "_launch_partial", launch_partial)
    monkeypatch.setattr(module, "_tree_merge_kernel", Merge())
    if hasattr(module, "_launch_gluon"):  # Hopper's stage 1 of the dense groups
        gluon = module._launch_gluon

        def launch_gluon(*args: Any, **kwargs: Any) -> Any:
            launched.append("gluon")
            return gluon(*args, **kwargs)

        monkeypatch.setattr(module, "_launch_gluon", launch_gluon)
    return launched


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("parents", "tokens", "queries", "kernels"),
    [
        ([-1, 0, 0], [0, 0, 0], None, ["merge"]),  # no groups: the merge writes O 0, LSE -inf
        ([-1, 0], [0, 0], [], []),  # no queries: nothing
        ([-1, 0, -1], [6, 0, 0], [1, 2], ["stage 1", "merge"]),  # query 2 sees nothing
        ([-1, 0, 0, 0], [20, 3, 1, 5], None, ["stage 1"]),  # one partial each: fused
        ([-1, 0, 0, 0], [200, 30, 64, 50], None, ["stage 1", "merge"]),
    ],
)
def test_reported_launches_are_the_kernels_launches(
    parents: list[int],
    tokens: list[int],
    queries: list[int] | None,
    kernels: list[str],
    device: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """plan.cost.launches against the launches a generated module makes for the plan
    (the empty plan's report counted a stage 1 that never runs, charging its program)."""
    spec = parse_spec({
        "name": "tree_launches", "heads": {"q": 2, "kv": 2}, "head_dim": 16, "dtype": "fp32",
        "topology": {"kind": "tree", "queries": "node"}, "mask": "full",
        "tune": {"block_n": [32], "num_warps": [4], "num_stages": [2]},
    })  # fmt: skip
    module = load(spec)
    tree = TreeBatch.from_parents(parents, tokens, queries)
    plan = plan_tree(tree, chunk=32, heads=HeadLayout(heads_q=2, heads_kv=2, head_dim_qk=16, head_dim_v=16),
                     device=device)
    launched = _count_launches(module, monkeypatch)
    q = torch.randn(tree.n_queries, 2, 16, device=device)
    k, v = torch.randn(tree.n_kv, 2, 16, device=device), torch.randn(tree.n_kv, 2, 16, device=device)
    out = module.attention(q, k, v, plan, config={"block_n": 32, "num_warps": 4, "num_stages": 2})
    assert launched == kernels and plan.cost.launches == len(kernels)
    if tree.n_kv == 0:  # what the merge alone writes
        assert torch.all(out == 0)
