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

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from attngen.errors import ExprError, SpecError, did_you_mean
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
HEAD_DIMS = (16, 32, 64, 96, 128, 192, 256)
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
            raise ValueError(f"kv={self.kv} must divide q={self.q}; divisors of q: {divisors}")
        return self

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.q // self.kv


class HeadDim(_Model):
    """Head dimension of Q·K (``qk``) and of V/O (``v``)."""

    qk: Int
    v: Int

    @field_validator("qk", "v")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value not in HEAD_DIMS:
            raise ValueError(f"{value} is not a supported head dim; allowed: {list(HEAD_DIMS)}")
        return value


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
            raise ValueError(f"queries={self.queries!r} does not fit kind={self.kind!r}; allowed: {list(allowed)}")
        if self.kv_layout == "paged" and self.page_size is None:
            raise ValueError("kv_layout 'paged' needs page_size")
        if self.kv_layout == "contiguous" and self.page_size is not None:
            raise ValueError("page_size is only meaningful with kv_layout 'paged'")
        if self.kind == "sequence" and self.kv_layout == "paged":
            raise ValueError("paged KV is supported for tree and shared_prefix topologies")
        return self


class TensorDecl(_Model):
    """A user tensor that expressions may index: ``dims`` lists, per axis, ``head``
    (size heads.q), ``batch`` (one per sequence/tree), ``token`` (packed like the KV,
    indexed by a position within its sequence) or a fixed positive size."""

    dims: tuple[Literal["head", "batch", "token"] | Annotated[Int, Field(ge=1)], ...]
    dtype: Literal["fp32", "fp16", "bf16", "int32", "int64"] = "fp32"

    @field_validator("dims")
    @classmethod
    def _not_empty(cls, dims: tuple[Any, ...]) -> tuple[Any, ...]:
        if not dims:
            raise ValueError("a tensor needs at least one dim")
        if "token" in dims and len(dims) > 1:
            raise ValueError("a per-token tensor has exactly one dim, ['token'] (packed like the KV)")
        return dims

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("fp", "bf"))


#: The tile sizes a spec that leaves ``tune.block_m`` / ``tune.block_n`` unset gets.
DEFAULT_BLOCKS = (128, 64)


class Tune(_Model):
    """Autotuner candidates. Every combination valid for the shapes is tried on a GPU;
    the interpreter uses the first valid one.

    ``block_m`` and ``block_n`` left unset (``null`` in the canonical form) are the
    family's default, :data:`DEFAULT_BLOCKS`; the tree family then also tries one narrow
    tile (``attngen.tree_ir.TREE_NARROW_TILE``). Only prefill tiles its queries:
    ``block_m`` on a decode or tree spec is an error (see :func:`_check_tune`)."""

    block_m: tuple[Annotated[Int, Field(ge=16, le=256)], ...] | None = None
    block_n: tuple[Annotated[Int, Field(ge=16, le=256)], ...] | None = None
    num_warps: tuple[Literal[1, 2, 4, 8, 16], ...] = (8, 4)
    num_stages: tuple[Annotated[Int, Field(ge=1, le=6)], ...] = (3, 4, 2)

    @field_validator("block_m", "block_n")
    @classmethod
    def _powers_of_two(cls, values: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if values is None:
            return None
        if not values:
            raise ValueError("needs at least one candidate")
        for v in values:
            if v & (v - 1):
                raise ValueError(f"{v} is not a power of two")
        return values


# ---------------------------------------------------------------------------------------


class Spec(_Model):
    """A validated attention variant. Build one with :func:`load_spec` or :func:`parse_spec`."""

    name: str
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
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", value):
            raise ValueError("must be a lower-case identifier (a-z, 0-9, _; starts with a letter)")
        return value

    @field_validator("head_dim", mode="before")
    @classmethod
    def _head_dim_short(cls, value: Any) -> Any:
        return {"qk": value, "v": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("topology", mode="before")
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


def _pydantic_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "literal[", "constrained-")):
            out += f".{part}" if out else str(part)
    return out


_FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "": tuple(Spec.model_fields),
    "heads": tuple(Heads.model_fields),
    "head_dim": tuple(HeadDim.model_fields),
    "topology": tuple(Topology.model_fields),
    "tune": tuple(Tune.model_fields),
}


def _translate(err: ValidationError) -> SpecError:
    """The first pydantic error as one SpecError paragraph."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = _pydantic_path(loc) or "spec"
    given = first.get("input")
    if first["type"] == "extra_forbidden":
        parent = _pydantic_path(loc[:-1])
        names = _FIELD_NAMES.get(parent, ())
        if parent.startswith("tensors."):
            names = tuple(TensorDecl.model_fields)
        return SpecError(path, "unknown field", allowed=", ".join(names) or None,
                         suggestion=did_you_mean(str(loc[-1]), names))
    if first["type"] == "missing":
        return SpecError(path, "is required")
    axis = loc.index("dims") + 1 if "dims" in loc else len(loc)
    if axis < len(loc) and isinstance(loc[axis], int):
        # one axis of a user tensor: pydantic would name only the union's first branch
        return SpecError(path, "is not a tensor dim", given=given,
                         allowed="head, batch, token, or a fixed size (an int >= 1)")
    msg = first["msg"].removeprefix("Value error, ")
    if isinstance(given, dict | list) and len(str(given)) > 80:
        given = None
    return SpecError(path, msg, given=given)


def parse_spec(data: Any, file: str | None = None) -> Spec:
    """Validate already-loaded YAML data into a :class:`Spec`."""
    try:
        if not isinstance(data, dict):
            raise SpecError("spec", "the top level must be a mapping", given=type(data).__name__)
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
        text = Path(path).read_text()
    except OSError as err:
        raise SpecError("", f"cannot read the spec: {err.strerror}", file=file) from None
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
