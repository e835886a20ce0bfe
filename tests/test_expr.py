"""The expression grammar: what parses to what, and the errors (with columns) for what
does not."""

from __future__ import annotations

import pytest
import sympy as sp

from attngen import expr
from attngen.errors import ExprError, SpecError
from attngen.spec import parse_spec
from attngen.symbols import SCORE_SYMBOLS, head, kv_pos, q_pos, score

TENSORS = {"slopes": 1, "bias": 2, "doc": 1}
INTEGER_TENSORS = frozenset({"doc"})  # slopes and bias hold floats
SLOPES, BIAS = sp.IndexedBase("slopes"), sp.IndexedBase("bias")


def parse(text: str, want: expr.Kind = "number") -> sp.Basic:
    return expr.parse(
        text, names=SCORE_SYMBOLS, tensors=TENSORS, want=want, integer_tensors=INTEGER_TENSORS
    )


def refusal(text: str) -> ExprError:
    with pytest.raises(ExprError) as caught:
        parse(text)
    return caught.value


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
    assert tensors == "tensors bias, doc, slopes"
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


# -- tensor indices: only what prints as a Triton integer (a float pointer offset fails
#    inside Triton, far from the spec) ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "column", "given", "why"),
    [
        ("score + slopes[head / 2]", 15, "'head / 2'", "write // for floor division"),
        ("score + slopes[0.5]", 15, "'0.5'", "0.5 is a float constant"),
        ("score + slopes[2.0]", 15, "'2.0'", "2.0 is a float constant"),
        ("score + slopes[score]", 15, "'score'", "'score' is a real number"),
        ("score + doc[kv_pos * 0.5]", 12, "'kv_pos * 0.5'", "0.5 is a float constant"),
        ("score + doc[slopes[head]]", 12, "'slopes[head]'", "'slopes' holds real numbers"),
        ("score + slopes[2 ** head]", 15, "'2 ** head'", "constant exponent 2, 3 or 4"),
        ("score + slopes[sqrt(head)]", 15, "'sqrt(head)'", "sqrt() gives a real number"),
        ("score + bias[head, (q_pos - kv_pos) / 4]", 19, "'(q_pos - kv_pos) / 4'", "write //"),
        ("score + slopes[where(q_pos > 1, head, 1.5)]", 15, "'where(q_pos > 1, head, 1.5)'", "1.5"),
    ],
)
def test_a_tensor_index_must_be_an_integer_expression(
    text: str, column: int, given: str, why: str
) -> None:
    err = refusal(text)
    assert err.column == column
    name = text.split("[")[0].split()[-1]
    assert err.problem == f"an index of {name!r} must be an integer expression, got {given}"
    hint = err.suggestion or ""
    assert why in hint
    assert "allowed: q_pos, kv_pos, head, batch, q_len, kv_len, whole constants" in hint
    assert "int32/int64 tensors (doc)" in hint and "// (floor division), %" in hint


@pytest.mark.parametrize(
    "index",
    [
        "head",
        "(head + 1) // 2",
        "q_pos % 4 - min(kv_pos, 3)",
        "doc[kv_pos]",
        "doc[kv_pos] // 2 * 2",
        "head ** 2",
        "abs(q_pos - kv_pos)",
        "clamp(q_pos - kv_pos, 0, 7)",
        "where(q_pos > kv_pos, head, 0)",
        "-3",
        "4 / 2",  # sympy folds it to the integer 2
    ],
)
def test_integer_indices_are_accepted(index: str) -> None:
    assert parse(f"slopes[{index}]").has(SLOPES)


# -- constants and powers: refused where the user wrote them, in the user's terms -------


@pytest.mark.parametrize(
    ("text", "column", "problem"),
    [
        ("score + log(-1)", 8, "the constant 'log(-1)' is not a real number"),
        ("score + sqrt(-1)", 8, "the constant 'sqrt(-1)' is not a real number"),
        ("score + (-2) ** 0.5", 8, "the constant '(-2) ** 0.5' is not a real number"),
        ("score + 1e400", 8, "the constant '1e400' is beyond float32's range"),
        ("score - 1e39", 8, "the constant '1e39' is beyond float32's range"),
        ("score + exp(1000)", 8, "the constant 'exp(1000)' is beyond float32's range"),
        ("score + 2 ** 200", 8, "the constant '2 ** 200' is beyond float32's range"),
        # sympy folds the two literals into one constant, which the printer would write
        (
            "score * 1e30 * 1e30",
            0,
            "'score * 1e30 * 1e30' makes the constant 1e+60, which is beyond float32's range",
        ),
    ],
)
def test_a_constant_must_be_a_finite_float32(text: str, column: int, problem: str) -> None:
    err = refusal(text)
    assert (err.column, err.problem) == (column, problem)
    assert (err.suggestion or "").startswith(
        "constants must be finite real numbers no larger in magnitude than 3.4e+38"
    )


