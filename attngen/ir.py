"""Lowering: Spec -> KernelIR, the frozen description a template renders.

The lowering is a short sequence of named passes (see :func:`lower`). Every value a
template needs is computed here, printed to Triton source where it is an expression;
templates only substitute and loop.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import sympy as sp

from attngen import __version__, analysis, semantics
from attngen.errors import SpecError
from attngen.masks import mask_rule_to_yaml
from attngen.printer import PrintError, TensorLoad, print_triton, widens
from attngen.spec import DEFAULT_BLOCKS, TORCH_DTYPE_NAMES, Spec, TensorDecl
from attngen.symbols import batch, head, kv_len, kv_pos, q_len, q_pos, score

#: The raw dot product q.k (fp32) inside a kernel tile.
QK = sp.Symbol("qk", real=True)
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


#: Names the printed element-wise code uses for each symbol inside ``_tile_step``.
ELEMENT_NAMES: dict[sp.Symbol, str] = {
    QK: "qk", q_pos: "q_pos", kv_pos: "kv_pos", head: "head", batch: "pid_b",
    q_len: "q_len", kv_len: "kv_len",
}
#: Names the printed tile-level code uses (scalars) in ``_tile_range``/``_tile_may_see``.
TILE_NAMES: dict[sp.Symbol, str] = {
    analysis.q_lo: "q_lo", analysis.q_hi: "q_hi", analysis.k_lo: "k_lo", analysis.k_hi: "k_hi",
    batch: "pid_b", q_len: "q_len", kv_len: "kv_len",
}


@dataclass(frozen=True, slots=True)
class TensorArg:
    """A user tensor as the kernel sees it."""

    name: str
    param: str
    dims: tuple[str | int, ...]
    dtype: str
    torch_dtype: str

    @property
    def shape_doc(self) -> str:
        names = {"head": "heads_q", "batch": "batch", "token": "total_kv"}
        return "[" + ", ".join(names.get(str(d), str(d)) for d in self.dims) + "]"


@dataclass(frozen=True, slots=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True, slots=True)
class ModuleIR:
    """What every generated module states about its spec (identity, heads, dims, dtype,
    user tensors), and the argument lists templates splice in."""

    name: str
    #: The module docstring's first line (``name: the description's first line``) and the
    #: rest of the description, often empty; ``description_doc`` is all of it, for
    #: ``attention``'s docstring. All three are escaped to stand in a docstring.
    title: str
    description_rest: str
    description_doc: str
    spec_hash: str
    spec_yaml: str
    attngen_version: str
    heads_q: int
    heads_kv: int
    d_qk: int
    d_v: int
    d_qk_pad: int
    d_v_pad: int
    dtype: str
    torch_dtype: str
    scale: float
    ln2: float
    tensors: tuple[TensorArg, ...]

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

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
    def qk_dim_mask(self) -> str:
        """Load mask of the padded Q·K head dim (Q and K tiles), or nothing."""
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


def pow2(n: int) -> int:
    """The smallest power of two >= n (tile dims must be powers of two)."""
    return 1 << (n - 1).bit_length()


def literal_text(text: str) -> str:
    """``text`` as it may stand between triple double quotes in generated code, where it
    reads back as ``text``: backslashes doubled, quotes that would close it escaped."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def module_fields(spec: Spec) -> dict[str, object]:
    """The :class:`ModuleIR` fields of ``spec``, shared by every family's lowering."""
    d_qk, d_v = spec.head_dim.qk, spec.head_dim.v
    first, *rest = spec.description.strip().splitlines() or [""]
    return dict(
        name=spec.name,
        title=literal_text(f"{spec.name}: {first}" if first else spec.name),
        description_rest=literal_text("\n".join(rest).strip()),
        description_doc=literal_text(spec.description.strip() or spec.name),
        spec_hash=spec.content_hash,
        spec_yaml=literal_text(spec.canonical_yaml()),
        attngen_version=__version__,
        heads_q=spec.heads.q,
        heads_kv=spec.heads.kv,
        d_qk=d_qk,
        d_v=d_v,
        d_qk_pad=pow2(d_qk),
        d_v_pad=pow2(d_v),
        dtype=spec.dtype,
        torch_dtype=TORCH_DTYPE_NAMES[spec.dtype],
        scale=spec.softmax_scale,
        ln2=LN2,
        tensors=tensor_args(spec),
    )


