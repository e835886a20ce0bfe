"""Hypothesis strategies that follow the spec grammar.

One strategy per mask kind and per score modification. Each draws the YAML fragment,
the tensors it needs declared, and a hand-written torch oracle of what it means (used by
the FlexAttention comparison; never derived from our printer or our semantics module).
Masks combine with ``all`` / ``any`` / ``not``. Spec dicts go through
:func:`attngen.spec.parse_spec`.

An oracle takes a :class:`Ctx` whose fields are torch tensors (or ints) that broadcast:
``b`` (sequence), ``h`` (q head), ``q`` / ``kv`` (positions), ``q_len``/``kv_len`` and
``t`` (user tensors as this sequence sees them: per-token tensors sliced to its KV).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from attngen.check import Shape
from attngen.spec import Spec, parse_spec


@dataclass(frozen=True)
class Ctx:
    b: Any
    h: Any
    q: Any
    kv: Any
    q_len: int
    kv_len: int
    t: dict[str, torch.Tensor]


MaskOracle = Callable[[Ctx], Any]
ScoreOracle = Callable[[Any, Ctx], Any]

DOC = {"doc": {"dims": ["token"], "dtype": "int32"}}
PREFIX = {"prefix": {"dims": ["batch"], "dtype": "int32"}}
#: Float user tensors come in each float dtype: a 16-bit one is widened as it is loaded.
FLOAT_TENSOR_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class MaskCase:
    yaml: Any
    oracle: MaskOracle
    tensors: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __repr__(self) -> str:
        return f"MaskCase({self.yaml!r})"


@dataclass(frozen=True)
class ScoreCase:
    text: str | None
    oracle: ScoreOracle | None
    tensors: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ScoreCase({self.text!r})"


# ---------------------------------------------------------------------------------------
# One strategy per mask kind


def causal() -> st.SearchStrategy[MaskCase]:
    return st.just(MaskCase("causal", lambda c: c.kv <= c.q, label="causal"))


def full() -> st.SearchStrategy[MaskCase]:
    return st.just(MaskCase("full", lambda c: (c.kv >= 0) | (c.q >= 0), label="full"))


@st.composite
def window(draw: st.DrawFn) -> MaskCase:
    side = st.one_of(st.none(), st.integers(0, 20))
    left, right = draw(side), draw(side)
    if left is None and right is None:
        left = draw(st.integers(0, 20))
    if right == 0 and left is not None and draw(st.booleans()):
        yaml: Any = {"window": left}  # the short form: left only, right 0
    else:
        yaml = {"window": {"left": left, "right": right}}

    def oracle(c: Ctx) -> Any:
        ok = (c.kv >= 0) | (c.q >= 0)
        if left is not None:
            ok = ok & (c.kv >= c.q - left)
        if right is not None:
            ok = ok & (c.kv <= c.q + right)
        return ok

    return MaskCase(yaml, oracle, label="window")


@st.composite
def sink(draw: st.DrawFn) -> MaskCase:
    n = draw(st.integers(1, 8))
    return MaskCase({"sink": n}, lambda c: c.kv < n, label="sink")


@st.composite
def prefix_lm(draw: st.DrawFn) -> MaskCase:
    if draw(st.booleans()):
        n = draw(st.integers(0, 24))
        return MaskCase({"prefix_lm": n}, lambda c: (c.kv <= c.q) | (c.kv < n), label="prefix_lm")
    return MaskCase(
        {"prefix_lm": "prefix"},
        lambda c: (c.kv <= c.q) | (c.kv < c.t["prefix"][c.b]),
        tensors=PREFIX,
        label="prefix_lm",
    )


def document() -> st.SearchStrategy[MaskCase]:
    return st.just(
        MaskCase(
            {"document": "doc"},
            lambda c: c.t["doc"][c.q] == c.t["doc"][c.kv],
            tensors=DOC,
            label="document",
        )
    )


#: Free expressions with their meaning written by hand in torch.
EXPRESSIONS: dict[str, MaskOracle] = {
    "kv_pos % 3 != 1": lambda c: c.kv % 3 != 1,
    "abs(q_pos - kv_pos) < 7": lambda c: torch.abs(c.q - c.kv) < 7,
    "q_pos // 4 == kv_pos // 4": lambda c: (
        torch.div(c.q, 4, rounding_mode="floor") == torch.div(c.kv, 4, rounding_mode="floor")
    ),
    "kv_pos >= q_pos - 5 and head % 2 == 0": lambda c: (c.kv >= c.q - 5) & (c.h % 2 == 0),
    "not (kv_pos > q_pos)": lambda c: ~(c.kv > c.q),
    "kv_pos + q_len >= kv_len": lambda c: c.kv + c.q_len >= c.kv_len,
    "batch % 2 == 1 or kv_pos <= q_pos": lambda c: (c.b % 2 == 1) | (c.kv <= c.q),
    "min(q_pos, 9) >= kv_pos": lambda c: torch.clamp(c.q, max=9) >= c.kv,
}


def expression() -> st.SearchStrategy[MaskCase]:
    return st.sampled_from(sorted(EXPRESSIONS)).map(
        lambda text: MaskCase({"expr": text}, EXPRESSIONS[text], label="expr")
    )


def leaf_masks() -> st.SearchStrategy[MaskCase]:
    """Every kind of single rule."""
    return st.one_of(causal(), full(), window(), sink(), prefix_lm(), document(), expression())


def _merge(cases: list[MaskCase]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in cases:
        out.update(c.tensors)
    return out


def _all(cases: list[MaskCase]) -> MaskCase:
    def oracle(c: Ctx) -> Any:
        ok = cases[0].oracle(c)
        for case in cases[1:]:
            ok = ok & case.oracle(c)
        return ok

    return MaskCase({"all": [m.yaml for m in cases]}, oracle, _merge(cases), "all")


def _any(cases: list[MaskCase]) -> MaskCase:
    def oracle(c: Ctx) -> Any:
        ok = cases[0].oracle(c)
        for case in cases[1:]:
            ok = ok | case.oracle(c)
        return ok

    return MaskCase({"any": [m.yaml for m in cases]}, oracle, _merge(cases), "any")


def _not(case: MaskCase) -> MaskCase:
    return MaskCase({"not": case.yaml}, lambda c: ~case.oracle(c), case.tensors, "not")


@st.composite
def masks(draw: st.DrawFn) -> MaskCase:
    """One to three rules, combined with ``all`` (the common case), ``any``, ``not`` or
    a nesting of them. Built by hand rather than with ``st.recursive``, whose draws are
    dominated by towers of ``not`` that hide nearly every key."""
    rules = draw(st.lists(leaf_masks(), min_size=1, max_size=3))
    form = draw(st.sampled_from(["all", "all", "any", "not", "nested"]))
    if form == "all" or (len(rules) == 1 and form != "not"):
        return _all(rules)
    if form == "any":
        return _any(rules)
    if form == "not":
        return _not(rules[0]) if len(rules) == 1 else _all([rules[0], _not(_any(rules[1:]))])
    return (
        _any([_all(rules[:2]), *rules[2:]])
        if len(rules) > 2
        else _all([_any(rules), _not(rules[0])])
    )


def mask_yaml(case: MaskCase) -> Any:
    """The spec's ``mask`` field: a top-level ``all`` in the documented list short form."""
    return case.yaml["all"] if isinstance(case.yaml, dict) and "all" in case.yaml else [case.yaml]