@pytest.mark.parametrize(
    ("text", "column", "problem"),
    [
        ("score ** -5", 0, "the power score**(-5) has no Triton form (written 'score ** -5')"),
        (
            "score ** q_pos",
            0,
            "the power score**q_pos has no Triton form (written 'score ** q_pos')",
        ),
        (
            "1 + (score + 1) ** 7.0",
            4,
            "the power (score + 1)**7.0 has no Triton form (written '(score + 1) ** 7.0')",
        ),
        (
            "score * (-2) ** q_pos",
            8,
            "the power (-2)**q_pos has no Triton form (written '(-2) ** q_pos')",
        ),
        # sympy merges the factors into one power: named, with what the user wrote
        (
            "1 + score * score * score * score * score",
            4,
            "the power score**5 has no Triton form (written 'score * score * score * score * score')",
        ),
        ("slopes[head ** 5]", 7, "the power head**5 has no Triton form (written 'head ** 5')"),
    ],
)
def test_a_power_must_have_a_triton_form(text: str, column: int, problem: str) -> None:
    err = refusal(text)
    assert (err.column, err.problem) == (column, problem)
    assert err.suggestion == (
        "allowed: x ** n for a constant whole n from -4 to 4, x ** p for a constant p that is "
        "not whole (x ** 0.5), or c ** x for a constant c > 0 (2 ** q_pos)"
    )


@pytest.mark.parametrize(
    "text",
    [
        "score ** -4",
        "score ** 0.5",
        "score ** 2.0",
        "abs(score) ** 1.5",
        "0.9 ** q_pos",
        "2 ** (kv_pos - q_pos)",
        "score ** 0.0",
        "3.4e38 - 1e-45",
    ],
)
def test_powers_and_constants_with_a_triton_form_are_accepted(text: str) -> None:
    parse(text)


@pytest.mark.parametrize(
    ("score_mod", "message"),
    [
        (
            "score + slopes[head / 2]",
            "score_mod: an index of 'slopes' must be an integer "
            "expression, got 'head / 2' at column 16 (given: 'score + slopes[head / 2]')",
        ),
        (
            "score ** -5",
            "score_mod: the power score**(-5) has no Triton form (written "
            "'score ** -5') at column 1 (given: 'score ** -5')",
        ),
        (
            "score + log(-1)",
            "score_mod: the constant 'log(-1)' is not a real number at column 9 "
            "(given: 'score + log(-1)')",
        ),
        (
            "score + 1e400",
            "score_mod: the constant '1e400' is beyond float32's range at column 9 "
            "(given: 'score + 1e400')",
        ),
    ],
)
def test_a_spec_names_file_field_column_and_the_users_text(score_mod: str, message: str) -> None:
    """The audit's cases, as ``attngen show`` reports them: the tensors are declared with
    their dtypes, and nothing internal (``qk``, the log2(e) factor) leaks."""
    data = {
        "name": "t",
        "heads": {"q": 4, "kv": 2},
        "head_dim": 16,
        "score_mod": score_mod,
        "tensors": {
            "slopes": {"dims": ["head"], "dtype": "fp32"},
            "doc": {"dims": ["token"], "dtype": "int32"},
        },
    }
    with pytest.raises(SpecError) as caught:
        parse_spec(data, file="t.yaml")
    assert str(caught.value).startswith(f"t.yaml: {message}")
    assert "qk" not in str(caught.value) and "1.44" not in str(caught.value)


def test_a_mask_may_index_with_an_integer_tensor_only() -> None:
    tensors = {"slopes": {"dims": ["head"]}, "doc": {"dims": ["token"], "dtype": "int64"}}
    base = {"name": "t", "heads": {"q": 4, "kv": 2}, "head_dim": 16, "tensors": tensors}
    parse_spec({**base, "mask": {"expr": "doc[doc[kv_pos] % 4] <= q_pos"}})
    with pytest.raises(SpecError) as caught:
        parse_spec({**base, "mask": ["causal", {"expr": "doc[slopes[head]] <= q_pos"}]})
    assert caught.value.field == "mask[1].expr"
    assert "an index of 'doc' must be an integer expression, got 'slopes[head]' at column 5" in str(
        caught.value
    )


# -- whole constants: integers where they meet integers, which the kernels hold in int32 --

INTEGER_RULE_START = "allowed: whole constants from -1073741824 to 1073741824 (2**30)"


