"""The independent float64 reference: a spec evaluated densely, straight from its objects.

Nothing here reads generated code. The visibility predicate and the score modification
come from :mod:`attngen.semantics` as sympy expressions and are evaluated by our own
walker over sympy nodes (:func:`evaluate`) with numpy broadcasting: float64 for reals,
int64 for integers. The attention itself is the textbook dense form (:func:`attend`):
build every score, apply the modification, mask, softmax, multiply.

Semantics kept here (and documented for kernels):

- score = softmax_scale * q·k; s' = score_mod(score, ...); invisible keys get -inf.
- A row with nothing visible returns O = 0 and LSE = -inf, never NaN. LSE is natural log.
- GQA: the KV head of query head ``h`` is ``h // group``.
- A comparison of reals (``kv_pos * 0.7 < q_pos - 1.8``) is decided in float64 here and in
  float32 in a kernel, so where its two sides lie within float32 rounding of each other
  the two may disagree, and neither is wrong. The reference marks such rows undecided
  (:attr:`Reference.undecided`), and ``attngen check`` leaves them out and counts them.
- Tensor indices are clamped into range per axis; a ``token`` axis is the packed KV of the
  sequence, so its index is a position clamped into ``[0, kv_len - 1]`` of that sequence.

>>> import numpy as np, sympy as sp
>>> from attngen.symbols import q_pos, kv_pos
>>> evaluate(sp.Le(kv_pos, q_pos), {"q_pos": np.arange(2)[:, None], "kv_pos": np.arange(3)})
array([[ True, False, False],
       [ True,  True, False]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import sympy as sp

from attngen.spec import Spec
from attngen.symbols import score
from attngen.tree import TreeBatch

Array = np.ndarray
ScoreMod = Callable[[Array], Array]

# ---------------------------------------------------------------------------------------
# Expression walker


#: env key of the walker's tie mode. A comparison of reals whose sides lie within the
#: band of :func:`_band` of each other is True under mode True and False under mode False,
#: and a floor of a real within the band of a whole number w is w or w - 1: the two
#: answers a float32 kernel may give. Without the key, comparisons are plain float64 ones.
TIES = "__ties__"


def _band(node: sp.Basic) -> float:
    """Relative width of a tie, times |a| + |b| + 1: 2**-19 (16 float32 roundings) for
    arithmetic on positions and constants, 2**-12 where the score takes part, since a
    kernel sums q·k in float32, whose rounding grows with head_dim and |q|·|k|."""
    return 2.0**-12 if node.has(score) else 2.0**-19


def _as_float(x: Array) -> Array:
    return np.asarray(x, dtype=np.float64)


def _near(a: Array, b: Array, band: float) -> Array:
    """Where reals ``a`` and ``b`` lie within ``band`` (relative) of each other."""
    with np.errstate(invalid="ignore"):
        return np.abs(a - b) <= band * (np.abs(a) + np.abs(b) + 1.0)


def _real(*xs: Array) -> bool:
    return any(np.asarray(x).dtype.kind == "f" for x in xs)


def _load(node: sp.Indexed, env: Mapping[str, Any]) -> Array:
    """``t[i, j]`` with every index clamped into its axis (documented semantics)."""
    table = np.asarray(env[str(node.base.label)])
    if table.ndim != len(node.indices):
        raise ValueError(
            f"{node.base.label} has {table.ndim} dims, indexed with {len(node.indices)}"
        )
    indices = [np.asarray(evaluate(i, env)) for i in node.indices]
    shape = np.broadcast_shapes(*(i.shape for i in indices))
    if any(n == 0 for n in table.shape):
        # An empty axis has nothing to load; only empty index arrays can reach here in a
        # well-formed case (e.g. a sequence with kv_len 0), so the values never matter.
        return np.zeros(shape, dtype=table.dtype)
    clamped = tuple(
        np.clip(
            np.floor(i).astype(np.int64) if i.dtype.kind == "f" else i.astype(np.int64), 0, n - 1
        )
        for i, n in zip(indices, table.shape, strict=True)
    )
    return table[clamped]


def _pow(node: sp.Pow, env: Mapping[str, Any]) -> Array:
    base, exponent = node.args
    b = evaluate(base, env)
    if exponent.is_Integer and int(exponent) >= 0:
        return np.power(b, int(exponent))
    return np.power(_as_float(b), _as_float(evaluate(exponent, env)))


def _ite(node: sp.ITE, env: Mapping[str, Any]) -> Array:
    """A boolean if-then-else, which sympy makes when it simplifies a ``where`` of
    comparisons."""
    cond, then, other = (np.asarray(evaluate(a, env), dtype=bool) for a in node.args)
    return np.where(cond, then, other)


def _piecewise(node: sp.Piecewise, env: Mapping[str, Any]) -> Array:
    values = [evaluate(e, env) for e, _ in node.args]
    conds = [np.asarray(evaluate(c, env), dtype=bool) for _, c in node.args]
    shape = np.broadcast_shapes(*(np.shape(x) for x in values + conds))
    out_dtype = np.result_type(*values)
    conds_b = [np.broadcast_to(c, shape) for c in conds]
    values_b = [np.broadcast_to(np.asarray(v, dtype=out_dtype), shape) for v in values]
    default = np.nan if out_dtype.kind == "f" else 0
    return np.select(conds_b, values_b, default=default)


def _reduce(fn: Callable[[Array, Array], Array]) -> Callable[[sp.Basic, Mapping[str, Any]], Array]:
    def apply(node: sp.Basic, env: Mapping[str, Any]) -> Array:
        values = [evaluate(a, env) for a in node.args]
        out = values[0]
        for v in values[1:]:
            out = fn(out, v)
        return np.asarray(out)

    return apply


def _unary(
    fn: Callable[[Array], Array], *, to_float: bool = True
) -> Callable[[sp.Basic, Mapping[str, Any]], Array]:
    def apply(node: sp.Basic, env: Mapping[str, Any]) -> Array:
        (arg,) = node.args
        x = evaluate(arg, env)
        return np.asarray(fn(_as_float(x) if to_float else x))

    return apply


def _rounded(
    fn: Callable[[Array], Array], exact: Callable[[Array, Array], Array]
) -> Callable[[sp.Basic, Mapping[str, Any]], Array]:
    """floor/ceiling. A ratio of integers (``a // b``, which sympy may hold as
    ``floor(a/3 + 2/3)``) is rounded exactly, in integers, by ``exact(numerator,
    denominator)``: in float64, 7/3 + 2/3 is 2.9999999999999996. Where the denominator
    is 0 the ratio is 0 (the language's integer division by zero, as numpy's)."""

    def apply(node: sp.Basic, env: Mapping[str, Any]) -> Array:
        (arg,) = node.args
        if _integral(arg):
            n, d = (np.asarray(evaluate(part, env)) for part in sp.fraction(sp.together(arg)))
            if n.dtype.kind in "iub" and d.dtype.kind in "iub":
                return _by_nonzero(exact, n.astype(np.int64), d.astype(np.int64))
        x = np.asarray(evaluate(arg, env))
        if x.dtype.kind in "iub":
            return x
        with np.errstate(all="ignore"):
            y = fn(x)
            if TIES in env:  # within the band of a whole number w: w, or the one past it
                whole = np.round(x)
                past = whole - 1 if fn is np.floor else whole + 1
                y = np.where(_near(x, whole, _band(arg)), whole if env[TIES] else past, y)
        return y.astype(np.int64) if _integral(arg) and np.all(np.isfinite(y)) else y

    return apply


def _integral(arg: sp.Basic) -> bool:
    """floor(a / b) of integers is an integer (sympy's form of ``a // b``)."""
    return all(s.is_integer for s in arg.free_symbols) and not arg.has(sp.Float)


def _mod(node: sp.Basic, env: Mapping[str, Any]) -> Array:
    """Python's (floor) modulo, which numpy's follows; of integers, 0 where ``b`` is 0 (the
    language's, as numpy's), of reals NaN there."""
    a, b = (np.asarray(evaluate(x, env)) for x in node.args)
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        return _by_nonzero(np.mod, a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.mod(a, b)
        if TIES in env:  # a / b within the band of a whole number w: floor w, or w - 1
            ratio = a / b
            whole = np.round(ratio)
            r = np.where(_near(ratio, whole, _band(node)), a - b * (whole if env[TIES] else whole - 1), r)
        return r


def _by_nonzero(fn: Callable[[Array, Array], Array], a: Array, b: Array) -> Array:
    """``fn(a, b)`` of integers (a quotient or a remainder), 0 where ``b`` is 0: the
    language's integer division by zero (the kernels' ``_floordiv_or_0``, ``_mod_or_0``)."""
    return np.where(b == 0, 0, fn(a, np.where(b == 0, 1, b)))


def _compare(fn: Callable[[Array, Array], Array]) -> Callable[[sp.Basic, Mapping[str, Any]], Array]:
    def apply(node: sp.Basic, env: Mapping[str, Any]) -> Array:
        a, b = (evaluate(side, env) for side in node.args)
        with np.errstate(invalid="ignore"):
            decided = np.asarray(fn(a, b))
        if TIES not in env or not _real(a, b):
            return decided
        return np.where(_near(_as_float(a), _as_float(b), _band(node)), env[TIES], decided)

    return apply


def _add(node: sp.Basic, env: Mapping[str, Any]) -> Array:
    return _reduce(np.add)(node, env)


def _mul(node: sp.Basic, env: Mapping[str, Any]) -> Array:
    return _reduce(np.multiply)(node, env)


#: sympy node class -> evaluator. Looked up along the MRO, so subclasses (e.g. the
#: concrete ``StrictLessThan``) find their entry.
_EVALUATORS: dict[type, Callable[[Any, Mapping[str, Any]], Array]] = {
    sp.Add: _add,
    sp.Mul: _mul,
    sp.Pow: _pow,
    sp.Min: _reduce(np.minimum),
    sp.Max: _reduce(np.maximum),
    sp.Abs: _unary(np.abs, to_float=False),
    sp.exp: _unary(np.exp),
    sp.log: _unary(np.log),
    sp.tanh: _unary(np.tanh),
    sp.sqrt: _unary(np.sqrt),  # sympy writes sqrt as Pow(x, 1/2); kept for completeness
    sp.floor: _rounded(np.floor, np.floor_divide),
    sp.ceiling: _rounded(np.ceil, lambda n, d: -np.floor_divide(-n, d)),
    sp.Mod: _mod,
    sp.Piecewise: _piecewise,
    sp.ITE: _ite,
    sp.Indexed: _load,
    sp.Eq: _compare(np.equal),
    sp.Ne: _compare(np.not_equal),
    sp.Lt: _compare(np.less),
    sp.Le: _compare(np.less_equal),
    sp.Gt: _compare(np.greater),
    sp.Ge: _compare(np.greater_equal),
    sp.And: _reduce(np.logical_and),
    sp.Or: _reduce(np.logical_or),
    sp.Not: _unary(np.logical_not, to_float=False),
    sp.Xor: _reduce(np.logical_xor),
}


def _evaluator(node: sp.Basic) -> Callable[[Any, Mapping[str, Any]], Array] | None:
    for cls in type(node).__mro__:
        found = _EVALUATORS.get(cls)
        if found is not None:
            return found
    return None


def evaluate(expr: sp.Basic, env: Mapping[str, Any]) -> Array:
    """Evaluate a sympy expression with numpy broadcasting.

    ``env`` maps symbol names (``q_pos``, ``kv_pos``, ``head``, ``batch``, ``q_len``,
    ``kv_len``, ``score``) to arrays or scalars, and tensor names to numpy arrays.
    Integers stay int64, reals are float64, predicates are bool. Tensor loads clamp every
    index into its axis. Raises TypeError on a node it does not know (never guesses).

    >>> import sympy as sp
    >>> evaluate(sp.Mod(sp.Symbol("x", integer=True), 3), {"x": np.arange(-2, 3)})
    array([1, 2, 0, 1, 2])
    """
    if isinstance(expr, sp.logic.boolalg.BooleanTrue):
        return np.asarray(True)
    if isinstance(expr, sp.logic.boolalg.BooleanFalse):
        return np.asarray(False)
    if isinstance(expr, sp.Integer):
        return np.asarray(int(expr), dtype=np.int64)
    if isinstance(expr, sp.Rational | sp.Float | sp.NumberSymbol):
        return np.asarray(float(expr), dtype=np.float64)
    if expr is sp.oo or expr is sp.S.NegativeInfinity:
        return np.asarray(float(expr), dtype=np.float64)
    if isinstance(expr, sp.Symbol):
        value = np.asarray(env[expr.name])
        return value.astype(np.int64) if value.dtype.kind in "iu" else value
    found = _evaluator(expr)
    if found is None:
        raise TypeError(f"reference cannot evaluate {type(expr).__name__}: {expr}")
    return found(expr, env)


# ---------------------------------------------------------------------------------------
# Dense attention core


class Reference(NamedTuple):
    """Reference O [Nq, Hq, Dv] and LSE [Nq, Hq], and which rows [Nq, Hq] are undecided:
    a real comparison there lies within float32 rounding of its boundary for some key
    the row might see, so a float32 kernel may rightly decide it the other way."""

    out: Any
    lse: Any
    undecided: Any


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    visible: Array | bool = True,
    score_mod: ScoreMod | None = None,
    undecided: Callable[[Array], Array] | None = None,
) -> Reference:
    """Dense attention in float64.

    q [Nq, Hq, Dqk], k [Nk, Hkv, Dqk], v [Nk, Hkv, Dv]; query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. ``visible`` is a bool array broadcastable to [Hq, Nq, Nk];
    ``score_mod`` maps the scaled scores [Hq, Nq, Nk] to modified scores (any
    position-dependence is closed over by the caller, see :func:`spec_terms`), and
    ``undecided`` maps them to the elements a tie leaves open (:attr:`Terms.undecided`).
    Returns O [Nq, Hq, Dv] and LSE [Nq, Hq] (natural log), numpy; a row that sees
    nothing has O = 0 and LSE = -inf.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    n_q, h_q, _ = q.shape
    _, h_kv, d_v = v.shape
    if h_q % max(h_kv, 1):
        raise ValueError(f"kv heads {h_kv} do not divide q heads {h_q}")
    group = h_q // h_kv
    k_h = np.repeat(k, group, axis=1)  # [Nk, Hq, D]
    v_h = np.repeat(v, group, axis=1)
    scaled = scale * np.einsum("qhd,khd->hqk", q, k_h)
    scores = scaled
    if score_mod is not None:
        with np.errstate(all="ignore"):  # invisible entries may overflow; they are dropped
            scores = np.broadcast_to(np.asarray(score_mod(scaled), dtype=np.float64), scaled.shape)
    seen = np.broadcast_to(np.asarray(visible, dtype=bool), scores.shape)
    scores = np.where(seen, scores, -np.inf)
    row_max = scores.max(axis=2, initial=-np.inf)  # [Hq, Nq]
    live = np.isfinite(row_max)
    shift = np.where(live, row_max, 0.0)
    p = np.exp(scores - shift[..., None])  # -inf -> 0
    total = p.sum(axis=2)
    out = np.einsum("hqk,khd->qhd", p, v_h)
    has_mass = total > 0
    out = np.where(has_mass.T[..., None], out / np.where(has_mass, total, 1.0).T[..., None], 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(has_mass, shift + np.log(np.where(has_mass, total, 1.0)), -np.inf)
    open_rows = np.zeros((h_q, n_q), dtype=bool)
    if undecided is not None:
        open_rows = np.asarray(np.broadcast_to(undecided(scaled), scaled.shape).any(axis=2))
    return Reference(out.reshape(n_q, h_q, d_v), lse.T.copy(), open_rows.T.copy())


class Terms(NamedTuple):
    """A spec's terms for a block of queries and keys: ``visible`` (bool [Hq, Nq, Nk]),
    ``score_mod`` (scaled scores to modified ones) and ``undecided`` (scaled scores to
    the elements [Hq, Nq, Nk] where a comparison of reals in the mask or the score
    modification lies within float32 rounding of its boundary, so that visibility or
    the modified score could go either way)."""

    visible: Array
    score_mod: ScoreMod
    undecided: Callable[[Array], Array]


def _has_ties(expr: sp.Basic) -> bool:
    """Whether ``expr`` compares or rounds anything (what a tie can flip)."""
    return any(isinstance(n, sp.core.relational.Relational | sp.floor | sp.ceiling | sp.Mod)
               for n in sp.preorder_traversal(expr))


def spec_terms(
    spec: Spec,
    *,
    q_pos: Array,
    kv_pos: Array,
    batch: Array | int,
    q_len: Array | int,
    kv_len: Array | int,
    tensors: Mapping[str, Array],
) -> Terms:
    """The spec's :class:`Terms` (visibility [Hq, Nq, Nk], score modification, and where a
    tie leaves either open) for queries at ``q_pos`` [Nq] and keys at ``kv_pos`` [Nk].

    ``batch``/``q_len``/``kv_len`` are scalars or per-query arrays [Nq] (a tree family
    binds them per query). ``tensors`` are already laid out for these queries and keys
    (a per-token tensor's ``token`` axis indexed by position). The sequence bounds are
    not included; callers AND them in.
    """
    from attngen import semantics  # the expression layer imports the spec layer

    def per_query(x: Array | int) -> Array:
        a = np.asarray(x, dtype=np.int64)
        return a.reshape(1, -1, 1) if a.ndim else a

    env: dict[str, Any] = {
        "q_pos": np.asarray(q_pos, dtype=np.int64).reshape(1, -1, 1),
        "kv_pos": np.asarray(kv_pos, dtype=np.int64).reshape(1, 1, -1),
        "head": np.arange(spec.heads.q, dtype=np.int64).reshape(-1, 1, 1),
        "batch": per_query(batch),
        "q_len": per_query(q_len),
        "kv_len": per_query(kv_len),
        **tensors,
    }
    shape = (spec.heads.q, env["q_pos"].shape[1], env["kv_pos"].shape[2])
    rule, modified = semantics.visibility(spec), semantics.score(spec)

    def at(ties: bool | None, **more: Any) -> dict[str, Any]:
        return {**env, **more} if ties is None else {**env, **more, TIES: ties}

    def mask(ties: bool | None = None) -> Array:
        return np.broadcast_to(np.asarray(evaluate(rule, at(ties)), dtype=bool), shape)

    def modify(scores: Array, ties: bool | None = None) -> Array:
        return np.asarray(evaluate(modified, at(ties, score=scores)), dtype=np.float64)

    visible = mask()
    mask_open = mask(False) != mask(True) if _has_ties(rule) else np.zeros(shape, dtype=bool)

    def undecided(scores: Array) -> Array:
        if not _has_ties(modified):
            return mask_open
        with np.errstate(all="ignore"):
            low, high = modify(scores, False), modify(scores, True)
        differ = (low != high) & ~(np.isnan(low) & np.isnan(high))
        return mask_open | (differ & (visible | mask_open))

    return Terms(visible, modify, undecided)


# ---------------------------------------------------------------------------------------
# Sequence topology


def to_numpy(x: Any, *, integer: bool = False) -> Array:
    """A torch tensor (any device/dtype, bf16 included) or array-like as float64 / int64."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.to(dtype=_torch().int64) if integer else x.to(dtype=_torch().float64)
        return np.asarray(x.numpy())
    return np.asarray(x, dtype=np.int64 if integer else np.float64)


def _torch() -> Any:
    import torch

    return torch


def _tensor_arrays(spec: Spec, tensors: Mapping[str, Any]) -> dict[str, Array]:
    missing = sorted(set(spec.tensors) - set(tensors))
    if missing:
        raise ValueError(f"missing user tensors: {missing}")
    return {
        name: to_numpy(tensors[name], integer=not decl.is_float)
        for name, decl in spec.tensors.items()
    }


def _sequence_tensors(
    spec: Spec, arrays: Mapping[str, Array], kv_start: int, kv_len: int
) -> dict[str, Array]:
    """The user tensors as one sequence sees them: the ``token`` axis sliced to its KV."""
    out = {}
    for name, decl in spec.tensors.items():
        a = arrays[name]
        if "token" in decl.dims:
            axis = decl.dims.index("token")
            a = np.take(a, np.arange(kv_start, kv_start + kv_len), axis=axis)
        out[name] = a
    return out


def sequence_reference(
    spec: Spec,
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any | None,
    cu_seqlens_k: Any,
    tensors: Mapping[str, Any] | None = None,
) -> Reference:
    """O and LSE of a sequence-topology spec, in float64 (torch tensors on the CPU), and
    the rows a tie leaves undecided.

    Prefill: q [total_q, Hq, Dqk] packed by ``cu_seqlens_q``; query ``i`` of sequence
    ``b`` sits at ``q_pos = kv_len_b - q_len_b + i`` (needs q_len_b <= kv_len_b).
    Decode (``cu_seqlens_q`` None): q [B, Hq, Dqk], one query per sequence at
    ``kv_len_b - 1``. k/v [total_kv, Hkv, D] packed by ``cu_seqlens_k``. Returns
    O [total_q or B, Hq, Dv] and LSE [total_q or B, Hq].
    """
    torch = _torch()
    qn, kn, vn = to_numpy(q), to_numpy(k), to_numpy(v)
    cu_k = to_numpy(cu_seqlens_k, integer=True)
    n_batch = len(cu_k) - 1
    if cu_seqlens_q is None:
        if qn.shape[0] != n_batch:
            raise ValueError(f"decode q has {qn.shape[0]} rows for {n_batch} sequences")
        cu_q = np.arange(n_batch + 1, dtype=np.int64)
    else:
        cu_q = to_numpy(cu_seqlens_q, integer=True)
    arrays = _tensor_arrays(spec, tensors or {})
    out = np.zeros((qn.shape[0], spec.heads.q, vn.shape[2]))
    lse = np.full((qn.shape[0], spec.heads.q), -np.inf)
    undecided = np.zeros((qn.shape[0], spec.heads.q), dtype=bool)
    for b in range(n_batch):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        n_q, n_kv = q1 - q0, k1 - k0
        if n_q > n_kv and cu_seqlens_q is not None:
            raise ValueError(f"sequence {b}: q_len {n_q} > kv_len {n_kv}")
        if n_q == 0 or n_kv == 0:
            continue  # nothing visible: O = 0, LSE = -inf
        positions = np.arange(n_kv - n_q, n_kv)
        kv_positions = np.arange(n_kv)
        terms = spec_terms(
            spec,
            q_pos=positions,
            kv_pos=kv_positions,
            batch=b,
            q_len=n_q,
            kv_len=n_kv,
            tensors=_sequence_tensors(spec, arrays, k0, n_kv),
        )
        out[q0:q1], lse[q0:q1], undecided[q0:q1] = attend(
            qn[q0:q1],
            kn[k0:k1],
            vn[k0:k1],
            scale=spec.softmax_scale,
            visible=terms.visible,
            score_mod=terms.score_mod,
            undecided=terms.undecided,
        )
    return Reference(torch.from_numpy(out), torch.from_numpy(lse), torch.from_numpy(undecided))


# ---------------------------------------------------------------------------------------
# Tree topology


def tree_reference(
    spec: Spec,
    tree: TreeBatch,
    q: Any,
    k: Any,
    v: Any,
    tensors: Mapping[str, Any] | None = None,
) -> Reference:
    """O and LSE of a tree-family spec (``tree`` / ``shared_prefix``), in float64, and
    the rows a tie leaves undecided.

    q [n_queries, Hq, Dqk] in query-id order; k/v [n_kv, Hkv, D] the *logical* flattened
    tree KV (preorder; a paged caller gathers it through its page table first). A query
    sees the tokens of :meth:`TreeBatch.visible_matrix` (its ancestors, and its own node
    up to itself) AND the spec's mask evaluated with the tree bindings of
    :mod:`attngen.tree_ir`: ``q_pos`` / ``kv_pos`` are tree positions, ``batch`` is the
    query's tree, ``q_len`` = 1 and ``kv_len`` = q_pos + 1. ``batch``-dim tensors hold one
    entry per tree. Returns O [n_queries, Hq, Dv] and LSE [n_queries, Hq] (torch, CPU).
    """
    torch = _torch()
    q_pos = np.asarray(tree.q_pos, dtype=np.int64)
    terms = spec_terms(
        spec,
        q_pos=q_pos,
        kv_pos=np.asarray(tree.kv_pos),
        batch=np.asarray(tree.q_tree),
        q_len=1,
        kv_len=q_pos + 1,
        tensors=_tensor_arrays(spec, tensors or {}),
    )
    on_path = tree.visible_matrix()[None]
    out, lse, undecided = attend(
        to_numpy(q),
        to_numpy(k),
        to_numpy(v),
        scale=spec.softmax_scale,
        visible=on_path & terms.visible,
        score_mod=terms.score_mod,
        undecided=lambda scores: on_path & terms.undecided(scores),
    )
    return Reference(torch.from_numpy(out), torch.from_numpy(lse), torch.from_numpy(undecided))


def is_finite_or_neg_inf(lse: Array) -> bool:
    """LSE values are finite or -inf (empty rows); never NaN or +inf."""
    return bool(np.all(np.isfinite(lse) | (lse == -math.inf)))
