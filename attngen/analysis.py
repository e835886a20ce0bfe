"""Symbolic classification of a (query tile, KV tile) pair under a visibility predicate.

A tile covers query positions ``q_lo..q_hi`` and key positions ``k_lo..k_hi``
(inclusive). :func:`analyse` answers, as sympy expressions over those four symbols and
the tile-uniform run-time scalars: is every pair visible (skip the mask), is no pair
visible (skip the tile), which KV range can hold visible keys at all (loop bounds), as
one hull and as a union of a few pieces (a sink and a window far from it are two, and
the gap between them is never scanned), and which KV range is visible for every query
of the tile (mask-free inner loop).

Method: the predicate is put in negation normal form (``==`` becomes two inequalities,
``!=`` their negated disjunction). An *affine atom* ``a*q_pos + b*kv_pos + c (op) 0``,
with numbers ``a``, ``b`` and ``c`` built from uniform things only, is decided exactly
from the box's corners; anything else (a tensor indexed by a position, ``head`` when
it is not uniform, products of positions, ...) is an *opaque* atom about which nothing
is known. ``and``/``or`` combine the children's answers. Everything is sound: a
condition that is True is always right; a False one may be a missed opportunity.

Infinities. ``kv_lo``/``full_lo`` may be exactly ``-oo`` and ``kv_hi``/``full_hi``
exactly ``+oo`` -- only ever as the whole expression, never inside one. The caller
replaces them with the sequence's own bounds (``0`` and ``kv_len``) before printing::

    lo = 0 if result.kv_lo == -sympy.oo else result.kv_lo

Inside expressions, an unbounded lower end is taken as ``0``, since positions are
non-negative (``symbols.kv_pos`` is declared so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import reduce

import sympy as sp
from sympy.core.relational import Relational

from attngen.symbols import TILE_UNIFORM, int_floor, kv_pos, q_pos

q_lo = sp.Symbol("q_lo", integer=True)
q_hi = sp.Symbol("q_hi", integer=True)
k_lo = sp.Symbol("k_lo", integer=True)
k_hi = sp.Symbol("k_hi", integer=True)

#: The tile's corner symbols, in (q_lo, q_hi, k_lo, k_hi) order.
TILE_SYMBOLS = (q_lo, q_hi, k_lo, k_hi)


@dataclass(frozen=True, slots=True)
class TileAnalysis:
    """What a predicate says about one tile (see the module docstring)."""

    all_visible: sp.Basic  # True only if every (q, kv) in the tile is visible
    none_visible: sp.Basic  # True only if no (q, kv) in the tile is visible
    kv_lo: sp.Basic  # every visible kv of any query in [q_lo, q_hi] is >= kv_lo (or -oo)
    kv_hi: sp.Basic  # ... and < kv_hi (or +oo)
    full_lo: sp.Basic  # every (q in [q_lo, q_hi], kv in [full_lo, full_hi)) is visible;
    full_hi: sp.Basic  # an empty range (full_lo >= full_hi) says nothing
    exact: bool  # every atom of the predicate was affine
    # [lo, hi) ranges (ends as kv_lo/kv_hi) whose union holds every visible kv of any
    # query in [q_lo, q_hi]; they may overlap and come in no particular order
    pieces: tuple[tuple[sp.Basic, sp.Basic], ...]


# -- ranges of kv ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Range:
    """``[lo, hi)`` of kv; ``None`` marks an unbounded end."""

    lo: sp.Basic | None
    hi: sp.Basic | None


_UNBOUNDED = _Range(None, None)
# An empty range is represented by ``None`` in place of a _Range.
MaybeRange = _Range | None

#: At most this many pieces describe where visible keys can be; more collapse to their
#: hull (each piece costs the kernel two loop heads).
MAX_PIECES = 4


def _bound(combine: Callable[..., sp.Basic], ends: Iterable[sp.Basic | None]) -> sp.Basic | None:
    """``combine`` of the finite ends, or None (unbounded) when there are none."""
    finite = [e for e in ends if e is not None]
    return combine(*finite) if finite else None


def _intersect(a: MaybeRange, b: MaybeRange) -> MaybeRange:
    if a is None or b is None:
        return None
    return _Range(_bound(sp.Max, (a.lo, b.lo)), _bound(sp.Min, (a.hi, b.hi)))


def _hull(a: MaybeRange, b: MaybeRange) -> MaybeRange:
    """The smallest range holding both."""
    if a is None or b is None:
        return a if b is None else b
    lo = None if a.lo is None or b.lo is None else sp.Min(a.lo, b.lo)
    hi = None if a.hi is None or b.hi is None else sp.Max(a.hi, b.hi)
    return _Range(lo, hi)


def _longer(a: MaybeRange, b: MaybeRange) -> MaybeRange:
    """One of two fully visible ranges, preferring the longer (each is sound alone)."""
    if a is None or b is None:
        return a if b is None else b
    if a.hi is None and b.hi is None:  # two rays: their union is a ray too
        return _Range(_bound(sp.Min, (a.lo, b.lo)) if None not in (a.lo, b.lo) else None, None)
    if a.hi is None or b.hi is None:  # a ray is the longer (before clipping to kv_len)
        return a if a.hi is None else b
    a_lo, b_lo = (sp.S.Zero if lo is None else lo for lo in (a.lo, b.lo))
    a_wins = sp.Ge(a.hi - a_lo, b.hi - b_lo)
    return _Range(_choose(a_wins, a_lo, b_lo), _choose(a_wins, a.hi, b.hi))


def _choose(cond: sp.Basic, a: sp.Basic, b: sp.Basic) -> sp.Basic:
    return a if a == b else sp.Piecewise((a, cond), (b, True))


Pieces = tuple[_Range, ...]  # a union of ranges; () holds nothing


def _join(a: _Range, b: _Range) -> _Range:
    """The hull of two (non-empty) pieces."""
    joined = _hull(a, b)
    assert joined is not None
    return joined


def _capped(pieces: Iterable[_Range]) -> Pieces:
    """Distinct pieces, those with a common end joined (their union is then their hull,
    exactly); the unbounded piece alone if it is one of them; the hull alone when there
    are too many."""
    unique: list[_Range] = []
    for p in pieces:
        for i, u in enumerate(unique):
            if p.lo == u.lo or p.hi == u.hi:  # None == None: both unbounded there
                unique[i] = _join(u, p)
                break
        else:
            unique.append(p)
    if _UNBOUNDED in unique:  # one piece holds every key: the others add nothing
        return (_UNBOUNDED,)
    if len(unique) > MAX_PIECES:
        return (reduce(_join, unique),)
    return tuple(unique)


def _intersect_pieces(a: Pieces, b: Pieces) -> Pieces:
    """(a1 | a2 | ...) & (b1 | b2 | ...), distributed."""
    return _capped(r for x in a for y in b if (r := _intersect(x, y)) is not None)


# -- per-node results ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _KvBound:
    """An atom solved for kv: ``kv >= value`` (lower) or ``kv <= value`` (upper), with
    ``value`` affine in q_pos, when ``equivalent``; otherwise the atom is the strict
    ``kv > value`` / ``kv < value`` with a value not known to be an integer."""

    lower: bool
    value: sp.Basic
    equivalent: bool


@dataclass(frozen=True, slots=True)
class _Result:
    all: sp.Basic
    none: sp.Basic
    hull: MaybeRange
    full: MaybeRange
    exact: bool
    pieces: Pieces  # a union within the hull, tighter where an `or` leaves gaps
    kv_bound: _KvBound | None = None  # set on affine atoms that involve kv


_OPAQUE = _Result(sp.false, sp.false, _UNBOUNDED, None, exact=False, pieces=(_UNBOUNDED,))


def analyse(pred: sp.Basic, *, uniform: frozenset[sp.Symbol] = TILE_UNIFORM) -> TileAnalysis:
    """Classify a tile under visibility predicate ``pred`` (over q_pos, kv_pos, the
    ``uniform`` symbols and tensors indexed by uniform things).

    >>> from attngen.symbols import kv_pos, q_pos
    >>> r = analyse(sp.Le(kv_pos, q_pos))
    >>> r.all_visible, r.none_visible, r.kv_hi
    (k_hi <= q_lo, k_lo > q_hi, q_hi + 1)
    """
    result = _analyse(_nnf(sp.sympify(pred), negate=False), uniform)
    hull_lo, hull_hi = _ends(result.hull, empty=(sp.S.Zero, sp.S.Zero))
    full_lo, full_hi = _ends(result.full, empty=(sp.S.Zero, sp.S.Zero))
    pieces = tuple(_ends(p, empty=(sp.S.Zero, sp.S.Zero)) for p in result.pieces)
    return TileAnalysis(
        result.all, result.none, hull_lo, hull_hi, full_lo, full_hi, result.exact, pieces
    )


def _ends(r: MaybeRange, empty: tuple[sp.Basic, sp.Basic]) -> tuple[sp.Basic, sp.Basic]:
    if r is None:
        return empty
    return (-sp.oo if r.lo is None else r.lo, sp.oo if r.hi is None else r.hi)


def _nnf(pred: sp.Basic, *, negate: bool) -> sp.Basic:
    """``pred`` (negated if ``negate``) with Not only around opaque atoms, and with
    ``==`` / ``!=`` turned into inequalities."""
    if pred in (sp.true, sp.false):
        return sp.false if (pred == sp.true) == negate else sp.true
    if isinstance(pred, sp.And | sp.Or):
        combine = sp.Or if isinstance(pred, sp.And) == negate else sp.And
        return combine(*(_nnf(arg, negate=negate) for arg in pred.args))
    if isinstance(pred, sp.Not):
        return _nnf(pred.args[0], negate=not negate)
    if isinstance(pred, Relational):
        return _split_equality(pred.negated if negate else pred)
    return sp.Not(pred) if negate else pred


def _split_equality(rel: sp.Basic) -> sp.Basic:
    lhs, rhs = rel.args
    if isinstance(rel, sp.Eq):
        return sp.And(sp.Le(lhs, rhs), sp.Ge(lhs, rhs))
    if isinstance(rel, sp.Ne):
        return sp.Or(sp.Lt(lhs, rhs), sp.Gt(lhs, rhs))
    return rel


def _analyse(pred: sp.Basic, uniform: frozenset[sp.Symbol]) -> _Result:
    if pred == sp.true:
        return _Result(sp.true, sp.false, _UNBOUNDED, _UNBOUNDED, exact=True, pieces=(_UNBOUNDED,))
    if pred == sp.false:
        return _Result(sp.false, sp.true, None, None, exact=True, pieces=())
    if isinstance(pred, sp.And):
        return _conjunction([_analyse(arg, uniform) for arg in pred.args])
    if isinstance(pred, sp.Or):
        return _disjunction([_analyse(arg, uniform) for arg in pred.args])
    if isinstance(pred, sp.Lt | sp.Le | sp.Gt | sp.Ge):
        return _atom(pred, uniform)
    return _OPAQUE


def _conjunction(parts: list[_Result]) -> _Result:
    bounds = [p.kv_bound for p in parts if p.kv_bound is not None]
    pair_none = [
        _incompatible(lo, hi) for lo in bounds if lo.lower for hi in bounds if not hi.lower
    ]
    return _Result(
        all=sp.And(*(p.all for p in parts)),
        none=sp.Or(*(p.none for p in parts), *pair_none),
        hull=reduce(_intersect, (p.hull for p in parts)),
        full=reduce(_intersect, (p.full for p in parts)),
        exact=all(p.exact for p in parts),
        pieces=reduce(_intersect_pieces, (p.pieces for p in parts)),
    )


def _disjunction(parts: list[_Result]) -> _Result:
    return _Result(
        all=sp.Or(*(p.all for p in parts)),
        none=sp.And(*(p.none for p in parts)),
        hull=reduce(_hull, (p.hull for p in parts)),
        full=reduce(_longer, (p.full for p in parts)),
        exact=all(p.exact for p in parts),
        pieces=_capped(r for p in parts for r in p.pieces),
    )


def _incompatible(lower: _KvBound, upper: _KvBound) -> sp.Basic:
    """True when no kv satisfies ``kv >= lower(q)`` and ``kv <= upper(q)`` for any q of
    the tile (Fourier-Motzkin on kv; exact for unit kv coefficients)."""
    gap = lower.value - upper.value
    return _relation(_q_min(gap), ">", sp.S.Zero)


# -- affine atoms ---------------------------------------------------------------------------


def _atom(rel: sp.Basic, uniform: frozenset[sp.Symbol]) -> _Result:
    """An inequality, decided exactly if affine in the positions, else opaque."""
    # a*q + b*kv + c (op) 0 with op one of < <=, after moving everything left
    sign = 1 if isinstance(rel, sp.Lt | sp.Le) else -1
    strict = isinstance(rel, sp.Lt | sp.Gt)
    diff = sp.expand(sign * (rel.lhs - rel.rhs))
    const, linear = diff.as_independent(q_pos, kv_pos, as_Add=True)
    coeffs = linear.as_coefficients_dict()
    if set(coeffs) - {q_pos, kv_pos} or not _is_uniform(const, uniform):
        return _OPAQUE
    a, b = coeffs.get(q_pos, sp.S.Zero), coeffs.get(kv_pos, sp.S.Zero)
    if not all(x.is_number and x.is_finite for x in (a, b)):
        return _OPAQUE
    return _affine(a, b, -const, strict)


def _is_uniform(expr: sp.Basic, uniform: frozenset[sp.Symbol]) -> bool:
    """Whether ``expr`` is one value for the whole tile: only uniform symbols, and
    tensors indexed by uniform things."""
    elements = expr.atoms(sp.Indexed)
    if any(not _is_uniform(i, uniform) for e in elements for i in e.indices):
        return False
    plain = expr.xreplace({e: sp.Dummy() for e in elements})
    symbols = {s for s in plain.free_symbols if not isinstance(s, sp.Dummy)}
    return symbols <= uniform and not plain.has(sp.zoo, sp.nan)


def _affine(a: sp.Basic, b: sp.Basic, t: sp.Basic, strict: bool) -> _Result:
    """The atom ``a*q + b*kv < t`` (``<=`` unless strict) over the tile."""
    lowest, highest = _corner(a, b, low=True), _corner(a, b, low=False)
    op_all, op_none = ("<", ">=") if strict else ("<=", ">")
    all_visible = _relation(highest, op_all, t)
    none_visible = _relation(lowest, op_none, t)
    if b == 0:
        return _Result(
            all_visible,
            none_visible,
            _UNBOUNDED,
            _UNBOUNDED if all_visible == sp.true else None,
            exact=True,
            pieces=(_UNBOUNDED,),
        )
    bound = _solve_for_kv(a, b, t, strict)
    hull, full = _kv_ranges(bound)
    return _Result(
        all_visible, none_visible, hull, full, exact=True, pieces=(hull,), kv_bound=bound
    )


def _corner(a: sp.Basic, b: sp.Basic, *, low: bool) -> sp.Basic:
    """The least (``low``) or greatest value of ``a*q + b*kv`` over the tile."""
    q = q_lo if bool(a > 0) == low else q_hi
    kv = k_lo if bool(b > 0) == low else k_hi
    return a * q + b * kv


def _solve_for_kv(a: sp.Basic, b: sp.Basic, t: sp.Basic, strict: bool) -> _KvBound:
    """``a*q + b*kv < t`` as a bound on kv (integer kv: ``kv < w`` is ``kv <= w - 1``)."""
    w = sp.expand((t - a * q_pos) / abs(b))
    lower = bool(b < 0)
    if lower:
        w = -w
    if not strict:
        return _KvBound(lower, w, equivalent=True)
    if w.is_integer:
        return _KvBound(lower, w + 1 if lower else w - 1, equivalent=True)
    return _KvBound(lower, w, equivalent=False)


def _kv_ranges(bound: _KvBound) -> tuple[_Range, _Range]:
    """Hull (loosest over the tile's queries) and full range (tightest), with integer
    ends, since kv is an integer and the ends are loop bounds. Where the value is a ratio
    of integers they are exact (``q_pos < 2 * kv_pos``: kv > q/2, so kv >= q // 2 + 1).
    A real value v (``kv_pos >= 0.9 * q_pos``, a float tensor's element) is computed with
    rounding, as v' within less than a key of v, on either side, so from f =
    :class:`~attngen.symbols.int_floor` (v') the ends keep a key of margin: a visible key
    lies in [f, f + 1] of the bound, a key past f + 1 below (or f - 1 above) is visible
    to every query, whatever the rounding and the comparison. Each end is then at most
    two keys from exact. (f + 1 and ceil(v') had no margin: 2.5*kv - 0.75*q + 1.5 < 0 at
    q = 22 is kv < 6 exactly, and 0.3*q - 0.6 rounded above 6 put key 6 in the full range.)"""
    loosest, tightest = (_q_min, _q_max) if bound.lower else (_q_max, _q_min)
    wide, narrow = loosest(bound.value), tightest(bound.value)
    strict = not bound.equivalent
    if bound.lower:  # kv >= value, or (strict) kv > value: the least such integer
        hull_lo, full_lo = _above(wide, strict), _above(narrow, strict)
        if hull_lo is None:  # kv >= v > v' - 1 >= f - 1, so kv >= f
            hull_lo = int_floor(wide)
        if full_lo is None:  # kv >= f + 2 > v' + 1 > v
            full_lo = int_floor(narrow) + 2
        return _Range(hull_lo, None), _Range(full_lo, None)
    # kv < value (strict), or kv <= value: the end past the greatest such integer
    hull_hi, full_hi = _past(wide, strict), _past(narrow, strict)
    if hull_hi is None:  # kv <= v < v' + 1 < f + 2, so kv <= f + 1
        hull_hi = int_floor(wide) + 2
    if full_hi is None:  # kv <= f - 1 <= v' - 1 < v
        full_hi = int_floor(narrow)
    return _Range(None, hull_hi), _Range(None, full_hi)


def _integer_ratio(value: sp.Basic) -> tuple[sp.Basic, sp.Basic] | None:
    """``value`` as numerator and positive integer denominator of integers, or None."""
    n, d = sp.fraction(sp.together(value))
    return (n, d) if n.is_integer and d.is_Integer and d > 0 else None


def _above(value: sp.Basic, strict: bool) -> sp.Basic | None:
    """The least integer kv with kv > value (strict) or kv >= value; None where value is
    no ratio of integers. floor((n + d - 1) / d) is ceil(n / d): the printer has floor
    division only."""
    ratio = _integer_ratio(value)
    if ratio is None:
        return None
    n, d = ratio
    return sp.floor(n / d) + 1 if strict else sp.floor((n + d - 1) / d)


def _past(value: sp.Basic, strict: bool) -> sp.Basic | None:
    """One past the greatest integer kv with kv < value (strict) or kv <= value; None
    where value is no ratio of integers."""
    ratio = _integer_ratio(value)
    if ratio is None:
        return None
    n, d = ratio
    return sp.floor((n + d - 1) / d) if strict else sp.floor(n / d) + 1


def _q_min(expr: sp.Basic) -> sp.Basic:
    """The least value over the tile's queries of ``expr``, affine in q_pos."""
    return expr.subs(q_pos, q_lo if expr.coeff(q_pos) >= 0 else q_hi)


def _q_max(expr: sp.Basic) -> sp.Basic:
    return expr.subs(q_pos, q_hi if expr.coeff(q_pos) >= 0 else q_lo)


_RELATIONS: dict[str, Callable[[sp.Basic, sp.Basic], sp.Basic]] = {
    "<": sp.Lt,
    "<=": sp.Le,
    ">": sp.Gt,
    ">=": sp.Ge,
}


def _relation(lhs: sp.Basic, op: str, rhs: sp.Basic) -> sp.Basic:
    """``lhs op rhs`` written with positive terms on each side (``k_hi <= q_lo``
    rather than ``k_hi - q_lo <= 0``)."""
    terms = sp.Add.make_args(sp.expand(lhs - rhs))
    left = sp.Add(*(t for t in terms if not t.could_extract_minus_sign()))
    right = sp.Add(*(-t for t in terms if t.could_extract_minus_sign()))
    if left.is_number and not right.is_number:  # keep the tile symbol on the left
        left, right = right, left
        op = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
    return _RELATIONS[op](left, right)