@pytest.mark.parametrize(
    ("text", "column", "problem"),
    [
        # the audit's case: built, then every check case failed inside Triton
        (
            "q_pos < kv_pos + 100000000000000000000",
            17,
            "the constant '100000000000000000000' is out of the integer range",
        ),
        # folded by sympy into one literal, which is what the kernel would compute with
        ("q_pos < kv_pos + 2 ** 40", 17, "the constant '2 ** 40' (1099511627776) is out of"),
        ("q_pos < kv_pos + 100000 * 100000", 17, "the constant '100000 * 100000' (10000000000)"),
        (
            "kv_pos * 65536 * 65536 < q_pos",
            0,
            "'kv_pos * 65536 * 65536' makes the constant 4294967296, which is out of",
        ),
        # int32's own largest, as "no limit": the tile bounds add a tile to it and overflow
        ("kv_pos - q_pos < 2147483647", 17, "the constant '2147483647' is out of"),
        ("kv_pos > q_pos - 2147483648", 17, "the constant '2147483648' is out of"),
        ("kv_pos // 3000000000 == 0", 10, "the constant '3000000000' is out of"),
        ("kv_pos % -3000000000 == 0", 9, "the constant '-3000000000' is out of"),
        ("kv_pos <= q_pos < 100000000000000000000", 18, "the constant '100000000000000000000'"),
        # each side fits; the tile bounds solve it as kv_pos < q_pos - 2147483648
        (
            "kv_pos + 1073741824 < q_pos - 1073741824",
            0,
            "'kv_pos + 1073741824 < q_pos - 1073741824' makes the constant 2147483648 when its "
            "constants are moved to one side",
        ),
    ],
)
def test_a_whole_constant_in_an_integer_mask_must_fit_int32(
    text: str, column: int, problem: str
) -> None:
    with pytest.raises(ExprError) as caught:
        parse(text, "bool")
    assert caught.value.column == column
    assert caught.value.problem.startswith(problem), caught.value.problem
    assert (caught.value.suggestion or "").startswith(INTEGER_RULE_START)
    assert "int32 (up to 2147483647)" in (caught.value.suggestion or "")


@pytest.mark.parametrize(
    ("text", "column", "problem"),
    [
        ("score + slopes[2 ** 40]", 15, "the constant '2 ** 40' (1099511627776)"),
        ("score + slopes[min(kv_pos, 3000000000)]", 27, "the constant '3000000000'"),
        ("score * (kv_pos + 100000000000000000000)", 18, "the constant '100000000000000000000'"),
        ("score + doc[kv_pos] * 100000000000", 22, "the constant '100000000000'"),
        # where of two whole numbers is integer arithmetic (tl.where of Python ints)
        ("score + where(kv_pos > 0, 100000000000000000000, 0)", 26, "the constant '1000"),
        ("score + where(kv_pos > 100000000000000000000, 1, 0)", 23, "the constant '1000"),
    ],
)
def test_a_whole_constant_beside_an_integer_in_a_score_must_fit_int32(
    text: str, column: int, problem: str
) -> None:
    err = refusal(text)
    assert (err.column, err.problem[: len(problem)]) == (column, problem), err.problem
    assert (err.suggestion or "").startswith(INTEGER_RULE_START)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        # real arithmetic: the constant is a float32 value there, as the reference's float64
        ("score + 100000000000000000000000", score + sp.Float(1e23)),
        ("score - 3000000000", score - sp.Float(3e9)),
        ("max(score, 100000000000000000000)", sp.Max(score, sp.Float(1e20))),
        ("100000000000000000000", sp.Float(1e20)),
        ("log(100000000000000000000)", sp.log(sp.Float(1e20))),
        ("kv_pos / 3000000000", kv_pos / sp.Float(3e9)),
        # an integer float32 cannot hold exactly is rounded there, not refused
        ("score + 16777217", score + 16777217),
        ("score + kv_pos + 16777217", score + kv_pos + 16777217),
        # within the range, in integer arithmetic
        ("slopes[kv_pos + 1073741824]", SLOPES[kv_pos + 1073741824]),
        ("slopes[kv_pos - 1073741824]", SLOPES[kv_pos - 1073741824]),
        # folded away before the kernel sees it
        ("slopes[kv_pos + 2 ** 40 // 2 ** 20]", SLOPES[kv_pos + 1048576]),
    ],
)
def test_a_whole_constant_in_real_arithmetic_is_a_float_of_any_size(
    text: str, want: sp.Basic
) -> None:
    assert parse(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("q_pos * 0.5 < 100000000000000000000", sp.Lt(0.5 * q_pos, sp.Float(1e20))),
        ("kv_pos - q_pos < 1073741824", sp.Lt(kv_pos - q_pos, 1073741824)),
        ("kv_pos + 1073741824 > q_pos", sp.Gt(kv_pos + 1073741824, q_pos)),
        # sympy decides it (kv_pos >= 0): nothing is left for the kernel to compute
        ("kv_pos > -100000000000000000000", sp.true),
    ],
)
def test_masks_with_a_real_comparison_or_a_constant_in_range_are_accepted(
    text: str, want: sp.Basic
) -> None:
    assert parse(text, "bool") == want
