"""The tree half of ``attngen check``: random forests for ``tree`` / ``shared_prefix`` specs.

Each case draws a batch of one to three trees (random recursive trees, chains, stars;
for ``shared_prefix`` mostly a prefix with its samples as children) whose nodes include
empty and one-token ones, and places queries at the leaves or at chosen nodes (in token
mode every token of a chosen node is a query); where the mask has constants, one case
runs trees as deep as the lengths where it changes shape (:func:`boundary_tree`). The batch is planned with
:func:`attngen.plan.plan_tree` at a drawn chunk and queries_per_group, and launched on
fresh random q/k/v (never zeros; a paged spec reads a random page table into a cache of
random pages with spare ones) into a NaN-poisoned ``out``, with a drawn small config.
O and LSE are compared with :func:`attngen.reference.tree_reference` through the same
:func:`attngen.check.judge` and report as the sequence cases.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from attngen.check import (
    BOUNDARY_CASE,
    CaseResult,
    Outputs,
    drawn_blocks,
    far_boundaries,
    judge,
    tensor_values,
)
from attngen.cost import HeadLayout
from attngen.paging import (
    make_node_pages,
    make_page_table,
    node_page_slots,
    pages_needed,
    physical_slots,
)
from attngen.reference import tree_reference
from attngen.spec import Spec, torch_dtype
from attngen.tree import QueryMode, TreeBatch

#: Node token counts biased to the edges: empty, one token, around a 16/32 tile.
EDGE_TOKENS = (0, 1, 1, 2, 3, 15, 16, 17, 31, 33)
TREE_FORMS = ("recursive", "chain", "star", "single")


@dataclass(frozen=True, slots=True)
class TreeShape:
    """One tree case: the forest with its queries, and the plan's chunk, queries/group
    and span."""

    tree: TreeBatch
    chunk: int
    queries_per_group: int
    span: int

    def describe(self) -> str:
        t = self.tree
        return (
            f"trees={t.n_trees} parent={t.parent.tolist()} tokens={t.tokens.tolist()} "
            f"{t.query_mode} queries at {t.query_nodes.tolist()} "
            f"chunk={self.chunk} qg={self.queries_per_group} span={self.span}"
        )


# ---------------------------------------------------------------------------------------
# Drawing trees


@dataclass(frozen=True, slots=True)
class TreeSizes:
    """Bounds of the drawn forests (small under the interpreter)."""

    max_trees: int
    max_nodes: int
    max_tokens: int  # per node, outside the edge counts
    max_prefix: int  # the shared prefix of a shared_prefix star
    max_token_queries: int  # queries of one tree in token mode (one per token)


INTERPRETER_SIZES = TreeSizes(
    max_trees=3, max_nodes=6, max_tokens=24, max_prefix=70, max_token_queries=12
)
GPU_SIZES = TreeSizes(
    max_trees=4, max_nodes=24, max_tokens=300, max_prefix=2000, max_token_queries=512
)


def draw_parents(rng: random.Random, form: str, n: int) -> list[int]:
    """Parent array of an ``n``-node tree of ``form`` (node 0 is the root)."""
    if form == "chain":
        return [-1, *range(n - 1)]
    if form == "star":
        return [-1] + [0] * (n - 1)
    return [-1] + [rng.randrange(i) for i in range(1, n)]  # random recursive tree


def draw_tokens(rng: random.Random, n: int, sizes: TreeSizes) -> list[int]:
    """Per-node token counts: edge counts 60% of the time, otherwise uniform."""
    return [
        rng.choice(EDGE_TOKENS) if rng.random() < 0.6 else rng.randint(0, sizes.max_tokens)
        for _ in range(n)
    ]


def draw_queries(
    rng: random.Random, parent: list[int], tokens: list[int], mode: QueryMode, budget: int
) -> list[int]:
    """Query nodes: the leaves or a random subset. In token mode only nodes with tokens
    (an empty node holds no query; one gets a token if none has any), at most ``budget``
    query tokens in all (the first node is shortened to fit if need be)."""
    nodes = range(len(parent))
    leaves = [n for n in nodes if n not in parent]
    chosen = (
        leaves if rng.random() < 0.4 else sorted(rng.sample(nodes, rng.randint(1, len(parent))))
    )
    if mode == "node":
        return chosen
    nonempty = [n for n in chosen if tokens[n] > 0] or chosen[:1]
    tokens[nonempty[0]] = min(max(tokens[nonempty[0]], 1), budget)
    kept, used = [], 0
    for n in nonempty:
        if used + tokens[n] <= budget:
            kept.append(n)
            used += tokens[n]
    return kept


def draw_tree(rng: random.Random, *, kind: str, mode: QueryMode, sizes: TreeSizes) -> TreeBatch:
    """One tree; a ``shared_prefix`` spec mostly gets a prefix whose children are samples."""
    prefix = kind == "shared_prefix" and rng.random() < 0.75
    form = "star" if prefix else rng.choice(TREE_FORMS)
    n = 1 if form == "single" else rng.randint(2, sizes.max_nodes)
    parent = draw_parents(rng, form, n)
    tokens = draw_tokens(rng, n, sizes)
    if prefix:
        tokens[0] = rng.randint(1, sizes.max_prefix)
    queries = draw_queries(rng, parent, tokens, mode, sizes.max_token_queries)
    return TreeBatch.from_parents(parent, tokens, queries, mode=mode)


def draw_forest(rng: random.Random, *, kind: str, mode: QueryMode, sizes: TreeSizes) -> TreeBatch:
    """One to ``sizes.max_trees`` trees side by side (each its own ``batch`` entry)."""
    count = rng.randint(1, sizes.max_trees)
    return TreeBatch.concat(
        [draw_tree(rng, kind=kind, mode=mode, sizes=sizes) for _ in range(count)]
    )


def edge_tree(index: int, mode: QueryMode) -> TreeBatch | None:
    """The first cases are fixed edges: one token; a forest with an empty root, an empty
    inner node and a one-token leaf; a star whose prefix is one past the tile."""
    if index == 0:
        return TreeBatch.from_parents([-1], [1], [0], mode=mode)
    if index == 1 and mode == "node":
        empty_root = TreeBatch.from_parents([-1], [0], [0])
        chain = TreeBatch.from_parents([-1, 0, 1, 1], [5, 0, 1, 3], [1, 2, 3])
        return TreeBatch.concat([empty_root, chain])
    if index == 1:
        empty_root = TreeBatch.from_parents([-1, 0, 0], [0, 1, 3], mode="token")
        chain = TreeBatch.from_parents([-1, 0, 1], [17, 0, 1], [0, 2], mode="token")
        return TreeBatch.concat([empty_root, chain])
    if index == 2:
        last = 17 if mode == "node" else 3  # token mode: one query per token, kept few
        return TreeBatch.from_parents([-1, 0, 0, 0], [33, 1, 2, last], mode=mode)
    return None


def boundary_tree(spec: Spec, mode: QueryMode, *, interpreter: bool) -> TreeBatch | None:
    """Case BOUNDARY_CASE: one two-node tree for each far boundary N of the mask
    (:func:`attngen.check.far_boundaries`), whose queries see N tokens: the leaf's one
    token in node mode, the last of the leaf's three query tokens in token mode. None
    where the mask has no far boundary."""
    far = far_boundaries(spec, interpreter=interpreter)
    if not far:
        return None
    leaf = 1 if mode == "node" else 3
    return TreeBatch.concat(
        [TreeBatch.from_parents([-1, 0], [n - leaf, leaf], [1], mode=mode) for n in far]
    )


# ---------------------------------------------------------------------------------------
# Plan and launch choices


def head_layout(spec: Spec) -> HeadLayout:
    return HeadLayout(
        heads_q=spec.heads.q,
        heads_kv=spec.heads.kv,
        head_dim_qk=spec.head_dim.qk,
        head_dim_v=spec.head_dim.v,
    )


def draw_plan_params(rng: random.Random, spec: Spec, *, interpreter: bool) -> tuple[int, int, int]:
    """(chunk, queries_per_group, span): small under the interpreter, QG valid for the
    heads, spans of one chunk (no coalescing) or several."""
    chunk = rng.choice((32, 64) if interpreter else (64, 128, 256))
    limit = 4 if interpreter else 16
    qg = rng.choice([g for g in head_layout(spec).queries_per_group_choices() if g <= limit])
    return chunk, qg, chunk * rng.choice((1, 3, 8))


def draw_tree_config(
    rng: random.Random, spec: Spec, chunk: int, *, interpreter: bool
) -> dict[str, int]:
    """block_n no larger than the chunk (:func:`~attngen.check.drawn_blocks`); now and then
    the two-launch path forced."""
    blocks = drawn_blocks(spec, interpreter=interpreter)
    config = {
        "block_n": rng.choice([b for b in blocks if b <= chunk]),
        "num_warps": 4,
        "num_stages": 1 if interpreter else rng.choice((2, 3)),
    }
    if rng.random() < 0.25:
        config["fused"] = False
    return config


# ---------------------------------------------------------------------------------------
# Inputs


@dataclass
class TreeInputs:
    """One launch's tensors: ``k``/``v`` are the logical flattened KV the reference reads,
    ``k_cache``/``v_cache`` what the kernel reads (the same tensors when contiguous)."""

    q: Any
    k: Any
    v: Any
    k_cache: Any
    v_cache: Any
    page_table: Any | None
    slots: Any | None
    tensors: dict[str, Any]


def tree_depths(tree: TreeBatch) -> list[int]:
    """Tokens on the longest root path of each tree (a per-tree length for user tensors)."""
    depth = np.zeros(tree.n_trees, dtype=np.int64)
    np.maximum.at(depth, tree.node_tree, tree.node_depth_start + tree.tokens)
    return depth.tolist()


def make_tree_inputs(spec: Spec, tree: TreeBatch, *, seed: int, device: str) -> TreeInputs:
    """Fresh N(0,1) q/k/v in the spec dtype. A paged spec gets a cache of random pages with
    one to three spare pages (so a wrong slot reads garbage), read through either a random
    page table over the flattened order, or slots from random pages that each node owns
    (with room to grow, as a serving cache holds them)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    dtype = torch_dtype(spec.dtype)
    hq, hkv, d_qk, d_v = spec.heads.q, spec.heads.kv, spec.head_dim.qk, spec.head_dim.v

    def randn(*dims: int) -> Any:
        return torch.randn(*dims, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    tensors = {}
    for name, decl in sorted(spec.tensors.items()):
        values = torch.from_numpy(np.asarray(tensor_values(spec, name, tree_depths(tree), rng)))
        tensors[name] = values.to(
            device=device, dtype=torch_dtype(decl.dtype)
        )
    q = randn(tree.n_queries, hq, d_qk)
    if spec.topology.kv_layout != "paged":
        k, v = randn(tree.n_kv, hkv, d_qk), randn(tree.n_kv, hkv, d_v)
        return TreeInputs(q, k, v, k, v, None, None, tensors)
    page = spec.topology.page_size or 1
    if rng.random() < 0.5:
        table = None
        node_pages, cache_pages = make_node_pages(
            tree, page, spare_pages=int(rng.integers(1, 4)), seed=int(rng.integers(2**31))
        )
        token_slots = node_page_slots(tree, node_pages, page, cache_pages=cache_pages)
    else:
        cache_pages = pages_needed(tree.n_kv, page) + int(rng.integers(1, 4))
        table = make_page_table(tree.n_kv, page, cache_pages=cache_pages, seed=int(rng.integers(2**31)))
        token_slots = physical_slots(table, tree.n_kv, page)
    k_cache, v_cache = randn(cache_pages, page, hkv, d_qk), randn(cache_pages, page, hkv, d_v)
    slots = torch.from_numpy(token_slots.astype(np.int64)).to(device)
    k, v = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
    if table is None:
        return TreeInputs(q, k, v, k_cache, v_cache, None, slots.int(), tensors)
    return TreeInputs(q, k, v, k_cache, v_cache, torch.from_numpy(table).to(device), None, tensors)


# ---------------------------------------------------------------------------------------
# The case


def tree_case(
    module: Any, spec: Spec, rng: random.Random, *, index: int, device: str, interpreter: bool
) -> CaseResult:
    """Case ``index`` of a tree-family spec: a fixed edge forest first, then random ones."""
    mode: QueryMode = "token" if spec.topology.queries == "token" else "node"
    sizes = INTERPRETER_SIZES if interpreter else GPU_SIZES
    tree = (
        edge_tree(index, mode)
        or (boundary_tree(spec, mode, interpreter=interpreter) if index == BOUNDARY_CASE else None)
        or draw_forest(rng, kind=spec.topology.kind, mode=mode, sizes=sizes)
    )
    chunk, qg, span = draw_plan_params(rng, spec, interpreter=interpreter)
    shape = TreeShape(tree, chunk, qg, span)
    config = draw_tree_config(rng, spec, chunk, interpreter=interpreter)
    seed = rng.randrange(2**31)

    def attempt(config: dict[str, int] | None) -> Outputs:
        import torch

        from attngen.plan import plan_tree

        plan = plan_tree(
            tree, chunk=chunk, queries_per_group=qg, span=span, heads=head_layout(spec), device=device
        )
        inputs = make_tree_inputs(spec, tree, seed=seed, device=device)
        n_q = tree.n_queries
        out = torch.full(
            (n_q, spec.heads.q, spec.head_dim.v), math.nan, dtype=inputs.q.dtype, device=device
        )
        got, lse = module.attention(
            inputs.q,
            inputs.k_cache,
            inputs.v_cache,
            plan,
            page_table=inputs.page_table,
            slots=inputs.slots,
            return_lse=True,
            out=out,
            config=config,
            **inputs.tensors,
        )
        if got.data_ptr() != out.data_ptr():
            raise AssertionError("the kernel did not write into the given `out`")
        return got, lse, tree_reference(spec, tree, inputs.q, inputs.k, inputs.v, inputs.tensors)

    base = CaseResult(index=index, shape=shape, dtype=spec.dtype, config=config, seed=seed)
    return judge(base, spec, attempt)