# ---------------------------------------------------------------------------------------
# Score modifications


@st.composite
def softcap(draw: st.DrawFn) -> ScoreCase:
    cap = draw(st.sampled_from([5, 30]))
    return ScoreCase(f"{cap} * tanh(score / {cap})", lambda s, c: cap * torch.tanh(s / cap))


def alibi() -> st.SearchStrategy[ScoreCase]:
    return st.sampled_from(FLOAT_TENSOR_DTYPES).map(
        lambda dtype: ScoreCase(
            "score - slopes[head] * abs(q_pos - kv_pos)",
            lambda s, c: s - c.t["slopes"][c.h] * torch.abs(c.q - c.kv),
            {"slopes": {"dims": ["head"], "dtype": dtype}},
        )
    )


def relative_bias() -> st.SearchStrategy[ScoreCase]:
    return st.sampled_from(FLOAT_TENSOR_DTYPES).map(
        lambda dtype: ScoreCase(
            "score + bias[head, clamp(q_pos - kv_pos, 0, 63)]",
            lambda s, c: s + c.t["bias"][c.h, torch.clamp(c.q - c.kv, 0, 63)],
            {"bias": {"dims": ["head", 64], "dtype": dtype}},
        )
    )


def temperature() -> st.SearchStrategy[ScoreCase]:
    return st.just(ScoreCase("score / 0.7", lambda s, c: s / 0.7))


