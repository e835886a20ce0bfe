"""Print sympy expressions as Triton source, in the mould of sympy's code printers.

Printing dispatches on the node's class (``_print_Add``, ``_print_Relational``, ...,
found along the class's MRO), known functions come from a table, and parentheses come
from a precedence table. The printer is strict: a node it has no rule for raises
:class:`PrintError` rather than emitting something Triton would misread.

The output calls the helpers that ``templates/expr_helpers.py.j2`` defines:
``_floordiv`` and ``_mod`` (Python floor semantics), their ``_or_0`` forms for divisors
that may be zero, ``_int_floor`` and ``_tanh``.

>>> import sympy as sp
>>> x = sp.Symbol("x")
>>> print_triton(30 * sp.tanh(x / 30), names={x: "s"}, tensor_load=lambda n, i: n)
'30 * _tanh(s / 30)'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache

import sympy as sp

from attngen.errors import AttngenError
from attngen.symbols import INTEGER_LIMIT, int_floor

TensorLoad = Callable[[str, list[str]], str]

# Python's operator precedence, which Triton's frontend follows. Note that ``&`` and
# ``|`` bind tighter than comparisons, so their operands are always parenthesized
# unless they are atoms.
PREC_ATOM = 100
PREC_POWER = 60
PREC_UNARY = 50
PREC_MUL = 40
PREC_ADD = 30
PREC_BITAND = 20
PREC_BITOR = 18
PREC_COMPARE = 10

#: sympy function class -> Triton function of one argument.
KNOWN_FUNCTIONS: Mapping[type, str] = {
    sp.Abs: "tl.abs",
    sp.exp: "tl.exp",
    sp.log: "tl.log",
    sp.tanh: "_tanh",
}
#: Triton functions that take only floating-point arguments (``_tanh`` converts its own).
FLOAT_ONLY = frozenset({"tl.exp", "tl.log", "tl.sqrt", "tl.log2"})

_SMALL_POWERS = range(2, 5)

#: The largest finite float32: the kernels compute scores in float32, so a constant
#: beyond it would be inf there and finite in the float64 reference.
FLOAT32_MAX = 3.4028234663852886e38

#: The powers the printer has a form for, in the grammar's terms (see :func:`power_form`).
POWER_RULE = ("x ** n for a constant whole n from -4 to 4, x ** p for a constant p that is "
              "not whole (x ** 0.5), or c ** x for a constant c > 0 (2 ** q_pos)")
#: The constants the printer can write as a float32 literal (see :func:`constant_problem`).
CONSTANT_RULE = ("constants must be finite real numbers no larger in magnitude than "
                 f"{FLOAT32_MAX:.3g} (float32's largest; the kernels compute in float32)")

#: The kernels compute positions, lengths, heads and tensor indices in int32, and Triton
#: refuses a whole constant beyond it beside one (``Scalar ... is out of range for type
#: int32``). Symmetric: ``x - 2147483648`` would need 2147483648.
INT32_MAX = 2**31 - 1
#: What :data:`INTEGER_LIMIT` allows, in the grammar's terms (see :func:`integer_constants`).
INTEGER_RULE = (
    f"allowed: whole constants from -{INTEGER_LIMIT} to {INTEGER_LIMIT} (2**30) where they "
    "meet integers (positions, lengths, heads, indices, int tensor elements): the kernels "
    f"compute these in int32 (up to {INT32_MAX}) and keep half of its range for the "
    "positions added to a constant; where a real number is meant, write one (1e20)"
)


class PrintError(AttngenError):
    """An expression node the Triton printer has no rule for."""


# -- what has a Triton form: asked by the parser, where the user's text is known -------


def power_form(expr: sp.Pow) -> str | None:
    """The Triton form :meth:`TritonPrinter._print_Pow` gives ``expr``, or None where it
    has none (``x**7``, ``x**q_pos``, ``(-2)**x``).

    >>> power_form(sp.Symbol("x") ** 3), power_form(sp.Symbol("x") ** 7)
    ('repeat', None)
    """
    base, exponent = _base_exp(expr)
    if exponent in (0, 1):
        return "one" if exponent == 0 else "base"
    if abs(exponent) == sp.Rational(1, 2):
        return "sqrt" if exponent > 0 else "rsqrt"
    if exponent.is_Integer and abs(int(exponent)) in _SMALL_POWERS:
        return "repeat" if exponent > 0 else "reciprocal"
    if exponent == -1:
        return "reciprocal"
    if base.is_number and base.is_positive:
        return "exp2_base"
    if exponent.is_number and not exponent.is_integer:
        return "exp2_log2"
    return None


def _base_exp(expr: sp.Pow) -> tuple[sp.Basic, sp.Basic]:
    """Base and exponent, a float exponent that is a multiple of 1/2 made exact (x**2.0
    prints as x * x, x**0.5 as a square root)."""
    base, exponent = expr.as_base_exp()
    if exponent.is_Float and float(exponent) * 2 == int(float(exponent) * 2):
        exponent = sp.Rational(int(float(exponent) * 2), 2)
    return base, exponent


@lru_cache(maxsize=1024)
def constant_problem(value: sp.Basic) -> str | None:
    """What keeps the constant ``value`` from being a float32 literal ("is not a real
    number", "is beyond float32's range"), or None.

    >>> constant_problem(sp.log(-1)), constant_problem(sp.Float(1e39)), constant_problem(sp.sqrt(2))
    ('is not a real number', "is beyond float32's range", None)
    """
    number = value if value.is_Atom else sp.N(value, 17)
    if number.has(sp.nan, sp.zoo):
        return "is undefined"
    if number.is_extended_real is not True:
        return "is not a real number"
    if number.is_finite is not True or abs(number) > FLOAT32_MAX:
        return "is beyond float32's range"
    return None


def folded_constants(expr: sp.Basic) -> Iterator[sp.Basic]:
    """The largest constant sub-expressions of ``expr``: those the printer folds into one
    literal each (``exp(-1000)``, ``sqrt(2)``, ``3``)."""
    if expr.is_number:
        yield expr
        return
    for arg in expr.args:
        yield from folded_constants(arg)


def integer_constants(expr: sp.Basic) -> Iterator[sp.Integer]:
    """The whole constants of ``expr`` that the printer writes into integer arithmetic:
    those beside an integer (a sum, product, floor division, ``%``, min, max, abs or
    ``where`` that :func:`prints_integer`, a comparison of two such), and in a tensor
    index. A constant in real arithmetic is not one (``score + 3``, ``q_pos * 0.5 < 3``),
    nor is a constant sub-expression on its own (the printer folds it).

    >>> q = sp.Symbol("q", integer=True)
    >>> list(integer_constants(sp.Lt(q + 7, sp.floor(q / 3)))), list(integer_constants(q * 0.5 + 7))
    ([7, 3], [])
    """
    return _integer_constants(expr, inside=False)


def _integer_constants(expr: sp.Basic, *, inside: bool) -> Iterator[sp.Integer]:
    if isinstance(expr, sp.Expr) and expr.is_number:
        if inside:
            yield from _whole_parts(expr)
        return
    children: tuple[sp.Basic, ...] = expr.args
    if isinstance(expr, sp.Indexed):
        children, inside = tuple(expr.indices), True
    elif isinstance(expr, sp.core.relational.Relational):
        inside = all(prints_integer(side) for side in expr.args)
    elif isinstance(expr, sp.floor) and prints_integer(expr):
        children, inside = _floor_fraction(expr), True  # printed _floordiv(n, d)
    elif isinstance(expr, sp.Expr):
        inside = prints_integer(expr)
    # else And, Or, Not (each comparison in them decides for itself) or one (value,
    # condition) pair of a Piecewise, whose value is in the Piecewise's arithmetic
    for child in children:
        yield from _integer_constants(child, inside=inside)


def _whole_parts(number: sp.Expr) -> Iterator[sp.Integer]:
    """The whole numbers a constant in integer arithmetic is written with: itself, or
    the two sides of a fraction (a coefficient 1/3 of a floor division)."""
    if number.is_Integer:
        yield number
    elif number.is_Rational:
        yield from (sp.Integer(p) for p in number.as_numer_denom())
    elif number.is_integer:  # an unevaluated Min(2, 1): printed as one integer
        yield sp.Integer(number)


def prints_integer(expr: sp.Basic) -> bool:
    """Whether the printer writes ``expr`` as a Triton integer (what a pointer offset
    needs): integer constants, integer symbols, elements of an integer tensor
    (``IndexedBase(name, integer=True)``), and ``+``, ``*``, floor division, ``%``, min,
    max, abs, ``where`` and small positive powers of those. A true division, a float
    constant or a float function is not.

    >>> q = sp.Symbol("q", integer=True)
    >>> prints_integer(sp.floor((q + 1) / 2)), prints_integer(q / 2), prints_integer(2**q)
    (True, False, False)
    """
    if expr.is_number:
        return bool(expr.is_Integer if expr.is_Atom else expr.is_integer)
    if isinstance(expr, sp.Symbol | sp.Indexed):
        return bool(expr.is_integer)
    if isinstance(expr, sp.Mul):
        if expr.as_coeff_Mul()[0].is_negative:
            return prints_integer(-expr)
        numerator, denominator = _split_fraction(expr)
        return not denominator and all(prints_integer(f) for f in numerator)
    if isinstance(expr, sp.Pow):
        return power_form(expr) in ("base", "repeat") and prints_integer(_base_exp(expr)[0])
    if isinstance(expr, sp.floor):  # _floordiv(n, d): a ratio of integers
        return all(prints_integer(p) for p in _floor_fraction(expr))
    if isinstance(expr, sp.Piecewise):
        return all(prints_integer(value) for value, _ in expr.args)
    if isinstance(expr, sp.Add | sp.Min | sp.Max | sp.Abs | sp.Mod):
        return all(prints_integer(a) for a in expr.args)
    return False


#: The range the printer assumes of an integer symbol (a position, length, head or batch
#: index, or a tile's end) and of an element of an integer tensor (a position, length or
#: id, as the spec's tensors hold): below 2**30 in magnitude, :data:`INTEGER_LIMIT`.
_SYMBOL_RANGE = (1 - INTEGER_LIMIT, INTEGER_LIMIT - 1)


def integer_range(expr: sp.Basic) -> tuple[int, int]:
    """Bounds on the value of an integer expression (one that :func:`prints_integer`), by
    interval arithmetic over the ranges of its symbols and tensor elements. The printer
    computes in int64 wherever they leave int32 (:func:`needs_int64`).

    >>> q, k = (sp.Symbol(n, integer=True, nonnegative=True) for n in "qk")
    >>> integer_range(q - k), integer_range(q * k)
    ((-1073741823, 1073741823), (0, 1152921502459363329))
    """
    if expr.is_Integer:
        return int(expr), int(expr)
    if isinstance(expr, sp.Symbol):
        return (0, _SYMBOL_RANGE[1]) if expr.is_nonnegative else _SYMBOL_RANGE
    if isinstance(expr, sp.Indexed):
        return _SYMBOL_RANGE
    if isinstance(expr, sp.floor):  # n // d: no larger than |n|, or 0
        lo, hi = integer_range(_floor_fraction(expr)[0])
        return min(lo, -hi, 0), max(hi, -lo, 0)
    if isinstance(expr, sp.Pow):  # a small whole power, printed as a product
        (lo, hi), n = integer_range(expr.base), int(expr.exp)
        ends = [lo**n, hi**n] + ([0] if lo < 0 < hi and n % 2 == 0 else [])
        return min(ends), max(ends)
    if isinstance(expr, sp.Piecewise):
        expr = sp.Max(*(v for v, _ in expr.args), evaluate=False)  # within its values' hull
    if isinstance(expr, int_floor):
        return -INTEGER_LIMIT, INTEGER_LIMIT
    args = [integer_range(a) for a in expr.args]
    if isinstance(expr, sp.Add):
        return sum(lo for lo, _ in args), sum(hi for _, hi in args)
    if isinstance(expr, sp.Mul):
        lo, hi = args[0]
        for a, b in args[1:]:
            ends = [lo * a, lo * b, hi * a, hi * b]
            lo, hi = min(ends), max(ends)
        return lo, hi
    if isinstance(expr, sp.Mod):  # |a % b| < |b|
        big = max(abs(end) for end in args[1])
        return -big, big
    if isinstance(expr, sp.Min | sp.Max):
        return min(lo for lo, _ in args), max(hi for _, hi in args)
    if isinstance(expr, sp.Abs):
        ((lo, hi),) = args
        return (0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
    return -INT32_MAX - 1, INT32_MAX  # what an int32 holds


def widens(expr: sp.Basic) -> bool:
    """Whether the printer computes some part of ``expr`` in int64 (:func:`needs_int64`),
    the sides of a floor division as it prints them included."""
    if isinstance(expr, sp.Add | sp.Mul | sp.Pow) and prints_integer(expr) and needs_int64(expr):
        return True
    if isinstance(expr, sp.floor) and prints_integer(expr):
        return any(widens(part) for part in _floor_fraction(expr))
    return any(widens(arg) for arg in expr.args)


def needs_int64(expr: sp.Basic) -> bool:
    """Whether integer ``expr`` may leave int32, in which the kernels compute positions:
    ``kv_pos * kv_pos`` passes 2**31 at position 46341, ``3 * kv_pos`` at 715827883. The
    printer then widens an operand to int64, so that the sum or product is exact, as in
    the reference's int64."""
    lo, hi = integer_range(expr)
    return lo < -INT32_MAX - 1 or hi > INT32_MAX


def _zero_guarded(helper: str, divisor: sp.Basic) -> str:
    """``helper`` (an integer ``//`` or ``%``) for ``divisor``, or its ``_or_0`` form where
    sympy cannot prove the divisor nonzero (``kv_pos // q_pos`` at q_pos = 0): integer
    division by zero is 0 in the language, as in the reference's numpy, while Triton's
    gives an undefined value.

    >>> q = sp.Symbol("q", integer=True, nonnegative=True)
    >>> _zero_guarded("_mod", sp.Integer(3)), _zero_guarded("_mod", q + 1), _zero_guarded("_mod", q)
    ('_mod', '_mod', '_mod_or_0')
    """
    return helper if divisor.is_zero is False else f"{helper}_or_0"


def _floor_fraction(expr: sp.floor) -> tuple[sp.Basic, sp.Basic]:
    """Numerator and denominator of a floor's argument, over one fraction bar: ``(q + 1)
    // 2`` is floor(q/2 + 1/2) to sympy, and prints as ``_floordiv(q + 1, 2)``."""
    numerator, denominator = sp.fraction(sp.together(expr.args[0]))
    return numerator, denominator


def print_triton(
    expr: sp.Basic,
    *,
    names: Mapping[sp.Symbol, str],
    tensor_load: TensorLoad,
) -> str:
    """Triton source for ``expr``.

    ``names`` maps each symbol to its Triton variable; ``tensor_load(name, indices)``
    returns the source that loads ``name[indices...]`` (the caller owns pointer math).
    """
    return TritonPrinter(names, tensor_load).doprint(expr)


class TritonPrinter:
    """Dispatch-on-class printer of sympy expressions as Triton expressions."""

    def __init__(self, names: Mapping[sp.Symbol, str], tensor_load: TensorLoad):
        self.names = names
        self.tensor_load = tensor_load

    def doprint(self, expr: sp.Basic) -> str:
        return self._print(expr)[0]

    # -- dispatch ------------------------------------------------------------------------

    def _print(self, expr: sp.Basic) -> tuple[str, int]:
        """Source and precedence of ``expr``."""
        if expr.is_number and not expr.is_Atom:  # exp(-1000), log(3), 2**(1/2): folded here
            if expr.is_integer:  # an unevaluated Min(2, 1) in index arithmetic stays an int
                return self._print_Integer(sp.Integer(expr))
            value = sp.N(expr, 17)
            if not value.is_real:
                raise PrintError(f"the constant {expr} is not a real number")
            return _float_literal(float(value), written=f"{expr} = {sp.N(expr, 6)}")
        for cls in type(expr).__mro__:
            method = getattr(self, f"_print_{cls.__name__}", None)
            if method is not None:
                result: tuple[str, int] = method(expr)
                return result
        raise PrintError(f"cannot print {type(expr).__name__} node {expr} as Triton")

    def paren(self, expr: sp.Basic, above: int) -> str:
        """``expr`` printed, parenthesized unless its precedence is above ``above``."""
        text, prec = self._print(expr)
        return text if prec > above else f"({text})"

    def call(self, function: str, *args: sp.Basic) -> tuple[str, int]:
        if function in FLOAT_ONLY:
            return f"{function}({', '.join(self.as_float(a) for a in args)})", PREC_ATOM
        return f"{function}({', '.join(self.doprint(a) for a in args)})", PREC_ATOM

    def widened(self, expr: sp.Basic) -> bool:
        """Whether a sum or product is computed in int64 (see :func:`needs_int64`)."""
        return prints_integer(expr) and needs_int64(expr)

    def as_float(self, expr: sp.Basic) -> str:
        """``expr`` printed for a function that takes only floats: converted to float32
        where it may be an integer in Triton (index symbols, integer arithmetic, a load
        from a user tensor, whose dtype the printer does not know)."""
        if prints_integer(expr) or expr.has(sp.Indexed):  # tl.cast, not .to(): it may be a constexpr
            return f"tl.cast({self.doprint(expr)}, tl.float32)"
        return self.doprint(expr)

    # -- atoms ---------------------------------------------------------------------------

    def _print_Symbol(self, expr: sp.Symbol) -> tuple[str, int]:
        if expr not in self.names:
            raise PrintError(f"symbol {expr.name!r} has no Triton name")
        return self.names[expr], PREC_ATOM

    def _print_Indexed(self, expr: sp.Indexed) -> tuple[str, int]:
        indices = [self.doprint(i) for i in expr.indices]
        return self.tensor_load(str(expr.base.label), indices), PREC_ATOM

    def _print_Integer(self, expr: sp.Integer) -> tuple[str, int]:
        value = int(expr)
        if abs(value) > INT32_MAX:  # the parser refuses the user's; this catches derived ones
            raise PrintError(f"the whole constant {value} is beyond int32, in which the kernels "
                             f"compute positions and indices (allowed: -{INT32_MAX} to {INT32_MAX}); "
                             f"keep whole constants from -{INTEGER_LIMIT} to {INTEGER_LIMIT}")
        return str(value), PREC_ATOM if value >= 0 else PREC_UNARY

    def _print_Rational(self, expr: sp.Rational) -> tuple[str, int]:
        return _float_literal(float(expr))

    def _print_Float(self, expr: sp.Float) -> tuple[str, int]:
        return _float_literal(float(expr))

    def _print_Pi(self, expr: sp.Basic) -> tuple[str, int]:
        return _float_literal(float(sp.pi))

    def _print_Exp1(self, expr: sp.Basic) -> tuple[str, int]:
        return _float_literal(float(sp.E))

    def _print_BooleanTrue(self, expr: sp.Basic) -> tuple[str, int]:
        return "True", PREC_ATOM

    def _print_BooleanFalse(self, expr: sp.Basic) -> tuple[str, int]:
        return "False", PREC_ATOM

    # -- arithmetic ----------------------------------------------------------------------

    def _print_Add(self, expr: sp.Add) -> tuple[str, int]:
        # sympy's order, with the positive terms first so that ``q - k`` reads as written
        ordered = expr.as_ordered_terms()
        terms = [t for t in ordered if not t.could_extract_minus_sign()]
        terms += [t for t in ordered if t.could_extract_minus_sign()]
        text = self.paren(terms[0], PREC_ADD - 1)
        if self.widened(expr) and not needs_int64(terms[0]):  # else int64 already
            text = f"tl.cast({self.doprint(terms[0])}, tl.int64)"
        for term in terms[1:]:
            if term.could_extract_minus_sign():
                text += f" - {self.paren(-term, PREC_ADD)}"
            else:
                text += f" + {self.paren(term, PREC_ADD)}"
        return text, PREC_ADD

    def _print_Mul(self, expr: sp.Mul) -> tuple[str, int]:
        coeff = expr.as_coeff_Mul()[0]
        if coeff.is_negative:
            text, prec = self._print(-expr)
            if prec <= PREC_ADD:
                return f"-({text})", PREC_UNARY
            return f"-{text}", min(prec, PREC_UNARY)
        numerator, denominator = _split_fraction(expr)
        factors = [self.paren(f, PREC_MUL - 1) for f in numerator]
        if numerator and self.widened(expr):  # a constant stays a constant: 3 * int64(q)
            at = next((i for i, f in enumerate(numerator) if not f.is_number), 0)
            factors[at] = f"tl.cast({self.doprint(numerator[at])}, tl.int64)"
        text = " * ".join(factors) if numerator else "1.0"
        if denominator:
            den = sp.Mul(*denominator, evaluate=False) if len(denominator) > 1 else denominator[0]
            text += f" / {self.paren(den, PREC_MUL)}"
        return text, PREC_MUL

    def _print_Pow(self, expr: sp.Pow) -> tuple[str, int]:
        base, exponent = _base_exp(expr)
        match power_form(expr):
            case "one":
                return "1.0", PREC_ATOM
            case "base":  # abs(score * score) ** 0.5 becomes Abs(qk) ** 1.0
                return self._print(base)
            case "sqrt":
                return self.call("tl.sqrt", base)
            case "rsqrt":
                return f"1.0 / {self.call('tl.sqrt', base)[0]}", PREC_MUL
            case "repeat":
                factors = [self.paren(base, PREC_MUL)] * int(exponent)
                if self.widened(expr):
                    factors[0] = f"tl.cast({self.doprint(base)}, tl.int64)"
                return " * ".join(factors), PREC_MUL
            case "reciprocal":
                return f"1.0 / {self.paren(sp.Pow(base, -exponent), PREC_MUL)}", PREC_MUL
            case "exp2_base":  # c**x = 2**(x * log2(c)), for a constant c > 0
                log2_base = float(sp.log(base, 2))
                if log2_base == 1.0:
                    return f"tl.exp2({self.as_float(exponent)})", PREC_ATOM
                return f"tl.exp2({self.paren(exponent, PREC_MUL - 1)} * {_float_literal(log2_base)[0]})", PREC_ATOM
            case "exp2_log2":
                # x**p = 2**(p * log2(x)): 0 for x = 0 < p, inf for p < 0, nan for x < 0, as in
                # the float64 reference
                return f"tl.exp2({_float_literal(float(exponent))[0]} * {self.call('tl.log2', base)[0]})", PREC_ATOM
        raise PrintError(f"the power {expr} has no Triton form; allowed: {POWER_RULE}")

    def _print_Min(self, expr: sp.Min) -> tuple[str, int]:
        return self._nested("tl.minimum", list(expr.args))

    def _print_Max(self, expr: sp.Max) -> tuple[str, int]:
        return self._nested("tl.maximum", list(expr.args))

    def _nested(self, function: str, args: list[sp.Basic]) -> tuple[str, int]:
        """``f(a, f(b, c))`` for a binary Triton ``f`` over 2+ arguments."""
        if len(args) == 1:
            return self._print(args[0])
        inner = self._nested(function, args[1:])[0]
        return f"{function}({self.doprint(args[0])}, {inner})", PREC_ATOM

    def _print_Function(self, expr: sp.Function) -> tuple[str, int]:
        function = KNOWN_FUNCTIONS.get(type(expr))
        if function is None:
            raise PrintError(f"no Triton function for {type(expr).__name__}()")
        return self.call(function, *expr.args)

    def _print_floor(self, expr: sp.floor) -> tuple[str, int]:
        numerator, denominator = _floor_fraction(expr)
        # Whether each side prints as an integer, not sympy's is_integer: that is None
        # for floor(q / (k - q)), since sympy's q / 0 is zoo, where the language's is 0.
        if not (prints_integer(numerator) and prints_integer(denominator)):
            return self.call("tl.floor", expr.args[0])  # IEEE: x / 0 is +-inf or NaN
        return self.call(_zero_guarded("_floordiv", denominator), numerator, denominator)

    def _print_int_floor(self, expr: int_floor) -> tuple[str, int]:
        return self.call("_int_floor", expr.args[0])  # clamps to INTEGER_LIMIT

    def _print_Mod(self, expr: sp.Mod) -> tuple[str, int]:
        if not prints_integer(expr):
            return self.call("_mod", *expr.args)  # IEEE: x % 0.0 is NaN, as numpy's
        return self.call(_zero_guarded("_mod", expr.args[1]), *expr.args)

    def _print_Piecewise(self, expr: sp.Piecewise) -> tuple[str, int]:
        *pieces, (last_value, last_cond) = expr.args
        if last_cond != sp.true:
            raise PrintError(f"Piecewise without a default (True) piece: {expr}")
        text = self.doprint(last_value)
        for value, cond in reversed(pieces):
            text = f"tl.where({self.doprint(cond)}, {self.doprint(value)}, {text})"
        return text, PREC_ATOM

    # -- logic ---------------------------------------------------------------------------

    def _print_ITE(self, expr: sp.ITE) -> tuple[str, int]:
        # a boolean if-then-else (sympy builds these when it simplifies Piecewise)
        cond, then, other = (self.doprint(a) for a in expr.args)
        return f"tl.where({cond}, {then}, {other})", PREC_ATOM

    def _print_Relational(self, expr: sp.core.relational.Relational) -> tuple[str, int]:
        if expr.rel_op not in ("==", "!=", "<", "<=", ">", ">="):
            raise PrintError(f"cannot print relation {expr.rel_op!r}")
        lhs, rhs = (self.paren(a, PREC_COMPARE) for a in expr.args)
        return f"{lhs} {expr.rel_op} {rhs}", PREC_COMPARE

    def _print_And(self, expr: sp.And) -> tuple[str, int]:
        return self._bitwise(" & ", expr.args), PREC_BITAND

    def _print_Or(self, expr: sp.Or) -> tuple[str, int]:
        return self._bitwise(" | ", expr.args), PREC_BITOR

    def _bitwise(self, op: str, args: tuple[sp.Basic, ...]) -> str:
        return op.join(self.paren(a, PREC_UNARY - 1) for a in args)

    def _print_Not(self, expr: sp.Not) -> tuple[str, int]:
        return f"~({self.doprint(expr.args[0])})", PREC_UNARY

    # -- refused explicitly (they would otherwise match a generic rule) ------------------

    def _print_Infinity(self, expr: sp.Basic) -> tuple[str, int]:
        raise PrintError("cannot print infinity; substitute a bound first")

    _print_NegativeInfinity = _print_Infinity
    _print_ComplexInfinity = _print_Infinity

    def _print_NaN(self, expr: sp.Basic) -> tuple[str, int]:
        raise PrintError("cannot print nan")


def _float_literal(value: float, written: str | None = None) -> tuple[str, int]:
    """A float32-range constant as a literal; ``written`` names it in the error."""
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise PrintError(f"the constant {written or repr(value)} is beyond float32's range "
                         "(the kernels compute in float32)")
    text = repr(value)
    return text, PREC_ATOM if value >= 0 else PREC_UNARY


def _split_fraction(expr: sp.Mul) -> tuple[list[sp.Basic], list[sp.Basic]]:
    """The factors of a product above and below the fraction bar (in sympy's order);
    a rational coefficient p/q contributes p above (unless 1) and q below."""
    numerator: list[sp.Basic] = []
    denominator: list[sp.Basic] = []
    for factor in expr.as_ordered_factors():
        if factor.is_Rational and not factor.is_Integer:
            p, q = factor.as_numer_denom()
            numerator += [p] if p != 1 else []
            denominator.append(q)
        elif factor.is_Pow and factor.exp.is_Integer and factor.exp < 0:
            denominator.append(sp.Pow(factor.base, -factor.exp))
        else:
            numerator.append(factor)
    return numerator, denominator