@dataclass(frozen=True, slots=True)
class KernelIR(ModuleIR):
    """Everything the sequence templates substitute."""

    family: str  # "prefill" | "decode"
    decode_rows: int
    configs: tuple[TileConfig, ...]
    score_code: str
    mask_code: str
    piece_codes: tuple[tuple[str, str], ...]  # [lo, hi) of each piece of visible keys
    full_lo_code: str
    full_hi_code: str
    may_see_code: str

    @property
    def ctx_params(self) -> str:
        return ", ".join(["pid_b", "q_len", "kv_len", "kv_start", "n_batch", *(t.param for t in self.tensors)])

    @property
    def piece_names(self) -> str:
        """``lo0, hi0, lo1, hi1, ...``: the pieces as ``_tile_range`` returns them."""
        return ", ".join(f"lo{i}, hi{i}" for i in range(len(self.piece_codes)))

    @property
    def pieces_doc(self) -> str:
        """How ``_tile_range``'s docstring names the pieces."""
        last = len(self.piece_codes) - 1
        if not last:
            return "[lo0, hi0), whose tiles hold every key any of them may see"
        return (f"the pieces [lo0, hi0) .. [lo{last}, hi{last}), in order and apart, whose tiles\n"
                "    hold every key any of them may see (the gaps between them are never read)")

    @property
    def runs_below(self) -> list[tuple[str, str]]:
        """[start, end) of each piece's tiles below the full run, as printed code."""
        return [(f"lo{i}", f"tl.minimum(f_lo, hi{i})") for i in range(len(self.piece_codes))]

    @property
    def runs_above(self) -> list[tuple[str, str]]:
        """[start, end) of each piece's tiles above the full run, as printed code."""
        return [(f"tl.maximum(f_hi, lo{i})", f"hi{i}") for i in range(len(self.piece_codes))]

    @property
    def piece_swaps(self) -> list[tuple[int, int]]:
        """Compare-and-swap steps that order the pieces by start (a bubble sort)."""
        n = len(self.piece_codes)
        return [(j, j + 1) for i in range(n) for j in range(n - 1 - i)]


# ---------------------------------------------------------------------------------------
# Passes


def tensor_args(spec: Spec) -> tuple[TensorArg, ...]:
    """User tensors in name order, with the kernel parameter each becomes."""
    return tuple(
        TensorArg(name, f"t_{name}", decl.dims, decl.dtype, TORCH_DTYPE_NAMES[decl.dtype])
        for name, decl in sorted(spec.tensors.items())
    )


def _clamp(index: str, size: str) -> str:
    return f"tl.maximum(tl.minimum({index}, {size} - 1), 0)"


def make_tensor_load(spec: Spec, heads_q: int) -> Callable[[str, list[str]], str]:
    """The printer hook that turns ``name[i, j]`` into a clamped Triton load. A 16-bit
    float tensor is widened to fp32 as it is loaded: expressions compute in fp32, and
    ``bias[head] * 1000`` must not overflow fp16 (or round to bf16) on its way."""
    decls: dict[str, TensorDecl] = spec.tensors

    def load(name: str, indices: list[str]) -> str:
        decl = decls[name]
        sizes = [_dim_size(d, heads_q) for d in decl.dims]
        offset = ""
        for i, (dim, idx) in enumerate(zip(decl.dims, indices, strict=True)):
            clamped = _clamp(idx, sizes[i])
            if dim == "token":
                clamped = f"kv_start + {clamped}"
            stride = " * ".join(sizes[i + 1:])
            term = f"({clamped}) * {stride}" if stride else clamped
            offset = f"{offset} + {term}" if offset else term
        loaded = f"tl.load(t_{name} + {offset})"
        return f"{loaded}.to(tl.float32)" if decl.dtype in ("fp16", "bf16") else loaded

    return load


def _dim_size(dim: str | int, heads_q: int) -> str:
    return {"head": str(heads_q), "batch": "n_batch", "token": "kv_len"}.get(str(dim), str(dim))


def print_for(spec: Spec, expr: sp.Basic, names: Mapping[sp.Symbol, str], load: TensorLoad, *,
              score: bool = False) -> str:
    """:func:`print_triton` of one of ``spec``'s expressions: its mask, or with ``score``
    its modified score. An expression that parses but has no Triton form (``x**7``, a
    constant beyond float32) is a SpecError on the field it comes from (the mask; the
    score_mod, else the scale)."""
    try:
        return print_triton(expr, names=names, tensor_load=load)
    except PrintError as err:
        if not score:
            field, given = "mask", mask_rule_to_yaml(spec.mask)
        elif spec.score_mod:
            field, given = "score_mod", spec.score_mod
        else:
            field, given = "scale", spec.scale
        raise SpecError(field, str(err), given=given) from None


def base2_score(spec: Spec) -> sp.Expr:
    """log2(e) * score_mod(scale * qk): the score the base-2 online softmax needs, with
    the scale folded in exactly once (sympy distributes the constants)."""
    modified = semantics.score(spec).subs(score, QK * sp.Float(spec.softmax_scale, 17))
    return sp.expand(modified * sp.Float(LOG2E, 17), deep=False)


def full_visibility(spec: Spec) -> sp.Basic:
    """The spec's predicate plus the sequence bounds every kernel applies."""
    return sp.And(semantics.visibility(spec), sp.Lt(kv_pos, kv_len), sp.Ge(kv_pos, 0))


def _finite(bound: sp.Expr) -> sp.Expr:
    """A top-level infinite bound replaced by the sequence bound it stands for
    (analysis returns +-oo only as a whole value, never inside an expression)."""
    if bound == -sp.oo:
        return sp.Integer(0)
    if bound == sp.oo:
        return kv_len
    return bound


