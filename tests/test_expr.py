"""The expression grammar: what parses to what, and the errors (with columns) for what
does not."""

from __future__ import annotations

import pytest
import sympy as sp

from attngen import expr
from attngen.errors import ExprError
from attngen.symbols import SCORE_SYMBOLS, head, kv_pos, q_pos, score

TENSORS = {"slopes": 1, "bias": 2}
SLOPES, BIAS = sp.IndexedBase("slopes"), sp.IndexedBase("bias")


def parse(text: str, want: expr.Kind = "number") -> sp.Basic:
    return expr.parse(text, names=SCORE_SYMBOLS, tensors=TENSORS, want=want)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("1 + 2 * 3", sp.Integer(7)),
        ("2 ** 3 ** 2", sp.Integer(512)),
        ("-2 ** 2", sp.Integer(-4)),
        ("2 ** -1", sp.Rational(1, 2)),
        ("7 // 2 + -7 // 2", sp.Integer(-1)),
        ("-7 % 3", sp.Integer(2)),
        ("1e-3", sp.Float(0.001)),
        ("1.5 * score", 1.5 * score),
        ("score / 30", score / 30),
        ("q_pos // 4", sp.floor(q_pos / 4)),
        ("q_pos % 4", sp.Mod(q_pos, 4)),
        ("min(q_pos, kv_pos, 3)", sp.Min(q_pos, kv_pos, 3)),
        ("clamp(q_pos - kv_pos, 0, 127)", sp.Min(sp.Max(q_pos - kv_pos, 0), 127)),
        ("where(q_pos < kv_pos, score, 0)", sp.Piecewise((score, q_pos < kv_pos), (0, True))),
        ("abs(q_pos - kv_pos) * slopes[head]", sp.Abs(q_pos - kv_pos) * SLOPES[head]),
        ("bias[head, q_pos]", BIAS[head, q_pos]),
        (
            "tanh(score) + exp(score) + log(score) + sqrt(score)",
            sp.tanh(score) + sp.exp(score) + sp.log(score) + sp.sqrt(score),
        ),
    ],
)
def test_numbers(text: str, want: sp.Basic) -> None:
    assert parse(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("kv_pos <= q_pos", sp.Le(kv_pos, q_pos)),
        ("0 <= q_pos - kv_pos < 8", sp.And(sp.Le(0, q_pos - kv_pos), sp.Lt(q_pos - kv_pos, 8))),
        (
            "not kv_pos < 4 or head == 1 and true",
            sp.Or(sp.Not(sp.Lt(kv_pos, 4)), sp.And(sp.Eq(head, 1), sp.true)),
        ),
        ("not (q_pos != kv_pos)", sp.Not(sp.Ne(q_pos, kv_pos))),
        ("false", sp.false),
    ],
)
def test_booleans(text: str, want: sp.Basic) -> None:
    assert parse(text, "bool") == want


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("q_pos $ 2", 6, "unexpected character"),
        ("q_pos <", 7, "unexpected end"),
        ("(q_pos", 6, "unexpected end"),
        ("q_pos q_pos", 6, "unexpected 'q_pos'"),
        ("qpos < 3", 0, "unknown name 'qpos'"),
        ("q_pos(1) < 2", 0, "is not a function"),
        ("foo(1) < 2", 0, "unknown name"),
        ("min(q_pos) < 2", 0, "got 1 argument"),
        ("where(true, 1) < 2", 0, "got 2 arguments"),
        ("q_pos[0] < 2", 0, "not a tensor"),
        ("(slopes)[0] < 2", 1, "must be indexed"),
        ("bias[0] < 2", 0, "takes 2"),
        ("slopes < 2", 0, "must be indexed"),
        ("abs < 2", 0, "must be called"),
        ("q_pos / 0 < 1", 8, "division by zero"),
        ("q_pos // (1 - 1) < 1", 9, "division by zero"),
        ("q_pos % 0 < 1", 8, "modulo by zero"),
        ("log(0) < 1", 0, "undefined"),
        ("score + (q_pos < 3) > 0", 8, "needs a number"),
        ("where(1, q_pos, 2) > 0", 6, "needs a boolean"),
        ("not q_pos", 4, "needs a boolean"),
        ("q_pos and true", 0, "needs a boolean"),
        ("-(q_pos < 1)", 1, "needs a number"),
        ("q_pos + 1", 0, "expected a boolean"),
    ],
)
def test_errors(text: str, column: int, fragment: str) -> None:
    with pytest.raises(ExprError) as caught:
        parse(text, "bool")
    assert caught.value.column == column
    assert fragment in caught.value.problem


def test_unknown_name_suggests() -> None:
    with pytest.raises(ExprError) as caught:
        parse("scroe * 2")
    assert caught.value.suggestion == "did you mean 'score'?"
    with pytest.raises(ExprError) as caught:
        parse("clmap(score, 0, 1)")
    assert caught.value.suggestion == "did you mean 'clamp'?"


def test_unknown_name_far_from_all_lists_what_is_allowed() -> None:
    with pytest.raises(ExprError) as caught:
        parse("softcap(score, 30)")
    hint = caught.value.suggestion or ""
    names, tensors, functions = hint.removeprefix("allowed: ").split("; ")
    assert names.split(" ", 1)[1].split(", ") == sorted(SCORE_SYMBOLS)
    assert tensors == "tensors bias, slopes"
    assert functions.split(" ", 1)[1].split(", ") == sorted(expr.FUNCTIONS)
    with pytest.raises(ExprError) as caught:  # no tensors: none listed
        expr.parse("softcap(score, 30)", names=SCORE_SYMBOLS, tensors={}, want="number")
    assert "tensors" not in (caught.value.suggestion or "")


def test_want_number() -> None:
    with pytest.raises(ExprError, match="expected a number"):
        parse("q_pos < 1", "number")


def test_functions_table() -> None:
    assert frozenset(expr.FUNCTIONS) == {
        "min",
        "max",
        "abs",
        "exp",
        "log",
        "tanh",
        "sqrt",
        "where",
        "clamp",
    }