#: Score mods whose float functions take integer positions (float32 in the kernel).
DISTANCE_MODS: dict[str, ScoreOracle] = {
    "score - 0.25 * sqrt(abs(q_pos - kv_pos))": lambda s, c: s - 0.25 * torch.sqrt(torch.abs(c.q - c.kv).double()),
    "score * 0.5 ** (abs(q_pos - kv_pos) // 8)": lambda s, c: s * 0.5 ** (torch.abs(c.q - c.kv) // 8).double(),
    "score - log(1 + abs(q_pos - kv_pos))": lambda s, c: s - torch.log1p(torch.abs(c.q - c.kv).double()),
}


def distance() -> st.SearchStrategy[ScoreCase]:
    return st.sampled_from(sorted(DISTANCE_MODS)).map(lambda text: ScoreCase(text, DISTANCE_MODS[text]))


def no_score_mod() -> st.SearchStrategy[ScoreCase]:
    return st.just(ScoreCase(None, None))


def score_mods() -> st.SearchStrategy[ScoreCase]:
    return st.one_of(no_score_mod(), softcap(), alibi(), relative_bias(), temperature(), distance())


# ---------------------------------------------------------------------------------------
# Specs and shapes

INTERPRETER_HEAD_DIMS = (16, 16, 16, 32, 32, 64, 96)  # 96 drawn rarely: it is the slow one
GPU_HEAD_DIMS = (16, 32, 64, 64, 96, 128, 128, 192, 256)


@dataclass(frozen=True)
class SpecCase:
    spec: Spec
    mask: MaskCase
    score: ScoreCase

    def __repr__(self) -> str:
        return f"SpecCase({self.spec.canonical()!r})"


@st.composite
def spec_cases(
    draw: st.DrawFn,
    *,
    dtypes: tuple[str, ...] = ("fp16", "fp32"),
    queries: tuple[str, ...] = ("prefill", "decode"),
    head_dims: tuple[int, ...] = INTERPRETER_HEAD_DIMS,
    max_kv_heads: int = 2,
    groups: tuple[int, ...] = (1, 2, 4),
) -> SpecCase:
    """A whole spec (through parse_spec) with its mask and score oracles."""
    mask = draw(masks())
    score = draw(score_mods())
    kv = draw(st.integers(1, max_kv_heads))
    group = draw(st.sampled_from(groups))
    dim = draw(st.sampled_from(head_dims))
    head_dim: Any = (
        dim if draw(st.integers(0, 4)) else {"qk": dim, "v": draw(st.sampled_from(head_dims))}
    )
    data: dict[str, Any] = {
        "name": "prop",
        "heads": {"q": kv * group, "kv": kv},
        "head_dim": head_dim,
        "dtype": draw(st.sampled_from(dtypes)),
        "topology": {"kind": "sequence", "queries": draw(st.sampled_from(queries))},
        "mask": mask_yaml(mask),
    }
    tensors = {**mask.tensors, **score.tensors}
    if tensors:
        data["tensors"] = tensors
    if score.text is not None:
        data["score_mod"] = score.text
    if draw(st.integers(0, 4)) == 0:
        data["scale"] = draw(st.sampled_from([0.05, 0.125, 0.5]))
    return SpecCase(parse_spec(data), mask, score)


LENGTH_EDGES = (0, 1, 2, 15, 16, 17, 31, 32, 33)


@st.composite
def shapes(draw: st.DrawFn, *, decode: bool, max_len: int = 40, max_batch: int = 3) -> Shape:
    """Per-sequence (q_len, kv_len) with 0, 1 and non-multiples of the tile; chunked
    prefill (q_len < kv_len) as often as plain prefill."""
    length = st.one_of(
        st.sampled_from([e for e in LENGTH_EDGES if e <= max_len]), st.integers(0, max_len)
    )
    lengths = []
    for _ in range(draw(st.integers(1, max_batch))):
        kv = draw(length)
        q = 1 if decode else draw(st.one_of(st.just(kv), st.integers(0, kv)))
        lengths.append((q, kv))
    return Shape(tuple(lengths), decode)


@st.composite
def configs(draw: st.DrawFn, shape: Shape, *, blocks: tuple[int, ...] = (16, 32)) -> dict[str, int]:
    """Launch configs with tiles valid for the shapes (powers of two >= 16, tl.dot's
    minimum; no larger than needed to cover the longest sequence twice over)."""
    longest = max((kv for _, kv in shape.lengths), default=0)
    useful = [b for b in blocks if b <= max(16, 2 * longest)] or [min(blocks)]
    config = {"block_n": draw(st.sampled_from(useful)), "num_warps": 4, "num_stages": 1}
    if shape.decode:
        config["num_splits"] = draw(st.integers(1, 5))
    else:
        config["block_m"] = draw(st.sampled_from(useful))
    return config


# ---------------------------------------------------------------------------------------
# Expressions of the grammar (the fuzz tests)


INTEGERS = ("q_pos", "kv_pos", "head", "batch", "q_len", "kv_len")


#: The right operands of // and %: constants (a constant zero is refused by the grammar,
#: tested in test_expr), and positions, lengths and heads, which are zero somewhere, where
#: the quotient and the remainder are 0 in kernel and reference alike.
DIVISORS = st.one_of(st.integers(1, 9).map(str), st.sampled_from(INTEGERS), st.just("(kv_pos - q_pos)"))


def integer_expr(depth: int = 0, divisors: st.SearchStrategy[str] = DIVISORS) -> st.SearchStrategy[str]:
    leaf = st.one_of(st.sampled_from(INTEGERS), st.integers(0, 40).map(str))
    if depth >= 2:
        return leaf
    sub = st.deferred(lambda: integer_expr(depth + 1, divisors))
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from("+-*"), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from(["//", "%"]), divisors).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["min", "max"]), sub, sub).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        sub.map(lambda a: f"abs({a})"),
        st.tuples(sub, st.integers(1, 30)).map(lambda t: f"clamp({t[0]}, 0, {t[1]})"),
        st.tuples(sub, sub).map(lambda t: f"where({t[0]} > {t[1]}, {t[0]}, {t[1]})"),
    )
