"""The named index symbols expressions are written over.

Positions are 0-based within a sequence (or, for trees, the depth of a token on its
root path). ``q_pos`` of a prefill query is ``kv_len - q_len + i``: queries are the last
``q_len`` tokens of their sequence's KV (chunked prefill; plain prefill when equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

q_pos = sp.Symbol("q_pos", integer=True, nonnegative=True)
kv_pos = sp.Symbol("kv_pos", integer=True, nonnegative=True)
head = sp.Symbol("head", integer=True, nonnegative=True)
batch = sp.Symbol("batch", integer=True, nonnegative=True)
q_len = sp.Symbol("q_len", integer=True, nonnegative=True)
kv_len = sp.Symbol("kv_len", integer=True, nonnegative=True)
score = sp.Symbol("score", real=True)

#: Names usable in a mask expression.
MASK_SYMBOLS: dict[str, sp.Symbol] = {
    s.name: s for s in (q_pos, kv_pos, head, batch, q_len, kv_len)
}
#: Names usable in a score_mod expression.
SCORE_SYMBOLS: dict[str, sp.Symbol] = {**MASK_SYMBOLS, "score": score}

#: Symbols whose value is the same for every element of a (query tile, KV tile) pair in
#: the sequence kernels; tile analysis may treat them as run-time scalars.
TILE_UNIFORM: frozenset[sp.Symbol] = frozenset({batch, q_len, kv_len})


def tensor(name: str, *, integer: bool = False) -> sp.IndexedBase:
    """The sympy handle of a user tensor (indexed as ``tensor(name)[i, j]``); an
    ``integer`` one's elements are integers to sympy, so that ``doc[i] // 2`` prints as
    integer division and the tile analysis bounds keys by them exactly (kv <
    prefix_len[batch])."""
    return sp.IndexedBase(name, integer=True) if integer else sp.IndexedBase(name)


#: The largest magnitude of a whole constant in the kernels' integer arithmetic, and of an
#: integer tile bound: half of int32's range, the other half left for the positions (below
#: it) and tile offsets added to it (see attngen.printer.INTEGER_RULE).
INTEGER_LIMIT = 2**30


class int_floor(sp.Function):  # lower case, as sympy names floor
    """floor(x) of a real ``x`` as an integer, clamped to [-2**30, 2**30] (positions are
    below 2**30): the tile analysis's loop bounds where a mask compares a key with a real
    value (``kv_pos >= 0.9 * q_pos``), which the kernels' loops need as integers."""

    is_integer = True

    @classmethod
    def eval(cls, x: sp.Basic) -> sp.Basic | None:
        if x.is_number and x.is_finite:
            return sp.Integer(max(-INTEGER_LIMIT, min(INTEGER_LIMIT, int(sp.floor(x)))))
        if x.is_integer:
            return x
        return None


@dataclass(frozen=True, slots=True)
class Fixed:
    """The values a topology gives some symbols, for every query it has: ``values``
    substituted into an expression, ``facts`` stating each in the user's terms, and
    ``where`` naming the topology ("a decode spec")."""

    where: str
    values: Mapping[sp.Symbol, sp.Basic]
    facts: Mapping[sp.Symbol, str]


#: A decode query is the last token of its sequence (the sequence decode kernels set
#: ``q_len = 1`` and ``q_pos = kv_len - 1``; so does the reference).
DECODE_FIXED = Fixed(
    "a decode spec",
    {q_len: sp.Integer(1), q_pos: kv_len - 1},
    {q_len: "q_len is 1 (one query per sequence)",
     q_pos: "q_pos is kv_len - 1 (the query is its sequence's last token)"},
)
#: A tree-family query sees its root path: ``q_len`` = 1 and ``kv_len`` = q_pos + 1,
#: substituted before printing (``attngen.tree_ir.TREE_LENGTHS``) and given so to the
#: reference.
TREE_FIXED = Fixed(
    "a tree spec",
    {q_len: sp.Integer(1), kv_len: q_pos + 1},
    {q_len: "q_len is 1 (each query is one token)",
     kv_len: "kv_len is q_pos + 1 (the tokens on the query's root path)"},
)
