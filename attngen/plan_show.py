"""Showing a tree plan (:mod:`attngen.plan`) to a person: a text summary
(:func:`describe`), a Graphviz graph of tree and chunks (:func:`to_dot`) and a picture
of both over the flattened KV (:func:`draw_png`). ``attngen plan`` prints and writes
these; nothing here changes a plan.
"""

from __future__ import annotations

import numpy as np

from attngen.errors import AttngenError
from attngen.plan import Plan
from attngen.plotting import pyplot
from attngen.tree import TreeBatch


def _popcount(bits: np.ndarray) -> np.ndarray:
    """Set bits per row of the last two axes (zero rows, as in a plan with no groups, included)."""
    *lead, rows, words = bits.shape
    as_bytes = np.ascontiguousarray(bits).view(np.uint8).reshape(*lead, rows * words * bits.itemsize)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def runs(values: list[int]) -> str:
    """Sorted ints as runs, for a person: ``[0..183]``, ``[0..3, 7, 9..10]``."""
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}..{values[j]}")
        i = j + 1
    return f"[{', '.join(parts)}]"


def describe(plan: Plan, max_groups: int = 32) -> str:
    """A text summary: sizes, predicted cost, and one line per group (up to ``max_groups``)."""
    start, length = plan.group_kv_start.cpu().numpy(), plan.group_kv_len.cpu().numpy()
    query, full = plan.group_q.cpu().numpy(), plan.group_full.cpu().numpy()
    visible = _popcount(plan.group_bits.cpu().numpy())
    fold, lead = plan.group_fold.cpu().numpy(), plan.group_lead.cpu().numpy()
    lines = [
        f"plan: chunk {plan.chunk}, {plan.queries_per_group} queries/group, span {plan.span}, "
        f"{plan.n_groups} groups ({_kernels(plan)}), {plan.n_queries} queries, {plan.n_kv} KV tokens, "
        f"{plan.n_partials} partials",
        plan.cost.summary(),
    ]
    for g in range(min(plan.n_groups, max_groups)):
        q = query[g][query[g] >= 0].tolist()
        kind = "full" if full[g] else f"masked ({visible[g]}/{len(q) * length[g]} visible)"
        if g < plan.n_dense:
            kind += ", dense" + (f", then group {fold[g]} as its tail" if fold[g] >= 0 else "")
        elif fold[g] >= 0:
            kind += f", folded into group {fold[g]} (its first {lead[g]} keys seen by every query)"
        lines.append(f"  group {g}: kv [{start[g]}, {start[g] + length[g]}) {len(q)} quer{'y' if len(q) == 1 else 'ies'} {runs(q)} {kind}")
    if not plan.n_groups:
        # what a generated module launches for it (templates/tree.py.j2): no stage 1; the
        # merge alone writes the outputs, or, without queries, nothing
        runs_then = ("stage 1 does not run and the merge alone writes their outputs (0, LSE -inf)"
                     if plan.n_queries else "nothing is launched")
        lines.append(f"  no groups: the queries see no KV tokens, so the kernels read none; {runs_then}")
    if plan.n_groups > max_groups:
        lines.append(f"  ... {plan.n_groups - max_groups} more groups")
    return "\n".join(lines)


def to_dot(tree: TreeBatch, plan: Plan) -> str:
    """Graphviz DOT: tree nodes (query nodes doubled), and one box per chunk linked to the
    nodes whose tokens it holds."""
    query_nodes = set(tree.query_nodes.tolist())
    out = ["digraph plan {", "  rankdir=TB; node [fontname=monospace];"]
    for node in tree.order.tolist():
        s, t = int(tree.node_kv_start[node]), int(tree.tokens[node])
        shape = "doubleoctagon" if node in query_nodes else "box"
        out.append(f'  n{node} [shape={shape} label="n{node}\\n{t} tok\\nkv [{s},{s + t})"];')
    out += [f"  n{p} -> n{c};" for c, p in enumerate(tree.parent.tolist()) if p >= 0]
    layout, groups = plan.state.layout, _groups_per_chunk(plan)
    for c in range(layout.n_chunks):
        s, n = int(layout.start[c]), int(layout.length[c])
        out.append(
            f"  c{c} [shape=note style=filled fillcolor=lightyellow "
            f'label="chunk {c}\\nkv [{s},{s + n})\\n{groups[c]} group(s)"];'
        )
    for c, rank in sorted(
        set(zip(layout.piece_chunk.tolist(), layout.piece_rank.tolist(), strict=True))
    ):
        out.append(f"  c{c} -> n{int(tree.order[rank])} [style=dashed arrowhead=none];")
    out.append("}")
    return "\n".join(out) + "\n"


