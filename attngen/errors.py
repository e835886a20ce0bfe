"""Errors a user can act on.

Every error attngen raises for bad input is an :class:`AttngenError`: one paragraph that
names where the problem is (file, field path), what was given, what is allowed and, when
we can guess, what was probably meant. The CLI prints ``str(err)`` and exits non-zero,
never a traceback.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable

#: ``given`` of a SpecError that shows no value (``None`` is YAML's ``null``, a value
#: a spec can give).
NOT_GIVEN: object = object()


class AttngenError(Exception):
    """Base class of every user-facing attngen error."""


class SpecError(AttngenError):
    """A spec file that is not valid: malformed YAML, an unknown field, a wrong type,
    an out-of-range value, or an expression that does not parse.

    >>> str(SpecError("heads.kv", "must divide heads.q", given=3, allowed="a divisor of 32", file="a.yaml"))
    'a.yaml: heads.kv: must divide heads.q (given: 3; allowed: a divisor of 32)'
    >>> str(SpecError("mask", "is empty", given=None))
    'mask: is empty (given: null)'
    """

    def __init__(
        self,
        field: str,
        problem: str,
        *,
        given: object = NOT_GIVEN,
        allowed: str | None = None,
        suggestion: str | None = None,
        file: str | None = None,
    ) -> None:
        self.field = field
        self.problem = problem
        self.given = given
        self.allowed = allowed
        self.suggestion = suggestion
        self.file = file
        super().__init__(self._format())

    def _format(self) -> str:
        where = ": ".join(p for p in (self.file, self.field) if p)
        details = []
        if self.given is not NOT_GIVEN:
            details.append(f"given: {'null' if self.given is None else repr(self.given)}")
        if self.allowed:
            details.append(f"allowed: {self.allowed}")
        text = f"{where}: {self.problem}" if where else self.problem
        if details:
            text += f" ({'; '.join(details)})"
        if self.suggestion:
            text += f". {self.suggestion}"
        return text

    def in_file(self, file: str) -> SpecError:
        """The same error, attributed to ``file``."""
        return SpecError(
            self.field,
            self.problem,
            given=self.given,
            allowed=self.allowed,
            suggestion=self.suggestion,
            file=file,
        )


class ExprError(AttngenError):
    """An expression that does not parse or names something it may not.

    ``column`` is 0-based into ``text``; the message shows a caret under it.
    """

    def __init__(self, text: str, column: int, problem: str, suggestion: str | None = None):
        self.text = text
        self.column = column
        self.problem = problem
        self.suggestion = suggestion
        msg = f"{problem} at column {column + 1} of {text!r}"
        if suggestion:
            msg += f". {suggestion}"
        super().__init__(msg)


class LaunchError(AttngenError):
    """Tensors handed to a generated kernel that do not fit its spec (shape, dtype,
    device, offsets), caught before anything is launched."""


class PlanError(AttngenError):
    """Run-time tree structure that is not valid: a cycle, a forest where a tree was
    expected, a query on a node that does not exist, lengths that disagree."""


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean' hint for ``word`` among ``choices``, or None.

    >>> did_you_mean("casual", ["causal", "window"])
    "did you mean 'causal'?"
    """
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def plan_int(value: object, what: str) -> int:
    """``value`` as an int if it is one (Python's or numpy's, not a bool); a PlanError
    naming ``what`` otherwise, before a float is cut (1000.5 to 1000) or a string fails
    deep inside.

    >>> plan_int(64, "chunk")
    64
    >>> plan_int(64.0, "chunk")
    Traceback (most recent call last):
    ...
    attngen.errors.PlanError: chunk must be an int, got 64.0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy's register
        raise PlanError(f"{what} must be an int, got {value!r}.")
    return int(value)
