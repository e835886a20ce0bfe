"""Tree-family kernels (templates/tree.py.j2) against the float64 reference.

The reference is :func:`attngen.reference.tree_reference`: each query's visible tokens
come from :meth:`TreeBatch.visible_matrix` (ancestors and the query's own node up to
itself), ANDed with the spec's own mask evaluated at tree positions, attended densely in
float64.
The interpreter class runs tiny fp16/fp32 shapes on the CPU; the GPU class is the same
cases in bf16 with head_dim 128 and the issue's head layouts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytest
import torch
import triton
from helpers import GPU_PHASES, assert_close, assert_lse_close, fresh, poisoned
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from attngen.cost import HeadLayout, Machine
from attngen.errors import LaunchError, SpecError
from attngen.paging import node_page_slots, node_paged_cache, physical_slots, table_paged_cache
from attngen.plan import FOLD_ALIGN, PlanBuffers, plan_into, plan_tree
from attngen.reference import Reference, tree_reference
from attngen.runtime import load
from attngen.spec import Spec, parse_spec
from attngen.tree import TreeBatch
from attngen.tree_ir import lower_tree
from attngen.workloads import speculative

HEAD_LAYOUTS = {"mha": (2, 2), "gqa": (4, 2), "mqa": (4, 1)}
#: Examples per kind of tree of the GPU test that draws trees for the Gluon stage 1 (the
#: first ones compile most of its kernels' variants: about 10 s each on the H200).
GLUON_EXAMPLES = int(os.environ.get("ATTNGEN_GLUON_EXAMPLES", "6"))
#: A fixed tile for the Triton stage 1 (no autotuning).
TILE = {"block_n": 64, "num_warps": 4, "num_stages": 2}
PAGE = 16


def tree_spec(
    *,
    heads: tuple[int, int] = (4, 2),
    head_dim: int = 16,
    dtype: str = "fp32",
    queries: str = "node",
    paged: bool = False,
    mask: Any = "full",
    score_mod: str | None = None,
    tensors: dict[str, Any] | None = None,
    kind: str = "tree",
    tune: dict[str, Any] | None = None,
) -> Spec:
    topology: dict[str, Any] = {"kind": kind, "queries": queries}
    if paged:
        topology |= {"kv_layout": "paged", "page_size": PAGE}
    data: dict[str, Any] = {
        "name": "tree_test",
        "heads": {"q": heads[0], "kv": heads[1]},
        "head_dim": head_dim,
        "dtype": dtype,
        "topology": topology,
        "mask": mask,
        # one small candidate keeps the interpreter fast
        "tune": tune or {"block_n": [32], "num_warps": [4], "num_stages": [2]},
    }
    if score_mod is not None:
        data["score_mod"] = score_mod
    if tensors:
        data["tensors"] = tensors
    return parse_spec(data)


# ---------------------------------------------------------------------------------------
# Reference and launch helpers


@dataclass
class Case:
    tree: TreeBatch
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def make_case(tree: TreeBatch, spec: Spec, device: str, seed: int = 0) -> Case:
    hq, hkv, d = spec.heads.q, spec.heads.kv, spec.head_dim.qk
    return Case(
        tree,
        fresh(tree.n_queries, hq, d, dtype=spec.dtype, seed=seed, device=device),
        fresh(tree.n_kv, hkv, d, dtype=spec.dtype, seed=seed + 1, device=device),
        fresh(tree.n_kv, hkv, spec.head_dim.v, dtype=spec.dtype, seed=seed + 2, device=device),
    )


def run(
    spec: Spec,
    case: Case,
    plan: Any,
    *,
    paged: Literal[False, "table", "slots"] = False,
    config: dict | None = None,
    **tensors: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch into poisoned buffers (anything left unwritten stays NaN). ``paged``: read
    a paged cache through a page table over the flattened order, or through slots into
    pages that each node owns."""
    module = load(spec)
    out = poisoned(*case.q.shape[:2], spec.head_dim.v, dtype=spec.dtype, device=str(case.q.device))
    k, v, layout = case.k, case.v, {}
    # every slot no token fills is NaN, so that a read of one shows
    if paged == "table":  # shuffled pages, two spare
        k, v, table = table_paged_cache(case.k, case.v, PAGE, spare_pages=2, seed=1, fill=math.nan)
        layout = {"page_table": table}
    elif paged == "slots":  # pages drawn at random for each node, with room to grow
        k, v, slots = node_paged_cache(case.tree, case.k, case.v, PAGE, spare_pages=1, seed=1, fill=math.nan)
        layout = {"slots": slots}
    o, lse = module.attention(
        case.q, k, v, plan, **layout, return_lse=True, out=out, config=config, **tensors
    )
    assert o is out
    return o, lse


def check(
    spec: Spec, case: Case, o: torch.Tensor, lse: torch.Tensor, **tensors: torch.Tensor
) -> None:
    assert_matches(spec, o, lse, tree_reference(spec, case.tree, case.q, case.k, case.v, tensors))


def assert_matches(
    spec: Spec, o: torch.Tensor, lse: torch.Tensor, ref: Reference, what: str = "O"
) -> None:
    """O and LSE against a reference's, at the spec's dtype tolerances."""
    assert_close(o, ref[0], spec.dtype, what=what)
    assert_lse_close(lse, ref[1], spec.dtype)


# ---------------------------------------------------------------------------------------
# Tree strategies


@st.composite
def trees(draw: st.DrawFn, max_nodes: int = 10) -> TreeBatch:
    """Random recursive trees, chains, stars, deep unbalanced trees, forests and single
    nodes; token counts include empty and one-token nodes; queries on a random subset."""
    shape = draw(st.sampled_from(["recursive", "chain", "star", "unbalanced", "forest", "single"]))
    n = 1 if shape == "single" else draw(st.integers(2, max_nodes))
    if shape == "chain":
        parent = [-1, *range(n - 1)]
    elif shape == "star":
        parent = [-1] + [0] * (n - 1)
    elif shape == "unbalanced":
        parent = [-1] + [i - 1 if draw(st.integers(0, 3)) else max(0, i - 2) for i in range(1, n)]
    else:
        parent = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
        if shape == "forest":
            parent = [p if draw(st.integers(0, 3)) else -1 for p in parent]
    tokens = [draw(st.sampled_from([0, 1, 1, 3, 7, 20, 33, 50])) for _ in range(n)]
    if sum(tokens) == 0:
        tokens[0] = 5
    mode: Literal["node", "token"] = draw(st.sampled_from(["node", "token"]))
    nodes = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    if mode == "token":
        nodes = [i for i in nodes if tokens[i] > 0] or [int(np.argmax(tokens))]
    return TreeBatch.from_parents(parent, tokens, sorted(nodes), mode=mode)


