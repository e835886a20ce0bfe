"""Lowering for the tree family: Spec -> TreeKernelIR, the frozen description that
``templates/tree.py.j2`` renders.

The tree kernels (DeFT-style, KV-guided) read a plan (:mod:`attngen.plan`): stage 1
computes one partial (O, LSE) per (group, query slot) over the group's chunk of the
flattened tree KV, stage 2 merges each query's partials by log-sum-exp in plan order.
The spec's own mask and score_mod compose with the plan's visibility bits through the
same element printer as the sequence family, with tree bindings for the symbols:

- ``q_pos`` / ``kv_pos``: tree positions (depth on the root path), from the plan;
- ``batch``: the query's tree (``plan.q_tree``); ``q_len`` = 1; ``kv_len`` = q_pos + 1
  (the query's root path holds q_pos + 1 tokens);
- ``head``: the query head.

Per-token user tensors are not supported here (a tree position does not name one token
of the flattened KV); ``head``, ``batch`` (one entry per tree) and fixed dims are.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy as sp

from attngen import __version__, semantics
from attngen.errors import SpecError
from attngen.ir import _TORCH_DTYPES, LN2, QK, TensorArg, base2_score, make_tensor_load, tensor_args
from attngen.printer import print_triton
from attngen.spec import Spec
from attngen.symbols import batch, head, kv_len, kv_pos, q_len, q_pos, score

#: Names the printed element-wise code uses inside the tree kernels' ``_tree_tile``.
TREE_ELEMENT_NAMES: dict[sp.Symbol, str] = {
    QK: "qk",
    q_pos: "q_pos",
    kv_pos: "kv_pos",
    head: "head",
    batch: "q_tree",
    q_len: "1",
    kv_len: "(q_pos + 1)",
}


@dataclass(frozen=True, slots=True)
class TreeTileConfig:
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True, slots=True)
class TreeKernelIR:
    """Everything ``tree.py.j2`` substitutes."""

    name: str
    title: str
    description_doc: str
    spec_hash: str
    spec_yaml: str
    attngen_version: str
    kind: str  # "tree" | "shared_prefix"
    query_mode: str  # "node" | "token"
    heads_q: int
    heads_kv: int
    group: int
    d_qk: int
    d_v: int
    d_qk_pad: int
    d_v_pad: int
    dtype: str
    torch_dtype: str
    scale: float
    ln2: float
    paged: bool
    page_size: int  # 1 for contiguous KV (unused there)
    configs: tuple[TreeTileConfig, ...]
    tensors: tuple[TensorArg, ...]
    score_code: str
    mask_code: str  # "" when the spec's mask adds nothing to the tree's visibility
    uses_q_pos: bool
    uses_kv_pos: bool
    uses_batch: bool

    # -- argument lists the template splices in --------------------------------------
    @property
    def tensor_ptr_params(self) -> str:
        return "".join(f" {t.param}," for t in self.tensors)

    @property
    def tensor_params_tail(self) -> str:
        return "".join(f", {t.param}" for t in self.tensors)

    @property
    def tensor_kwargs(self) -> str:
        return "".join(f", {t.name}=None" for t in self.tensors)

    @property
    def tensor_pass(self) -> str:
        return "".join(f", {t.name}" for t in self.tensors)

    @property
    def tensor_check_tuples(self) -> str:
        items = [f"({t.name!r}, {t.name}, {t.dims!r}, torch.{t.torch_dtype})" for t in self.tensors]
        return "".join(i + ", " for i in items)

    @property
    def tensor_signature(self) -> str:
        return "{" + ", ".join(f"{t.name!r}: ({t.dims!r}, {t.dtype!r})" for t in self.tensors) + "}"

    @property
    def q_dim_mask(self) -> str:
        return f" & (d_qk < {self.d_qk})[None, :]" if self.d_qk != self.d_qk_pad else ""

    @property
    def v_dim_mask(self) -> str:
        return f" & (d_v < {self.d_v})[None, :]" if self.d_v != self.d_v_pad else ""

    @property
    def v_dim_mask_1d(self) -> str:
        return f", mask=d_v < {self.d_v}" if self.d_v != self.d_v_pad else ""

    @property
    def dot_kwargs(self) -> str:
        # fp32 specs promise fp32 accuracy: no tf32 in the matrix units
        return ', input_precision="ieee"' if self.dtype == "fp32" else ""


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


def spec_mask(spec: Spec) -> sp.Basic:
    """The spec's own visibility; the tree's ancestor visibility comes from the plan."""
    return semantics.visibility(spec)


def tree_configs(spec: Spec) -> tuple[TreeTileConfig, ...]:
    """Autotuner candidates (block_n, warps, stages); the chunk and the queries per group
    come from the plan, so there is no block_m."""
    seen: dict[TreeTileConfig, None] = {}
    tune = spec.tune
    for bn, w, s in itertools.product(tune.block_n, tune.num_warps, tune.num_stages):
        seen.setdefault(TreeTileConfig(bn, w, s), None)
    return tuple(seen)


def used_symbols(*exprs: sp.Basic) -> set[sp.Symbol]:
    """Index symbols the expressions read (tensor names themselves excluded)."""
    free: set[sp.Symbol] = set()
    labels: set[sp.Basic] = set()
    for e in exprs:
        free |= {s for s in e.free_symbols if isinstance(s, sp.Symbol)}
        labels |= {i.base.label for i in e.atoms(sp.Indexed)}
    return free - labels


def verify(ir: TreeKernelIR, spec: Spec, mask: sp.Basic, modified: sp.Expr) -> None:
    """Checks at the end of lowering: heads divide, dims padded, symbols bound."""
    assert ir.heads_q % ir.heads_kv == 0 and ir.group == ir.heads_q // ir.heads_kv
    assert ir.d_qk_pad >= ir.d_qk and ir.d_qk_pad & (ir.d_qk_pad - 1) == 0
    assert ir.d_v_pad >= ir.d_v and ir.d_v_pad & (ir.d_v_pad - 1) == 0
    assert ir.score_code.strip(), "empty generated score"
    assert ir.configs, "no tile candidates"
    unbound = used_symbols(mask, modified) - set(TREE_ELEMENT_NAMES) - {score}
    if unbound:
        raise SpecError(
            "spec",
            "expression uses symbols the tree kernels do not bind",
            given=sorted(map(str, unbound)),
        )


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def lower_tree(spec: Spec) -> TreeKernelIR:
    """Spec -> TreeKernelIR for the tree family (``tree`` and ``shared_prefix``)."""
    check_topology(spec)
    check_tensors(spec)
    load = make_tensor_load(spec, spec.heads.q)

    def element(expr: sp.Basic) -> str:
        return print_triton(expr, names=TREE_ELEMENT_NAMES, tensor_load=load)

    mask = spec_mask(spec)
    modified = base2_score(spec)
    symbols = used_symbols(mask, modified)
    d_qk, d_v = spec.head_dim.qk, spec.head_dim.v
    first_line = (spec.description.strip().splitlines() or [spec.name])[0]
    topology = spec.topology
    ir = TreeKernelIR(
        name=spec.name,
        title=f"{spec.name}: {first_line}",
        description_doc=(spec.description.strip() or spec.name).replace('"""', "'''"),
        spec_hash=spec.content_hash,
        spec_yaml=spec.canonical_yaml().replace("\\", "\\\\").replace('"""', '\\"\\"\\"'),
        attngen_version=__version__,
        kind=topology.kind,
        query_mode=str(topology.queries),
        heads_q=spec.heads.q,
        heads_kv=spec.heads.kv,
        group=spec.heads.group,
        d_qk=d_qk,
        d_v=d_v,
        d_qk_pad=_pow2(d_qk),
        d_v_pad=_pow2(d_v),
        dtype=spec.dtype,
        torch_dtype=_TORCH_DTYPES[spec.dtype],
        scale=spec.softmax_scale,
        ln2=LN2,
        paged=topology.kv_layout == "paged",
        page_size=topology.page_size or 1,
        configs=tree_configs(spec),
        tensors=tensor_args(spec),
        score_code=element(modified),
        mask_code="" if mask == sp.true else element(mask),
        uses_q_pos=bool(symbols & {q_pos, kv_len}),
        uses_kv_pos=kv_pos in symbols,
        uses_batch=batch in symbols,
    )
    verify(ir, spec, mask, modified)
    return ir
