"""The mask-rule language: ``causal``, ``{window: {left: 128}}``, ``{any: [...]}``.

Each rule is a one-key mapping (or a bare name), which pydantic cannot express with
useful error paths, so it is parsed by hand here; every error names the rule's path
(``mask[1].any[0].window.left``). What a rule *means* is defined once, in
:mod:`attngen.semantics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attngen.errors import SpecError, did_you_mean


@dataclass(frozen=True, slots=True)
class Causal:
    """kv_pos <= q_pos"""


@dataclass(frozen=True, slots=True)
class Full:
    """Every key visible."""


@dataclass(frozen=True, slots=True)
class Window:
    """q_pos - left <= kv_pos <= q_pos + right; None is unbounded on that side."""

    left: int | None
    right: int | None


@dataclass(frozen=True, slots=True)
class Sink:
    """The first ``tokens`` keys of every sequence are visible (attention sinks)."""

    tokens: int


@dataclass(frozen=True, slots=True)
class PrefixLM:
    """Causal, plus a bidirectional prefix of ``length`` tokens (or ``tensor[batch]``)."""

    length: int | None
    tensor: str | None


@dataclass(frozen=True, slots=True)
class Document:
    """A query sees only keys of its own document: ``tensor[q_pos] == tensor[kv_pos]``."""

    tensor: str


@dataclass(frozen=True, slots=True)
class ExprRule:
    """A boolean expression over q_pos, kv_pos, head, batch, q_len, kv_len and tensors."""

    text: str


@dataclass(frozen=True, slots=True)
class AllOf:
    rules: tuple[MaskRule, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    rules: tuple[MaskRule, ...]


@dataclass(frozen=True, slots=True)
class NotRule:
    rule: MaskRule


MaskRule = Causal | Full | Window | Sink | PrefixLM | Document | ExprRule | AllOf | AnyOf | NotRule

_RULE_KEYS = ("causal", "full", "window", "sink", "prefix_lm", "document", "expr", "all", "any", "not")


def _int_field(value: Any, path: str, *, minimum: int = 0, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, "must be an integer", given=value,
                        allowed=f"an integer >= {minimum}" + (" or null (unbounded)" if allow_none else ""))
    if value < minimum:
        raise SpecError(path, "is out of range", given=value, allowed=f"an integer >= {minimum}")
    return value


def parse_mask_rule(raw: Any, path: str = "mask") -> MaskRule:
    """Parse the YAML form of a mask rule; a list means all of its rules."""
    if isinstance(raw, list):
        if not raw:
            raise SpecError(path, "an empty list of rules", allowed="at least one rule, or 'full'")
        return AllOf(tuple(parse_mask_rule(r, f"{path}[{i}]") for i, r in enumerate(raw)))
    if isinstance(raw, str):
        if raw == "causal":
            return Causal()
        if raw == "full":
            return Full()
        hint = did_you_mean(raw, ("causal", "full"))
        raise SpecError(path, "unknown rule", given=raw,
                        allowed="'causal', 'full', or a one-key mapping: " + ", ".join(_RULE_KEYS[2:]),
                        suggestion=hint)
    if not isinstance(raw, dict) or len(raw) != 1:
        raise SpecError(path, "a rule is a name or a mapping with exactly one key", given=raw,
                        allowed=", ".join(_RULE_KEYS))
    ((key, value),) = raw.items()
    sub = f"{path}.{key}"
    if key == "window":
        if isinstance(value, int) and not isinstance(value, bool):
            return Window(_int_field(value, sub), 0)
        if not isinstance(value, dict):
            raise SpecError(sub, "must be a mapping {left, right} or an int (left)", given=value)
        unknown = set(value) - {"left", "right"}
        if unknown:
            bad = sorted(unknown)[0]
            raise SpecError(f"{sub}.{bad}", "unknown field", allowed="left, right",
                            suggestion=did_you_mean(bad, ("left", "right")))
        left = _int_field(value.get("left"), f"{sub}.left", allow_none=True)
        right = _int_field(value.get("right", 0), f"{sub}.right", allow_none=True)
        if left is None and right is None:
            raise SpecError(sub, "a window unbounded on both sides is 'full'", given=value)
        return Window(left, right)
    if key == "sink":
        return Sink(_int_field(value, sub, minimum=1) or 1)
    if key == "prefix_lm":
        if isinstance(value, str):
            return PrefixLM(None, value)
        return PrefixLM(_int_field(value, sub), None)
    if key == "document":
        if not isinstance(value, str):
            raise SpecError(sub, "must name a declared per-token tensor", given=value)
        return Document(value)
    if key == "expr":
        if not isinstance(value, str) or not value.strip():
            raise SpecError(sub, "must be a non-empty expression string", given=value)
        return ExprRule(value)
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise SpecError(sub, "must be a non-empty list of rules", given=value)
        rules = tuple(parse_mask_rule(r, f"{sub}[{i}]") for i, r in enumerate(value))
        return AllOf(rules) if key == "all" else AnyOf(rules)
    if key == "not":
        return NotRule(parse_mask_rule(value, sub))
    if key in ("causal", "full"):
        raise SpecError(sub, f"write '{key}' as a plain name, not a mapping", given=raw)
    raise SpecError(sub, "unknown rule", allowed=", ".join(_RULE_KEYS),
                    suggestion=did_you_mean(str(key), _RULE_KEYS))


def mask_rule_to_yaml(rule: MaskRule) -> Any:
    """The canonical YAML form of a rule (inverse of :func:`parse_mask_rule`)."""
    match rule:
        case Causal():
            return "causal"
        case Full():
            return "full"
        case Window(left, right):
            return {"window": {"left": left, "right": right}}
        case Sink(tokens):
            return {"sink": tokens}
        case PrefixLM(length, tensor):
            return {"prefix_lm": tensor if tensor is not None else length}
        case Document(tensor):
            return {"document": tensor}
        case ExprRule(text):
            return {"expr": text}
        case AllOf(rules):
            return {"all": [mask_rule_to_yaml(r) for r in rules]}
        case AnyOf(rules):
            return {"any": [mask_rule_to_yaml(r) for r in rules]}
        case NotRule(inner):
            return {"not": mask_rule_to_yaml(inner)}
    raise TypeError(rule)