def draw_png(tree: TreeBatch, plan: Plan, path: str) -> bool:
    """Draw the tree (nodes as bars over their flattened KV range, one row per depth) above
    the plan's groups (bars over their KV ranges, a row per first query, coloured by
    where they run: dense, folded into a dense group, full, or masked by visibility bits).
    Returns False, drawing nothing, without matplotlib."""
    try:
        plt = pyplot("--png")
    except AttngenError:
        return False
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    level = _node_levels(tree)
    query_nodes = set(tree.query_nodes.tolist())
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(12, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for node in tree.order.tolist():
        s, t = int(tree.node_kv_start[node]), max(int(tree.tokens[node]), 1)
        top.barh(level[node], t, left=s, height=0.6, edgecolor="white", linewidth=0.8,
                 color="tab:orange" if node in query_nodes else "tab:blue")
    top.invert_yaxis()  # the root on top
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.legend(handles=[Patch(color="tab:blue", label="node"),
                        Patch(color="tab:orange", label="node with a query")],
               loc="upper right", fontsize=8)
    # the groups over their KV ranges, one row per first query, by where they run
    start, length = plan.group_kv_start.cpu().numpy(), plan.group_kv_len.cpu().numpy()
    first, full = plan.group_q.cpu().numpy()[:, 0], plan.group_full.cpu().numpy().astype(bool)
    fold = plan.group_fold.cpu().numpy()
    kinds = {"dense": "tab:blue", "folded into a dense group": "tab:green",
             "full": "tab:gray", "masked (visibility bits)": "tab:red"}
    labels = list(kinds)  # in the order the conditions pick them; the last where none holds
    kind = np.select([np.arange(plan.n_groups) < plan.n_dense, fold >= 0, full], labels[:-1], labels[-1])
    lanes, lane = np.unique(first, return_inverse=True)
    for label, color in kinds.items():
        mine = kind == label
        if mine.any():
            bottom.barh(lane[mine], length[mine], left=start[mine], height=0.8, color=color, label=label,
                        edgecolor="white", linewidth=0.8)
    bottom.invert_yaxis()
    ticks = np.unique(np.linspace(0, len(lanes) - 1, min(len(lanes), 12)).round().astype(np.int64))
    bottom.set_yticks(ticks, [f"q{q}" for q in lanes[ticks].tolist()], fontsize=8)
    if plan.n_groups:
        bottom.legend(loc="upper right", fontsize=8)
    top.set_ylabel("depth")
    bottom.set_ylabel("groups, a row per\nfirst query")
    bottom.set_xlabel("flattened KV token")
    top.set_title(f"chunk {plan.chunk}, QG {plan.queries_per_group}, span {plan.span}, {plan.n_groups} groups "
                  f"({_kernels(plan)}), {plan.n_queries} queries, {plan.n_kv} KV tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # the path as given, whatever its ending
    plt.close(fig)
    return True


def _kernels(plan: Plan) -> str:
    """Where the groups run: the dense ones in a kernel of their own on Hopper (Gluon),
    with the folded ones as their tails."""
    if not plan.n_dense:
        return "none dense"
    folded = f", {plan.n_folded} folded into them" if plan.n_folded else ""
    return f"{plan.n_dense} dense{folded}"


def _node_levels(tree: TreeBatch) -> np.ndarray:
    level = np.zeros(tree.n_nodes, dtype=np.int64)
    for node in tree.order.tolist():
        p = int(tree.parent[node])
        level[node] = level[p] + 1 if p >= 0 else 0
    return level


def _groups_per_chunk(plan: Plan) -> np.ndarray:
    """How many query groups read each chunk."""
    return np.bincount(plan.state.rows.chunk, minlength=plan.state.layout.n_chunks)
