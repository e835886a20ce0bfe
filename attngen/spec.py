"""The spec language: YAML in, frozen and validated :class:`Spec` out.

A spec describes one attention variant. Loading it checks everything that can be
checked without data: types, ranges, cross-field rules (kv heads divide q heads, a
tensor named in a mask is declared, an expression parses and names only what it may).
Every problem is a :class:`~attngen.errors.SpecError` naming the file, the field path
(``mask[1].window.left``), the value given and what is allowed.

>>> spec = parse_spec({"name": "demo", "heads": {"q": 8, "kv": 2}, "head_dim": 64,
...                    "dtype": "fp16", "mask": ["causal"]})
>>> spec.heads.group, spec.head_dim.qk, spec.topology.queries
(4, 64, 'prefill')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from attngen.errors import NOT_GIVEN, ExprError, SpecError, did_you_mean
from attngen.masks import (
    AllOf,
    AnyOf,
    Document,
    ExprRule,
    Full,
    MaskRule,
    NotRule,
    PrefixLM,
    mask_rule_to_yaml,
    parse_mask_rule,
)

SPEC_VERSION = 1
#: What a spec's ``name`` may be: a lower-case identifier, at most 64 characters (anchored,
#: so that JSON Schema, which searches, and ``re.fullmatch`` read it alike).
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
HEAD_DIMS = (16, 32, 64, 96, 128, 192, 256)
#: The tile sizes ``tune.block_m`` / ``tune.block_n`` may list: powers of two.
BLOCK_SIZES = (16, 32, 64, 128, 256)
NUM_WARPS = (1, 2, 4, 8, 16)
DTYPES = ("fp16", "bf16", "fp32")
#: Bytes of an element of each spec dtype.
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
TENSOR_DTYPES = ("fp32", "fp16", "bf16", "int32", "int64")
TENSOR_DIMS = ("head", "batch", "token")
#: The torch dtype (its name in ``torch``) of every dtype a spec may name.
TORCH_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "int32": "int32", "int64": "int64"}


def torch_dtype(name: str) -> Any:
    """``torch.float16`` for ``"fp16"`` and so on (imports torch)."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES[name])


#: An int that YAML must give as an int (``true`` or ``"3"`` is an error, not 1 or 3).
Int = Annotated[int, Strict()]


