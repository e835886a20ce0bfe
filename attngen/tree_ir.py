"""Lowering for the tree family: Spec -> TreeKernelIR, the frozen description that
``templates/tree.py.j2`` renders.

The tree kernels (DeFT-style, KV-guided) read a plan (:mod:`attngen.plan`): stage 1
computes one partial (O, LSE) per (group, query slot) over the group's chunk of the
flattened tree KV, stage 2 merges each query's partials by log-sum-exp in plan order.
The spec's own mask and score_mod compose with the plan's visibility bits through the
same element printer as the sequence family, with tree bindings for the symbols:

- ``q_pos`` / ``kv_pos``: tree positions (depth on the root path), from the plan;
- ``batch``: the query's tree (``plan.q_tree``);
- ``q_len`` = 1 and ``kv_len`` = q_pos + 1 (the query's root path holds q_pos + 1
  tokens), substituted into the expressions before they are printed;
- ``head``: the query head.

Per-token user tensors are not supported here (a tree position does not name one token
of the flattened KV); ``head``, ``batch`` (one entry per tree) and fixed dims are.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy as sp

from attngen import semantics
from attngen.cost import BLOCK_ROWS, DENSE_ROWS, ROW_TIERS
from attngen.errors import SpecError
from attngen.ir import (
    QK,
    ModuleIR,
    base2_score,
    check_bound,
    make_tensor_load,
    module_fields,
    print_for,
    used_symbols,
)
from attngen.spec import DEFAULT_BLOCKS, Spec
from attngen.symbols import TREE_FIXED, batch, head, kv_pos, q_pos

#: Names the printed element-wise code uses inside the tree kernels' ``_tree_tile``.
TREE_ELEMENT_NAMES: dict[sp.Symbol, str] = {
    QK: "qk",
    q_pos: "q_pos",
    kv_pos: "kv_pos",
    head: "head",
    batch: "q_tree",
}
#: The lengths a tree query has (:data:`attngen.symbols.TREE_FIXED`, which the parser
#: checks expressions against), substituted before printing, so that the printer folds
#: what they make constant (``tanh(q_len)`` is a number, not ``_tanh`` of a Python int).
TREE_LENGTHS: dict[sp.Basic, sp.Basic] = dict(TREE_FIXED.values)


@dataclass(frozen=True, slots=True)
class TreeTileConfig:
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True, slots=True)
class TreeKernelIR(ModuleIR):
    """Everything ``tree.py.j2`` substitutes."""

    kind: str  # "tree" | "shared_prefix"
    query_mode: str  # "node" | "token"
    paged: bool
    page_size: int  # 1 for contiguous KV (unused there)
    configs: tuple[TreeTileConfig, ...]
    score_code: str
    mask_code: str  # "" when the spec's mask adds nothing to the tree's visibility
    uses_q_pos: bool
    uses_kv_pos: bool
    uses_batch: bool
    #: The base-2 score scale, printed, when stage 1's tall full groups can run the Gluon
    #: program on Hopper (see :func:`gluon_scale`); "" when they cannot.
    gluon_scale: str

    @property
    def gluon_dtype(self) -> str:
        return {"bf16": "bfloat16", "fp16": "float16"}.get(self.dtype, "")

    @property
    def gluon_rows(self) -> tuple[int, int]:
        """The dense groups' heights (filled slots x query heads), which the Gluon program
        takes: at least two of its tile's 64-row warpgroups hold rows."""
        return DENSE_ROWS

    @property
    def gluon_loader_regs(self) -> int:
        """Registers per thread of the Gluon programs' one-warp loader: a TMA issuer needs
        few; a paged gather holds a 16-row copy's addresses (8 a lane) and its slots."""
        return 56 if self.paged else 40

    @property
    def block_rows(self) -> int:
        """The tallest Triton stage-1 tile; a tall plan's groups run as row blocks of it."""
        return BLOCK_ROWS

    @property
    def merge_heads(self) -> int:
        """Query heads one merge program combines: the largest power of two up to 8 that
        divides the head count (their partial rows are contiguous). One partial per step:
        on an H200, 8 heads x 1 partial merged 3-5x faster than 8 x 2 and 1.4-2.6x faster
        still than 8 x 4 to 8 x 16 (docs/benchmarks/HISTORY.md)."""
        return min(8, self.heads_q & -self.heads_q)

    @property
    def row_tiers(self) -> tuple[int, ...]:
        """The stage-1 tile heights below the plan's own, lowest first (the cost model
        charges by them): a group runs at the lowest that holds its filled slots' rows,
        else at the plan's full height, which is never below the lowest tier."""
        return ROW_TIERS


#: Head dims the Gluon stage-1 program is built for (its K/V ring and Q fill shared memory).
GLUON_HEAD_DIMS = (128,)

# ---------------------------------------------------------------------------------------
# Passes


