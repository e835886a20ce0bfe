"""What a spec means, as sympy expressions over the symbols of :mod:`attngen.symbols`.

This is the single definition of each mask rule; the reference evaluates it directly
and the lowering analyses and prints it. Nothing here knows about Triton.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import sympy as sp

from attngen import expr, symbols
from attngen.masks import (
    AllOf,
    AnyOf,
    Causal,
    Document,
    ExprRule,
    Full,
    MaskRule,
    NotRule,
    PrefixLM,
    Sink,
    Window,
)
from attngen.spec import Spec
from attngen.symbols import batch, kv_pos, q_pos

RESERVED_NAMES = frozenset(symbols.SCORE_SYMBOLS) | frozenset(expr.FUNCTIONS)
#: Tensor dtypes whose elements are integers: only these may appear in an index.
INTEGER_DTYPES = frozenset({"int32", "int64"})


def _tensor_ndims(spec: Spec) -> dict[str, int]:
    return {name: len(decl.dims) for name, decl in spec.tensors.items()}


def _integer_tensors(spec: Spec) -> frozenset[str]:
    return frozenset(name for name, decl in spec.tensors.items() if decl.dtype in INTEGER_DTYPES)


def rule_to_sympy(
    rule: MaskRule,
    tensor_ndims: dict[str, int],
    integer_tensors: frozenset[str] = frozenset(),
    fixed: symbols.Fixed | None = None,
) -> sp.Basic:
    """The visibility predicate of one mask rule; ``integer_tensors`` may be indexed with,
    and an expression must be defined with the values ``fixed`` gives (see :func:`fixed_values`)."""
    match rule:
        case Full():
            return sp.true
        case Causal():
            return sp.Le(kv_pos, q_pos)
        case Window(left, right):
            parts = []
            if left is not None:
                parts.append(sp.Ge(kv_pos, q_pos - left))
            if right is not None:
                parts.append(sp.Le(kv_pos, q_pos + right))
            return sp.And(*parts)
        case Sink(tokens):
            return sp.Lt(kv_pos, tokens)
        case PrefixLM(length, name):
            bound = symbols.tensor(name, integer=name in integer_tensors)[batch] if name is not None else length
            return sp.Or(sp.Le(kv_pos, q_pos), sp.Lt(kv_pos, bound))
        case Document(name):
            doc = symbols.tensor(name, integer=name in integer_tensors)
            return sp.Eq(doc[q_pos], doc[kv_pos])
        case ExprRule(text):
            return expr.parse(text, names=symbols.MASK_SYMBOLS, tensors=tensor_ndims, want="bool",
                              integer_tensors=integer_tensors, fixed=fixed)
        case AllOf(rules):
            return sp.And(*(rule_to_sympy(r, tensor_ndims, integer_tensors, fixed) for r in rules))
        case AnyOf(rules):
            return sp.Or(*(rule_to_sympy(r, tensor_ndims, integer_tensors, fixed) for r in rules))
        case NotRule(inner):
            return sp.Not(rule_to_sympy(inner, tensor_ndims, integer_tensors, fixed))
    raise TypeError(rule)


def fixed_values(spec: Spec) -> symbols.Fixed | None:
    """The values ``spec``'s topology gives some symbols for every query (a decode query
    is its sequence's last token; a tree query is one token on its root path), which
    its expressions must be defined with; None where it fixes none (prefill)."""
    topology = spec.topology
    if topology.kind == "sequence":
        return symbols.DECODE_FIXED if topology.queries == "decode" else None
    return dataclasses.replace(symbols.TREE_FIXED, where=f"a {topology.kind} spec")


@lru_cache(maxsize=256)
def visibility(spec: Spec) -> sp.Basic:
    """The spec's visibility predicate over q_pos, kv_pos, head, batch, q_len, kv_len
    and tensors (not including the sequence bounds, which every kernel adds)."""
    return rule_to_sympy(spec.mask, _tensor_ndims(spec), _integer_tensors(spec), fixed_values(spec))


@lru_cache(maxsize=256)
def score(spec: Spec) -> sp.Basic:
    """The modified score as an expression of ``score`` (= scale * q·k) and the index
    symbols; ``score`` itself when the spec has no score_mod."""
    if spec.score_mod is None:
        return symbols.score
    return expr.parse(spec.score_mod, names=symbols.SCORE_SYMBOLS, tensors=_tensor_ndims(spec),
                      want="number", integer_tensors=_integer_tensors(spec), fixed=fixed_values(spec))
