"""Random expressions, end to end: whatever the grammar accepts as a mask or a score_mod
either builds a kernel that ``attngen check`` passes, or is refused as a SpecError that
names its field (never a kernel that fails to compile or to run, and never a reference
that cannot evaluate what sympy made of it).

A tensor index the grammar accepts must print as a Triton integer (a float pointer offset
fails inside Triton): every integer expression, as the index of a float and of an integer
tensor, builds a kernel that checks.

Found, before this test existed: ``tl.sqrt`` of integer positions, ``tl.exp`` of a Python
int, the boolean if-then-else sympy makes of a ``where`` over comparisons, which the
reference could not evaluate, and ``abs(score * score) ** 0.5`` becoming
``Abs(qk) ** 1.0``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from strategies import integer_expr

from attngen.check import check_spec
from attngen.errors import SpecError
from attngen.render import render_uncached
from attngen.spec import parse_spec


def real_expr(depth: int = 0) -> st.SearchStrategy[str]:
    leaf = st.one_of(st.just("score"), st.floats(-3, 3).map(lambda x: f"{x:.2f}"), integer_expr(2))
    if depth >= 2:
        return leaf
    sub = st.deferred(lambda: real_expr(depth + 1))
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from("+-*"), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, sub).map(lambda t: f"({t[0]} / (1 + abs({t[1]})))"),
        sub.map(lambda a: f"tanh({a})"),
        sub.map(lambda a: f"exp(-abs({a}) / 8)"),
        sub.map(lambda a: f"log(1 + abs({a}))"),
        sub.map(lambda a: f"sqrt(abs({a}))"),
        sub.map(lambda a: f"abs({a}) ** 0.5"),
        integer_expr(2).map(lambda a: f"0.9 ** abs({a})"),
        st.tuples(sub, sub).map(lambda t: f"min({t[0]}, {t[1]})"),
        st.tuples(integer_expr(2), integer_expr(2), sub, sub).map(
            lambda t: f"where({t[0]} > {t[1]}, {t[2]}, {t[3]})"),
    )


BASE: dict[str, object] = {"name": "fuzz", "heads": {"q": 4, "kv": 2}, "head_dim": 16,
                           "topology": {"kind": "sequence", "queries": "prefill"}}


@st.composite
def odd_specs(draw: st.DrawFn) -> dict[str, object]:
    spec: dict[str, object] = {
        **BASE,
        "topology": draw(st.sampled_from([
            {"kind": "sequence", "queries": "prefill"},
            {"kind": "sequence", "queries": "decode"},
            {"kind": "tree", "queries": "token"},
            {"kind": "tree", "queries": "node"},
        ])),
    }
    kind = draw(st.sampled_from(["none", "integer", "real"]))
    if kind != "none":
        op = draw(st.sampled_from(['<', '<=', '==', '!='] if kind == "integer" else ['<', '<=', '>', '>=']))
        if kind == "integer":
            rule = {"expr": f"{draw(integer_expr())} {op} {draw(integer_expr())}"}
        else:  # a key against a real value: loop bounds through _int_floor
            a, c = draw(st.floats(-2, 2).map(lambda x: f"{x:.2f}")), draw(st.floats(-20, 20).map(lambda x: f"{x:.1f}"))
            rule = {"expr": f"kv_pos * {draw(st.sampled_from(['1', '1.5', '0.7']))} {op} {a} * q_pos + {c}"}
        spec["mask"] = ["causal", rule] if draw(st.booleans()) else rule
    spec["score_mod"] = f"score + {draw(real_expr())}"
    return spec


@pytest.mark.interpreter
@settings(max_examples=int(os.environ.get("ATTNGEN_FUZZ_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=odd_specs())
@example(data={**BASE, "mask": {"expr": "q_pos < where(q_pos > where(q_pos > kv_pos, q_pos, kv_pos), q_pos, "
                                         "where(q_pos > kv_pos, q_pos, kv_pos))"}, "score_mod": "score + score"})
@example(data={**BASE, "topology": {"kind": "tree", "queries": "token"},
               "score_mod": "score + sqrt(abs(-2.76 / (1 + abs(q_len)))) * exp(-abs(0.52) / 8)"})
@example(data={**BASE, "topology": {"kind": "tree", "queries": "token"},
               "score_mod": "score + (clamp(kv_pos, 0, 25) - abs(score * score) ** 0.5)"})
# a tree's q_len is the constant 1: tanh of it once printed as _tanh(1), a Python int
@example(data={**BASE, "topology": {"kind": "tree", "queries": "token"},
               "score_mod": "score + log(1 + abs(tanh(q_len)))"})
# a whole constant too wide for an integer, in real arithmetic: once an int64 overflow in
# the reference and 'Nonrepresentable integer' in Triton; now a float there
@example(data={**BASE, "score_mod": "score + 100000000000000000000000"})
@example(data={**BASE, "mask": {"expr": "q_pos * 0.5 < 100000000000000000000"},
               "score_mod": "max(score, -3000000000)"})
# the largest whole constant allowed beside positions, and a tree's q_len guarded by where
@example(data={**BASE, "mask": {"expr": "kv_pos - q_pos < 1073741824"}, "score_mod": "score"})
@example(data={**BASE, "topology": {"kind": "tree", "queries": "token"},
               "score_mod": "score + where(q_len > 1, log(q_len - 1), 0) + kv_pos % max(q_len - 1, 1)"})
# kv > q_pos / 2: its tile bounds were real numbers, which the loops could not take
@example(data={**BASE, "mask": {"expr": "q_pos < kv_pos * 2"}, "score_mod": "score + 1"})
# integer division by zero: Triton's quotient is undefined there, numpy's 0
@example(data={**BASE, "mask": ["causal", {"expr": "kv_pos // q_pos < 2"}], "score_mod": "score + kv_pos % head"})
@example(data={**BASE, "topology": {"kind": "tree", "queries": "token"},
               "mask": {"expr": "(kv_pos - q_pos) % (q_pos - 3) != 1"}, "score_mod": "score"})
# a quotient of a quotient: sympy does not call floor(q / (kv - q)) an integer, so the
# outer // once printed as tl.floor of a real division, NaN at q_pos = 0
@example(data={**BASE, "mask": {"expr": "((q_pos // (kv_pos - q_pos)) // q_pos) < head"},
               "score_mod": "score + score"})
@example(data={**BASE, "mask": {"expr": "3 * kv_pos <= q_pos + 1"}, "score_mod": "score + 1"})
# kv < 0.999999999 q + 0.5 in products past int32 at position 3: the mask and the tile
# bounds once wrapped around in int32, where the reference's int64 does not
@example(data={**BASE, "mask": {"expr": "kv_pos * 1000000000 < q_pos * 999999999 + 500000000"},
               "score_mod": "score"})
# a key against a real value: its tile bounds were real too, and tl.cdiv refused them
@example(data={**BASE, "mask": ["causal", {"expr": "kv_pos >= 0.9 * q_pos - 3"}], "score_mod": "score + 1"})
@example(data={**BASE, "topology": {"kind": "sequence", "queries": "decode"},
               "mask": {"expr": "kv_pos * 1.5 >= kv_len - 20.5"}, "score_mod": "score"})
def test_an_accepted_expression_builds_a_kernel_that_checks_or_is_refused_by_field(
        data: dict[str, object], device: str) -> None:
    try:
        spec = parse_spec(data)
    except SpecError:
        return  # the grammar's own refusals are tested in test_expr
    try:
        render_uncached(spec)
    except SpecError as err:
        assert err.field in ("mask", "score_mod"), err
        return
    # On the H200's Triton 3.6, ptxas 12.8 crashed (signal 11) on such kernels at some
    # forced tiles (score + tanh(log(1 + abs(score))), mask q_pos < 15, 64 x 128); ptxas
    # 13.4 compiles the same PTX. check_spec runs such a case again at the autotuner's
    # choice, which skips those tiles, so a failure here is a failure users would meet.
    report = check_spec(spec, examples=2, seed=0, device=device)
    assert report.passed, f"{data}\n{report.summary()}"


# ids: a fixed size, not per token, which the tree kernels do not support
TENSORS = {"slopes": {"dims": ["head"], "dtype": "fp32"}, "ids": {"dims": [16], "dtype": "int32"}}


@st.composite
def indexed_specs(draw: st.DrawFn) -> dict[str, object]:
    index = draw(integer_expr())
    load = draw(st.sampled_from([f"slopes[{index}]", f"ids[{index}]", f"slopes[ids[{index}] % 7]"]))
    topology = draw(st.sampled_from([{"kind": "sequence", "queries": "prefill"},
                                     {"kind": "sequence", "queries": "decode"},
                                     {"kind": "tree", "queries": "token"}]))
    return {**BASE, "topology": topology, "tensors": TENSORS, "mask": "causal",
            "score_mod": f"score + {load}"}


@pytest.mark.interpreter
@settings(max_examples=int(os.environ.get("ATTNGEN_FUZZ_EXAMPLES", "10")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=indexed_specs())
# floor(head/2 + 1/2) to sympy: printed as tl.floor of a float once, a float pointer offset
@example(data={**BASE, "tensors": TENSORS, "score_mod": "score + slopes[(head + 1) // 2]"})
@example(data={**BASE, "tensors": TENSORS, "score_mod": "score + slopes[ids[kv_pos] // 2 % 4]"})
# floor(q_pos/3 + 2/3) to sympy, which the float64 reference once rounded to 2 at q_pos = 7
@example(data={**BASE, "tensors": TENSORS, "score_mod": "score + ids[(q_pos + 2) // 3 % 16]"})
@example(data={**BASE, "topology": {"kind": "tree", "queries": "token"}, "tensors": TENSORS,
               "score_mod": "score + ids[(kv_len + q_len) // 4] * slopes[abs(q_pos - kv_pos) ** 2]"})
def test_an_integer_index_is_accepted_and_builds_a_kernel_that_checks(
        data: dict[str, object], device: str) -> None:
    spec = parse_spec(data)
    render_uncached(spec)
    # three: the third case's positions reach 10, where (q_pos + 2) // 3 once went wrong
    report = check_spec(spec, examples=3, seed=0, device=device)
    assert not report.failures, f"{data}\n{report.summary()}"
