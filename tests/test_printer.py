"""Golden strings for the sympy -> Triton printer, and the Triton helpers it calls run
under the interpreter against Python semantics."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import jinja2
import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from strategies import INTEGERS, integer_expr

from attngen import expr
from attngen.printer import (
    INT32_MAX,
    PrintError,
    integer_constants,
    integer_range,
    power_form,
    print_triton,
    prints_integer,
)
from attngen.reference import evaluate
from attngen.symbols import SCORE_SYMBOLS

TENSORS = {"slopes": 1, "bias": 2, "doc": 1}
NAMES = {symbol: name for name, symbol in SCORE_SYMBOLS.items()}
HELPERS = Path(__file__).resolve().parents[1] / "templates" / "expr_helpers.py.j2"


def load(name: str, indices: list[str]) -> str:
    return f"tl.load({name}_ptr + {' + '.join(indices)})"


def parsed(text: str, want: expr.Kind = "number") -> sp.Basic:
    return expr.parse(text, names=SCORE_SYMBOLS, tensors=TENSORS, want=want, integer_tensors={"doc"})


def printed(text: str, want: expr.Kind = "number") -> str:
    return print_triton(parsed(text, want), names=NAMES, tensor_load=load)


GOLDEN_NUMBERS = [
    ("30 * tanh(score / 30)", "30 * _tanh(score / 30)"),
    (
        "score - slopes[head] * abs(q_pos - kv_pos)",
        "score - tl.abs(kv_pos - q_pos) * tl.load(slopes_ptr + head)",
    ),
    (
        "score + bias[head, clamp(q_pos - kv_pos, 0, 127)]",
        "score + tl.load(bias_ptr + head + tl.minimum(127, tl.maximum(0, q_pos - kv_pos)))",
    ),
    ("q_pos // 64 + kv_pos % 4", "_mod(kv_pos, 4) + _floordiv(q_pos, 64)"),
    # head is 0 for the first head: integer division by zero is 0, guarded in the kernel
    ("(q_pos - kv_pos) // head", "_floordiv_or_0(q_pos - kv_pos, head)"),
    ("kv_pos % (head + 1) + kv_pos // (q_len + 2)", "_mod(kv_pos, head + 1) + _floordiv(kv_pos, q_len + 2)"),
    # the inner quotient is an integer (0 at kv = q) though sympy's is_integer is None for it
    ("(q_pos // (kv_pos - q_pos)) // q_pos", "_floordiv_or_0(_floordiv_or_0(q_pos, kv_pos - q_pos), q_pos)"),
    ("kv_pos % doc[head] + kv_pos // (q_pos - 1)",
     "_mod_or_0(kv_pos, tl.load(doc_ptr + head)) + _floordiv_or_0(kv_pos, q_pos - 1)"),
    ("where(q_pos >= kv_pos, score, -score)", "tl.where(kv_pos <= q_pos, score, -score)"),
    (
        "where(q_pos > 3, 1, where(kv_pos > 3, 2, 3))",
        "tl.where(q_pos > 3, 1, tl.where(kv_pos > 3, 2, 3))",
    ),
    ("max(q_pos, kv_pos, 3)", "tl.maximum(3, tl.maximum(kv_pos, q_pos))"),
    ("score * (q_pos + 1)", "score * (q_pos + 1)"),
    ("-(score + 1) / (q_pos + 2)", "(-score - 1) / (q_pos + 2)"),
    ("score ** 2 + 1 / score", "score * score + 1.0 / score"),
    ("sqrt(score) + exp(-score) + log(score)", "tl.sqrt(score) + tl.log(score) + tl.exp(-score)"),
    ("0.5 * score + 1e-3", "0.5 * score + 0.001"),
    ("score + 1 / 4", "score + 0.25"),
    ("-score", "-score"),
    # functions that take floats get integer arguments (positions, user tensors) as float32
    ("score - sqrt(abs(q_pos - kv_pos))", "score - tl.sqrt(tl.cast(tl.abs(kv_pos - q_pos), tl.float32))"),
    ("exp(q_pos - kv_pos) + log(1 + doc[kv_pos])",
     "tl.exp(tl.cast(q_pos - kv_pos, tl.float32)) + tl.log(tl.cast(tl.load(doc_ptr + kv_pos) + 1, tl.float32))"),
    ("exp(score / 2)", "tl.exp(score / 2)"),
    # powers beyond x**-4..4: through exp2
    ("score * 2 ** (kv_pos - q_pos)", "tl.exp2(tl.cast(kv_pos - q_pos, tl.float32)) * score"),
    ("score * 0.5 ** q_pos", "tl.exp2(q_pos * -1.0) * score"),
    ("(1 + q_pos) ** 1.5", "tl.exp2(1.5 * tl.log2(tl.cast(q_pos + 1, tl.float32)))"),
    # constant subexpressions are folded in float64
    ("score * exp(-1000) + sqrt(2)", "score * 0.0 + 1.4142135623730951"),
    ("score ** 0.0 + score", "1.0 + score"),
    # floor division of integers is integer division, also over a sum sympy splits
    # ((head + 1) // 2 is floor(head/2 + 1/2)) and of an integer tensor's elements: an
    # index stays an integer
    ("score + slopes[(head + 1) // 2]", "score + tl.load(slopes_ptr + _floordiv(head + 1, 2))"),
    ("score + slopes[doc[kv_pos] // 2]",
     "score + tl.load(slopes_ptr + _floordiv(tl.load(doc_ptr + kv_pos), 2))"),
    ("(q_pos + 1) // 2 + score", "score + _floordiv(q_pos + 1, 2)"),
]

GOLDEN_BOOLEANS = [
    ("kv_pos <= q_pos", "kv_pos <= q_pos"),
    ("kv_pos <= q_pos and q_pos - kv_pos < 128", "(kv_pos <= q_pos) & (q_pos - kv_pos < 128)"),
    ("q_pos - 64 <= kv_pos <= q_pos + 8", "(kv_pos <= q_pos + 8) & (q_pos - 64 <= kv_pos)"),
    (
        "kv_pos < 4 or (q_pos // 64) == (kv_pos // 64)",
        "(kv_pos < 4) | (_floordiv(q_pos, 64) == _floordiv(kv_pos, 64))",
    ),
    (
        "not (kv_pos < 4 or doc[q_pos] == doc[kv_pos])",
        "~((kv_pos < 4) | (tl.load(doc_ptr + q_pos) == tl.load(doc_ptr + kv_pos)))",
    ),
    (
        "kv_pos % 2 == 0 and not (head == 1 or q_pos != 3)",
        "(_mod(kv_pos, 2) == 0) & ~((head == 1) | (q_pos != 3))",
    ),
    ("true", "True"),
    ("false or 1 > 2", "False"),
    # sums and products that may leave int32 (positions below 2**30) are computed in int64
    ("kv_pos * kv_pos < q_pos * q_pos + 3",
     "tl.cast(kv_pos, tl.int64) * kv_pos < tl.cast(q_pos, tl.int64) * q_pos + 3"),
    ("3 * kv_pos <= q_pos + 1", "3 * tl.cast(kv_pos, tl.int64) <= q_pos + 1"),
    ("2 * kv_pos + q_pos // 3 < 9", "tl.cast(2 * kv_pos, tl.int64) + _floordiv(q_pos, 3) < 9"),
    ("2 * kv_pos <= q_pos + kv_pos + 1", "2 * kv_pos <= kv_pos + q_pos + 1"),
]


@pytest.mark.parametrize(("text", "want"), GOLDEN_NUMBERS)
def test_numbers(text: str, want: str) -> None:
    assert printed(text) == want


@pytest.mark.parametrize(("text", "want"), GOLDEN_BOOLEANS)
def test_booleans(text: str, want: str) -> None:
    assert printed(text, "bool") == want


def test_constants_print_as_floats() -> None:
    assert print_triton(sp.pi, names={}, tensor_load=load) == repr(math.pi)
    assert print_triton(sp.E, names={}, tensor_load=load) == repr(math.e)
    assert print_triton(sp.Rational(1, 3), names={}, tensor_load=load) == repr(1 / 3)
    assert print_triton(sp.Float(2.0), names={}, tensor_load=load) == "2.0"


def test_a_whole_constant_prints_only_within_int32() -> None:
    """Triton refuses a whole constant beside an int32 beyond int32 ('Scalar ... is out of
    range for type int32'); ``x - 2147483648`` would need one. The parser refuses the
    user's own; this stops one the tile analysis derives (a sum of two) at the build. The
    sum itself may leave int32, so it is computed in int64."""
    q_pos = SCORE_SYMBOLS["q_pos"]
    assert print_triton(q_pos + INT32_MAX, names=NAMES, tensor_load=load) == "tl.cast(q_pos, tl.int64) + 2147483647"
    assert print_triton(q_pos - INT32_MAX, names=NAMES, tensor_load=load) == "q_pos - 2147483647"
    for wide in (INT32_MAX + 1, -INT32_MAX - 1, 10**20):
        with pytest.raises(PrintError, match=f"the whole constant {abs(wide)} is beyond int32"):
            print_triton(q_pos + wide, names=NAMES, tensor_load=load)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("score + 100000000000000000000000", "score + 1e+23"),
        ("max(score, 3000000000)", "tl.maximum(3000000000.0, score)"),
        ("q_pos * 0.5 < 100000000000000000000", "0.5 * q_pos < 1e+20"),
    ],
)
def test_a_wide_whole_constant_in_real_arithmetic_prints_as_a_float(text: str, want: str) -> None:
    """Not as a Python int beside a float (Triton: 'Nonrepresentable integer')."""
    assert printed(text, "bool" if "<" in text else "number") == want


@pytest.mark.parametrize(
    ("text", "constants"),
    [
        ("q_pos + 7 < kv_pos // 3", [7, 3]),
        ("q_pos * 0.5 < 7", []),  # a real comparison
        ("score + 7", []),
        ("slopes[7] + slopes[q_pos % 5]", [7, 5]),  # an index, even a constant one
        ("where(q_pos > 2, 6, 7) > 1", [2, 6, 7, 1]),
        ("where(q_pos > 2, score, 7) > 1", [2]),  # a real where: 7 and 1 are reals there
    ],
)
def test_integer_constants_are_those_beside_integers(text: str, constants: list[int]) -> None:
    got = list(integer_constants(parsed(text, "bool" if ">" in text or "<" in text else "number")))
    assert sorted(got) == sorted(constants)


@pytest.mark.parametrize(
    "node",
    [
        sp.Symbol("unnamed"),
        sp.Pow(SCORE_SYMBOLS["score"], 7),
        sp.Pow(-2, SCORE_SYMBOLS["q_pos"]),
        sp.Pow(SCORE_SYMBOLS["q_pos"], SCORE_SYMBOLS["kv_pos"]),
        sp.exp(1000) * SCORE_SYMBOLS["score"],
        sp.Float(1e300) * SCORE_SYMBOLS["score"],
        sp.oo,
        sp.sin(SCORE_SYMBOLS["score"]),
        sp.Piecewise((1, SCORE_SYMBOLS["q_pos"] > 2)),
    ],
    ids=str,
)
def test_refuses_what_it_cannot_print(node: sp.Basic) -> None:
    with pytest.raises(PrintError):
        print_triton(node, names=NAMES, tensor_load=load)


# What makes printed Triton a float (a float literal, true division, a float function)
# in the texts below, none of which loads a float tensor.
FLOAT_MARKERS = re.compile(r"\b\d+\.\d*| / |\btl\.(exp|log|sqrt|floor)|_tanh")


@pytest.mark.parametrize(
    "text",
    [
        "q_pos", "3", "-head", "q_pos - 2 * kv_pos", "(head + 1) // 2", "q_pos % (head + 1)",
        "min(q_pos, kv_pos) * 3", "abs(q_pos - kv_pos) ** 3", "where(q_pos > 1, head, 0)",
        "doc[kv_pos] // 2 + doc[q_pos] % 4", "clamp(q_pos - kv_pos, 0, 7)", "4 / 2",
        "head / 2", "0.5 * q_pos", "2.0", "q_pos ** -1", "2 ** q_pos", "sqrt(head)",
        "(head + 0.5) // 1", "where(q_pos > 1, head, 0.5)", "score // 1", "q_pos ** 0.0",
    ],
)
def test_prints_integer_agrees_with_what_is_printed(text: str) -> None:
    """The parser refuses an index ``prints_integer`` calls a float: it must call a float
    exactly what the printer writes as one."""
    source = printed(text)
    assert prints_integer(parsed(text)) == (FLOAT_MARKERS.search(source) is None), source


def test_power_form_names_each_printed_form() -> None:
    x, q = SCORE_SYMBOLS["score"], SCORE_SYMBOLS["q_pos"]
    forms = {x**0.0: "one", x**1.0: "base", sp.sqrt(x): "sqrt", 1 / sp.sqrt(x): "rsqrt",
             x**4: "repeat", x**-4: "reciprocal", 1 / x: "reciprocal", 3**q: "exp2_base",
             x**1.5: "exp2_log2", x**5: None, x**-5: None, x**q: None, (-2) ** q: None}
    assert {str(p): power_form(p) for p in forms} == {str(p): f for p, f in forms.items()}


# -- the helpers, run under the Triton interpreter ---------------------------------------


def interpreted_module(directory: Path, name: str, kernels: str) -> ModuleType:
    """The helper template and ``kernels`` rendered into an importable module (triton.jit
    needs a file), its kernels made interpreted: the interpreter is chosen when
    ``triton.jit`` runs, so the variable is set only while the module executes and leaks
    into no other test."""
    body = jinja2.Template(HELPERS.read_text(), undefined=jinja2.StrictUndefined).render()
    path = directory / f"{name}.py"
    path.write_text("import triton\nimport triton.language as tl\n\n" + body + kernels)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        spec.loader.exec_module(module)
    return module


KERNELS = """

@triton.jit
def int_kernel(a_ptr, b_ptr, div_ptr, mod_ptr, div7_ptr, mod7_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0)
    b = tl.load(b_ptr + offs, mask=mask, other=1)
    tl.store(div_ptr + offs, _floordiv(a, b), mask=mask)
    tl.store(mod_ptr + offs, _mod(a, b), mask=mask)
    tl.store(div7_ptr + offs, _floordiv(a, -7), mask=mask)
    tl.store(mod7_ptr + offs, _mod(a, 7), mask=mask)


@triton.jit
def or_0_kernel(a_ptr, b_ptr, div_ptr, mod_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0)
    b = tl.load(b_ptr + offs, mask=mask, other=1)
    tl.store(div_ptr + offs, _floordiv_or_0(a, b), mask=mask)
    tl.store(mod_ptr + offs, _mod_or_0(a, b), mask=mask)


@triton.jit
def tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, _tanh(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)
"""


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return interpreted_module(tmp_path_factory.mktemp("helpers"), "expr_helpers_under_test", KERNELS)


@pytest.mark.interpreter
def test_floordiv_and_mod_follow_python(helpers: ModuleType) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    n = 256
    a = rng.integers(-1000, 1000, n).astype(np.int32)
    b = rng.integers(1, 50, n).astype(np.int32) * rng.choice([-1, 1], n).astype(np.int32)
    a[:4] = [0, -7, 7, -1]
    outs = [torch.empty(n, dtype=torch.int32) for _ in range(4)]
    helpers.int_kernel[(1,)](torch.from_numpy(a), torch.from_numpy(b), *outs, n, BLOCK=n)
    div, mod, div7, mod7 = (o.numpy() for o in outs)
    np.testing.assert_array_equal(div, np.floor_divide(a, b))
    np.testing.assert_array_equal(mod, np.mod(a, b))
    np.testing.assert_array_equal(div7, np.floor_divide(a, -7))
    np.testing.assert_array_equal(mod7, np.mod(a, 7))


@pytest.mark.interpreter
def test_the_or_0_forms_give_0_where_the_divisor_is_0(helpers: ModuleType) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    n = 256
    a = rng.integers(-1000, 1000, n).astype(np.int32)
    b = rng.integers(-6, 7, n).astype(np.int32)  # about one in thirteen a zero
    b[:3], a[:3] = 0, [0, -5, 5]
    outs = [torch.full((n,), -99, dtype=torch.int32) for _ in range(2)]  # poisoned
    helpers.or_0_kernel[(1,)](torch.from_numpy(a), torch.from_numpy(b), *outs, n, BLOCK=n)
    div, mod = (o.numpy() for o in outs)
    safe = np.where(b == 0, 1, b)
    np.testing.assert_array_equal(div, np.where(b == 0, 0, np.floor_divide(a, safe)))
    np.testing.assert_array_equal(mod, np.where(b == 0, 0, np.mod(a, safe)))


@pytest.mark.interpreter
def test_tanh_is_accurate_and_finite(helpers: ModuleType) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.normal(0, 3, 400),
            rng.uniform(-0.2, 0.2, 100),
            [0.0, -0.0, 1e-30, 0.125, -0.125],
            [50.0, -50.0, 1e4, -1e4, 3e38, -3e38],
        ]
    ).astype(np.float32)
    y = torch.empty(len(x), dtype=torch.float32)
    helpers.tanh_kernel[(1,)](torch.from_numpy(x), y, len(x), BLOCK=1024)
    got = y.numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64)), rtol=2e-6, atol=1e-7)


def test_the_int_floor_helper_clamps_where_sympy_does() -> None:
    """_int_floor in the kernels and int_floor to sympy clamp at one limit."""
    from attngen.render import templates_root
    from attngen.symbols import INTEGER_LIMIT, int_floor

    helper = templates_root().joinpath("expr_helpers.py.j2").read_text()
    assert f"tl.maximum(x, -{INTEGER_LIMIT}.0), {INTEGER_LIMIT}.0)" in helper
    assert int_floor(sp.Float(1e12)) == INTEGER_LIMIT and int_floor(sp.Float(-1e12)) == -INTEGER_LIMIT
    assert int_floor(sp.Float(-2.5)) == -3


#: Positions, lengths, heads and batch indices at the ends of their range (below 2**30)
#: and between: where int32 arithmetic on them wraps around.
_WIDE = st.lists(st.sampled_from([0, 1, 2, 46341, 2**30 - 1]) | st.integers(0, 2**30 - 1),
                 min_size=16, max_size=16)


@pytest.mark.interpreter
@settings(max_examples=int(os.environ.get("ATTNGEN_FUZZ_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=integer_expr(), values=st.tuples(*[_WIDE] * len(INTEGERS)))
@example(text="kv_pos * kv_pos - q_pos * q_pos", values=tuple([[2**30 - 1] * 8 + [46341] * 8] * 6))
@example(text="(q_pos * 3 + kv_pos * 40) // (kv_pos - q_pos)", values=tuple([[2**30 - 1, 7] * 8] * 6))
def test_integer_arithmetic_is_exact_wherever_positions_lie(
        text: str, values: tuple[list[int], ...], tmp_path: Path) -> None:
    """Every integer expression of the grammar, computed by its printed Triton at
    positions anywhere below 2**30, equals the reference's int64, wherever that holds it:
    the printer widens to int64 what int32 cannot hold."""
    torch = pytest.importorskip("torch")
    integer = parsed(text)
    lo, hi = integer_range(integer)
    assume(prints_integer(integer) and max(-lo, hi) < 2**62)
    arguments = ", ".join(f"{n}_ptr" for n in INTEGERS)
    loads = "".join(f"    {n} = tl.load({n}_ptr + offs)\n" for n in INTEGERS)
    code = print_triton(integer, names={SCORE_SYMBOLS[n]: n for n in INTEGERS}, tensor_load=load)
    kernel = (f"\n\n@triton.jit\ndef integer_kernel({arguments}, out_ptr):\n    offs = tl.arange(0, 16)\n"
              f"{loads}    tl.store(out_ptr + offs, tl.cast({code}, tl.int64) + tl.zeros((16,), tl.int64))\n")
    module = interpreted_module(tmp_path, f"integer_{abs(hash(text))}", kernel)
    arrays = {n: np.asarray(v, dtype=np.int32) for n, v in zip(INTEGERS, values, strict=True)}
    out = torch.full((16,), -7, dtype=torch.int64)
    module.integer_kernel[(1,)](*(torch.from_numpy(arrays[n]) for n in INTEGERS), out)
    want = np.broadcast_to(evaluate(integer, {n: a.astype(np.int64) for n, a in arrays.items()}), (16,))
    np.testing.assert_array_equal(out.numpy(), want, err_msg=f"{text} printed as {code}")