def check_topology(spec: Spec) -> None:
    if spec.topology.kind not in ("tree", "shared_prefix"):
        raise SpecError(
            "topology.kind",
            "this lowering handles the tree family",
            given=spec.topology.kind,
            allowed="tree, shared_prefix",
        )


def check_tensors(spec: Spec) -> None:
    """Per-token tensors have no meaning the tree kernels can index (see module doc)."""
    for name, decl in sorted(spec.tensors.items()):
        if "token" in decl.dims:
            raise SpecError(
                f"tensors.{name}.dims",
                "per-token tensors are not supported by the tree family",
                given=list(decl.dims),
                allowed="dims made of 'head', 'batch' (one per tree) and fixed sizes",
            )


#: Added to the spec's candidates when its ``tune.block_n`` is left at the default: a
#: 32-key tile whose 48 KB K/V ring lets three programs share an SM where the 64-key
#: tile's 96 KB fits two. Plans of many short programs gain (tot_d3_w3 GQA at span 512:
#: 22.2 us against 23.2 with 64-key tiles on the H200, session 24); it loses elsewhere,
#: where the autotuner does not pick it.
TREE_NARROW_TILE = TreeTileConfig(block_n=32, num_warps=4, num_stages=3)


def tree_configs(spec: Spec) -> tuple[TreeTileConfig, ...]:
    """Autotuner candidates (block_n, warps, stages); the chunk and the queries per group
    come from the plan, so there is no block_m."""
    seen: dict[TreeTileConfig, None] = {}
    tune = spec.tune
    for bn, w, s in itertools.product(tune.block_n or DEFAULT_BLOCKS, tune.num_warps, tune.num_stages):
        seen.setdefault(TreeTileConfig(bn, w, s), None)
    if tune.block_n is None:
        seen.setdefault(TREE_NARROW_TILE, None)
    return tuple(seen)


def gluon_scale(spec: Spec, mask: sp.Basic, modified: sp.Expr) -> str:
    """The base-2 scale c when the score is c * q.k (c > 0) with nothing else to apply, on a
    bf16/fp16 cache of head dim 128: then the full groups of 65 to 192 rows run
    in the Gluon program (one loader warp, two or three warpgroups whose softmax overlaps
    their p.v), which has no mask, score_mod or tensor code. Its loader reads a contiguous
    cache by TMA, and a paged one by TMA boxes of 16 rows where the slots run on, by
    cp.async where they do not. "" otherwise."""
    coeff, rest = modified.as_coeff_Mul()
    plain = rest == QK and coeff.is_Number and coeff > 0 and mask == sp.true and not spec.tensors
    layout_ok = spec.dtype in ("bf16", "fp16")
    dims_ok = spec.head_dim.qk == spec.head_dim.v and spec.head_dim.qk in GLUON_HEAD_DIMS
    return repr(float(coeff)) if plain and layout_ok and dims_ok else ""


def verify(ir: TreeKernelIR, mask: sp.Basic, modified: sp.Expr) -> None:
    """Checks at the end of lowering: heads divide, dims padded, symbols bound."""
    assert ir.heads_q % ir.heads_kv == 0
    assert ir.d_qk_pad >= ir.d_qk and ir.d_qk_pad & (ir.d_qk_pad - 1) == 0
    assert ir.d_v_pad >= ir.d_v and ir.d_v_pad & (ir.d_v_pad - 1) == 0
    assert ir.score_code.strip(), "empty generated score"
    assert ir.configs, "no tile candidates"
    check_bound((mask, modified), TREE_ELEMENT_NAMES, "tree")


def lower_tree(spec: Spec) -> TreeKernelIR:
    """Spec -> TreeKernelIR for the tree family (``tree`` and ``shared_prefix``)."""
    check_topology(spec)
    check_tensors(spec)
    load = make_tensor_load(spec, spec.heads.q)

    def element(expr: sp.Basic) -> str:
        return print_for(spec, expr, TREE_ELEMENT_NAMES, load)

    # the tree's own visibility comes from the plan
    mask = semantics.visibility(spec).xreplace(TREE_LENGTHS)
    modified = base2_score(spec).xreplace(TREE_LENGTHS)
    symbols = used_symbols(mask, modified)
    topology = spec.topology
    ir = TreeKernelIR(
        **module_fields(spec),  # type: ignore[arg-type]
        kind=topology.kind,
        query_mode=str(topology.queries),
        paged=topology.kv_layout == "paged",
        page_size=topology.page_size or 1,
        configs=tree_configs(spec),
        score_code=print_for(spec, modified, TREE_ELEMENT_NAMES, load, score=True),
        mask_code="" if mask == sp.true else element(mask),
        uses_q_pos=q_pos in symbols,
        uses_kv_pos=kv_pos in symbols,
        uses_batch=batch in symbols,
        gluon_scale=gluon_scale(spec, mask, modified),
    )
    verify(ir, mask, modified)
    return ir