class _RuleError(ValueError):
    """A validator's objection, carrying what the SpecError shows: the value it is about
    (``given``), what is allowed, and the sub-field it concerns (``kv`` of ``heads``)."""

    def __init__(self, problem: str, *, given: object = NOT_GIVEN, allowed: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(problem)
        self.problem, self.given, self.allowed, self.field = problem, given, allowed, field


@dataclasses.dataclass(frozen=True)
class _OneOf:
    """Annotated metadata for an int that must be one of ``choices``: checked after the
    int itself (our message, not pydantic's) and stated as the JSON Schema's ``enum``, so
    that the schema and the validator agree."""

    choices: tuple[int, ...]
    problem: str

    def _check(self, value: int) -> int:
        if value not in self.choices:
            raise _RuleError(self.problem, given=value, allowed=f"one of {list(self.choices)}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler) -> Any:
        return {**handler(schema), "enum": list(self.choices)}


HeadDimSize = Annotated[Int, _OneOf(HEAD_DIMS, "is not a supported head dim")]
BlockSize = Annotated[Int, _OneOf(BLOCK_SIZES, "is not a power of two from 16 to 256")]
NumWarps = Annotated[Int, _OneOf(NUM_WARPS, "is not a supported number of warps")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class Heads(_Model):
    """Query and key/value head counts; ``kv`` divides ``q`` (MHA, GQA, MQA)."""

    q: Annotated[Int, Field(ge=1, le=1024)]
    kv: Annotated[Int, Field(ge=1, le=1024)]

    @model_validator(mode="after")
    def _kv_divides_q(self) -> Heads:
        if self.q % self.kv:
            divisors = [d for d in range(1, self.q + 1) if self.q % d == 0]
            raise _RuleError(f"must divide heads.q = {self.q}", given=self.kv,
                             allowed=f"a divisor of {self.q}: {divisors}", field="kv")
        return self

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.q // self.kv


class HeadDim(_Model):
    """Head dimension of Q·K (``qk``) and of V/O (``v``)."""

    qk: HeadDimSize
    v: HeadDimSize


class Topology(_Model):
    """How queries and keys are organised.

    ``sequence``: a batch of independent variable-length sequences; ``queries`` is
    ``prefill`` (many queries per sequence, the last ``q_len`` tokens of its KV, which
    covers chunked prefill) or ``decode`` (one query per sequence, its last token).
    ``tree`` / ``shared_prefix``: see the tree family; ``queries`` is ``node`` (one
    query per chosen node) or ``token`` (every token of a token tree is a query).
    """

    kind: Literal["sequence", "tree", "shared_prefix"] = "sequence"
    queries: Literal["prefill", "decode", "node", "token"] | None = None
    kv_layout: Literal["contiguous", "paged"] = "contiguous"
    page_size: Annotated[Int, Field(ge=1, le=4096)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Topology:
        allowed = {"sequence": ("prefill", "decode"), "tree": ("node", "token"),
                   "shared_prefix": ("node", "token")}[self.kind]
        if self.queries is None:
            object.__setattr__(self, "queries", allowed[0])
        elif self.queries not in allowed:
            raise _RuleError(f"does not fit kind {self.kind!r}", given=self.queries,
                             allowed=" or ".join(map(repr, allowed)), field="queries")
        if self.kind == "sequence" and self.kv_layout == "paged":
            raise _RuleError("paged KV is supported for tree and shared_prefix topologies",
                             given=self.kv_layout, allowed="'contiguous' with kind 'sequence'",
                             field="kv_layout")
        if self.kv_layout == "paged" and self.page_size is None:
            raise _RuleError("is required with kv_layout 'paged'", field="page_size",
                             allowed=_ALLOWED["topology.page_size"])
        if self.kv_layout == "contiguous" and self.page_size is not None:
            raise _RuleError("is only meaningful with kv_layout 'paged'", given=self.page_size,
                             allowed="leave page_size out, or set kv_layout: paged", field="page_size")
        return self


class TensorDecl(_Model):
    """A user tensor that expressions may index: ``dims`` lists, per axis, ``head``
    (size heads.q), ``batch`` (one per sequence/tree), ``token`` (packed like the KV,
    indexed by a position within its sequence) or a fixed positive size."""

    dims: Annotated[tuple[Literal["head", "batch", "token"] | Annotated[Int, Field(ge=1)], ...],
                    Field(json_schema_extra={"minItems": 1})]
    dtype: Literal["fp32", "fp16", "bf16", "int32", "int64"] = "fp32"

    @field_validator("dims")
    @classmethod
    def _not_empty(cls, dims: tuple[Any, ...]) -> tuple[Any, ...]:
        if not dims:
            raise _RuleError("a tensor needs at least one dim", given=[],
                             allowed=_ALLOWED["tensors.*.dims"])
        if "token" in dims and len(dims) > 1:
            raise _RuleError("a per-token tensor has exactly one dim (packed like the KV)",
                             given=list(dims), allowed="['token']")
        return dims

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("fp", "bf"))


#: The tile sizes a spec that leaves ``tune.block_m`` / ``tune.block_n`` unset gets.
DEFAULT_BLOCKS = (128, 64)

_T = TypeVar("_T")
#: Autotuner candidates: a list, never empty (the JSON Schema says so too).
Candidates = Annotated[tuple[_T, ...], Field(json_schema_extra={"minItems": 1})]


class Tune(_Model):
    """Autotuner candidates. Every combination valid for the shapes is tried on a GPU;
    the interpreter uses the first valid one.

    ``block_m`` and ``block_n`` left unset (``null`` in the canonical form) are the
    family's default, :data:`DEFAULT_BLOCKS`; the tree family then also tries one narrow
    tile (``attngen.tree_ir.TREE_NARROW_TILE``). Only prefill tiles its queries:
    ``block_m`` on a decode or tree spec is an error (see :func:`_check_tune`)."""

    block_m: Candidates[BlockSize] | None = None
    block_n: Candidates[BlockSize] | None = None
    num_warps: Candidates[NumWarps] = (8, 4)
    num_stages: Candidates[Annotated[Int, Field(ge=1, le=6)]] = (3, 4, 2)

    @field_validator("block_m", "block_n", "num_warps", "num_stages")
    @classmethod
    def _not_empty(cls, values: tuple[int, ...] | None) -> tuple[int, ...] | None:
        # an empty list would leave the autotuner nothing to try
        if values is not None and not values:
            raise _RuleError("needs at least one candidate", given=[])
        return values


# ---------------------------------------------------------------------------------------


class Spec(_Model):
    """A validated attention variant. Build one with :func:`load_spec` or :func:`parse_spec`."""

    name: Annotated[str, Field(json_schema_extra={"pattern": NAME_PATTERN})]
    description: str = ""
    heads: Heads
    head_dim: HeadDim
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    topology: Topology = Topology()
    tensors: dict[str, TensorDecl] = Field(default_factory=dict)
    mask: Any = Full()
    score_mod: str | None = None
    scale: Annotated[float, Field(gt=0)] | None = None
    tune: Tune = Tune()

    @field_validator("name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise _RuleError("is not a usable spec name", given=value, allowed=_ALLOWED["name"])
        return value

    @field_validator("head_dim", mode="before", json_schema_input_type=HeadDimSize | HeadDim)
    @classmethod
    def _head_dim_short(cls, value: Any) -> Any:
        return {"qk": value, "v": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("topology", mode="before",
                     json_schema_input_type=Literal["sequence", "tree", "shared_prefix"] | Topology)
    @classmethod
    def _topology_short(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    def __hash__(self) -> int:
        return hash(self.content_hash)

    @property
    def softmax_scale(self) -> float:
        """The scale applied to Q·K before score_mod (default 1/sqrt(head_dim.qk))."""
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim.qk)

    def canonical(self) -> dict[str, Any]:
        """Plain data with every default filled in, keys sorted: the hashed form. The tile
        sizes left to the family stay ``None`` (see :class:`Tune`), so a spec that
        spells out ``block_n: [128, 64]`` on a tree, which drops the narrow tile, hashes
        apart from one that leaves it unset."""
        data = self.model_dump(mode="json")
        data["mask"] = mask_rule_to_yaml(self.mask)
        data["spec_version"] = SPEC_VERSION
        return _sorted(data)

    def canonical_yaml(self) -> str:
        return yaml.safe_dump(self.canonical(), sort_keys=True, default_flow_style=None)

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical form (hex, 16 chars)."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


def _pydantic_path(loc: tuple[Any, ...], *, key: bool = False) -> str:
    """The field path of pydantic's ``loc`` (``tensors.bias.dims[1]``; a union's branch
    tags dropped), or with ``key`` its :data:`_ALLOWED` key (``tensors.*.dims[]``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += "[]" if key else f"[{part}]"
        elif not str(part).startswith(("function-", "literal[", "constrained-")):
            name = "*" if key and out == "tensors" else str(part)
            out += f".{name}" if out else name
    return out


def _listed(values: tuple[Any, ...]) -> str:
    """``'fp16', 'bf16' or 'fp32'``: choices as pydantic's own messages list them."""
    shown = [repr(v) for v in values]
    return f"{', '.join(shown[:-1])} or {shown[-1]}"


#: What each field allows, keyed by its path with ``[]`` for a list index and ``*`` for a
#: tensor's name: the "allowed" of an error about the field's type, range or absence.
_ALLOWED: dict[str, str] = {
    "name": "a lower-case identifier: a-z, 0-9 and _, starting with a letter, at most 64 characters",
    "description": "a string",
    "heads": "a mapping {q: N, kv: M}",
    "heads.q": "an integer from 1 to 1024",
    "heads.kv": "an integer from 1 to 1024 that divides heads.q",
    "head_dim": f"an integer (one of {list(HEAD_DIMS)}) or {{qk: N, v: M}}",
    "head_dim.qk": f"one of {list(HEAD_DIMS)}",
    "head_dim.v": f"one of {list(HEAD_DIMS)}",
    "dtype": _listed(DTYPES),
    "topology": "'sequence', 'tree', 'shared_prefix', or a mapping {kind, queries, kv_layout, page_size}",
    "topology.kind": "'sequence', 'tree' or 'shared_prefix'",
    "topology.queries": "'prefill' or 'decode' (kind sequence); 'node' or 'token' (kind tree or shared_prefix)",
    "topology.kv_layout": "'contiguous', or 'paged' (kind tree or shared_prefix)",
    "topology.page_size": "an integer from 1 to 4096",
    "tensors": "a mapping from tensor names to {dims: [...], dtype: ...}",
    "tensors.*": "a mapping {dims: [...], dtype: ...}",
    "tensors.*.dims": "a non-empty list of dims, e.g. [head] or [token]",
    "tensors.*.dims[]": "head, batch, token, or a fixed size (an int >= 1)",
    "tensors.*.dtype": _listed(TENSOR_DTYPES),
    "score_mod": "an expression string, e.g. '30 * tanh(score / 30)'",
    "scale": "a number > 0",
    "tune": "a mapping {block_m, block_n, num_warps, num_stages}",
    "tune.block_m": "a list of candidates, e.g. [64, 128]",
    "tune.block_m[]": f"one of {list(BLOCK_SIZES)}",
    "tune.block_n": "a list of candidates, e.g. [64, 128]",
    "tune.block_n[]": f"one of {list(BLOCK_SIZES)}",
    "tune.num_warps": "a list of candidates, e.g. [4, 8]",
    "tune.num_warps[]": f"one of {list(NUM_WARPS)}",
    "tune.num_stages": "a list of candidates, e.g. [2, 3]",
    "tune.num_stages[]": "an integer from 1 to 6",
}

_FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "": tuple(Spec.model_fields),
    "heads": tuple(Heads.model_fields),
    "head_dim": tuple(HeadDim.model_fields),
    "topology": tuple(Topology.model_fields),
    "tensors.*": tuple(TensorDecl.model_fields),
    "tune": tuple(Tune.model_fields),
}

#: Our words for pydantic's error types (the rest: "has the wrong type", or pydantic's).
_PROBLEMS = {
    "missing": "is required",
    "literal_error": "is not one of the allowed values",
    "greater_than": "is out of range",
    "greater_than_equal": "is out of range",
    "less_than": "is out of range",
    "less_than_equal": "is out of range",
}


def _translate(err: ValidationError) -> SpecError:
    """The pydantic error most worth fixing first, as one SpecError paragraph."""
    errors = err.errors()
    misspelt = _misspelt_required(errors)
    if misspelt:
        return _unknown_field(*misspelt)
    first = errors[0]
    loc = tuple(first["loc"])
    if first["type"] == "extra_forbidden":
        return _unknown_field(loc)
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _RuleError):
        return _rule_error(loc, cause)
    return _field_error(loc, first)


def _misspelt_required(errors: list[Any]) -> tuple[tuple[Any, ...], str] | None:
    """An unknown key that looks like a missing required field beside it (``headdim``
    for head_dim), with its hint. Pydantic lists the missing field first, but the
    unknown key is what the user has to fix."""
    missing = [tuple(e["loc"]) for e in errors if e["type"] == "missing"]
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            wanted = [str(m[-1]) for m in missing if m[:-1] == loc[:-1]]
            hint = did_you_mean(str(loc[-1]), wanted)
            if hint:
                return loc, hint
    return None


def _unknown_field(loc: tuple[Any, ...], hint: str | None = None) -> SpecError:
    names = _FIELD_NAMES.get(_pydantic_path(loc[:-1], key=True), ())
    return SpecError(_pydantic_path(loc), "unknown field", allowed=", ".join(names) or None,
                     suggestion=hint or did_you_mean(str(loc[-1]), names))


def _rule_error(loc: tuple[Any, ...], cause: _RuleError) -> SpecError:
    """One of our validators' objections, at the sub-field it names."""
    full = loc + ((cause.field,) if cause.field else ())
    allowed = cause.allowed or _ALLOWED.get(_pydantic_path(full, key=True))
    return SpecError(_pydantic_path(full), cause.problem, given=cause.given, allowed=allowed)


def _field_error(loc: tuple[Any, ...], error: Any) -> SpecError:
    """A type, range or missing-field error, in our words: what was given, what is allowed."""
    path, key = _pydantic_path(loc) or "spec", _pydantic_path(loc, key=True)
    given = NOT_GIVEN if error["type"] == "missing" else error.get("input")
    if isinstance(given, dict | list) and len(str(given)) > 80:
        given = NOT_GIVEN
    allowed = _ALLOWED.get(key)
    if allowed is None:  # a field the table does not describe: pydantic's words, as they are
        return SpecError(path, error["msg"].removeprefix("Value error, "), given=given)
    if key == "tensors.*.dims[]":
        # one axis of a user tensor: pydantic would name only the union's first branch
        return SpecError(path, "is not a tensor dim", given=given, allowed=allowed)
    problem = _PROBLEMS.get(error["type"])
    if problem is None:
        problem = "has the wrong type" if error["type"].endswith(("_type", "_parsing")) else error["msg"]
    hint = None
    if error["type"] == "literal_error" and isinstance(given, str):
        hint = did_you_mean(given, re.findall(r"'([^']*)'", error["ctx"]["expected"]))
    return SpecError(path, problem, given=given, allowed=allowed, suggestion=hint)


def parse_spec(data: Any, file: str | None = None) -> Spec:
    """Validate already-loaded YAML data into a :class:`Spec`."""
    try:
        if data is None:
            raise SpecError("spec", "the file holds no spec (it is empty)",
                            allowed="a mapping with at least name, heads and head_dim")
        if not isinstance(data, dict):
            raise SpecError("spec", "the top level must be a mapping", given=type(data).__name__,
                            allowed="a mapping with at least name, heads and head_dim")
        data = dict(data)
        version = data.pop("spec_version", SPEC_VERSION)  # present in the canonical form
        if version != SPEC_VERSION:
            raise SpecError("spec_version", "is not a version this attngen reads", given=version,
                            allowed=str(SPEC_VERSION))
        mask = parse_mask_rule(data.pop("mask", "full"), "mask")
        try:
            spec = Spec.model_validate({**data, "mask": Full()})
        except ValidationError as err:
            raise _translate(err) from None
        spec = spec.model_copy(update={"mask": mask})
        _check_tune(spec)
        _check_names(spec)
        return spec
    except SpecError as err:
        raise (err.in_file(file) if file and not err.file else err) from None


def _check_tune(spec: Spec) -> None:
    """Tile candidates the spec's kernels can use: only prefill has query tiles."""
    if spec.tune.block_m is not None and spec.topology.queries != "prefill":
        rows = ("one row block per KV head: its query heads" if spec.topology.queries == "decode"
                else "the rows the plan gives each group")
        raise SpecError("tune.block_m", f"is only for prefill specs; a {spec.topology.queries} "
                        f"kernel runs {rows}", given=list(spec.tune.block_m),
                        allowed="leave block_m out (block_n, num_warps and num_stages still apply)")


def _check_names(spec: Spec) -> None:
    """Cross-field rules: tensors named by rules exist and fit; expressions parse."""
    from attngen import semantics  # the expression layer sits above the spec layer

    for name in spec.tensors:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in semantics.RESERVED_NAMES:
            raise SpecError(f"tensors.{name}", "is not a usable tensor name", given=name,
                            allowed="an identifier that is not one of " + ", ".join(sorted(semantics.RESERVED_NAMES)))
    for path, name, need in _tensor_refs(spec.mask, "mask"):
        found = spec.tensors.get(name)
        if found is None:
            raise SpecError(path, "names an undeclared tensor", given=name,
                            allowed="a tensor declared under 'tensors'",
                            suggestion=did_you_mean(name, spec.tensors))
        if found.dims != need:
            raise SpecError(path, f"tensor {name!r} has dims {list(found.dims)}", given=name,
                            allowed=f"a tensor with dims {list(need)}")
    try:
        semantics.visibility(spec)
    except ExprError as err:
        raise SpecError(_expr_path(spec.mask, "mask", err.text) or "mask",
                        f"{err.problem} at column {err.column + 1}",
                        given=err.text, suggestion=err.suggestion) from None
    if spec.score_mod is not None:
        try:
            semantics.score(spec)
        except ExprError as err:
            raise SpecError("score_mod", f"{err.problem} at column {err.column + 1}",
                            given=err.text, suggestion=err.suggestion) from None


def _tensor_refs(rule: MaskRule, path: str) -> list[tuple[str, str, tuple[str, ...]]]:
    match rule:
        case PrefixLM(_, tensor) if tensor is not None:
            return [(f"{path}.prefix_lm", tensor, ("batch",))]
        case Document(tensor):
            return [(f"{path}.document", tensor, ("token",))]
        case AllOf(rules) | AnyOf(rules):
            key = "all" if isinstance(rule, AllOf) else "any"
            top = path == "mask" and isinstance(rule, AllOf)
            return [ref for i, r in enumerate(rules)
                    for ref in _tensor_refs(r, f"{path}[{i}]" if top else f"{path}.{key}[{i}]")]
        case NotRule(inner):
            return _tensor_refs(inner, f"{path}.not")
    return []


def _expr_path(rule: MaskRule, path: str, text: str) -> str | None:
    match rule:
        case ExprRule(t) if t == text:
            return f"{path}.expr"
        case AllOf(rules) | AnyOf(rules):
            key = "all" if isinstance(rule, AllOf) else "any"
            top = path == "mask" and isinstance(rule, AllOf)
            for i, r in enumerate(rules):
                found = _expr_path(r, f"{path}[{i}]" if top else f"{path}.{key}[{i}]", text)
                if found:
                    return found
        case NotRule(inner):
            return _expr_path(inner, f"{path}.not", text)
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a key given twice is an error rather than the
    last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec file (safe loader only)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError("", f"cannot read the spec: {err.strerror}", file=file) from None
    except UnicodeDecodeError as err:
        raise SpecError("", f"cannot read the spec: it is not UTF-8 text (byte {err.object[err.start]:#04x} "
                        f"at offset {err.start})", file=file) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError("", f"malformed YAML at {where}: {problem}", file=file) from None
    return parse_spec(data, file)


def spec_from_mapping(data: Mapping[str, Any]) -> Spec:
    """Convenience for tests and notebooks: build a spec from a dict."""
    return parse_spec(dict(data))