@st.composite
def wide_trees(draw: st.DrawFn, kind: str, chunk: int, group: int, span: int | None) -> TreeBatch:
    """Trees with enough queries over a shared prefix that plans have dense groups (the
    Gluon kernel's), for ``chunk``, ``span`` and ``group`` query heads per KV head, by
    ``kind``:
    - "speculative": a speculative token tree of random widths (17-300 tokens);
    - "branches": a prompt with 17-140 branches of 1-120 tokens, some of them under
      other branches (node mode, queries at the leaves);
    - "folding": a random token tree whose queries fill one 65-128-row group, over a
      prefix of c whole chunks and a rest that leaves the whole tree room in its last
      chunk. A plan cuts the c chunks into k = ceil(c / (span / chunk)) pieces at chunk
      boundaries, the last the shortest; k of 2 or 3 and c not a multiple of k make it
      shorter than the first by a chunk or more, the structure that lets a plan fold the
      tree's chunk into it (``span`` a multiple of ``chunk`` by 2 or more, ``chunk`` of
      FOLD_ALIGN or more)."""
    if kind == "folding":
        assert span is not None and span % chunk == 0 and span > chunk >= FOLD_ALIGN
        size = draw(st.integers(64 // group + 1, min(128 // group, chunk - 1)))  # one dense group's queries
        per_span, k = span // chunk, draw(st.integers(2, 3))
        chunks = draw(st.sampled_from([c for c in range((k - 1) * per_span + 1, k * per_span + 1) if c % k]))
        prefix = chunks * chunk + draw(st.integers(1, chunk - size))
        parent = [-1, 0] + [draw(st.integers(1, i - 1)) for i in range(2, size + 1)]
        return TreeBatch.from_parents(parent, [prefix] + [1] * size, list(range(1, size + 1)), mode="token")
    prefix = draw(st.integers(200, 2600))
    if kind == "speculative":
        widths = draw(st.lists(st.integers(2, 6), min_size=2, max_size=5))
        while sum(math.prod(widths[: d + 1]) for d in range(len(widths))) > 300:
            widths = widths[:-1] if widths[-1] == 1 else [*widths[:-1], widths[-1] - 1]
        return speculative(prefix=prefix, widths=widths).tree
    n = draw(st.integers(17, 140))
    parent = [-1, 0] + [0 if draw(st.integers(0, 3)) else draw(st.integers(1, i - 1)) for i in range(2, n + 1)]
    tokens = [prefix, *draw(st.lists(st.integers(1, 120), min_size=n, max_size=n))]
    return TreeBatch.from_parents(parent, tokens)


FAST = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    # on a GPU each example compiles: a failing draw is reported as drawn (helpers.GPU_PHASES)
    phases=GPU_PHASES if torch.cuda.is_available() else tuple(Phase),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------------------


@pytest.mark.interpreter
class TestTreeKernelsInterpreter:
    """Tiny shapes under TRITON_INTERPRET=1 (or on the GPU when there is one)."""

    dtypes: tuple[str, ...] = ("fp32", "fp16")
    head_dims: tuple[int, ...] = (16, 32, 64)

    @FAST
    @given(tree=trees(), data=st.data())
    def test_random_trees_match_reference_and_paged_is_bitwise_equal(
        self, tree: TreeBatch, data: st.DataObject
    ) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"  # no fixtures under @given
        heads = HEAD_LAYOUTS[data.draw(st.sampled_from(sorted(HEAD_LAYOUTS)))]
        dtype = data.draw(st.sampled_from(self.dtypes))
        head_dim = data.draw(st.sampled_from(self.head_dims))
        chunk = data.draw(st.sampled_from([32, 64]))
        qg = data.draw(st.sampled_from([1, 2, 4]))
        spec = tree_spec(heads=heads, head_dim=head_dim, dtype=dtype, queries=tree.query_mode)
        case = make_case(tree, spec, device, seed=data.draw(st.integers(0, 100)))
        plan = plan_tree(tree, chunk=chunk, queries_per_group=qg, device=device)
        # tiles of 32 keys read one bit word, of 64 two (16: see test_sixteen_key_tiles)
        tile = {"block_n": data.draw(st.sampled_from([32, chunk])), "num_warps": 4, "num_stages": 2}
        o, lse = run(spec, case, plan, config=tile)
        check(spec, case, o, lse)
        paged = tree_spec(
            heads=heads, head_dim=head_dim, dtype=dtype, queries=tree.query_mode, paged=True
        )
        for layout in ("table", "slots"):
            o_p, lse_p = run(paged, case, plan, paged=layout, config=tile)
            assert torch.equal(o_p, o) and torch.equal(lse_p, lse), f"paged ({layout}) and contiguous differ"

    def test_sixteen_key_tiles(self, device: str) -> None:
        """A 16-key tile reads half of a bit word (its low or high half)."""
        tree = TreeBatch.from_parents([-1, 0, 0, 1, 2], [37, 20, 9, 30, 3])
        spec = tree_spec(heads=(4, 2), dtype="fp16")
        case = make_case(tree, spec, device, seed=11)
        plan = plan_tree(tree, chunk=64, queries_per_group=2, device=device)
        tile = {"block_n": 16, "num_warps": 4, "num_stages": 2}
        o, lse = run(spec, case, plan, config=tile)
        check(spec, case, o, lse)
        for layout in ("table", "slots"):
            o_p, lse_p = run(tree_spec(heads=(4, 2), dtype="fp16", paged=True), case, plan, paged=layout, config=tile)
            assert torch.equal(o_p, o) and torch.equal(lse_p, lse), layout

    def test_interior_tiles_of_128_row_programs(self, device: str) -> None:
        """Programs of 128 rows (16 queries x 8 query heads) run a full group's whole tiles
        in their own unmasked loop and the rest in the masked one: the 160-key prompt is one
        full group of five 32-key chunks, two whole 64-key tiles and a half tile."""
        tree = TreeBatch.from_parents([-1] + [0] * 16, [160] + [3 + i % 5 for i in range(16)])
        spec = tree_spec(heads=(16, 2), dtype="fp16")
        plan = plan_tree(tree, chunk=32, queries_per_group=16, span=256, device=device)
        lengths = plan.group_kv_len[plan.group_full.bool()].tolist()
        assert 160 in lengths, f"the prompt should be one full group of 160 keys, got {lengths}"
        case = make_case(tree, spec, device, seed=5)
        o, lse = run(spec, case, plan, config=TILE)
        check(spec, case, o, lse)

    def test_groups_run_at_the_height_their_filled_slots_need(self, device: str) -> None:
        """Programs of a 128-row plan (16 slots x 8 query heads) run a group at 16, 64 or
        128 rows, from ``group_slots``: the prompt (15 queries, 120 rows) and inner node A
        (9 queries, 72 rows) at 128, inner node B (3 queries, 24 rows) at 64, each leaf
        (8 rows) at 16; A and B are one slot past a lower tier, so a tier that drops a
        filled slot fails. The same plan with every group's slots reversed puts each
        group's last filled slot at the end: every group runs at 128 rows."""
        parents = [-1, 0, 0] + [1] * 9 + [2] * 3 + [0] * 3
        tree = TreeBatch.from_parents(parents, [70, 40, 40] + [32] * 15)
        spec = tree_spec(heads=(16, 2), dtype="fp16")
        plan = plan_tree(tree, chunk=32, queries_per_group=16, span=256, device=device)
        filled = (plan.group_q >= 0).sum(1).tolist()
        assert {15, 9, 3, 1} <= set(filled), filled
        case = make_case(tree, spec, device, seed=3)
        tile = {"block_n": 32, "num_warps": 4, "num_stages": 2}
        o, lse = run(spec, case, plan, config=tile)
        check(spec, case, o, lse)
        reversed_slots = dict(plan.tensors())
        for name in ("group_q", "group_bits", "merge_row"):
            reversed_slots[name] = reversed_slots[name].flip(1).contiguous()
        reversed_slots["group_slots"] = torch.where(plan.group_slots > 0, 16, 0).to(torch.int32)
        o_r, lse_r = run(spec, case, reversed_slots, config=tile)
        check(spec, case, o_r, lse_r)

    def test_tall_plan_runs_groups_as_row_blocks(self, device: str) -> None:
        """A tall QG (24 queries x 8 query heads = 192 rows, past the 128 of one Triton
        tile) runs each (group, KV head) as two row blocks of up to 128 rows: the prompt's
        group (22 queries, 176 rows) at 128 + 64, inner node A's (9 queries, 72 rows) at
        128 in the first block while the second returns, the leaves' at 16."""
        parents = [-1, 0] + [1] * 9 + [0] * 13
        tree = TreeBatch.from_parents(parents, [90, 40] + [7 + i % 4 for i in range(22)])
        spec = tree_spec(heads=(16, 2), dtype="fp16")
        heads = HeadLayout(heads_q=16, heads_kv=2, head_dim_qk=16, head_dim_v=16)
        plan = plan_tree(tree, chunk=32, queries_per_group=24, span=256, heads=heads, device=device)
        assert plan.queries_per_group * 8 == 192 and int(plan.group_slots.max()) == 22
        case = make_case(tree, spec, device, seed=13)
        for fused in (True, False):
            o, lse = run(spec, case, plan, config={"block_n": 32, "num_warps": 4, "num_stages": 2, "fused": fused})
            check(spec, case, o, lse)

    def test_fused_single_launch_equals_two_stage(self, device: str) -> None:
        tree = TreeBatch.from_parents([-1, 0, 0, 0], [20, 3, 1, 5])  # one chunk, one group
        spec = tree_spec(heads=(4, 2), dtype="fp16")
        plan = plan_tree(tree, chunk=64, queries_per_group=4, device=device)
        assert plan.n_groups == 1 and plan.merge_ptr.tolist() == [0, 1, 2, 3]
        case = make_case(tree, spec, device)
        module = load(spec)
        assert module._single_partial(plan, tree.n_queries)
        assert not module._single_partial(plan.tensors(), tree.n_queries)  # a mapping: two launches
        o1, l1 = run(spec, case, plan)
        o2, l2 = run(spec, case, plan, config={"fused": False})
        assert torch.equal(o1, o2) and torch.equal(l1, l2)
        check(spec, case, o1, l1)

    def test_window_over_tree_positions_with_softcap(self, device: str) -> None:
        tree = TreeBatch.from_parents(
            [-1, 0, 0, 1, 3, 2], [30, 9, 17, 1, 12, 0], [3, 4, 5, 2], mode="node"
        )
        spec = tree_spec(
            heads=(4, 1),
            head_dim=32,
            mask=[{"window": {"left": 20, "right": 0}}],
            score_mod="5 * tanh(score / 5)",
        )
        case = make_case(tree, spec, device, seed=3)
        for qg in (1, 4):
            o, lse = run(spec, case, plan_tree(tree, chunk=32, queries_per_group=qg, device=device))
            check(spec, case, o, lse)

    def test_token_mode_speculative_tree_with_per_tree_tensor(self, device: str) -> None:
        # two independent trees (prefix + token tree); a per-tree prefix bound and a
        # per-head mask, both read through the user tensors of the spec
        a = TreeBatch.from_parents(
            [-1, 0, 0, 1, 1, 2], [40, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5], mode="token"
        )
        tree = TreeBatch.concat([a, TreeBatch.from_parents([-1, 0], [35, 3], [1], mode="token")])
        lo = torch.tensor([5, 30], dtype=torch.int32, device=device)
        spec = tree_spec(
            heads=(2, 2),
            queries="token",
            mask={"expr": "kv_pos >= lo[batch] or head == 0"},
            tensors={"lo": {"dims": ["batch"], "dtype": "int32"}},
        )
        case = make_case(tree, spec, device, seed=5)
        o, lse = run(spec, case, plan_tree(tree, chunk=32, queries_per_group=2, device=device), lo=lo)
        check(spec, case, o, lse, lo=lo)

    def test_empty_rows_give_zero_and_neg_inf(self, device: str) -> None:
        # node 2 is an empty root: its query sees nothing; node 1 is empty under a root
        tree = TreeBatch.from_parents([-1, 0, -1], [6, 0, 0], [1, 2])
        spec = tree_spec()
        case = make_case(tree, spec, device)
        o, lse = run(spec, case, plan_tree(tree, chunk=32, queries_per_group=2, device=device))
        assert torch.all(o[1] == 0) and torch.all(lse[1] == -math.inf)
        check(spec, case, o, lse)

    def test_merge_weighs_an_empty_partial_zero_whatever_its_o_holds(self, device: str) -> None:
        # a folded group's merge rows hold LSE = -inf and an O that the Gluon kernel does
        # not write (NaN here): the merge loads that O beside the LSE (so that neither
        # load waits for the other) and weighs it 0, so the NaN reaches no output
        spec = tree_spec(heads=(4, 2))
        module = load(spec)
        hq, d = spec.heads.q, spec.head_dim.v
        o_part, lse_part = fresh(5, hq, d, seed=7, device=device), fresh(5, hq, seed=8, device=device)
        o_part[1], lse_part[1] = math.nan, -math.inf
        ptr = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)  # query 0: rows 0-2, 1: 3-4
        out, lse = poisoned(2, hq, d, device=device), poisoned(2, hq, device=device)
        module._tree_merge_kernel[(2, triton.cdiv(hq, module.MERGE_HEADS))](
            o_part, lse_part, out, lse, ptr, out.stride(0), out.stride(1),
            HB=module.MERGE_HEADS, D_V=d, RETURN_LSE=True)
        for query, rows in enumerate(([0, 2], [3, 4])):
            natural = lse_part[rows].double() * math.log(2)  # [rows, heads]; stored in base 2
            w = torch.softmax(natural, dim=0)
            assert_close(out[query], (w[:, :, None] * o_part[rows].double()).sum(0), "fp32")
            assert_lse_close(lse[query], torch.logsumexp(natural, 0), "fp32")

    def test_fixed_capacity_buffers(self, device: str) -> None:
        tree = TreeBatch.from_parents([-1, 0, 0, 2], [37, 5, 40, 2])
        spec = tree_spec(heads=(4, 2))
        buffers = PlanBuffers.allocate(
            max_groups=16,
            max_queries=4,
            max_kv=200,
            chunk=32,
            queries_per_group=2,
            device=device,
        )
        plan_into(buffers, tree)
        case = make_case(tree, spec, device)
        q = torch.cat([case.q, fresh(2, 4, 16, device=device)])  # two idle query slots
        o, lse = load(spec).attention(q, case.k, case.v, buffers, return_lse=True)
        check(spec, case, o[:2], lse[:2])
        assert torch.all(o[2:] == 0) and torch.all(lse[2:] == -math.inf)

    def test_deterministic(self, device: str) -> None:
        tree = TreeBatch.from_parents([-1, 0, 0, 1, 1], [50, 20, 33, 7, 1])
        spec = tree_spec(heads=(4, 2), dtype="fp16")
        case = make_case(tree, spec, device)
        plan = plan_tree(tree, chunk=32, queries_per_group=2, device=device)
        first = run(spec, case, plan)
        second = run(spec, case, plan)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))

    def test_a_growing_tree_reads_its_nodes_pages_where_they_were_written(self, device: str) -> None:
        """A serving loop on a paged cache whose pages belong to nodes: tokens are written
        once, into their node's pages, and never move while the tree grows, branches and
        is pruned (a layout over the flattened order would shift at every step). Slots
        nothing wrote are NaN. Each step is checked against the reference over the KV as
        the nodes hold it."""
        spec = tree_spec(heads=(4, 2), dtype="fp32", paged=True)
        module = load(spec)
        hkv, d = spec.heads.kv, spec.head_dim.qk
        gen = torch.Generator().manual_seed(5)
        k_cache = torch.full((40, PAGE, hkv, d), math.nan, device=device)
        v_cache = torch.full_like(k_cache, math.nan)
        free = torch.randperm(40, generator=gen).tolist()
        pages: list[list[int]] = []
        held: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # each node's (k, v) rows, in order

        def write(node: int, count: int) -> None:
            """``count`` new tokens at the end of ``node``, into its own pages."""
            for _ in range(count):
                t = len(held[node])
                if t % PAGE == 0:
                    pages[node].append(free.pop())
                kv = (torch.randn(hkv, d, generator=gen).to(device), torch.randn(hkv, d, generator=gen).to(device))
                page, at = pages[node][t // PAGE], t % PAGE
                k_cache[page, at], v_cache[page, at] = kv
                held[node].append(kv)

        tree = TreeBatch.from_parents([-1, 0, 0], [0, 0, 0])
        pages, held = [[] for _ in range(3)], [[] for _ in range(3)]
        for node, count in enumerate((37, 5, 19)):
            write(node, count)
        tree = tree.append_tokens([37, 5, 19])

        def step(tree: TreeBatch) -> None:
            slots = torch.from_numpy(node_page_slots(tree, pages, PAGE, cache_pages=40)).to(device)
            plan = plan_tree(tree, chunk=32, queries_per_group=2, device=device)
            q = torch.randn(tree.n_queries, spec.heads.q, d, generator=gen).to(device)
            out = poisoned(tree.n_queries, spec.heads.q, d, device=device)
            o, lse = module.attention(q, k_cache, v_cache, plan, slots=slots, return_lse=True, out=out,
                                      config={"block_n": 16, "num_warps": 4, "num_stages": 1})
            k = torch.stack([kv[0] for n in tree.order.tolist() for kv in held[n]])
            v = torch.stack([kv[1] for n in tree.order.tolist() for kv in held[n]])
            assert_matches(spec, o, lse, tree_reference(spec, tree, q, k, v, {}))

        step(tree)
        for _ in range(3):  # decode steps: one token on each leaf
            for leaf in tree.leaves.tolist():
                write(leaf, 1)
            tree = tree.append_to_leaves(1)
            step(tree)
        tree = tree.add_branch(1, 0)  # a new branch off node 1, then its tokens
        pages.append([])
        held.append([])
        write(3, 21)
        tree = tree.append_tokens({3: 21})
        step(tree)
        tree, remap = tree.prune(2)  # its pages go back to the cache
        free += pages[2]
        kept = np.flatnonzero(remap >= 0).tolist()
        pages, held = [pages[n] for n in kept], [held[n] for n in kept]
        write(2, 17)  # node 3 is node 2 now; its new pages may be node 2's old ones
        tree = tree.append_tokens({2: 17})
        step(tree)

    def test_bad_inputs_raise_before_launch(self, device: str) -> None:
        tree = TreeBatch.from_parents([-1, 0, 0], [20, 5, 6])
        spec, paged = tree_spec(), tree_spec(paged=True)
        case = make_case(tree, spec, device)
        plan = plan_tree(tree, chunk=32, queries_per_group=2, device=device)
        module, paged_module = load(spec), load(paged)
        out = poisoned(2, 4, 16, device=device)
        with pytest.raises(LaunchError, match="queries"):
            module.attention(case.q[:1], case.k, case.v, plan)
        with pytest.raises(LaunchError, match="tokens"):
            module.attention(case.q, case.k[:-1], case.v[:-1], plan, out=out)
        with pytest.raises(LaunchError, match="float32"):
            module.attention(case.q.half(), case.k, case.v, plan, out=out)
        with pytest.raises(LaunchError, match="page_table"):
            module.attention(
                case.q, case.k, case.v, plan, page_table=torch.zeros(4, dtype=torch.int32)
            )
        k, v, table = table_paged_cache(case.k, case.v, PAGE, spare_pages=2, seed=0, fill=math.nan)
        with pytest.raises(LaunchError, match="outside the cache"):
            paged_module.attention(
                case.q, k, v, plan, page_table=torch.full_like(table, 99), out=out
            )
        with pytest.raises(LaunchError, match="exactly one of page_table"):
            paged_module.attention(case.q, k, v, plan, out=out)
        slots = torch.from_numpy(physical_slots(table.cpu().numpy(), tree.n_kv, PAGE)).int().to(device)
        with pytest.raises(LaunchError, match="exactly one of page_table"):
            paged_module.attention(case.q, k, v, plan, page_table=table, slots=slots, out=out)
        with pytest.raises(LaunchError, match=r"slots points outside the cache \(allowed slots 0\.\.63\)"):
            paged_module.attention(case.q, k, v, plan, slots=slots + 64, out=out)
        with pytest.raises(LaunchError, match="slots has 30 entries; 31 tokens need 31"):
            paged_module.attention(case.q, k, v, plan, slots=slots[:-1], out=out)
        with pytest.raises(LaunchError, match="slots must be an int32 vector"):
            paged_module.attention(case.q, k, v, plan, slots=slots.long(), out=out)
        with pytest.raises(LaunchError, match="page_table or slots given"):
            module.attention(case.q, case.k, case.v, plan, slots=slots)
        own = dict(plan.tensors())  # a caller's own plan mapping: group_slots is checked
        filled = int((plan.group_q[0] >= 0).sum())
        assert filled == 2, "the test needs a group whose second slot is filled"
        own["group_slots"] = plan.group_slots.clone()
        own["group_slots"][0] = 1
        with pytest.raises(LaunchError, match=r"group_slots\[0\] = 1, but group 0 needs 2 to 2"):
            module.attention(case.q, case.k, case.v, own, out=out)
        own["group_slots"][0] = 3
        with pytest.raises(LaunchError, match=r"group_slots\[0\] = 3"):
            module.attention(case.q, case.k, case.v, own, out=out)
        if device == "cpu":  # CPU tensors run only under the interpreter
            module._INTERPRET = False
            try:
                with pytest.raises(LaunchError, match="q is on cpu; these kernels run on a CUDA GPU"):
                    module.attention(case.q, case.k, case.v, plan, out=out)
            finally:
                module._INTERPRET = True
        assert torch.isnan(out).all(), "a rejected launch wrote its output"
        own["group_slots"][0] = 2  # right again (a new tensor version): the launch runs
        check(spec, case, *run(spec, case, own))

    def test_lowering_rejects_what_it_cannot_run(self) -> None:
        with pytest.raises(SpecError, match="per-token"):
            lower_tree(tree_spec(tensors={"doc": {"dims": ["token"], "dtype": "int32"}}))
        sequence = parse_spec({"name": "s", "heads": {"q": 2, "kv": 1}, "head_dim": 16})
        with pytest.raises(SpecError, match="tree family"):
            lower_tree(sequence)


def check_launches(spec: Spec, case: Case, launches: list[tuple[Any, dict]]) -> None:
    """Each launch (a Plan or PlanBuffers, and a config) against one reference."""
    ref = tree_reference(spec, case.tree, case.q, case.k, case.v, {})
    for plan, config in launches:
        o, lse = run(spec, case, plan, config=config)
        assert_matches(spec, o, lse, ref, what=f"O ({type(plan).__name__}, {config})")


def check_with_and_without_gluon(spec: Spec, tree: TreeBatch, case: Case, plan: Any, seed: int) -> None:
    """The call on a GPU with and without the Gluon stage 1, against the reference, then
    replayed from a CUDA graph on fresh queries (``seed``) into a poisoned output."""
    check_launches(spec, case, [(plan, TILE), (plan, TILE | {"gluon": False})])
    module = load(spec)
    out = poisoned(*case.q.shape[:2], 128, dtype="bf16", device="cuda")
    module.attention(case.q, case.k, case.v, plan, out=out)  # autotune and compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module.attention(case.q, case.k, case.v, plan, out=out)
    case.q.copy_(fresh(*case.q.shape, dtype="bf16", seed=seed, device="cuda"))
    out.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    ref_o = tree_reference(spec, tree, case.q, case.k, case.v, {}).out
    assert_close(out, ref_o, "bf16", what="O (CUDA graph)")


def gluon_case(heads: tuple[int, int], tree: TreeBatch, seed: int) -> tuple[Spec, Any, Case, HeadLayout]:
    """A bf16, head-dim-128 spec for ``tree``'s query mode, its module, random inputs for
    ``tree`` on the GPU and the head layout; skips the test where the Gluon stage 1 cannot
    run."""
    spec = tree_spec(heads=heads, head_dim=128, dtype="bf16", queries=tree.query_mode)
    module = load(spec)
    case = make_case(tree, spec, "cuda", seed=seed)
    if not module._gluon_ready(case.k, case.v):
        pytest.skip("the Gluon stage 1 needs an sm_90 GPU and a Triton with Gluon")
    return spec, module, case, HeadLayout(heads_q=heads[0], heads_kv=heads[1], head_dim_qk=128, head_dim_v=128)


@pytest.mark.gpu
class TestTreeKernelsGPU(TestTreeKernelsInterpreter):
    """The same cases on a GPU in bf16 (and fp16), with the larger head dims."""

    dtypes = ("bf16", "fp16")
    head_dims = (64, 128)

    @pytest.mark.parametrize("heads", [(32, 32), (32, 8)])
    @pytest.mark.parametrize("queries", ["node", "token"])
    def test_deft_shapes_bf16(self, heads: tuple[int, int], queries: str) -> None:
        if queries == "node":  # few-shot: prompt x branches
            tree = TreeBatch.from_parents([-1] + [0] * 8, [1000] + [50 + 13 * i for i in range(8)])
        else:  # speculative token tree over a prefix, widths [4, 2, 2]
            tree = speculative(prefix=1000, widths=(4, 2, 2)).tree
        autotuned = {"block_n": [64, 128, 32], "num_warps": [4, 8], "num_stages": [2, 3]}
        spec = tree_spec(heads=heads, head_dim=128, dtype="bf16", queries=queries, tune=autotuned)
        case = make_case(tree, spec, "cuda", seed=7)
        plan = plan_tree(tree, device="cuda")
        o, lse = run(spec, case, plan)
        check(spec, case, o, lse)
        paged = tree_spec(heads=heads, head_dim=128, dtype="bf16", queries=queries, paged=True)
        o_c, _ = run(spec, case, plan, config=TILE)
        for layout in ("table", "slots"):
            o_p, _ = run(paged, case, plan, paged=layout, config=TILE)
            assert torch.equal(o_c, o_p), layout

    def test_cuda_graph_over_buffers_replanned(self) -> None:
        """One capture over PlanBuffers, replayed after plan_into wrote other trees: one
        partial per query (which an attngen Plan would run in one launch), then several,
        then one again. The buffers always get stage 2, so the capture holds for every
        plan they take."""
        spec = tree_spec(heads=(32, 8), head_dim=128, dtype="bf16")
        module = load(spec)
        layout = HeadLayout(heads_q=32, heads_kv=8, head_dim_qk=128, head_dim_v=128)
        buffers = PlanBuffers.allocate(max_groups=64, max_queries=3, max_kv=1200, chunk=128,
                                       queries_per_group=4, heads=layout, device="cuda")
        single = TreeBatch.from_parents([-1, 0, 0, 0], [20, 3, 1, 5])  # one chunk, one group
        several = TreeBatch.from_parents([-1, 0, 0, 0], [700, 30, 64, 200])
        q = fresh(3, 32, 128, dtype="bf16", seed=20, device="cuda")
        k = fresh(1200, 8, 128, dtype="bf16", seed=21, device="cuda")
        v = fresh(1200, 8, 128, dtype="bf16", seed=22, device="cuda")
        out = poisoned(3, 32, 128, dtype="bf16", device="cuda")
        plan_into(buffers, single)
        module.attention(q, k, v, buffers, out=out)  # autotune and compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module.attention(q, k, v, buffers, out=out)
        for tree in (single, several, single):
            plan_into(buffers, tree)
            out.fill_(math.nan)
            graph.replay()
            torch.cuda.synchronize()
            ref_o = tree_reference(spec, tree, q, k[: tree.n_kv], v[: tree.n_kv], {}).out
            assert_close(out, ref_o, "bf16", what=f"O (replay, {tree.n_kv} tokens)")

    @pytest.mark.parametrize("heads", [(32, 8), (32, 32)])
    def test_cuda_graph_over_buffers_that_fold(self, heads: tuple[int, int]) -> None:
        """Over PlanBuffers whose plan folds (written for a one-SM machine), the folded
        groups run in the Gluon kernel and the Triton kernel skips them on the device. A
        graph captured over a folding plan and one captured over the same tree unfolded
        each replay right after plan_into wrote the other kind."""
        tree = speculative(prefix=1428, widths=(4, 2, 2, 2, 1)).tree
        spec, module, case, layout = gluon_case(heads, tree, seed=23)
        ref_o = tree_reference(spec, tree, case.q, case.k, case.v, {}).out
        folding, plain = Machine(sms=1), Machine()
        for capture, other in ((folding, plain), (plain, folding)):
            buffers = PlanBuffers.allocate(max_groups=32, max_queries=tree.n_queries, max_kv=tree.n_kv, chunk=128,
                                           queries_per_group=128 // layout.group, span=512, heads=layout,
                                           device="cuda")
            plan_into(buffers, tree, machine=capture)
            assert (buffers.n_folded > 0) == (capture is folding)
            out = poisoned(*case.q.shape[:2], 128, dtype="bf16", device="cuda")
            module.attention(case.q, case.k, case.v, buffers, out=out)  # autotune and compile outside
            assert_close(out, ref_o, "bf16", what=f"O (eager, {buffers.n_folded} folded)")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                module.attention(case.q, case.k, case.v, buffers, out=out)
            for machine in (other, capture):
                plan_into(buffers, tree, machine=machine)
                out.fill_(math.nan)
                graph.replay()
                torch.cuda.synchronize()
                assert_close(out, ref_o, "bf16", what=f"O (replay, {buffers.n_folded} folded)")

    def test_side_stream_is_never_the_callers(self) -> None:
        """The Triton stage 1 goes on a side stream to run beside the Gluon kernel. torch
        lends streams round-robin from a pool, so the caller's stream (a benchmark's, a
        capture's) can be the very stream kept for that; both kernels then ran one after
        the other (spec_4k_92 gqa 37.8 us against 22.0 on the H200, session 21). Whatever
        stream is current, the side stream differs from it."""
        module = load(tree_spec(heads=(32, 8), head_dim=128, dtype="bf16", queries="token"))
        device = torch.device("cuda", torch.cuda.current_device())
        kept = {module._side_stream(torch.cuda.current_stream(device))}
        for stream in [torch.cuda.Stream(device) for _ in range(40)] + list(kept):
            with torch.cuda.stream(stream):
                side = module._side_stream(torch.cuda.current_stream(device))
                assert side != torch.cuda.current_stream(device)
                kept.add(side)
        assert len(kept) == 2, "the module keeps two side streams, no more"

    @pytest.mark.parametrize(
        ("heads", "qg"), [((32, 32), 128), ((32, 8), 32), ((24, 8), 32), ((32, 32), 192), ((32, 8), 48)]
    )
    def test_gluon_stage1(self, heads: tuple[int, int], qg: int) -> None:
        """On Hopper, the plan's dense groups run in the Gluon kernel: its partials alone
        against float64 (nothing else written), the whole call with and without it against
        the reference, and the call replayed from a CUDA graph. The plan's 480-token spans
        end inside a 128-key tile; with (24, 8) a tile's last 32 rows lie past the group's
        slots; the 56-row groups of mha (one 64-row half) run in the Triton kernel beside.
        The tall QGs (192 rows) run three warpgroups: mha's one 184-row group per span,
        gqa's groups of 192 and 160 rows; their tree part runs as Triton row blocks."""
        hq, hkv = heads
        group = hq // hkv
        tree = speculative(prefix=1500, widths=(8, 2, 2, 2, 1)).tree
        spec, module, case, layout = gluon_case(heads, tree, seed=11)
        plan = plan_tree(tree, chunk=160, queries_per_group=qg, span=480, heads=layout, device="cuda")
        assert 0 < plan.n_dense < plan.n_groups, "both kernels must have groups to run"

        o_part = poisoned(plan.n_partials, hq, 128, device="cuda")
        lse_part = poisoned(plan.n_partials, hq, device="cuda")
        module._launch_gluon(case.q, case.k, case.v, plan.tensors(), o_part, lse_part, plan.n_dense, qg)
        written = torch.zeros(plan.n_partials, dtype=torch.bool)
        refs_o, refs_lse, got_o, got_lse = [], [], [], []
        for g in range(plan.n_dense):
            start, n = int(plan.group_kv_start[g]), int(plan.group_kv_len[g])
            k = case.k[start : start + n].double().repeat_interleave(group, 1)  # [n, hq, d]
            v = case.v[start : start + n].double().repeat_interleave(group, 1)
            for slot in range(int(plan.group_slots[g])):
                qid, r = int(plan.group_q[g, slot]), int(plan.merge_row[g, slot])
                if qid < 0:
                    continue
                scores = torch.einsum("hd,nhd->hn", case.q[qid].double(), k) * spec.softmax_scale
                refs_o.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
                refs_lse.append(scores.logsumexp(-1) / math.log(2))  # base 2, as stored
                got_o.append(o_part[r])
                got_lse.append(lse_part[r])
                written[r] = True
        assert_close(torch.stack(got_o), torch.stack(refs_o), "bf16", what="Gluon partials")
        assert_lse_close(torch.stack(got_lse), torch.stack(refs_lse), "bf16")
        assert torch.isnan(o_part[~written.cuda()]).all(), "the Gluon kernel wrote rows of other groups"

        check_with_and_without_gluon(spec, tree, case, plan, seed=12)

    @pytest.mark.parametrize(("heads", "qg", "prefix", "widths"), [
        ((32, 32), 128, 1428, (6, 2, 2, 2)), ((32, 8), 32, 1428, (6, 2, 2, 2)), ((32, 8), 48, 1428, (6, 2, 2, 2)),
        ((32, 8), 32, 1500, (8, 2, 2, 2, 1)),
    ])
    def test_gluon_runs_folded_groups(
        self, heads: tuple[int, int], qg: int, prefix: int, widths: tuple[int, ...]
    ) -> None:
        """Groups folded into a dense one (plan tensor group_fold) run in the Gluon kernel,
        as its tail, with their bits past group_lead, and no Triton kernel runs. A one-SM
        machine makes the planner fold whatever the structure allows. With a 1428-token
        prefix, the chunk after its last 384-token span holds its last 20 tokens and the
        whole 90-token tree: each QG's groups fold (MHA's one of 90 rows; GQA's of 128 and
        104 rows, or at QG 48 tall tiles of 192 and 168: three warpgroups, 64-key tiles).
        With 1500 tokens and a 184-token tree, two chunks of the tree's cannot fold, so
        none does (the Triton kernel runs them beside)."""
        tree = speculative(prefix=prefix, widths=widths).tree
        spec, _, case, layout = gluon_case(heads, tree, seed=17)
        plan = plan_tree(tree, chunk=128, queries_per_group=qg, span=512, heads=layout,
                         machine=Machine(sms=1), device="cuda")
        folds = prefix == 1428
        assert plan.n_folded == (plan.n_groups - plan.n_dense if folds else 0) and plan.n_dense > 0
        tails = plan.group_fold[: plan.n_dense]
        assert plan.group_lead[tails[tails >= 0].long()].tolist() == [20] * plan.n_folded
        check_with_and_without_gluon(spec, tree, case, plan, seed=18)

    @pytest.mark.parametrize(("heads", "qg", "sms", "lead"),
                             [((32, 8), 32, None, 0), ((32, 32), 192, None, 0), ((32, 8), 48, 1, 0),
                              ((32, 8), 32, None, 37)])
    def test_gluon_reads_paged_caches(self, heads: tuple[int, int], qg: int, sms: int | None, lead: int) -> None:
        """On a paged cache the Gluon programs read each K/V tile as 16-row TMA boxes where
        every block's slots run on, and gather it row by row by cp.async where not (a block
        across two pages; the range's last tile, whose rows past the range are zero-filled).
        The caches are a page table over shuffled pages and slots into pages that belong to
        nodes, every slot no token fills NaN. The programs run the same tiles in the same
        order as on the contiguous cache, so the calls are bitwise equal: with two
        warpgroups (128-key tiles), with three (64-key tiles), with the tree's chunk folded
        in (a one-SM machine's plan; the 1428-token prefix leaves a 20-token lead), and
        behind a ``lead``-token tree, which puts the prefix's blocks across the table's
        pages (every tile gathered) but not across its own pages. Over PlanBuffers, the
        Triton kernel skips the dense and folded groups on the device, as contiguous."""
        tree = speculative(prefix=1428, widths=(6, 2, 2, 2)).tree
        if lead:
            tree = TreeBatch.concat([speculative(prefix=lead, widths=(1,)).tree, tree])
        spec, _, case, layout = gluon_case(heads, tree, seed=31)
        machine = Machine() if sms is None else Machine(sms=sms)
        plan = plan_tree(tree, chunk=128, queries_per_group=qg, span=480, heads=layout, machine=machine,
                         device="cuda")
        assert plan.n_dense > 0 and (plan.n_folded > 0) == (sms == 1)
        buffers = PlanBuffers.allocate(max_groups=plan.n_groups + 2, max_queries=tree.n_queries, max_kv=tree.n_kv,
                                       chunk=128, queries_per_group=qg, span=480, heads=layout, device="cuda")
        plan_into(buffers, tree, machine=machine)
        paged = tree_spec(heads=heads, head_dim=128, dtype="bf16", queries=tree.query_mode, paged=True)
        module = load(paged)
        calls = []

        def spy(*args: Any, **kwargs: Any) -> None:
            calls.append(kwargs["table_page"])
            launch(*args, **kwargs)

        launch = module._launch_gluon
        module._launch_gluon = spy
        try:
            for p in (plan, buffers):
                o, lse = run(spec, case, p, config=TILE)
                check(spec, case, o, lse)
                for kv in ("table", "slots"):
                    o_p, lse_p = run(paged, case, p, paged=kv, config=TILE)
                    assert torch.equal(o_p, o) and torch.equal(lse_p, lse), f"{kv} over {type(p).__name__}"
        finally:
            module._launch_gluon = launch
        assert calls == [PAGE, 1] * 2, "the paged module's dense groups must run in the Gluon kernel"

    @pytest.mark.parametrize("lead", [0, 37])
    def test_paged_gluon_reads_by_box_where_blocks_run_on(self, lead: int) -> None:
        """Which path a paged tile takes, shown rather than assumed: the Gluon descriptors
        are built over NaN copies of the cache, so a tile the copy engine reads by box turns
        its queries' outputs NaN, and one gathered by cp.async (from the cache itself) does
        not. A node's own pages (slots) hold its tokens in 16-row blocks that run on, so
        their tiles come by box; so do a page table's with no lead. Behind a 37-token lead
        every block of the table's pages crosses a page, so every tile is gathered: that
        call is bitwise the call with the real descriptors."""
        tree = speculative(prefix=1428, widths=(6, 2, 2, 2)).tree
        if lead:
            tree = TreeBatch.concat([speculative(prefix=lead, widths=(1,)).tree, tree])
        _, _, case, layout = gluon_case((32, 8), tree, seed=37)
        plan = plan_tree(tree, chunk=128, queries_per_group=32, span=480, heads=layout, device="cuda")
        assert plan.n_dense > 0
        paged = tree_spec(heads=(32, 8), head_dim=128, dtype="bf16", queries=tree.query_mode, paged=True)
        module = load(paged)
        real = module.GluonDescriptor

        class NanCopies:
            @staticmethod
            def from_tensor(t: torch.Tensor, box: list[int], layout: Any) -> Any:
                return real.from_tensor(torch.full_like(t, math.nan), box, layout)

        paths: list[tuple[Literal["table", "slots"], bool]] = [("table", lead == 0), ("slots", True)]
        for kv, boxed in paths:
            o, lse = run(paged, case, plan, paged=kv, config=TILE)
            assert not o.isnan().any(), kv
            module.GluonDescriptor = NanCopies
            try:
                o_nan, lse_nan = run(paged, case, plan, paged=kv, config=TILE)
            finally:
                module.GluonDescriptor = real
            assert bool(o_nan.isnan().any()) == boxed, f"{kv}: expected {'box' if boxed else 'gathered'} tiles"
            if not boxed:
                assert torch.equal(o_nan, o) and torch.equal(lse_nan, lse), kv

    @pytest.mark.parametrize("kind", ["speculative", "branches", "folding"])
    @settings(max_examples=GLUON_EXAMPLES, deadline=None, phases=GPU_PHASES,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def test_gluon_on_random_wide_trees(self, kind: str, data: st.DataObject) -> None:
        """Random trees with many queries over a shared prefix (:func:`wide_trees`), at
        random chunks, QGs and spans, planned for the H200 or for a one-SM machine (which
        folds whatever the structure allows; always, for the "folding" trees): the call
        with the Gluon stage 1, without it, and over PlanBuffers holding the same plan (the
        Triton kernel skips the dense and folded groups on the device), each against the
        reference. A folding tree's plan folds its tree chunk."""
        folding = kind == "folding"
        chunk = data.draw(st.sampled_from([128, 256, 512] if folding else [64, 128, 256, 512]))
        span = data.draw(st.sampled_from([2 * chunk, 4 * chunk] if folding else [None, chunk, 2 * chunk, 480, 1024]))
        heads = data.draw(st.sampled_from([(32, 32), (32, 8), (24, 8)]))
        tree = data.draw(wide_trees(kind, chunk, heads[0] // heads[1], span))
        spec, _, case, layout = gluon_case(heads, tree, seed=data.draw(st.integers(0, 1000)))
        # the two QGs whose groups run in Gluon when dense (65-192 rows), or the choice's;
        # for a folding tree, those that hold all its queries in one group
        choices = layout.queries_per_group_choices()[-2:]
        qg = data.draw(st.sampled_from([c for c in choices if c >= tree.n_queries] if folding else [None, *choices]))
        machine = Machine(sms=1) if folding else data.draw(st.sampled_from([Machine(), Machine(sms=1)]))
        plan = plan_tree(tree, chunk=chunk, queries_per_group=qg, span=span, heads=layout, machine=machine,
                         device="cuda")
        event(f"dense groups: {plan.n_dense > 0}, folds: {plan.n_folded > 0}")
        if folding:
            assert plan.n_dense > 0 and plan.n_folded == plan.n_groups - plan.n_dense == 1
        buffers = PlanBuffers.allocate(max_groups=plan.n_groups + 3, max_queries=tree.n_queries, max_kv=tree.n_kv,
                                       chunk=chunk, queries_per_group=plan.queries_per_group, span=plan.span,
                                       heads=layout, device="cuda")
        plan_into(buffers, tree, machine=machine)
        assert buffers.n_folded == plan.n_folded
        check_launches(spec, case, [(plan, TILE), (plan, TILE | {"gluon": False}), (buffers, TILE)])

    def test_autotuner_tells_gluon_beside_from_gluon_off(self) -> None:
        """The Triton stage 1's best tile depends on whether the plan's dense groups run
        beside it in Gluon or in it (``gluon: False``). Here the two launches' group counts
        (5 and 7) share one bucket, so only the Gluon switch in the autotuner's key keeps
        their picks apart; before, the second call reused the first's."""
        tune = {"block_n": [64, 32], "num_warps": [4], "num_stages": [2, 3]}
        spec = tree_spec(heads=(32, 32), head_dim=128, dtype="bf16", queries="token", tune=tune)
        module = load(spec)
        tree = speculative(prefix=1500, widths=(8, 2, 2, 2, 1)).tree
        case = make_case(tree, spec, "cuda", seed=13)
        if not module._gluon_ready(case.k, case.v):
            pytest.skip("the Gluon stage 1 needs an sm_90 GPU and a Triton with Gluon")
        layout = HeadLayout(heads_q=32, heads_kv=32, head_dim_qk=128, head_dim_v=128)
        plan = plan_tree(tree, chunk=160, queries_per_group=128, span=960, heads=layout, device="cuda")
        beside, alone = plan.n_groups - plan.n_dense, plan.n_groups
        assert 0 < beside < alone and triton.next_power_of_2(beside) == triton.next_power_of_2(alone)
        tuner = module._tree_partial_tuned
        tuner.cache.clear()
        o, lse = run(spec, case, plan)
        check(spec, case, o, lse)
        o, lse = run(spec, case, plan, config={"gluon": False})
        check(spec, case, o, lse)
        assert len(tuner.cache) == 2, f"one pick beside Gluon, one with every group in Triton: {list(tuner.cache)}"
