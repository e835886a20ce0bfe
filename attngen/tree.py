"""Run-time tree structure for tree-topology attention: :class:`TreeBatch`.

A batch is a forest of declared trees. Node ``n`` holds ``tokens[n]`` KV tokens and has
parent ``parent[n]`` (-1 for a root). The KV of the batch is *flattened*: nodes in DFS
preorder (trees by ascending root id, children by ascending node id), each node's
tokens contiguous. A token's *position* (``kv_pos``) is its depth on its root path: the
number of tokens of its ancestors plus its offset within its node.

Queries are either one per chosen node (``node`` mode: the node's last token, which
sees every token of the node and of its ancestors) or one per token of the chosen nodes
(``token`` mode: token ``j`` of a node sees the node's tokens ``0..j`` and every
ancestor token). A node-mode query on an empty node sees its ancestors' tokens only.

>>> tb = TreeBatch.from_parents([-1, 0, 0], [4, 2, 3])
>>> tb.n_kv, tb.node_kv_start.tolist(), tb.q_pos.tolist()
(9, [0, 4, 6], [5, 6])

Batches are immutable; mutations (:meth:`TreeBatch.append_tokens`,
:meth:`TreeBatch.add_branch`, :meth:`TreeBatch.prune`) return a new batch. Every
invalid input raises :class:`~attngen.errors.PlanError` before anything is computed
from it, token counts past :data:`MAX_KV_TOKENS` (the kernels' int32 KV offsets) too.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import networkx as nx
import numpy as np

from attngen.errors import PlanError, plan_int

QueryMode = Literal["node", "token"]
IntArray = np.ndarray

#: The most KV tokens a batch may hold, in all and so in any one node (its appends
#: included). The tree kernels hold KV offsets in int32: the plan's group_kv_start,
#: group_kv_len, kv_pos and q_pos are int32 tensors, and stage 1 forms a token's index
#: kv_start + j in int32 before widening it (templates/tree_triton.py.j2), so a flattened
#: index past 2**31 - 1 would wrap; token mode makes a query of each token, and query
#: ids (group_q) are int32 too. The planner relies on it as well: replan keys pack a
#: node offset into 32 bits (plan/planner.py ``_matched``), and an append's depth shift
#: is summed in float64, exact below 2**53.
MAX_KV_TOKENS = 2**31 - 1

_INT64 = np.iinfo(np.int64)
_TOKENS_ALLOWED = f"0..{MAX_KV_TOKENS} per node, {MAX_KV_TOKENS} in all"


def _frozen(values: Iterable[int] | np.ndarray) -> np.ndarray:
    """A read-only int64 copy of ``values``."""
    out = np.array(values, dtype=np.int64).reshape(-1)
    out.setflags(write=False)
    return out


def checked_ints(values: object, what: str, expected: str = "an integer") -> np.ndarray:
    """A read-only int64 copy of user-given ``values``, a flat sequence of integers
    (integral floats, as from a float tensor, are taken); PlanError naming ``what`` and
    saying what was ``expected`` otherwise, where a plain cast would read 3.5 as 3, "3"
    as 3, or wrap an integer past int64 (2**63 as a uint64, 3e20 as a float) to a
    negative one."""
    try:
        arr = np.asarray(values)
    except ValueError as err:  # ragged nesting
        raise PlanError(f"{what}: expected a flat sequence of integers ({err}).") from None
    if arr.ndim != 1 and arr.size:
        raise PlanError(f"{what}: expected a flat sequence of integers, got an array of shape {arr.shape}.")
    if arr.size and (arr.dtype.kind not in "iu" or arr.dtype == np.uint64):
        ok = _int64_entries(arr)
        if not ok.all():
            bad = int(np.argmin(ok))
            # tolist: a Python value whatever the dtype (an object array's big int has no .item())
            raise PlanError(f"{what}: entry {bad} is {arr.tolist()[bad]!r}; expected {expected}.")
    return _frozen(arr)


def _int64_entries(arr: np.ndarray) -> np.ndarray:
    """Which entries of ``arr`` (of any dtype but the int64-safe integer ones) are integers
    that int64 holds: numpy keeps a Python int past int64 as an object."""
    kind = arr.dtype.kind
    if kind == "u":
        return arr <= _INT64.max
    if kind == "f":  # 2.0**63 itself is past int64.max
        return np.isfinite(arr) & (arr == np.round(arr)) & (np.abs(arr) < 2.0**63)
    if kind == "O":
        return np.array([_is_int64(v) for v in arr.tolist()], dtype=bool)
    return np.zeros(arr.shape, dtype=bool)  # strings, bools, ...


def _is_int64(value: object) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and _INT64.min <= int(value) <= _INT64.max
    )


# ---------------------------------------------------------------------------------------
# Validation: each check raises one PlanError paragraph.


def _check_parents(parent: np.ndarray) -> None:
    bad = np.flatnonzero((parent < -1) | (parent >= len(parent)))
    if bad.size:
        n = int(bad[0])
        raise PlanError(
            f"parent array: node {n} has parent {int(parent[n])}, which is not a node "
            f"(allowed: -1 for a root, or a node id in [0, {len(parent) - 1}]); "
            f"{bad.size} node(s) have an out-of-range parent."
        )


def _check_tokens(tokens: np.ndarray, n_nodes: int) -> None:
    if tokens.shape != (n_nodes,):
        raise PlanError(
            f"token counts: got {tokens.size} counts for {n_nodes} nodes; give exactly one "
            "count per node (0 is allowed for an empty node)."
        )
    # one unsigned comparison finds the negative counts (huge as uint64) and those past
    # the limit, the pass the negative ones alone took; with every count bounded, the
    # total (checked in _derive) cannot wrap int64
    bad = np.flatnonzero(tokens.view(np.uint64) > MAX_KV_TOKENS)
    if bad.size:
        n = int(bad[0])
        if tokens[n] < 0:
            raise PlanError(
                f"token counts: node {n} has {int(tokens[n])} tokens; a node holds 0 or more "
                f"tokens ({int((tokens < 0).sum())} node(s) are negative)."
            )
        raise PlanError(
            f"token counts: node {n} has {int(tokens[n])} tokens, more than the tree kernels "
            f"address (allowed: {_TOKENS_ALLOWED}; KV offsets are int32)."
        )


def _check_total(
    tokens: np.ndarray, kv_start: np.ndarray, order: np.ndarray, message: Callable[[int], str]
) -> None:
    """PlanError with ``message(total)`` if the batch holds more than :data:`MAX_KV_TOKENS`
    tokens in all. The total is where the last node in ``order`` ends in the flattened KV:
    one lookup, where a sum would be another pass (the message, worked out only on error,
    may take one)."""
    if not len(order):
        return
    last = int(order[-1])
    total = int(kv_start[last]) + int(tokens[last])
    if total > MAX_KV_TOKENS:
        raise PlanError(message(total))


def _find_cycle(parent: np.ndarray, start: int) -> list[int]:
    """The cycle reached by following parents from ``start`` (a node on no root path)."""
    seen: dict[int, int] = {}
    path: list[int] = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = int(parent[node])
    return [*path[seen[node] :], node]


def _preorder(parent: np.ndarray) -> np.ndarray:
    """Nodes in DFS preorder (roots, then children, by ascending id); PlanError on cycles."""
    n_nodes = len(parent)
    by_parent = np.argsort(parent, kind="stable")
    counts = np.bincount(parent + 1, minlength=n_nodes + 1)
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    kids = by_parent.tolist()
    order: list[int] = []
    stack = kids[bounds[0] : bounds[1]][::-1]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(kids[bounds[node + 1] : bounds[node + 2]][::-1])
    if len(order) < n_nodes:
        reached = np.zeros(n_nodes, dtype=bool)
        reached[order] = True
        cycle = _find_cycle(parent, int(np.flatnonzero(~reached)[0]))
        raise PlanError(
            f"parent array has a cycle: {' -> '.join(map(str, cycle))} (each arrow goes to "
            f"a node's parent); {n_nodes - len(order)} node(s) never reach a root. A tree's "
            "parent links must end at a node whose parent is -1."
        )
    return np.array(order, dtype=np.int64)


# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TreeBatch:
    """A validated forest of token trees with query placement.

    Use :meth:`from_parents` or :meth:`from_networkx`; the constructor takes the same
    arrays and validates them. Attributes ending in ``_pre`` are indexed by preorder
    rank, everything else by node id, flattened token index or query index.
    """

    parent: np.ndarray
    tokens: np.ndarray
    query_nodes: np.ndarray
    query_mode: QueryMode = "node"
    order: np.ndarray = field(init=False)
    pre_rank: np.ndarray = field(init=False)
    pre_end: np.ndarray = field(init=False)
    node_kv_start: np.ndarray = field(init=False)
    node_depth_start: np.ndarray = field(init=False)
    node_tree: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        parent = checked_ints(self.parent, "parent array")
        tokens = checked_ints(self.tokens, "token counts", f"an integer in {_TOKENS_ALLOWED}")
        _check_parents(parent)
        _check_tokens(tokens, len(parent))
        order = _preorder(parent)
        self._set("parent", parent)
        self._set("tokens", tokens)
        self._set("query_nodes", self._checked_queries(self.query_nodes, len(parent)))
        if self.query_mode not in ("node", "token"):
            raise PlanError(f"query mode {self.query_mode!r} is not one of 'node', 'token'.")
        self._derive(order)

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    @staticmethod
    def _checked_queries(query_nodes: Iterable[int] | np.ndarray, n_nodes: int) -> np.ndarray:
        queries = checked_ints(query_nodes, "queries")
        bad = queries[(queries < 0) | (queries >= n_nodes)]
        if bad.size:
            raise PlanError(
                f"queries: node {int(bad[0])} does not exist (the batch has {n_nodes} nodes, "
                f"ids 0..{n_nodes - 1}); place queries on existing nodes."
            )
        if np.unique(queries).size != queries.size:
            values, counts = np.unique(queries, return_counts=True)
            raise PlanError(
                f"queries: node {int(values[counts > 1][0])} is chosen more than once; each "
                "node carries at most one query placement (token mode already makes every "
                "token of a node a query)."
            )
        return queries

    def _derive(self, order: np.ndarray) -> None:
        """Preorder ranks, subtree extents, flattened starts and depth positions."""
        n_nodes, parent, tokens = len(order), self.parent, self.tokens
        pre_rank = np.empty(n_nodes, dtype=np.int64)
        pre_rank[order] = np.arange(n_nodes)
        size = np.ones(n_nodes, dtype=np.int64)
        depth_start = np.zeros(n_nodes, dtype=np.int64)
        tree = np.zeros(n_nodes, dtype=np.int64)
        par, tok = parent.tolist(), tokens.tolist()
        size_l, depth_l, tree_l = size.tolist(), depth_start.tolist(), tree.tolist()
        roots = 0
        for node in order.tolist():
            p = par[node]
            if p < 0:
                tree_l[node], roots = roots, roots + 1
            else:
                depth_l[node], tree_l[node] = depth_l[p] + tok[p], tree_l[p]
        for node in order[::-1].tolist():
            if par[node] >= 0:
                size_l[par[node]] += size_l[node]
        self._set("order", _frozen(order))
        self._set("pre_rank", _frozen(pre_rank))
        self._set("pre_end", _frozen(pre_rank + np.array(size_l, dtype=np.int64)))
        kv_start = _kv_starts(tokens, order)
        _check_total(
            tokens, kv_start, order,
            lambda total: f"token counts: the batch holds {total} tokens in all, more than the "
            f"tree kernels address (allowed: {_TOKENS_ALLOWED}; KV offsets are int32).",
        )
        self._set("node_kv_start", kv_start)
        self._set("node_depth_start", _frozen(depth_l))
        self._set("node_tree", _frozen(tree_l))

    # ---- constructors -----------------------------------------------------------------

    @classmethod
    def from_parents(
        cls,
        parent: Sequence[int] | np.ndarray,
        tokens: Sequence[int] | np.ndarray,
        queries: Sequence[int] | np.ndarray | None = None,
        *,
        mode: QueryMode = "node",
        expect_single_tree: bool = False,
        kv_len: int | None = None,
    ) -> TreeBatch:
        """A batch from a parent array (-1 for a root) and per-node token counts.

        ``queries`` lists the query nodes (default: the leaves, by id). With
        ``expect_single_tree`` a forest is an error; with ``kv_len`` the token counts
        must add up to it.
        """
        parent_arr = checked_ints(parent, "parent array")
        if queries is None:
            _check_parents(parent_arr)
            queries = _leaves(parent_arr)
        batch = cls(parent_arr, tokens, queries, mode)  # type: ignore[arg-type]  # checked there
        if expect_single_tree:
            batch.check_single_tree()
        if kv_len is not None:
            batch.check_kv_len(kv_len)
        return batch

    @classmethod
    def from_networkx(
        cls,
        graph: nx.DiGraph,
        queries: Iterable[object] | None = None,
        *,
        mode: QueryMode = "node",
        expect_single_tree: bool = False,
        kv_len: int | None = None,
    ) -> TreeBatch:
        """A batch from a DiGraph with edges parent -> child and node attribute ``tokens``.

        Node labels must be sortable; node ids are the ranks of the sorted labels.
        ``queries`` names query nodes by label (default: the leaves).
        """
        labels = sorted(graph.nodes)
        index = {label: i for i, label in enumerate(labels)}
        parent = np.full(len(labels), -1, dtype=np.int64)
        for label in labels:
            preds = sorted(graph.predecessors(label))
            if len(preds) > 1:
                raise PlanError(
                    f"graph: node {label!r} has {len(preds)} parents {preds}; in a tree every "
                    "node has at most one incoming edge (parent -> child)."
                )
            if preds:
                parent[index[label]] = index[preds[0]]
        tokens = [_node_tokens(graph, label) for label in labels]
        query_ids = None if queries is None else [_label_index(index, q) for q in queries]
        return cls.from_parents(
            parent,
            tokens,
            query_ids,
            mode=mode,
            expect_single_tree=expect_single_tree,
            kv_len=kv_len,
        )

    @classmethod
    def concat(cls, batches: Sequence[TreeBatch]) -> TreeBatch:
        """Several batches side by side as one forest (node ids offset in order)."""
        if not batches:
            raise PlanError("concat: no batches given; a batch needs at least one tree.")
        modes = {b.query_mode for b in batches}
        if len(modes) > 1:
            raise PlanError(f"concat: batches mix query modes {sorted(modes)}; use one mode.")
        offsets = np.cumsum([0] + [b.n_nodes for b in batches[:-1]])
        parent = [
            np.where(b.parent < 0, -1, b.parent + o) for b, o in zip(batches, offsets, strict=True)
        ]
        queries = [b.query_nodes + o for b, o in zip(batches, offsets, strict=True)]
        tokens = [b.tokens for b in batches]
        return cls(
            np.concatenate(parent),
            np.concatenate(tokens),
            np.concatenate(queries),
            batches[0].query_mode,
        )

    # ---- checks -----------------------------------------------------------------------

    def check_single_tree(self) -> None:
        """PlanError unless the batch is exactly one tree."""
        roots = np.flatnonzero(self.parent < 0)
        if roots.size != 1:
            raise PlanError(
                f"expected a single tree but the parent array has {roots.size} roots "
                f"({roots[:8].tolist()}{'...' if roots.size > 8 else ''}): a forest. Give every "
                "node but one a parent, or declare a batch of several trees."
            )

    def check_kv_len(self, kv_len: int) -> None:
        """PlanError unless the token counts add up to ``kv_len`` (the KV tensor's length)."""
        if int(kv_len) != self.n_kv:
            raise PlanError(
                f"token counts add up to {self.n_kv} tokens but the KV has {int(kv_len)}; the "
                "per-node counts must describe the flattened KV exactly (preorder, each node's "
                "tokens contiguous)."
            )

    # ---- sizes and per-token / per-query arrays --------------------------------------

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    @property
    def n_trees(self) -> int:
        return int(np.count_nonzero(self.parent < 0))

    @property
    def n_kv(self) -> int:
        """Total tokens (the flattened KV length)."""
        return int(self.tokens.sum())

    @property
    def node_tokens(self) -> np.ndarray:
        return self.tokens

    @property
    def leaves(self) -> np.ndarray:
        """Nodes without children, ascending."""
        return _leaves(self.parent)

    @functools.cached_property
    def token_node(self) -> np.ndarray:
        """The node of each flattened token."""
        return _frozen(np.repeat(self.order, self.tokens[self.order]))

    @functools.cached_property
    def kv_pos(self) -> np.ndarray:
        """Depth position of each flattened token on its root path."""
        shift = (self.node_depth_start - self.node_kv_start)[self.order]
        return _frozen(np.arange(self.n_kv) + shift.repeat(self.tokens[self.order]))

    @functools.cached_property
    def query_node(self) -> np.ndarray:
        """The node of each query (token mode: repeated once per token)."""
        if self.query_mode == "node":
            return self.query_nodes
        return _frozen(np.repeat(self.query_nodes, self.tokens[self.query_nodes]))

    @functools.cached_property
    def query_own_len(self) -> np.ndarray:
        """How many tokens of its own node each query sees (its offset + 1 in token mode)."""
        if self.query_mode == "node":
            return self.tokens[self.query_nodes]
        counts = self.tokens[self.query_nodes]
        first = np.repeat(np.cumsum(counts) - counts, counts)
        return _frozen(np.arange(int(counts.sum())) - first + 1)

    @property
    def n_queries(self) -> int:
        return len(self.query_node)

    @functools.cached_property
    def q_pos(self) -> np.ndarray:
        """Position of each query token (-1 for a query on an empty root: it sees nothing)."""
        return _frozen(self.node_depth_start[self.query_node] + self.query_own_len - 1)

    @property
    def q_tree(self) -> np.ndarray:
        return self.node_tree[self.query_node]

    @functools.cached_property
    def needed_kv_tokens(self) -> int:
        """Unique tokens some query sees: those of nodes with a query node in their subtree
        (every token of such a node, since its last token or a descendant is a query)."""
        marked = np.zeros(self.n_nodes + 1, dtype=np.int64)
        marked[self.pre_rank[self.query_node] + 1] = 1
        before = marked.cumsum()  # [r]: preorder ranks below r that hold a query node
        return int(self.tokens[before[self.pre_end] > before[self.pre_rank]].sum())

    @functools.cached_property
    def query_visible_counts(self) -> np.ndarray:
        """Tokens each query sees: its ancestors' tokens plus its own visible ones."""
        return _frozen(self.node_depth_start[self.query_node] + self.query_own_len)

    @functools.cached_property
    def n_seeing(self) -> int:
        """Queries that see any token (a query on an empty root sees none)."""
        return int(np.count_nonzero(self.query_visible_counts))

    def ancestors(self, node: int) -> list[int]:
        """Strict ancestors of ``node``, root first."""
        path: list[int] = []
        p = int(self.parent[node])
        while p >= 0:
            path.append(p)
            p = int(self.parent[p])
        return path[::-1]

    def query_visible_tokens(self, i: int) -> np.ndarray:
        """Flattened indices of the tokens query ``i`` sees, ascending."""
        if not 0 <= i < self.n_queries:
            raise PlanError(f"query {i} does not exist (the batch has {self.n_queries} queries).")
        node = int(self.query_node[i])
        spans = [(int(self.node_kv_start[a]), int(self.tokens[a])) for a in self.ancestors(node)]
        spans.append((int(self.node_kv_start[node]), int(self.query_own_len[i])))
        return np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in spans])

    def visible_matrix(self) -> np.ndarray:
        """Bool [n_queries, n_kv]: entry (i, L) is whether query i sees flattened token L."""
        tok_rank = self.pre_rank[self.token_node][None, :]
        q_rank = self.pre_rank[self.query_node][:, None]
        ancestor_or_self = (tok_rank <= q_rank) & (q_rank < self.pre_end[self.token_node][None, :])
        offset = np.arange(self.n_kv) - self.node_kv_start[self.token_node]
        own = self.token_node[None, :] == self.query_node[:, None]
        return ancestor_or_self & (~own | (offset[None, :] < self.query_own_len[:, None]))

    def to_networkx(self) -> nx.DiGraph:
        """The structure as a DiGraph (edges parent -> child, node attribute ``tokens``)."""
        graph = nx.DiGraph()
        for node, count in enumerate(self.tokens.tolist()):
            graph.add_node(node, tokens=count)
        graph.add_edges_from((int(p), c) for c, p in enumerate(self.parent.tolist()) if p >= 0)
        return graph

    # ---- mutations (between decode steps) ---------------------------------------------

    def _with(self, parent: np.ndarray, tokens: np.ndarray, queries: np.ndarray) -> TreeBatch:
        return TreeBatch(parent, tokens, queries, self.query_mode)

    def append_tokens(self, counts: Mapping[int, int] | Sequence[int] | np.ndarray) -> TreeBatch:
        """A new batch with ``counts`` tokens appended to nodes (a node -> count mapping, or
        one count per node)."""
        extra = np.zeros(self.n_nodes, dtype=np.int64)
        if isinstance(counts, Mapping):
            nodes = [self._check_node(node, "append_tokens") for node in counts]
            np.add.at(extra, nodes, checked_ints(list(counts.values()), "append_tokens counts"))
        else:
            extra += checked_ints(counts, "append_tokens counts") if len(counts) == self.n_nodes else self._bad_counts(counts)
        # as in _check_tokens: one unsigned comparison for both bounds, and none can wrap
        # int64 when added to a node's count
        if (extra.view(np.uint64) > MAX_KV_TOKENS).any():
            if (extra < 0).any():
                raise PlanError("append_tokens: counts must be >= 0 (use prune to remove nodes).")
            n = int(np.argmax(extra))
            raise PlanError(
                f"append_tokens: {int(extra[n])} tokens appended to node {n}, more than the tree "
                f"kernels address (allowed: {_TOKENS_ALLOWED}; KV offsets are int32)."
            )
        return self._grown(extra)

    def _grown(self, extra: np.ndarray) -> TreeBatch:
        """This batch with ``extra[node]`` (>= 0) more tokens per node. The structure (and
        its checks) is unchanged, so it is reused: only the token-dependent fields are
        derived again, without the node loops of :meth:`_derive` (the decode step's path)."""
        grown = object.__new__(TreeBatch)
        for f in fields(self):  # every field but the three set below (no cached views)
            if f.name not in ("tokens", "node_kv_start", "node_depth_start"):
                grown._set(f.name, getattr(self, f.name))
        tokens = _frozen(self.tokens + extra)
        # a node's depth start grows by its strict ancestors' extra: each node's extra
        # covers the preorder ranks of its subtree after itself
        n = self.n_nodes + 1
        cover = np.bincount(self.pre_rank + 1, extra, n) - np.bincount(self.pre_end, extra, n)
        shift = cover.cumsum().astype(np.int64)  # bincount sums in float64: exact here
        kv_start = _kv_starts(tokens, self.order)
        _check_total(
            tokens, kv_start, self.order,
            lambda total: f"append_tokens: the batch would hold {total} tokens ({self.n_kv} held, "
            f"{int(extra.sum())} appended), more than the tree kernels address (allowed: "
            f"{_TOKENS_ALLOWED}; KV offsets are int32).",
        )
        grown._set("tokens", tokens)
        grown._set("node_kv_start", kv_start)
        grown._set("node_depth_start", _frozen(self.node_depth_start + shift[self.pre_rank]))
        return grown

    def _bad_counts(self, counts: Sequence[int] | np.ndarray) -> np.ndarray:
        raise PlanError(
            f"append_tokens: got {len(counts)} counts for {self.n_nodes} nodes; give one "
            "count per node, or a mapping node -> count."
        )

    def append_to_leaves(self, count: int = 1) -> TreeBatch:
        """A new batch with ``count`` tokens appended to every leaf (one decode step)."""
        # checked before it is stored: numpy would cut 1.5 to 1, and refuse 2**63 with an
        # OverflowError
        count = plan_int(count, "append_to_leaves: count")
        if not 0 <= count <= MAX_KV_TOKENS:
            raise PlanError(f"append_to_leaves: count {count} is out of range (allowed: {_TOKENS_ALLOWED}).")
        extra = np.zeros(self.n_nodes, dtype=np.int64)
        extra[self.leaves] = count
        return self.append_tokens(extra)

    def add_branch(self, parent: int, tokens: int, *, query: bool = True) -> TreeBatch:
        """A new batch with a child of ``parent`` (-1: a new tree) holding ``tokens`` tokens.

        The new node's id is ``n_nodes``; with ``query`` it gets a query placement.
        """
        if parent != -1:
            self._check_node(parent, "add_branch")
        queries = np.append(self.query_nodes, self.n_nodes) if query else self.query_nodes
        return self._with(np.append(self.parent, parent), np.append(self.tokens, tokens), queries)

    def prune(self, node: int) -> tuple[TreeBatch, np.ndarray]:
        """A new batch without the subtree of ``node``, and the old -> new id map (-1: removed).

        Surviving nodes keep their relative order; queries on removed nodes are dropped.
        """
        self._check_node(node, "prune")
        rank = int(self.pre_rank[node])
        removed = np.zeros(self.n_nodes, dtype=bool)
        removed[self.order[rank : int(self.pre_end[node])]] = True
        if removed.all():
            raise PlanError(f"prune: removing node {node} would leave an empty batch.")
        remap = np.where(removed, -1, np.cumsum(~removed) - 1)
        keep = np.flatnonzero(~removed)
        parent = np.where(self.parent[keep] < 0, -1, remap[self.parent[keep]])
        queries = remap[self.query_nodes[~removed[self.query_nodes]]]
        return self._with(parent, self.tokens[keep], queries), _frozen(remap)

    def _check_node(self, node: int, what: str) -> int:
        """``node`` as an int id of this batch; PlanError otherwise."""
        node_id = plan_int(node, f"{what}: a node id")
        if not 0 <= node_id < self.n_nodes:
            raise PlanError(
                f"{what}: node {node} does not exist (the batch has {self.n_nodes} nodes, "
                f"ids 0..{self.n_nodes - 1})."
            )
        return node_id

    def same_structure(self, other: TreeBatch) -> bool:
        """Whether ``other`` has the same parents, queries and mode (token counts may differ)."""
        return (
            self.query_mode == other.query_mode
            and np.array_equal(self.parent, other.parent)
            and np.array_equal(self.query_nodes, other.query_nodes)
        )


def _kv_starts(tokens: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Each node's first index in the flattened KV (nodes in ``order``, tokens contiguous)."""
    in_order = tokens[order]
    starts = np.empty(len(order), dtype=np.int64)
    starts[order] = np.cumsum(in_order) - in_order
    starts.setflags(write=False)
    return starts


def _leaves(parent: np.ndarray) -> np.ndarray:
    has_child = np.zeros(len(parent), dtype=bool)
    has_child[parent[parent >= 0]] = True
    return _frozen(np.flatnonzero(~has_child))


def _node_tokens(graph: nx.DiGraph, label: object) -> int:
    if "tokens" not in graph.nodes[label]:
        raise PlanError(f"graph: node {label!r} has no 'tokens' attribute (its token count).")
    value = graph.nodes[label]["tokens"]
    try:
        (count,) = checked_ints([value], "tokens")
    except PlanError:
        raise PlanError(
            f"graph: node {label!r} has tokens {value!r}; a token count is an integer "
            f"(allowed: {_TOKENS_ALLOWED})."
        ) from None
    return int(count)


def _label_index(index: Mapping[object, int], label: object) -> int:
    if label not in index:
        raise PlanError(f"queries: node {label!r} does not exist in the graph.")
    return index[label]
