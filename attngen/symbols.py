"""The named index symbols expressions are written over.

Positions are 0-based within a sequence (or, for trees, the depth of a token on its
root path). ``q_pos`` of a prefill query is ``kv_len - q_len + i``: queries are the last
``q_len`` tokens of their sequence's KV (chunked prefill; plain prefill when equal).
"""

from __future__ import annotations

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
