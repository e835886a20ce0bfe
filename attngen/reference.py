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
from typing import Any

import numpy as np
import sympy as sp

from attngen.spec import Spec
from attngen.tree import TreeBatch

Array = np.ndarray
ScoreMod = Callable[[Array], Array]

# ---------------------------------------------------------------------------------------
# Expression walker


def _as_float(x: Array) -> Array:
    return np.asarray(x, dtype=np.float64)


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
        return np.mod(a, b)


def _by_nonzero(fn: Callable[[Array, Array], Array], a: Array, b: Array) -> Array:
    """``fn(a, b)`` of integers (a quotient or a remainder), 0 where ``b`` is 0: the
    language's integer division by zero (the kernels' ``_floordiv_or_0``, ``_mod_or_0``)."""
    return np.where(b == 0, 0, fn(a, np.where(b == 0, 1, b)))


def _compare(fn: Callable[[Array, Array], Array]) -> Callable[[sp.Basic, Mapping[str, Any]], Array]:
    def apply(node: sp.Basic, env: Mapping[str, Any]) -> Array:
        lhs, rhs = node.args
        return np.asarray(fn(evaluate(lhs, env), evaluate(rhs, env)))

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


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    visible: Array | bool = True,
    score_mod: ScoreMod | None = None,
) -> tuple[Array, Array]:
    """Dense attention in float64.

    q [Nq, Hq, Dqk], k [Nk, Hkv, Dqk], v [Nk, Hkv, Dv]; query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. ``visible`` is a bool array broadcastable to [Hq, Nq, Nk];
    ``score_mod`` maps the scaled scores [Hq, Nq, Nk] to modified scores (any
    position-dependence is closed over by the caller, see :func:`spec_terms`).
    Returns O [Nq, Hq, Dv] and LSE [Nq, Hq] (natural log); a row that sees nothing has
    O = 0 and LSE = -inf.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    n_q, h_q, _ = q.shape
    _, h_kv, d_v = v.shape
    if h_q % max(h_kv, 1):
        raise ValueError(f"kv heads {h_kv} do not divide q heads {h_q}")
    group = h_q // h_kv
    k_h = np.repeat(k, group, axis=1)  # [Nk, Hq, D]
    v_h = np.repeat(v, group, axis=1)
    scores = scale * np.einsum("qhd,khd->hqk", q, k_h)
    if score_mod is not None:
        with np.errstate(all="ignore"):  # invisible entries may overflow; they are dropped
            scores = np.broadcast_to(np.asarray(score_mod(scores), dtype=np.float64), scores.shape)
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
    return out.reshape(n_q, h_q, d_v), lse.T.copy()


def spec_terms(
    spec: Spec,
    *,
    q_pos: Array,
    kv_pos: Array,
    batch: Array | int,
    q_len: Array | int,
    kv_len: Array | int,
    tensors: Mapping[str, Array],
) -> tuple[Array, ScoreMod]:
    """The spec's visibility [Hq, Nq, Nk] (bool) and score modification, for queries at
    ``q_pos`` [Nq] and keys at ``kv_pos`` [Nk].

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
    visible = np.broadcast_to(
        np.asarray(evaluate(semantics.visibility(spec), env), dtype=bool), shape
    )
    modified = semantics.score(spec)

    def score_mod(scores: Array) -> Array:
        return np.asarray(evaluate(modified, {**env, "score": scores}), dtype=np.float64)

    return visible, score_mod


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
) -> tuple[Any, Any]:
    """O and LSE of a sequence-topology spec, in float64 (torch tensors on the CPU).

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
    for b in range(n_batch):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        n_q, n_kv = q1 - q0, k1 - k0
        if n_q > n_kv and cu_seqlens_q is not None:
            raise ValueError(f"sequence {b}: q_len {n_q} > kv_len {n_kv}")
        if n_q == 0 or n_kv == 0:
            continue  # nothing visible: O = 0, LSE = -inf
        positions = np.arange(n_kv - n_q, n_kv)
        kv_positions = np.arange(n_kv)
        visible, score_mod = spec_terms(
            spec,
            q_pos=positions,
            kv_pos=kv_positions,
            batch=b,
            q_len=n_q,
            kv_len=n_kv,
            tensors=_sequence_tensors(spec, arrays, k0, n_kv),
        )
        in_sequence = kv_positions[None, None, :] < n_kv
        o_b, lse_b = attend(
            qn[q0:q1],
            kn[k0:k1],
            vn[k0:k1],
            scale=spec.softmax_scale,
            visible=visible & in_sequence,
            score_mod=score_mod,
        )
        out[q0:q1], lse[q0:q1] = o_b, lse_b
    return torch.from_numpy(out), torch.from_numpy(lse)


# ---------------------------------------------------------------------------------------
# Tree topology


def tree_reference(
    spec: Spec,
    tree: TreeBatch,
    q: Any,
    k: Any,
    v: Any,
    tensors: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """O and LSE of a tree-family spec (``tree`` / ``shared_prefix``), in float64.

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
    own, score_mod = spec_terms(
        spec,
        q_pos=q_pos,
        kv_pos=np.asarray(tree.kv_pos),
        batch=np.asarray(tree.q_tree),
        q_len=1,
        kv_len=q_pos + 1,
        tensors=_tensor_arrays(spec, tensors or {}),
    )
    visible = tree.visible_matrix()[None] & own
    out, lse = attend(
        to_numpy(q),
        to_numpy(k),
        to_numpy(v),
        scale=spec.softmax_scale,
        visible=visible,
        score_mod=score_mod,
    )
    return torch.from_numpy(out), torch.from_numpy(lse)


def is_finite_or_neg_inf(lse: Array) -> bool:
    """LSE values are finite or -inf (empty rows); never NaN or +inf."""
    return bool(np.all(np.isfinite(lse) | (lse == -math.inf)))
