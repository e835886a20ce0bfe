"""The expression grammar of masks and score modifications, parsed into sympy.

A small tokenizer and recursive-descent parser with Python's precedence; nothing here
calls ``eval``, ``sympify`` or ``lambdify`` on user text. Every value the parser builds
carries its kind (boolean or number), so type mistakes are reported at the column where
they start instead of surfacing later as a sympy error. The same goes for what the
Triton printer could not write: a constant that is not a finite float32, a power with no
Triton form, a tensor index that would not print as an integer. The parser asks
:mod:`attngen.printer` as it builds each value, and quotes the user's own text.

>>> from attngen.symbols import MASK_SYMBOLS
>>> parse("kv_pos <= q_pos", names=MASK_SYMBOLS, tensors={}, want="bool")
kv_pos <= q_pos
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import sympy as sp

from attngen.errors import ExprError, did_you_mean
from attngen.printer import (
    CONSTANT_RULE,
    INTEGER_LIMIT,
    INTEGER_RULE,
    POWER_RULE,
    constant_problem,
    folded_constants,
    integer_constants,
    power_form,
    prints_integer,
)
from attngen.symbols import Fixed, tensor

Kind = Literal["bool", "number"]


@dataclass(frozen=True, slots=True)
class Function:
    """A callable name of the grammar: its arity and how it builds sympy."""

    name: str
    min_args: int
    max_args: int | None  # None: any number >= min_args
    build: Callable[[list[sp.Basic]], sp.Basic]
    arg_kinds: Callable[[int], Kind]  # the kind each argument (by position) must have
    signature: str


def _numbers(_: int) -> Kind:
    return "number"


def _where_kinds(i: int) -> Kind:
    return "bool" if i == 0 else "number"


def _function(
    name: str,
    lo: int,
    hi: int | None,
    build: Callable[[list[sp.Basic]], sp.Basic],
    signature: str,
    kinds: Callable[[int], Kind] = _numbers,
) -> Function:
    return Function(name, lo, hi, build, kinds, signature)


#: The call names an expression may use, with their arity and sympy meaning.
FUNCTIONS: Mapping[str, Function] = MappingProxyType(
    {
        f.name: f
        for f in (
            _function("min", 2, None, lambda a: sp.Min(*a), "min(a, b, ...)"),
            _function("max", 2, None, lambda a: sp.Max(*a), "max(a, b, ...)"),
            _function("abs", 1, 1, lambda a: sp.Abs(a[0]), "abs(x)"),
            _function("exp", 1, 1, lambda a: sp.exp(a[0]), "exp(x)"),
            _function("log", 1, 1, lambda a: sp.log(a[0]), "log(x)"),
            _function("tanh", 1, 1, lambda a: sp.tanh(a[0]), "tanh(x)"),
            _function("sqrt", 1, 1, lambda a: sp.sqrt(a[0]), "sqrt(x)"),
            _function(
                "where",
                3,
                3,
                lambda a: sp.Piecewise((a[1], a[0]), (a[2], True)),
                "where(cond, a, b)",
                _where_kinds,
            ),
            _function(
                "clamp", 3, 3, lambda a: sp.Min(sp.Max(a[0], a[1]), a[2]), "clamp(x, lo, hi)"
            ),
        )
    }
)

_KEYWORDS = frozenset({"and", "or", "not", "true", "false"})
_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%<>()\[\],])"
)
_COMPARISONS: dict[str, Callable[[sp.Basic, sp.Basic], sp.Basic]] = {
    "==": sp.Eq,
    "!=": sp.Ne,
    "<": sp.Lt,
    "<=": sp.Le,
    ">": sp.Gt,
    ">=": sp.Ge,
}


@dataclass(frozen=True, slots=True)
class Token:
    """One lexeme: ``kind`` is number, name, op or end; ``column`` is 0-based."""

    kind: str
    text: str
    column: int


#: Functions whose value is a real number even of integers (they make no index).
_REAL_FUNCTIONS = frozenset({"exp", "log", "tanh", "sqrt"})


@dataclass(frozen=True, slots=True)
class _Value:
    """A parsed sub-expression, its kind and the columns it spans (``end`` exclusive)."""

    expr: sp.Basic
    kind: Kind
    column: int
    end: int


@dataclass(frozen=True, slots=True)
class _Step:
    """A value the parser built from operands (``parts``), kept for the checks that need
    the whole text first: ``op`` names the operation ('/', 'log'), ``form`` shows it from
    its operands ('{} / {}', 'log({})')."""

    expr: sp.Basic
    column: int
    end: int
    op: str
    form: str
    parts: tuple[sp.Basic, ...]


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens, ending with an ``end`` token; raise ExprError on a
    character that starts no token."""
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ExprError(text, pos, f"unexpected character {text[pos]!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(Token(kind, match.group(), pos))
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def parse(
    text: str,
    *,
    names: Mapping[str, sp.Symbol],
    tensors: Mapping[str, int],
    want: Kind,
    integer_tensors: Collection[str] = frozenset(),
    fixed: Fixed | None = None,
) -> sp.Basic:
    """Parse ``text`` into a sympy expression of kind ``want``.

    ``names`` are the plain symbols the text may use; ``tensors`` maps each tensor name
    to its number of indices (it must be indexed with exactly that many), and
    ``integer_tensors`` names those whose elements are integers (only they may appear in
    an index). ``fixed`` gives the values the spec's topology fixes (a tree's q_len is
    1): the text must be defined with them. Raises :class:`ExprError` naming the column
    of the first problem.

    Whole constants are integers where they meet integers (they must then fit the
    kernels' int32, see :data:`~attngen.printer.INTEGER_RULE`) and real numbers where they
    meet real ones: ``score + 10**20`` is ``score + 1.0e20``.
    """
    parser = _Parser(text, names, tensors, frozenset(integer_tensors))
    value = parser.parse_all()
    if value.kind != want:
        wanted = "a boolean (a condition)" if want == "bool" else "a number"
        raise ExprError(text, 0, f"expected {wanted}, got {_describe(value.kind)}")
    if fixed is not None:
        parser.check_fixed(value, fixed)
    # a score is real: a constant one too wide for an integer is a float
    return _real(value.expr) if want == "number" else value.expr


def _describe(kind: Kind) -> str:
    return "a boolean" if kind == "bool" else "a number"


class _Parser:
    """Recursive descent, one method per precedence level (lowest first)."""

    def __init__(
        self,
        text: str,
        names: Mapping[str, sp.Symbol],
        tensors: Mapping[str, int],
        integer_tensors: frozenset[str],
    ):
        self.text = text
        self.names = names
        self.tensors = tensors
        self.integer_tensors = integer_tensors
        self.tokens = tokenize(text)
        self.pos = 0
        self.end = 0  # the column just past the last token consumed
        self.steps: list[_Step] = []  # the values built from operands, innermost first

    # -- token helpers -------------------------------------------------------------------

    @property
    def peek(self) -> Token:
        return self.tokens[self.pos]

    def advance(self) -> Token:
        token = self.tokens[self.pos]
        self.pos += 1
        self.end = token.column + len(token.text)
        return token

    def accept(self, *texts: str) -> Token | None:
        """Consume the next token if it is one of ``texts`` (an op or a keyword)."""
        if self.peek.kind in ("op", "name") and self.peek.text in texts:
            return self.advance()
        return None

    def expect(self, text: str) -> Token:
        token = self.accept(text)
        if token is None:
            raise self.unexpected(f"expected {text!r}")
        return token

    def error(self, column: int, problem: str, suggestion: str | None = None) -> ExprError:
        return ExprError(self.text, column, problem, suggestion)

    def unexpected(self, hint: str | None = None) -> ExprError:
        token = self.peek
        what = (
            "unexpected end of expression" if token.kind == "end" else f"unexpected {token.text!r}"
        )
        return self.error(token.column, what, hint)

    def need(self, value: _Value, kind: Kind, context: str) -> _Value:
        """``value`` itself, if it has ``kind``; otherwise an ExprError at its column."""
        if value.kind != kind:
            raise self.error(
                value.column, f"{context} needs {_describe(kind)}, got {_describe(value.kind)}"
            )
        return value

    # -- values, checked as they are built -----------------------------------------------

    def source(self, start: int) -> str:
        """The user's text from ``start`` to the end of the last token consumed."""
        return self.text[start : self.end]

    def boolean(
        self, expr: sp.Basic, start: int, op: str = "", form: str = "", parts: Sequence[_Value] = ()
    ) -> _Value:
        """A boolean spanning ``start`` to the last token consumed, built by ``op`` from
        ``parts`` (see :meth:`number`)."""
        self.check_integers(expr, start, parts)
        self.record(expr, start, op, form, parts)
        return _Value(expr, "bool", start, self.end)

    def number(
        self, expr: sp.Basic, start: int, op: str = "", form: str = "", parts: Sequence[_Value] = ()
    ) -> _Value:
        """A number spanning ``start`` to the last token consumed, once its constants and
        powers are known to have a Triton form (sympy may have folded or merged them).
        ``op`` built it from the operands ``parts``, shown as ``form`` ('{} / {}')."""
        self.check_constants(expr, start)
        self.check_powers(expr, start)
        self.check_integers(expr, start, parts)
        self.record(expr, start, op, form, parts)
        return _Value(expr, "number", start, self.end)

    def record(
        self, expr: sp.Basic, start: int, op: str, form: str, parts: Sequence[_Value]
    ) -> None:
        if op:
            self.steps.append(_Step(expr, start, self.end, op, form, tuple(p.expr for p in parts)))

    def combine(
        self, build: Callable[[list[sp.Basic]], sp.Basic], parts: Sequence[_Value]
    ) -> sp.Basic:
        """``build`` of the operands; where the result is real arithmetic, a whole
        constant too wide for the kernels' integers is a float there (``score + 10**20``
        adds 1e20 in float32, as the float64 reference does), not an integer Triton and
        numpy's int64 would refuse."""
        exprs = [p.expr for p in parts]
        result = build(exprs)
        if any(_too_wide(e) for e in exprs) and not _integer_arithmetic(result, exprs):
            result = build([_real(e) for e in exprs])
        return result

    def check_integers(self, expr: sp.Basic, start: int, parts: Sequence[_Value]) -> None:
        """An ExprError unless every whole constant of ``expr`` in integer arithmetic fits
        :data:`~attngen.printer.INTEGER_LIMIT`, at the operand that is that constant if
        one is (``kv_pos + 2 ** 40``), else at the whole value (``kv_pos * 65536 * 65536``
        makes 4294967296)."""
        for constant in integer_constants(expr):
            if abs(constant) <= INTEGER_LIMIT:
                continue
            for part in parts:
                if part.expr.is_Integer and abs(part.expr) == abs(constant):  # (- it, too)
                    text = self.text[part.column : part.end]
                    literal = text.strip().lstrip("+-").strip().isdigit()
                    shown = "" if literal else f" ({constant})"
                    raise self.error(
                        part.column,
                        f"the constant {text!r}{shown} is out of the integer range",
                        INTEGER_RULE,
                    )
            raise self.error(
                start,
                f"{self.source(start)!r} makes the constant {constant}, which is out of the "
                "integer range",
                INTEGER_RULE,
            )

    def check_constants(self, expr: sp.Basic, start: int) -> None:
        for constant in folded_constants(expr):
            problem = constant_problem(constant)
            if problem is None:
                continue
            hint = CONSTANT_RULE
            if problem == "is not a real number":
                hint += (
                    "; log and sqrt need an argument >= 0, a power that is not whole a base >= 0"
                )
            what = (
                f"the constant {self.source(start)!r}"
                if constant == expr
                else f"{self.source(start)!r} makes the constant {_shown(constant)}, which"
            )
            raise self.error(start, f"{what} {problem}", hint)

    def check_powers(self, expr: sp.Basic, start: int) -> None:
        for power in sorted(expr.atoms(sp.Pow), key=sp.default_sort_key):
            if power.is_number or power_form(power) is not None:
                continue  # a constant is folded into one literal
            # sympy's form names what it merged (score * score * ... is score**5)
            problem = f"the power {power} has no Triton form (written {self.source(start)!r})"
            raise self.error(start, problem, f"allowed: {POWER_RULE}")

    def check_offset(self, relation: sp.Basic, left: _Value, right: _Value) -> None:
        """An ExprError if the integer comparison ``relation`` has constants on its two
        sides that, moved to one side, leave the integer range: the kernels' tile bounds
        solve ``kv_pos + c < q_pos - c`` as ``kv_pos < q_pos - 2c``."""
        if not isinstance(relation, sp.core.relational.Relational):
            return  # sympy decided it
        if not (prints_integer(left.expr) and prints_integer(right.expr)):
            return
        offset = (left.expr - right.expr).as_coeff_Add()[0]
        if offset.is_Integer and abs(offset) > INTEGER_LIMIT:
            raise self.error(
                left.column,
                f"{self.source(left.column)!r} makes the constant {abs(offset)} when its "
                "constants are moved to one side (as the kernels' tile bounds do), which is "
                "out of the integer range",
                INTEGER_RULE,
            )

    # -- the values a topology fixes -----------------------------------------------------

    def check_fixed(self, value: _Value, fixed: Fixed) -> None:
        """An ExprError if ``value`` is undefined (a division by zero, log(0), ...) once
        ``fixed``'s values are substituted, at the innermost part of the text that is,
        stated in the user's terms. A part guarded by ``where`` does not count when the
        ``where`` is defined: ``where(q_len > 1, log(q_len - 1), 0)`` is 0 in a tree."""
        if _fixed_problem(value.expr, fixed) is None:
            return
        failing = {id(s) for s in self.steps if _fixed_problem(s.expr, fixed) is not None}

        def unguarded(step: _Step) -> bool:
            """Whether every part of the text around ``step`` fails as well."""
            return all(
                id(outer) in failing
                for outer in self.steps
                if outer is not step and outer.column <= step.column and step.end <= outer.end
            )

        candidates = [s for s in self.steps if id(s) in failing and unguarded(s)]
        if not candidates:  # sympy merged the parts: the whole value, then
            step = _Step(value.expr, value.column, value.end, "", "", ())
        else:
            step = min(candidates, key=lambda s: s.end - s.column)
        raise self.error(step.column, self.fixed_message(step, fixed), _FIXED_RULE)

    def fixed_message(self, step: _Step, fixed: Fixed) -> str:
        """'in a tree spec q_len is 1 (...), so 'log(q_len - 1)' is log(0) = -inf'."""
        used = step.expr.free_symbols
        facts = [fact for symbol, fact in fixed.facts.items() if symbol in used]
        facts = facts or list(fixed.facts.values())
        parts = [_substituted(p, fixed) for p in step.parts]
        whole = _substituted(step.expr, fixed)
        left = parts[0] if parts else None
        right = parts[1] if len(parts) > 1 else None
        if step.form and all(p is not None for p in parts):
            shown = step.form.format(*(_shown_operand(p) for p in parts if p is not None))
        elif whole is not None and not whole.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
            shown = _shown_operand(whole)
        else:
            shown = ""
        if step.op in _DIVISIONS and right == 0:
            outcome = "a modulo by zero" if step.op == "%" else "a division by zero"
        elif step.op == "**" and left == 0 and right is not None and right.is_negative:
            outcome = "a division by zero"
        elif step.op == "log" and left == 0:
            outcome = "= -inf"
        else:
            problem = _fixed_problem(step.expr, fixed) or "is undefined"
            outcome = "which " + problem
        if not shown:
            says = outcome.removeprefix("which ")  # "is undefined"
        elif outcome.startswith("="):
            says = f"is {shown} {outcome}"
        else:
            says = f"is {shown}, {outcome}"
        source = self.text[step.column : step.end]
        return f"in {fixed.where} {' and '.join(facts)}, so {source!r} {says}"

    # -- grammar -------------------------------------------------------------------------

    def parse_all(self) -> _Value:
        value = self.parse_or()
        if self.peek.kind != "end":
            raise self.unexpected()
        return value

    def parse_or(self) -> _Value:
        return self._boolean_chain("or", self.parse_and, sp.Or)

    def parse_and(self) -> _Value:
        return self._boolean_chain("and", self.parse_not, sp.And)

    def _boolean_chain(
        self, word: str, operand: Callable[[], _Value], combine: Callable[..., sp.Basic]
    ) -> _Value:
        first = operand()
        parts = [first]
        while self.accept(word):
            parts.append(operand())
        if len(parts) == 1:
            return first
        exprs = [self.need(p, "bool", f"'{word}'").expr for p in parts]
        return self.boolean(combine(*exprs), first.column, word, f" {word} ".join("{}" for _ in parts), parts)

    def parse_not(self) -> _Value:
        token = self.accept("not")
        if token is None:
            return self.parse_comparison()
        inner = self.need(self.parse_not(), "bool", "'not'")
        return self.boolean(sp.Not(inner.expr), token.column, "not", "not {}", (inner,))

    def parse_comparison(self) -> _Value:
        left = self.parse_sum()
        start, relations = left.column, []
        while (op := self.accept(*_COMPARISONS)) is not None:
            right = self.parse_sum()
            context = f"comparison {op.text!r}"
            a, b = self.need(left, "number", context), self.need(right, "number", context)
            relation = self.combine(_binary(_COMPARISONS[op.text]), (a, b))
            self.check_integers(relation, a.column, (a, b))
            self.check_offset(relation, a, b)
            self.record(relation, a.column, op.text, f"{{}} {op.text} {{}}", (a, b))
            relations.append(relation)
            left = right
        if not relations:
            return left
        return self.boolean(sp.And(*relations), start)

    def parse_sum(self) -> _Value:
        value = self.parse_product()
        while (op := self.accept("+", "-")) is not None:
            right = self.need(self.parse_product(), "number", f"{op.text!r}")
            left = self.need(value, "number", f"{op.text!r}")
            parts = (left, right)
            combined = self.combine(_binary(operator.add if op.text == "+" else operator.sub), parts)
            value = self.number(combined, left.column, op.text, f"{{}} {op.text} {{}}", parts)
        return value

    def parse_product(self) -> _Value:
        value = self.parse_unary()
        while (op := self.accept("*", "/", "//", "%")) is not None:
            right = self.need(self.parse_unary(), "number", f"{op.text!r}")
            left = self.need(value, "number", f"{op.text!r}")
            product = self._product(op, left, right)
            value = self.number(product, left.column, op.text, f"{{}} {op.text} {{}}", (left, right))
        return value

    def _product(self, op: Token, left: _Value, right: _Value) -> sp.Basic:
        if op.text == "*":
            return self.combine(_binary(operator.mul), (left, right))
        if right.expr == 0:
            raise self.error(
                right.column, "division by zero" if op.text != "%" else "modulo by zero"
            )
        build = _DIVISIONS[op.text]
        return self.defined(self.combine(build, (left, right)), op.column)

    def defined(self, result: sp.Basic, column: int) -> sp.Basic:
        """``result``, unless sympy folded it to an undefined value (zoo, nan)."""
        if result.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
            raise self.error(column, "the value is undefined (division by zero or log of zero?)")
        return result

    def parse_unary(self) -> _Value:
        token = self.accept("-", "+")
        if token is None:
            return self.parse_power()
        operand = self.need(self.parse_unary(), "number", f"unary {token.text!r}")
        if token.text == "+":
            return self.number(operand.expr, token.column)
        return self.number(-operand.expr, token.column, "-", "-{}", (operand,))

    def parse_power(self) -> _Value:
        base = self.parse_primary()
        op = self.accept("**")
        if op is None:
            return base
        exponent = self.need(self.parse_unary(), "number", "'**'")
        base = self.need(base, "number", "'**'")
        parts = (base, exponent)
        power = self.defined(self.combine(_binary(operator.pow), parts), op.column)
        return self.number(power, base.column, "**", "{} ** {}", parts)

    def parse_primary(self) -> _Value:
        token = self.peek
        if token.kind == "number":
            self.advance()
            return self.number(_number(token.text), token.column)
        if token.kind == "name":
            return self.parse_name()
        if self.accept("("):
            inner = self.parse_or()
            self.expect(")")
            if self.peek.text in ("(", "["):
                raise self.error(
                    self.peek.column, "only a function can be called and only a tensor indexed"
                )
            return _Value(inner.expr, inner.kind, token.column, self.end)
        raise self.unexpected()

    def parse_name(self) -> _Value:
        token = self.advance()
        name = token.text
        if name in ("true", "false"):
            return self.boolean(sp.true if name == "true" else sp.false, token.column)
        if name in _KEYWORDS:
            raise self.error(token.column, f"unexpected {name!r}")
        if self.peek.text == "(":
            return self.parse_call(token)
        if self.peek.text == "[":
            return self.parse_index(token)
        if name in self.names:
            return self.number(self.names[name], token.column)
        if name in self.tensors:
            dims = ", ".join(["i"] * self.tensors[name])
            raise self.error(
                token.column, f"tensor {name!r} must be indexed", f"write {name}[{dims}]"
            )
        if name in FUNCTIONS:
            raise self.error(
                token.column,
                f"function {name!r} must be called",
                f"write {FUNCTIONS[name].signature}",
            )
        raise self.unknown(token)

    def unknown(self, token: Token) -> ExprError:
        """A name that is none of the expression's: the nearest one if one is close, or
        everything it may name."""
        choices = [*self.names, *self.tensors, *FUNCTIONS]
        hint = did_you_mean(token.text, choices)
        if hint is None:
            kinds = [("names", self.names), ("tensors", self.tensors), ("functions", FUNCTIONS)]
            hint = "allowed: " + "; ".join(
                f"{kind} {', '.join(sorted(have))}" for kind, have in kinds if have
            )
        return self.error(token.column, f"unknown name {token.text!r}", hint)

    def parse_arguments(self, close: str) -> list[_Value]:
        self.advance()  # the opening bracket
        args = [self.parse_or()]
        while self.accept(","):
            args.append(self.parse_or())
        self.expect(close)
        return args

    def parse_call(self, token: Token) -> _Value:
        function = FUNCTIONS.get(token.text)
        if function is None:
            if token.text in self.names or token.text in self.tensors:
                raise self.error(token.column, f"{token.text!r} is not a function")
            raise self.unknown(token)
        args = self.parse_arguments(")")
        self.check_arity(function, args, token)
        kinds = [function.arg_kinds(i) for i in range(len(args))]
        parts = [
            self.need(a, k, f"argument {i + 1} of {function.name}()")
            for i, (a, k) in enumerate(zip(args, kinds, strict=True))
        ]
        result = self.defined(self.combine(function.build, parts), token.column)
        form = f"{function.name}({', '.join('{}' for _ in parts)})"
        return self.number(result, token.column, function.name, form, parts)

    def check_arity(self, function: Function, args: Sequence[_Value], token: Token) -> None:
        n = len(args)
        too_many = function.max_args is not None and n > function.max_args
        if n < function.min_args or too_many:
            raise self.error(
                token.column,
                f"{function.name}() got {n} argument{'s' * (n != 1)}",
                f"write {function.signature}",
            )

    def parse_index(self, token: Token) -> _Value:
        name = token.text
        if name not in self.tensors:
            if name in self.names or name in FUNCTIONS:
                raise self.error(token.column, f"{name!r} is not a tensor and cannot be indexed")
            raise self.unknown(token)
        indices = [
            self.need(i, "number", f"an index of {name!r}") for i in self.parse_arguments("]")
        ]
        if len(indices) != self.tensors[name]:
            raise self.error(
                token.column,
                f"tensor {name!r} takes {self.tensors[name]} index(es), got {len(indices)}",
            )
        for index in indices:
            self.check_index(name, index)
        base = tensor(name, integer=name in self.integer_tensors)
        element = base[tuple(i.expr for i in indices)]
        form = f"{name}[{', '.join('{}' for _ in indices)}]"
        return self.number(element, token.column, "[]", form, indices)

    def check_index(self, name: str, index: _Value) -> None:
        """An ExprError at ``index`` unless it prints as a Triton integer: the load's
        pointer offset (a float offset fails inside Triton, far from the spec)."""
        if prints_integer(index.expr):
            return
        source = self.text[index.column : index.end]
        spanned = [t for t in self.tokens if index.column <= t.column < index.end]
        reasons = dict.fromkeys(r for t in spanned if (r := self.why_real(t)) is not None)
        raise self.error(
            index.column,
            f"an index of {name!r} must be an integer expression, got {source!r}",
            "; ".join([*reasons, self.allowed_in_index()]),
        )

    def why_real(self, token: Token) -> str | None:
        """Why ``token`` may make an index a real number, in the user's terms, or None."""
        text = token.text
        if token.kind == "number" and not text.isdigit():
            return f"{text} is a float constant (a whole constant has no '.' or 'e')"
        if text == "/":
            return "'/' divides exactly: write // for floor division"
        if text == "**":
            return "'**' gives an integer only for a constant exponent 2, 3 or 4"
        if text in _REAL_FUNCTIONS:
            return f"{text}() gives a real number"
        if text in self.names and not self.names[text].is_integer:
            return f"{text!r} is a real number"
        if text in self.tensors and text not in self.integer_tensors:
            return f"{text!r} holds real numbers (an index may read only an int32 or int64 tensor)"
        return None

    def allowed_in_index(self) -> str:
        positions = ", ".join(n for n, s in self.names.items() if s.is_integer)
        integer_tensors = sorted(self.integer_tensors & set(self.tensors))
        tensors = f" ({', '.join(integer_tensors)})" if integer_tensors else ""
        return (
            f"allowed: {positions}, whole constants and elements of int32/int64 tensors"
            f"{tensors}, combined with +, -, *, // (floor division), %, min, max, abs, "
            "clamp, where and ** 2 to 4"
        )


def _binary(
    operation: Callable[[sp.Basic, sp.Basic], sp.Basic],
) -> Callable[[list[sp.Basic]], sp.Basic]:
    """``operation`` of two operands, as :meth:`_Parser.combine` calls it (on a list)."""
    return lambda e: operation(e[0], e[1])


#: ``/``, ``//`` and ``%`` of two operands (a zero right operand is refused before).
_DIVISIONS: dict[str, Callable[[list[sp.Basic]], sp.Basic]] = {
    "/": _binary(operator.truediv),
    "//": _binary(lambda a, b: sp.floor(a / b)),
    "%": _binary(sp.Mod),
}


def _too_wide(expr: sp.Basic) -> bool:
    """Whether ``expr`` is a whole constant beyond the integer range of the kernels."""
    return isinstance(expr, sp.Integer) and abs(int(expr)) > INTEGER_LIMIT


def _real(expr: sp.Basic) -> sp.Basic:
    """``expr``, a float if it is a whole constant too wide for an integer (as the float64
    reference reads it; one beyond float64 stays whole, for the float32 check to refuse)."""
    if not _too_wide(expr):
        return expr
    try:
        return sp.Float(float(int(expr)))
    except OverflowError:
        return expr


def _integer_arithmetic(result: sp.Basic, operands: Sequence[sp.Basic]) -> bool:
    """Whether the operation that made ``result`` of ``operands`` computes in integers:
    a comparison of two integers, or a value that prints as one."""
    if not isinstance(result, sp.Expr):  # a comparison (or what sympy decided of it)
        return all(prints_integer(o) for o in operands if isinstance(o, sp.Expr))
    return prints_integer(result)


#: What an expression must be with the values its topology fixes.
_FIXED_RULE = (
    "allowed: expressions defined for every query this topology has; drop the term, or keep "
    "it defined there: a divisor as max(q_len - 1, 1), a real value as "
    "where(q_len > 1, log(q_len - 1), 0)"
)


def _substituted(expr: sp.Basic, fixed: Fixed) -> sp.Basic | None:
    """``expr`` with ``fixed``'s values, or None where sympy finds it undefined (it
    raises on a modulo by zero)."""
    try:
        return expr.xreplace(dict(fixed.values))
    except (ZeroDivisionError, TypeError):  # Mod(x, 0); zoo > 0 is no comparison
        return None


def _fixed_problem(expr: sp.Basic, fixed: Fixed) -> str | None:
    """What ``expr`` becomes with ``fixed``'s values that the kernels cannot compute
    ("is undefined", "is beyond float32's range", ...), or None."""
    value = _substituted(expr, fixed)
    if value is None or value.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        return "is undefined"
    for constant in folded_constants(value):
        problem = constant_problem(constant)
        if problem is not None:
            return problem
    if any(abs(c) > INTEGER_LIMIT for c in integer_constants(value)):
        return "is out of the integer range"
    return None


def _shown_operand(value: sp.Basic) -> str:
    """An operand as the message shows it: a number as one, a sum in parentheses."""
    if isinstance(value, sp.Expr) and value.is_number:
        return str(int(value)) if value.is_Integer else _shown(value)
    text = str(value)
    atomic = isinstance(value, sp.Symbol | sp.Indexed | sp.Function) or value.is_Boolean
    return text if atomic else f"({text})"


def _shown(constant: sp.Basic) -> str:
    """A constant sympy folded, as a number (1e+60, 3.14159*I)."""
    value = sp.N(constant, 6)
    return f"{float(value):g}" if value.is_real and abs(value) < 1e300 else str(value)


def _number(text: str) -> sp.Basic:
    if any(c in text for c in ".eE"):
        return sp.Float(float(text))
    return sp.Integer(int(text))
