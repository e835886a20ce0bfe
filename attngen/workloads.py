"""Named tree workloads: the DeFT paper's shapes and the issue's reference shapes.

Each generator returns a :class:`Workload` (a :class:`~attngen.tree.TreeBatch` with its
queries placed) and is deterministic: shapes with random lengths take a ``seed``.

>>> w = WORKLOADS["spec_4k_92"]()
>>> w.tree.n_queries, unique_kv_tokens(w)
(92, 4092)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from attngen.errors import PlanError
from attngen.tree import TreeBatch


@dataclass(frozen=True, eq=False)
class Workload:
    """A named tree batch with its queries, and a one-line description."""

    name: str
    tree: TreeBatch
    description: str


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise PlanError(f"workload: {name} must be >= 1 (given {value}).")


def fewshot(
    prompt: int = 4000,
    branches: int = 20,
    generated: int = 400,
    seed: int | None = None,
    name: str | None = None,
) -> Workload:
    """Few-shot prompting: one prompt, ``branches`` children of ``generated`` tokens each
    (with ``seed``: uniform in [1, generated]); one node-mode query per branch."""
    _check_positive(prompt=prompt, branches=branches, generated=generated)
    if seed is None:
        lengths = np.full(branches, generated, dtype=np.int64)
    else:
        lengths = np.random.default_rng(seed).integers(1, generated + 1, branches)
    tree = TreeBatch.from_parents([-1] + [0] * branches, [prompt, *lengths.tolist()])
    label = name or f"fewshot_{prompt}_x{branches}"
    return Workload(
        label,
        tree,
        f"few-shot: {prompt}-token prompt x {branches} branches of up to {generated} tokens",
    )


def tree_of_thoughts(
    prompt: int = 1000, depth: int = 3, width: int = 3, thought: int = 300, name: str | None = None
) -> Workload:
    """Tree-of-thoughts: a complete ``width``-ary tree of ``depth`` levels of thoughts of
    ``thought`` tokens over a prompt; node-mode queries at the leaves."""
    _check_positive(prompt=prompt, depth=depth, width=width, thought=thought)
    parent, level = [-1], [0]
    for _ in range(depth):
        nxt = []
        for p in level:
            nxt += list(range(len(parent), len(parent) + width))
            parent += [p] * width
        level = nxt
    tokens = [prompt] + [thought] * (len(parent) - 1)
    tree = TreeBatch.from_parents(parent, tokens, level)
    label = name or f"tot_d{depth}_w{width}"
    return Workload(
        label,
        tree,
        f"tree-of-thoughts: depth {depth}, width {width}, "
        f"{thought}-token thoughts over a {prompt}-token prompt",
    )


def speculative(
    prefix: int = 4000,
    widths: Sequence[int] = (4, 2, 2, 2, 1),
    budget: int | None = None,
    name: str | None = None,
) -> Workload:
    """A speculative token tree: over a committed prefix, depth ``d`` has ``widths[d]``
    children per token of depth ``d - 1``; every tree token is a query (token mode). With
    ``budget``, the tree keeps its first ``budget`` tokens in breadth-first order (each
    token's children in order, as a drafter ranks them): a tree of exactly that many
    tokens, whose last level holds the first parents' children."""
    _check_positive(prefix=prefix, **{f"widths[{i}]": w for i, w in enumerate(widths)})
    parent, level = [-1], [0]
    for width in widths:
        nxt = []
        for p in level:
            nxt += list(range(len(parent), len(parent) + width))
            parent += [p] * width
        level = nxt
    grown = len(parent) - 1
    if budget is not None:
        _check_positive(budget=budget)
        if budget > grown:
            raise PlanError(
                f"workload: budget {budget} exceeds the {grown} tokens that widths {list(widths)} "
                f"grow (allowed: 1..{grown})."
            )
        parent = parent[: budget + 1]  # breadth-first: a prefix of the list is a tree
    tokens = [prefix] + [1] * (len(parent) - 1)
    tree = TreeBatch.from_parents(parent, tokens, list(range(1, len(parent))), mode="token")
    label = name or f"spec_{prefix}_{len(parent) - 1}"
    shape = f"widths {list(widths)}" + (f" cut breadth-first to {budget} tokens" if budget is not None else "")
    return Workload(
        label,
        tree,
        f"speculative token tree: {shape} over a {prefix}-token prefix ({len(parent) - 1} tree tokens)",
    )


def shared_prefix(
    prefix: int = 32000,
    samples: int = 64,
    generated: int = 256,
    seed: int = 0,
    name: str | None = None,
) -> Workload:
    """Shared-prefix sampling: ``samples`` continuations of a prefix, their lengths drawn
    (with ``seed``) uniformly in [generated // 2, generated], as samples finish apart."""
    _check_positive(prefix=prefix, samples=samples, generated=generated)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(generated // 2, 1), generated + 1, samples)
    tree = TreeBatch.from_parents([-1] + [0] * samples, [prefix, *lengths.tolist()])
    label = name or f"shared_prefix_{prefix}_x{samples}"
    return Workload(
        label,
        tree,
        f"shared-prefix sampling: {samples} samples of "
        f"{generated // 2}..{generated} tokens over {prefix}",
    )


#: Every named workload; the first five are the issue's reference shapes.
WORKLOADS: dict[str, Callable[..., Workload]] = {
    "fewshot_4k_x20": lambda: fewshot(4000, 20, 400, name="fewshot_4k_x20"),
    "fewshot_32k_x64": lambda: fewshot(32000, 64, 256, name="fewshot_32k_x64"),
    "tot_d3_w3": lambda: tree_of_thoughts(1000, 3, 3, 300, name="tot_d3_w3"),
    "spec_4k_92": lambda: speculative(4000, (4, 2, 2, 2, 1), name="spec_4k_92"),
    "spec_16k_184": lambda: speculative(16000, (8, 2, 2, 2, 1), name="spec_16k_184"),
    "shared_prefix_32k_x64": lambda: shared_prefix(32000, 64, 256, name="shared_prefix_32k_x64"),
    "fewshot_4k_x30": lambda: fewshot(4000, 30, 400, name="fewshot_4k_x30"),
    "fewshot_4k_x50": lambda: fewshot(4000, 50, 400, name="fewshot_4k_x50"),
    "tot_d3_w4": lambda: tree_of_thoughts(1000, 3, 4, 200, name="tot_d3_w4"),
    "spec_1k_44": lambda: speculative(1000, (4, 2, 2, 1), name="spec_1k_44"),
    "spec_8k_248": lambda: speculative(8000, (8, 2, 2, 2, 2), name="spec_8k_248"),
    # DeFT's token-tree sizes (32, 64, 128, 256 tokens) exactly, over 1k-16k prefixes
    "spec_1k_32": lambda: speculative(1000, (4, 2, 2, 2), budget=32, name="spec_1k_32"),
    "spec_4k_64": lambda: speculative(4000, (4, 2, 2, 2, 2), budget=64, name="spec_4k_64"),
    "spec_8k_128": lambda: speculative(8000, (4, 2, 2, 2, 2, 2), budget=128, name="spec_8k_128"),
    "spec_16k_256": lambda: speculative(16000, (8, 2, 2, 2, 2, 2), budget=256, name="spec_16k_256"),
}

#: The issue's reference shapes (item 9), in order.
REFERENCE_SHAPES = ("fewshot_4k_x20", "fewshot_32k_x64", "tot_d3_w3", "spec_4k_92", "spec_16k_184")


def planning_target_tree() -> TreeBatch:
    """Issue 3's planning-time tree (item 5): a random recursive tree of 256 nodes with a
    query at each, nodes of 1..63 tokens under a 1000-token root (seed 0)."""
    rng = np.random.default_rng(0)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, 256)]
    tokens = rng.integers(1, 64, 256)
    tokens[0] = 1000
    return TreeBatch.from_parents(parents, tokens, np.arange(256))


def unique_kv_tokens(workload: Workload) -> int:
    """KV tokens some query sees, each counted once (the IO floor's token count)."""
    return workload.tree.needed_kv_tokens


def per_branch_kv_tokens(workload: Workload) -> int:
    """KV tokens read by per-branch decoding: each query's whole visible KV."""
    return int(workload.tree.query_visible_counts.sum())