def clamp_to_sequence(tiles: analysis.TileAnalysis) -> analysis.TileAnalysis:
    """``tiles`` with its key bounds inside the sequence ``[0, kv_len)``: the pieces and
    their hull clamped into it, the fully visible run into the hull. These are the bounds
    the kernels use, and the ones ``attngen show`` prints."""
    kv_lo = sp.Max(_finite(tiles.kv_lo), 0)
    kv_hi = sp.Min(_finite(tiles.kv_hi), kv_len)
    return replace(
        tiles,
        kv_lo=kv_lo,
        kv_hi=kv_hi,
        full_lo=sp.Max(_finite(tiles.full_lo), kv_lo),
        full_hi=sp.Min(_finite(tiles.full_hi), kv_hi),
        pieces=tuple((sp.Max(_finite(lo), 0), sp.Min(_finite(hi), kv_len)) for lo, hi in tiles.pieces),
    )


def sequence_tiles(spec: Spec) -> analysis.TileAnalysis:
    """The tile analysis a sequence kernel is generated from: the spec's mask within the
    sequence, its bounds clamped into it."""
    return clamp_to_sequence(analysis.analyse(full_visibility(spec)))


def tile_configs(spec: Spec, family: str, decode_rows: int) -> tuple[TileConfig, ...]:
    tune = spec.tune
    block_m = (tune.block_m or DEFAULT_BLOCKS) if family == "prefill" else (decode_rows,)
    block_n = tune.block_n or DEFAULT_BLOCKS
    seen: dict[TileConfig, None] = {}
    for bm, bn, w, s in itertools.product(block_m, block_n, tune.num_warps, tune.num_stages):
        seen.setdefault(TileConfig(bm, bn, w, s), None)
    return tuple(seen)


def used_symbols(*exprs: sp.Basic) -> set[sp.Symbol]:
    """Index symbols the expressions read (tensor names themselves excluded)."""
    free: set[sp.Symbol] = set()
    labels: set[sp.Basic] = set()
    for e in exprs:
        free |= {s for s in e.free_symbols if isinstance(s, sp.Symbol)}
        labels |= {i.base.label for i in e.atoms(sp.Indexed)}
    return free - labels


def check_bound(exprs: tuple[sp.Basic, ...], names: dict[sp.Symbol, str], family: str) -> None:
    """Every symbol the printed expressions read is one the kernel binds."""
    unbound = used_symbols(*exprs) - set(names) - {score}
    if unbound:
        raise SpecError("spec", f"expression uses symbols the {family} kernels do not bind",
                        given=sorted(map(str, unbound)))


def verify(ir: KernelIR, spec: Spec) -> None:
    """Checks at the end of lowering: dims padded correctly, heads divide, code is
    non-empty, every symbol bound."""
    assert ir.heads_q % ir.heads_kv == 0
    assert ir.d_qk_pad >= ir.d_qk and ir.d_qk_pad & (ir.d_qk_pad - 1) == 0
    assert ir.d_v_pad >= ir.d_v and ir.d_v_pad & (ir.d_v_pad - 1) == 0
    pieces = [code for piece in ir.piece_codes for code in piece]
    for code in (ir.score_code, ir.mask_code, ir.may_see_code, *pieces):
        assert code.strip(), "empty generated expression"
    assert ir.piece_codes, "no KV piece to visit"
    check_bound((full_visibility(spec), base2_score(spec)), ELEMENT_NAMES, "sequence")


def lower(spec: Spec) -> KernelIR:
    """Spec -> KernelIR for the sequence family."""
    if spec.topology.kind != "sequence":
        raise SpecError("topology.kind", "this lowering handles the sequence family",
                        given=spec.topology.kind, allowed="sequence")
    family = "decode" if spec.topology.queries == "decode" else "prefill"
    group = spec.heads.group
    decode_rows = max(16, pow2(group))  # query heads of a KV head, as tl.dot rows
    load = make_tensor_load(spec, spec.heads.q)

    def element(expr: sp.Basic) -> str:
        return print_for(spec, expr, ELEMENT_NAMES, load)

    def tile(expr: sp.Basic) -> str:
        code = print_for(spec, expr, TILE_NAMES, load)
        # a loop bound computed in int64 goes back to int32: loops and TMA take int32
        return f"_int32_bound({code})" if isinstance(expr, sp.Expr) and widens(expr) else code

    pred = full_visibility(spec)
    tiles = sequence_tiles(spec)
    ir = KernelIR(
        **module_fields(spec),  # type: ignore[arg-type]
        family=family,
        decode_rows=decode_rows,
        configs=tile_configs(spec, family, decode_rows),
        score_code=print_for(spec, base2_score(spec), ELEMENT_NAMES, load, score=True),
        mask_code=element(pred),
        # a predicate that is never true still gets one (empty) piece to loop over
        piece_codes=tuple((tile(lo), tile(hi)) for lo, hi in tiles.pieces or [(sp.S.Zero, sp.S.Zero)]),
        full_lo_code=tile(tiles.full_lo),
        full_hi_code=tile(tiles.full_hi),
        may_see_code=tile(sp.Not(tiles.none_visible)),
    )
    verify(ir, spec)
    return ir
