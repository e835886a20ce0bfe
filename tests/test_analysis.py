"""Tile classification: golden results for the common masks, and a brute-force check
that every answer is sound (and exact where it should be) on random tiles."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import sympy as sp
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen import expr
from attngen.analysis import TileAnalysis, analyse, k_hi, k_lo, q_hi, q_lo
from attngen.symbols import MASK_SYMBOLS, batch, head, kv_len, kv_pos, q_len, q_pos

PREFIX = sp.IndexedBase("prefix", integer=True)  # an int tensor, as the specs declare prefix lengths
DOC = sp.IndexedBase("doc")
CAUSAL = sp.Le(kv_pos, q_pos)
SINK = sp.Lt(kv_pos, 4)


def window(left: int, right: int) -> sp.Basic:
    return sp.And(sp.Ge(kv_pos, q_pos - left), sp.Le(kv_pos, q_pos + right))


def fields(r: TileAnalysis) -> tuple[object, ...]:
    return (r.all_visible, r.none_visible, r.kv_lo, r.kv_hi, r.full_lo, r.full_hi, r.exact)


def test_causal() -> None:
    assert fields(analyse(CAUSAL)) == (
        sp.Le(k_hi, q_lo),
        sp.Gt(k_lo, q_hi),
        -sp.oo,
        q_hi + 1,
        -sp.oo,
        q_lo + 1,
        True,
    )


def test_window() -> None:
    assert fields(analyse(window(128, 8))) == (
        sp.Le(k_hi, q_lo + 8) & sp.Le(q_hi, k_lo + 128),
        sp.Gt(k_lo, q_hi + 8) | sp.Gt(q_lo, k_hi + 128),
        q_lo - 128,
        q_hi + 9,
        q_hi - 128,
        q_lo + 9,
        True,
    )


def test_sink() -> None:
    assert fields(analyse(SINK)) == (sp.Lt(k_hi, 4), sp.Ge(k_lo, 4), -sp.oo, 4, -sp.oo, 4, True)


def test_sink_or_causal_window() -> None:
    r = analyse(sp.Or(SINK, sp.And(window(128, 0), CAUSAL)))
    longer = sp.Ge(q_hi - q_lo, 125)
    assert (r.kv_lo, r.kv_hi) == (-sp.oo, sp.Max(4, q_hi + 1))
    assert r.full_lo == sp.Piecewise((0, longer), (q_hi - 128, True))
    assert r.full_hi == sp.Piecewise((4, longer), (q_lo + 1, True))
    assert r.exact


def test_sink_and_window_are_two_pieces() -> None:
    """The gap between a sink and a window far from it is outside every piece, so the
    kernels never scan its tiles; pieces with a common end join into one."""
    r = analyse(sp.And(CAUSAL, sp.Or(SINK, window(4095, 0))))
    assert r.pieces == ((-sp.oo, sp.Min(4, q_hi + 1)), (q_lo - 4095, q_hi + 1))
    assert (r.kv_lo, r.kv_hi) == (-sp.oo, q_hi + 1)
    prefix_lm = analyse(sp.Or(CAUSAL, sp.Lt(kv_pos, PREFIX[batch])))
    assert prefix_lm.pieces == ((-sp.oo, sp.Max(q_hi + 1, PREFIX[batch])),)
    # an opaque rule may see any key: the window's piece adds nothing beside it
    either = analyse(sp.Or(window(5, 0), sp.Eq(DOC[q_pos], DOC[kv_pos])))
    assert either.pieces == ((-sp.oo, sp.oo),)


def test_prefix_lm_with_a_per_batch_tensor() -> None:
    r = analyse(sp.Or(CAUSAL, sp.Lt(kv_pos, PREFIX[batch])))
    assert r.all_visible == sp.Le(k_hi, q_lo) | sp.Lt(k_hi, PREFIX[batch])
    assert r.none_visible == sp.Gt(k_lo, q_hi) & sp.Ge(k_lo, PREFIX[batch])
    assert (r.kv_lo, r.kv_hi) == (-sp.oo, sp.Max(q_hi + 1, PREFIX[batch]))
    assert r.exact


def test_document_is_opaque() -> None:
    r = analyse(sp.Eq(DOC[q_pos], DOC[kv_pos]))
    assert fields(r) == (sp.false, sp.false, -sp.oo, sp.oo, 0, 0, False)


def test_head_is_not_uniform_by_default() -> None:
    pred = sp.Le(kv_pos, q_pos + head)
    assert not analyse(pred).exact
    assert analyse(pred, uniform=frozenset({head})).exact


def test_expression_masks() -> None:
    def mask(text: str) -> sp.Basic:
        return expr.parse(text, names=MASK_SYMBOLS, tensors={"prefix": 1}, want="bool")

    chunked = analyse(mask("kv_pos <= q_pos and q_pos // 64 == kv_pos // 64"))
    assert not chunked.exact and chunked.none_visible == sp.Gt(k_lo, q_hi)
    bounded = analyse(mask("not (kv_pos > q_pos + kv_len - q_len)"))
    assert bounded.kv_hi == q_hi + kv_len - q_len + 1 and bounded.exact
    assert analyse(mask("kv_pos != q_pos")).all_visible == sp.Lt(k_hi, q_lo) | sp.Lt(q_hi, k_lo)


def test_constants() -> None:
    assert fields(analyse(sp.true)) == (sp.true, sp.false, -sp.oo, sp.oo, -sp.oo, sp.oo, True)
    assert fields(analyse(sp.false)) == (sp.false, sp.true, 0, 0, 0, 0, True)
    assert analyse(sp.true).pieces == ((-sp.oo, sp.oo),) and analyse(sp.false).pieces == ()


# -- brute force ----------------------------------------------------------------------------

PREFIX_VALUES = np.array([3, 9])  # prefix[batch] for batch 0, 1
DOC_IDS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3] * 6)
KV_SCAN = np.arange(48)  # hull and full range hold over all keys, not just the tile's


def simple_atoms() -> st.SearchStrategy[sp.Basic]:
    """Causal, sink and window pieces: conjunctions of these are decided exactly."""
    small = st.integers(0, 12)
    return st.one_of(
        st.just(CAUSAL),
        small.map(lambda s: sp.Lt(kv_pos, s)),
        small.map(lambda left: sp.Ge(kv_pos, q_pos - left)),
        small.map(lambda right: sp.Le(kv_pos, q_pos + right)),
    )


def any_atom() -> st.SearchStrategy[sp.Basic]:
    coeff = st.integers(-3, 3)
    affine = st.builds(
        lambda a, b, c, op: op(a * q_pos + b * kv_pos + c, 0),
        coeff,
        coeff,
        st.integers(-20, 20),
        st.sampled_from([sp.Lt, sp.Le, sp.Gt, sp.Ge, sp.Eq, sp.Ne]),
    )
    return st.one_of(
        simple_atoms(),
        affine,
        st.just(sp.Lt(kv_pos, PREFIX[batch])),
        st.just(sp.Ge(kv_pos, q_pos - kv_len + q_len)),
        st.just(sp.Eq(DOC[q_pos], DOC[kv_pos])),  # opaque
        st.just(sp.Lt(q_pos * kv_pos, 30)),  # opaque
        st.just(sp.Ge(q_pos, 6)),  # q only
    )


def predicates(
    atoms: st.SearchStrategy[sp.Basic], *, negation: bool
) -> st.SearchStrategy[sp.Basic]:
    def extend(children: st.SearchStrategy[sp.Basic]) -> st.SearchStrategy[sp.Basic]:
        pairs = st.lists(children, min_size=2, max_size=3)
        options = [pairs.map(lambda xs: sp.And(*xs))]
        if negation:
            options += [pairs.map(lambda xs: sp.Or(*xs)), children.map(sp.Not)]
        return st.one_of(*options)

    return st.recursive(atoms, extend, max_leaves=5)


@st.composite
def tiles(draw: st.DrawFn) -> dict[sp.Symbol, int]:
    lo_q, lo_k = draw(st.integers(0, 24)), draw(st.integers(0, 24))
    return {
        q_lo: lo_q,
        q_hi: lo_q + draw(st.integers(0, 8)),
        k_lo: lo_k,
        k_hi: lo_k + draw(st.integers(0, 8)),
        batch: draw(st.integers(0, 1)),
        q_len: draw(st.integers(0, 10)),
        kv_len: draw(st.integers(10, 20)),
    }


def visibility_grid(pred: sp.Basic, env: dict[sp.Symbol, int]) -> np.ndarray:
    """``pred`` at every (query of the tile, kv in KV_SCAN), by direct evaluation."""
    f = sp.lambdify([q_pos, kv_pos, batch, q_len, kv_len, DOC, PREFIX], pred, modules="numpy")
    qs, kvs = np.meshgrid(np.arange(env[q_lo], env[q_hi] + 1), KV_SCAN, indexing="ij")
    grid = f(qs, kvs, env[batch], env[q_len], env[kv_len], DOC_IDS, PREFIX_VALUES)
    return np.broadcast_to(np.asarray(grid, dtype=bool), qs.shape)


def value(result: sp.Basic, env: dict[sp.Symbol, int]) -> float:
    """A field of a TileAnalysis at the tile ``env``."""
    resolved = sp.sympify(result).xreplace({k: sp.Integer(v) for k, v in env.items()})
    resolved = resolved.replace(
        lambda e: isinstance(e, sp.Indexed), lambda e: sp.Integer(PREFIX_VALUES[int(e.indices[0])])
    )
    return (
        float(bool(resolved)) if isinstance(resolved, sp.logic.boolalg.Boolean) else float(resolved)
    )


def check(pred: sp.Basic, env: dict[sp.Symbol, int], *, exact_all_none: bool) -> None:
    r = analyse(pred)
    grid = visibility_grid(pred, env)
    in_tile = grid[:, env[k_lo] : env[k_hi] + 1]
    all_visible, none_visible = value(r.all_visible, env), value(r.none_visible, env)
    if all_visible or exact_all_none:
        assert all_visible == in_tile.all(), (pred, env, r)
    if none_visible or exact_all_none:
        assert none_visible == (not in_tile.any()), (pred, env, r)
    in_hull = (value(r.kv_lo, env) <= KV_SCAN) & (value(r.kv_hi, env) > KV_SCAN)
    assert not (grid & ~in_hull).any(), (pred, env, r)
    in_full = (value(r.full_lo, env) <= KV_SCAN) & (value(r.full_hi, env) > KV_SCAN)
    assert grid[:, in_full].all(), (pred, env, r)
    in_pieces = np.zeros_like(in_hull)
    for lo, hi in r.pieces:
        in_pieces |= (value(lo, env) <= KV_SCAN) & (value(hi, env) > KV_SCAN)
    assert not (grid & ~in_pieces).any(), (pred, env, r)
    assert not (in_pieces & ~in_hull).any(), (pred, env, r)


@settings(max_examples=200, deadline=None)
@given(predicates(any_atom(), negation=True), tiles())
def test_sound_on_random_predicates(pred: sp.Basic, env: dict[sp.Symbol, int]) -> None:
    check(pred, env, exact_all_none=False)


@settings(max_examples=200, deadline=None)
@given(predicates(simple_atoms(), negation=False), tiles())
def test_exact_on_conjunctions_of_simple_masks(pred: sp.Basic, env: dict[sp.Symbol, int]) -> None:
    assert analyse(pred).exact
    check(pred, env, exact_all_none=True)


@settings(max_examples=200, deadline=None)
@given(st.integers(-3, 3), st.sampled_from([-3, -2, 2, 3]), st.integers(-20, 20),
       st.sampled_from([sp.Lt, sp.Le, sp.Gt, sp.Ge]), tiles())
def test_a_scaled_key_gets_integer_bounds_that_are_exact(
        a: int, b: int, c: int, op: Any, env: dict[sp.Symbol, int]) -> None:
    """``a*q + b*kv + c (op) 0`` with |b| > 1 bounds kv by a ratio (kv > q/2): the ends
    are the integers the loops need, and as tight as one atom allows: the hull holds
    exactly the keys some query of the tile sees, the full range exactly those all see."""
    pred = op(a * q_pos + b * kv_pos + c, 0)
    r = analyse(pred)
    grid = visibility_grid(pred, env)
    ends = [r.kv_lo, r.kv_hi, r.full_lo, r.full_hi, *(e for piece in r.pieces for e in piece)]
    for end in ends:
        v = value(end, env)
        assert math.isinf(v) or v == int(v), (pred, env, end)
    lo, hi = max(value(r.kv_lo, env), 0), min(value(r.kv_hi, env), len(KV_SCAN))
    seen = np.flatnonzero(grid.any(axis=0))
    if seen.size:  # the scan holds every key some query sees, not just past its end
        assert (lo, hi) == (seen[0], seen[-1] + 1) or hi == len(KV_SCAN), (pred, env, r)
    full = (value(r.full_lo, env) <= KV_SCAN) & (value(r.full_hi, env) > KV_SCAN)
    assert (full == grid.all(axis=0)).all(), (pred, env, r)


@settings(max_examples=200, deadline=None)
# kv < 0.3*q - 0.6 is kv < 6 at q = 22, and 0.3*22 - 0.6 rounds above 6
@example(-0.75, 2.5, 1.5, sp.Lt, {q_lo: 22, q_hi: 22, k_lo: 0, k_hi: 0, batch: 0, q_len: 40, kv_len: 40})
@given(st.sampled_from([0.0, 0.5, 0.9, -0.75, 1.3]), st.sampled_from([1.0, -1.0, 2.5, -0.6]),
       st.sampled_from([0.0, 1.5, -7.25, 12.0]), st.sampled_from([sp.Lt, sp.Le, sp.Gt, sp.Ge]), tiles())
def test_a_real_bound_on_the_key_gets_integer_ends_that_are_sound(
        a: float, b: float, c: float, op: Any, env: dict[sp.Symbol, int]) -> None:
    """``a*q + b*kv + c (op) 0`` with real coefficients (``kv_pos >= 0.9 * q_pos``): the
    ends are integers the loops can take (real ones failed to compile in the kernels),
    the hull holds every key some query sees and at most two more on its bounded side,
    and the full range only keys every query sees, at most two fewer: each end keeps a
    key of margin for the rounding of the real value, on either side."""
    pred = op(sp.Float(a) * q_pos + sp.Float(b) * kv_pos + sp.Float(c), 0)
    r = analyse(pred)
    grid = visibility_grid(pred, env)
    for end in [r.kv_lo, r.kv_hi, r.full_lo, r.full_hi, *(e for piece in r.pieces for e in piece)]:
        v = value(end, env)
        assert math.isinf(v) or v == int(v), (pred, env, end)
    hull = (value(r.kv_lo, env) <= KV_SCAN) & (value(r.kv_hi, env) > KV_SCAN)
    assert not (grid.any(axis=0) & ~hull).any(), (pred, env, r)
    assert (hull & ~grid.any(axis=0)).sum() <= 2 or not grid.any(), (pred, env, r)
    full = (value(r.full_lo, env) <= KV_SCAN) & (value(r.full_hi, env) > KV_SCAN)
    assert grid[:, full].all(), (pred, env, r)
    assert (grid.all(axis=0) & ~full).sum() <= 2, (pred, env, r)


def test_an_integer_tensor_bounds_keys_exactly() -> None:
    """A declared int32 tensor's element is an integer to the analysis (semantics makes it
    so, as the parser does): prefix_lm's kv < prefix_len[batch] is its own loop end, not
    an int_floor of it, which would pass it through float32."""
    from pathlib import Path

    from attngen.semantics import visibility
    from attngen.spec import load_spec
    from attngen.symbols import int_floor

    spec = load_spec(Path(__file__).parent.parent / "specs" / "prefix_lm_prefill.yaml")
    r = analyse(visibility(spec))
    for end in (r.kv_lo, r.kv_hi, r.full_lo, r.full_hi, *(e for piece in r.pieces for e in piece)):
        assert not sp.sympify(end).has(int_floor), end
