"""Each kind of bad spec gives its documented one-paragraph error (file, field path, what
is allowed or meant) and a build writes nothing; the canonical form and hash are stable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attngen.errors import SpecError
from attngen.spec import Tune, load_spec, parse_spec

GOOD = """\
name: demo
heads: {q: 8, kv: 2}
head_dim: 64
dtype: fp16
mask: [causal]
"""


def _with(**changes: object) -> str:
    data = yaml.safe_load(GOOD)
    data.update(changes)
    return yaml.safe_dump(data, sort_keys=False)


#: (label, YAML text, substrings the one-paragraph error must contain)
BAD_SPECS: list[tuple[str, str, list[str]]] = [
    (
        "malformed YAML",
        "name: demo\nheads: {q: 8, kv: 2\nhead_dim: 64\n",
        ["malformed YAML", "line 3"],
    ),
    ("top level not a mapping", "- causal\n", ["top level must be a mapping", "given: 'list'"]),
    ("empty file", "", ["holds no spec (it is empty)", "allowed: a mapping with at least name"]),
    # \udce9 is written as the lone byte 0xe9 (see write_spec)
    ("not UTF-8", "name: caf\udce9\n", ["not UTF-8 text (byte 0xe9 at offset 9)"]),
    (
        "unknown top-level field",
        GOOD + "maks: [causal]\n",
        ["maks", "unknown field", "did you mean 'mask'"],
    ),
    (
        "unknown nested field",
        _with(heads={"q": 8, "kv": 2, "qq": 1}),
        ["heads.qq", "unknown field", "q, kv"],
    ),
    (
        "unknown tensor field",
        _with(tensors={"doc": {"dims": ["token"], "dtyp": "int32"}}),
        ["tensors.doc.dtyp", "did you mean 'dtype'"],
    ),
    (
        "unknown tensor dim",
        _with(tensors={"bias": {"dims": ["head", "wat"], "dtype": "fp32"}}),
        ["tensors.bias.dims[1]", "is not a tensor dim", "'wat'", "head, batch, token, or a fixed size"],
    ),
    (
        "zero-size tensor dim",
        _with(tensors={"bias": {"dims": [0], "dtype": "fp32"}}),
        ["tensors.bias.dims[0]", "given: 0", "an int >= 1"],
    ),
    ("wrong type", _with(heads={"q": "eight", "kv": 2}), ["heads.q", "integer", "'eight'"]),
    (
        "heads not divisible",
        _with(heads={"q": 8, "kv": 3}),
        ["heads", "must divide", "[1, 2, 4, 8]"],
    ),
    ("unsupported dtype", _with(dtype="fp8"), ["dtype", "'fp8'", "'fp16', 'bf16' or 'fp32'"]),
    (
        "unsupported head_dim",
        _with(head_dim=80),
        ["head_dim", "80", "[16, 32, 64, 96, 128, 192, 256]"],
    ),
    (
        "unknown mask rule",
        _with(mask=["casual"]),
        ["mask[0]", "unknown rule", "did you mean 'causal'"],
    ),
    (
        "unknown mask rule key",
        _with(mask=["causal", {"windw": {"left": 4}}]),
        ["mask[1].windw", "did you mean 'window'"],
    ),
    (
        "unknown window field",
        _with(mask=[{"window": {"left": 4, "rigth": 0}}]),
        ["mask[0].window.rigth", "left, right", "did you mean 'right'"],
    ),
    (
        "window out of range",
        _with(mask=[{"window": {"left": -3}}]),
        ["mask[0].window.left", "-3", ">= 0"],
    ),
    (
        "expression with an unknown name",
        _with(mask=["causal", {"expr": "kv_pos <= q_ps"}]),
        ["mask[1].expr", "unknown name 'q_ps'", "did you mean 'q_pos'"],
    ),
    (
        "disallowed call in a mask",
        _with(mask=[{"expr": "sin(kv_pos) > 0"}]),
        ["mask[0].expr", "'sin'"],
    ),
    ("disallowed call in score_mod", _with(score_mod="__import__('os')"), ["score_mod"]),
    ("division by zero", _with(score_mod="score / 0"), ["score_mod", "division by zero"]),
    (
        "floor division by zero",
        _with(mask=[{"expr": "kv_pos // 0 == 1"}]),
        ["mask[0].expr", "division by zero"],
    ),
    (
        "modulo by zero",
        _with(mask=[{"expr": "kv_pos % (3 - 3) == 1"}]),
        ["mask[0].expr", "by zero"],
    ),
    (
        "undeclared tensor in a rule",
        _with(mask=[{"document": "docs"}], tensors={"doc": {"dims": ["token"], "dtype": "int32"}}),
        ["mask[0].document", "undeclared tensor", "'docs'", "did you mean 'doc'"],
    ),
    (
        "undeclared tensor in score_mod",
        _with(score_mod="score + bias[head]"),
        ["score_mod", "'bias'"],
    ),
    (
        "tensor with the wrong dims",
        _with(mask=[{"document": "doc"}], tensors={"doc": {"dims": ["batch"], "dtype": "int32"}}),
        ["mask[0].document", "['token']"],
    ),
    (
        "score_mod that is a condition",
        _with(score_mod="score > 0"),
        ["score_mod", "expected a number"],
    ),
    (
        "mask expression that is a number",
        _with(mask=[{"expr": "kv_pos + 1"}]),
        ["mask[0].expr", "boolean"],
    ),
    (
        "reserved tensor name",
        _with(tensors={"score": {"dims": ["head"]}}),
        ["tensors.score", "not a usable"],
    ),
    (
        "queries that do not fit the topology",
        _with(topology={"kind": "sequence", "queries": "node"}),
        ["topology", "'node'", "prefill", "decode"],
    ),
    ("missing field", "heads: {q: 8, kv: 2}\nhead_dim: 64\n", ["name", "is required"]),
    (
        "misspelt required field",
        GOOD.replace("head_dim:", "headdim:"),
        ["headdim", "unknown field", "did you mean 'head_dim'"],
    ),
    (
        "misspelt required mapping",
        GOOD.replace("heads:", "head:"),
        ["head", "unknown field", "did you mean 'heads'"],
    ),
    (
        "misspelt required nested field",
        _with(head_dim={"qk": 192, "vv": 128}),
        ["head_dim.vv", "unknown field", "qk, v", "did you mean 'v'"],
    ),
    (
        "heads as a list",
        _with(heads=[32, 8]),
        ["heads", "given: [32, 8]", "allowed: a mapping {q: N, kv: M}"],
    ),
    (
        "head_dim as a string",
        _with(head_dim="128"),
        ["head_dim", "given: '128'", "an integer (one of [16, 32, 64, 96, 128, 192, 256]) or {qk: N, v: M}"],
    ),
    (
        "tile candidates as a scalar",
        _with(tune={"block_n": 64}),
        ["tune.block_n", "given: 64", "allowed: a list of candidates, e.g. [64, 128]"],
    ),
    ("null mask", _with(mask=None), ["mask", "given: null", "allowed: causal, full, window"]),
    (
        "paged KV on a sequence topology",
        _with(topology={"kind": "sequence", "kv_layout": "paged", "page_size": 16}),
        ["topology.kv_layout", "tree and shared_prefix", "given: 'paged'", "allowed: 'contiguous'"],
    ),
    (
        "misspelt dtype",
        _with(dtype="fp61"),
        ["dtype", "given: 'fp61'", "'fp16', 'bf16' or 'fp32'", "did you mean 'fp16'"],
    ),
    ("empty mask", _with(mask=[]), ["mask", "at least one rule"]),
    ("bad tile candidate", _with(tune={"block_m": [48]}), ["tune.block_m", "power of two"]),
    (
        "no tile candidates",
        _with(tune={"block_n": []}),
        ["tune.block_n", "needs at least one candidate", "given: []", "a list of candidates"],
    ),
    (
        "no warp candidates",
        _with(tune={"num_warps": []}),
        ["tune.num_warps", "needs at least one candidate", "given: []", "a list of candidates"],
    ),
    (
        "no stage candidates",
        _with(tune={"num_stages": []}),
        ["tune.num_stages", "needs at least one candidate", "given: []", "a list of candidates"],
    ),
    (
        "unsupported warp count",
        _with(tune={"num_warps": [3]}),
        ["tune.num_warps[0]", "given: 3", "[1, 2, 4, 8, 16]"],
    ),
    (
        "query tiles on a decode spec",
        _with(topology={"kind": "sequence", "queries": "decode"}, mask="full", tune={"block_m": [64]}),
        ["tune.block_m", "only for prefill", "[64]", "leave block_m out"],
    ),
    (
        "query tiles on a tree spec",
        _with(topology={"kind": "tree", "queries": "node"}, mask="full", tune={"block_m": [32]}),
        ["tune.block_m", "only for prefill", "the plan", "leave block_m out"],
    ),
]


def write_spec(path: Path, text: str) -> None:
    """``text`` as UTF-8, a lone surrogate (\udc80-\udcff) as the raw byte it stands for."""
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize(("label", "text", "expected"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_gives_its_error(
    tmp_path: Path, label: str, text: str, expected: list[str]
) -> None:
    path = tmp_path / "bad.yaml"
    write_spec(path, text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:"), message  # names the file first
    assert "\n" not in message and "Traceback" not in message, message
    for part in expected:
        assert part in message, f"{label}: {part!r} not in {message!r}"
    # pydantic's own words name its classes and leave out what is allowed
    assert "Input should" not in message and "instance of" not in message, message


@pytest.mark.parametrize(
    ("spec", "unknown", "meant"),
    [
        (GOOD.replace("head_dim:", "headdim:"), "headdim", "head_dim"),
        (GOOD.replace("heads:", "head:"), "head", "heads"),
        (_with(heads={"q": 8, "kvv": 2}), "heads.kvv", "kv"),
    ],
    ids=["headdim", "head", "kvv"],
)
def test_misspelt_required_field_names_the_unknown_key(spec: str, unknown: str, meant: str) -> None:
    """A required field spelt wrong is both missing and unknown; the unknown key, with its
    hint, is what the user can act on, not 'is required'."""
    with pytest.raises(SpecError) as caught:
        parse_spec(yaml.safe_load(spec))
    message = str(caught.value)
    assert message.startswith(f"{unknown}: unknown field"), message
    assert f"did you mean {meant!r}?" in message and "is required" not in message, message


def test_num_warps_accepts_powers_of_two_up_to_16() -> None:
    """The README's "1–16" is these five values; 3, 32 and YAML's true are refused."""
    for warps in (1, 2, 4, 8, 16):
        assert parse_spec(yaml.safe_load(_with(tune={"num_warps": [warps]}))).tune.num_warps == (warps,)
    for bad in (3, 32, 0, True, 4.0):
        with pytest.raises(SpecError, match=r"tune\.num_warps\[0\].*\[1, 2, 4, 8, 16\]"):
            parse_spec(yaml.safe_load(_with(tune={"num_warps": [bad]})))


#: Spec changes on which the JSON Schema and the validator must agree (accept or refuse).
SCHEMA_CASES: list[dict[str, object]] = [
    {},
    {"name": "My-Spec"},
    {"name": "a" * 64},
    {"name": "a" * 65},
    {"head_dim": 100},
    {"head_dim": 128},
    {"head_dim": {"qk": 192, "v": 100}},
    {"head_dim": {"qk": 192, "v": 128}},
    {"tune": {"num_warps": []}},
    {"tune": {"num_stages": []}},
    {"tune": {"num_warps": [3]}},
    {"tune": {"num_warps": [True]}},
    {"tune": {"block_n": [48]}},
    {"tune": {"block_n": [512]}},
    {"tune": {"block_n": [16, 256]}},
    {"tensors": {"bias": {"dims": []}}},
    {"topology": "tree", "mask": "full"},
]


@pytest.mark.parametrize("change", SCHEMA_CASES, ids=[str(c) for c in SCHEMA_CASES])
def test_json_schema_agrees_with_the_validator(change: dict[str, object]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from attngen.spec import Spec

    data = {**yaml.safe_load(GOOD), **change}
    try:
        parse_spec(data)
        valid = True
    except SpecError:
        valid = False
    schema_errors = list(jsonschema.Draft202012Validator(Spec.model_json_schema()).iter_errors(data))
    assert (not schema_errors) == valid, (valid, [e.message for e in schema_errors])


@pytest.mark.parametrize(
    ("label", "text", "expected"), BAD_SPECS[::4], ids=[b[0] for b in BAD_SPECS[::4]]
)
def test_bad_spec_builds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], label: str, text: str, expected: list[str]
) -> None:
    cli = pytest.importorskip("attngen.cli")
    good, bad, out = tmp_path / "good.yaml", tmp_path / "bad.yaml", tmp_path / "out"
    good.write_text(GOOD)
    write_spec(bad, text)
    assert cli.main(["build", str(good), str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err, err  # one paragraph naming the file
    assert not out.exists() or not any(out.iterdir()), "a failed build left files behind"


def test_render_build_refuses_nothing_valid_and_writes_atomically(tmp_path: Path) -> None:
    render = pytest.importorskip("attngen.render")
    spec = parse_spec(yaml.safe_load(GOOD))
    first = render.build(spec, tmp_path)
    again = render.build(spec, tmp_path)
    assert first.changed and not again.changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.py"]  # no temp files left


def test_boolean_is_not_an_integer() -> None:
    """YAML ``true`` is not a head count (pydantic's lax mode would read it as 1)."""
    with pytest.raises(SpecError, match=r"heads\.q"):
        parse_spec({"name": "b", "heads": {"q": True, "kv": 1}, "head_dim": 64})


def test_duplicate_yaml_keys_are_an_error(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys silently; a spec should say so."""
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nname: b\nheads: {q: 8, kv: 2}\nhead_dim: 64\n")
    with pytest.raises(SpecError, match="name"):
        load_spec(path)


# ---------------------------------------------------------------------------------------
# Canonical form and content hash


def test_hash_is_stable_under_key_order_and_defaults() -> None:
    short = parse_spec(yaml.safe_load(GOOD))
    spelled_out = parse_spec(
        {
            "mask": ["causal"],
            "topology": {"queries": "prefill", "kind": "sequence", "kv_layout": "contiguous"},
            "dtype": "fp16",
            "head_dim": {"v": 64, "qk": 64},
            "heads": {"kv": 2, "q": 8},
            "scale": None,
            "tensors": {},
            "name": "demo",
            "description": "",
            # the defaults, spelled out in reverse key order (null: the family's tiles)
            "tune": {k: v and list(v) for k, v in reversed(Tune().model_dump().items())},
        }
    )
    assert short == spelled_out
    assert short.content_hash == spelled_out.content_hash
    assert short.canonical() == spelled_out.canonical()


def test_canonical_yaml_round_trips() -> None:
    spec = parse_spec(
        {
            **yaml.safe_load(GOOD),
            "mask": ["causal", {"window": 8}, {"any": [{"sink": 4}, "full"]}],
            "score_mod": "30 * tanh(score / 30)",
        }
    )
    again = parse_spec(yaml.safe_load(spec.canonical_yaml()))
    assert again == spec and again.content_hash == spec.content_hash


def test_hash_changes_with_meaning() -> None:
    base = yaml.safe_load(GOOD)
    hashes = {
        parse_spec({**base, **change}).content_hash
        for change in (
            {},
            {"dtype": "bf16"},
            {"mask": [{"window": 8}]},
            {"score_mod": "score / 0.7"},
            {"scale": 0.5},
            {"heads": {"q": 8, "kv": 8}},
        )
    }
    assert len(hashes) == 6


def test_tiles_left_to_the_family_hash_apart_from_spelled_out_ones() -> None:
    """A tree spec that leaves block_n unset also tries the narrow tile; one that spells
    out the same list does not. The two build different modules, so they must not share
    a hash (the render cache is keyed by it)."""
    from attngen.tree_ir import TREE_NARROW_TILE, tree_configs

    tree = {**yaml.safe_load(GOOD), "mask": "full", "topology": {"kind": "tree", "queries": "node"}}
    unset = parse_spec(tree)
    spelled = parse_spec({**tree, "tune": {"block_n": [128, 64]}})
    assert TREE_NARROW_TILE in tree_configs(unset) and TREE_NARROW_TILE not in tree_configs(spelled)
    assert unset.content_hash != spelled.content_hash
    assert unset.canonical()["tune"]["block_n"] is None
    again = parse_spec(yaml.safe_load(unset.canonical_yaml()))
    assert tree_configs(again) == tree_configs(unset) and again.content_hash == unset.content_hash


# -- what a topology fixes: q_len is 1 in a tree or a decode, ... -----------------------

TREE = {"kind": "tree", "queries": "token"}
DECODE = {"kind": "sequence", "queries": "decode"}


def _expression_spec(topology: dict[str, str], field: str, text: str) -> dict[str, object]:
    data: dict[str, object] = {**yaml.safe_load(GOOD), "topology": topology}
    if field == "mask":
        data["mask"] = [{"expr": text}]
    else:
        data["score_mod"] = text
    return data


@pytest.mark.parametrize(
    ("topology", "field", "text", "message"),
    [
        # the audit's case: the build once said "cannot print infinity; substitute a bound"
        (
            TREE, "score_mod", "score + log(q_len - 1)",
            "score_mod: in a tree spec q_len is 1 (each query is one token), so "
            "'log(q_len - 1)' is log(0) = -inf at column 9 (given: 'score + log(q_len - 1)')",
        ),
        (
            TREE, "score_mod", "score / (q_len - 1)",
            "score_mod: in a tree spec q_len is 1 (each query is one token), so "
            "'score / (q_len - 1)' is score / 0, a division by zero at column 1",
        ),
        # sympy's Mod raised ZeroDivisionError from inside the tree lowering
        (
            TREE, "mask", "kv_pos % (q_len - 1) == 0",
            "mask[0].expr: in a tree spec q_len is 1 (each query is one token), so "
            "'kv_pos % (q_len - 1)' is kv_pos % 0, a modulo by zero at column 1",
        ),
        (
            TREE, "score_mod", "score + kv_pos // (q_len - 1)",
            "so 'kv_pos // (q_len - 1)' is kv_pos // 0, a division by zero at column 9",
        ),
        (
            TREE, "score_mod", "score + 1 / (kv_len - q_pos - 1)",
            "in a tree spec kv_len is q_pos + 1 (the tokens on the query's root path), so "
            "'1 / (kv_len - q_pos - 1)' is 1 / 0, a division by zero at column 9",
        ),
        (
            TREE, "score_mod", "score + (q_len - 1) ** -1",
            "so '(q_len - 1) ** -1' is 0 ** -1, a division by zero",
        ),
        (
            TREE, "score_mod", "score + sqrt(q_len - 2)",
            "so 'sqrt(q_len - 2)' is sqrt(-1), which is not a real number at column 9",
        ),
        (
            TREE, "score_mod", "score + exp(q_len * 100)",
            "so 'exp(q_len * 100)' is exp(100), which is beyond float32's range at column 9",
        ),
        # 'and' does not spare it: sympy evaluates both sides, as the tree lowering does
        (
            TREE, "mask", "q_len > 1 and kv_pos % (q_len - 1) == 0",
            "so 'kv_pos % (q_len - 1)' is kv_pos % 0, a modulo by zero at column 15",
        ),
        (
            {"kind": "shared_prefix", "queries": "node"}, "score_mod", "score + log(q_len - 1)",
            "in a shared_prefix spec q_len is 1",
        ),
        # a decode query is its sequence's last token (the kernel sets q_len = 1)
        (
            DECODE, "score_mod", "score / (q_len - 1)",
            "score_mod: in a decode spec q_len is 1 (one query per sequence), so "
            "'score / (q_len - 1)' is score / 0, a division by zero at column 1",
        ),
        (
            DECODE, "score_mod", "score + log(kv_len - q_pos - 1)",
            "in a decode spec q_pos is kv_len - 1 (the query is its sequence's last token), "
            "so 'log(kv_len - q_pos - 1)' is log(0) = -inf at column 9",
        ),
        # zoo > 0 is no comparison to sympy: once a TypeError from inside the parser
        (
            DECODE, "mask", "kv_pos <= q_pos and 1 / (kv_len - q_pos - 1) > 0",
            "so '1 / (kv_len - q_pos - 1)' is 1 / 0, a division by zero at column 21",
        ),
    ],
)
def test_an_expression_must_be_defined_with_what_its_topology_fixes(
    topology: dict[str, str], field: str, text: str, message: str
) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(_expression_spec(topology, field, text), file="t.yaml")
    error = str(caught.value)
    assert error.startswith("t.yaml: ") and message in error, error
    assert "allowed: expressions defined for every query this topology has" in error
    assert "\n" not in error and "qk" not in error and "1.44" not in error


@pytest.mark.parametrize(
    ("topology", "field", "text"),
    [
        (TREE, "score_mod", "score + where(q_len > 1, log(q_len - 1), 0)"),
        (TREE, "score_mod", "score + where(q_len > 1, 1 / (q_len - 1), 0)"),
        (TREE, "score_mod", "score + kv_pos % max(q_len - 1, 1)"),
        (TREE, "score_mod", "score + log(kv_len - q_pos)"),
        (TREE, "mask", "kv_pos % max(q_len - 1, 1) == 0"),
        (DECODE, "mask", "kv_pos % q_len == 0"),
        (DECODE, "score_mod", "score + tanh(q_len)"),
        # prefill fixes nothing: q_len - 1 is 0 only where a batch has one query
        ({"kind": "sequence", "queries": "prefill"}, "score_mod", "score + log(q_len - 1)"),
    ],
)
def test_an_expression_defined_with_what_its_topology_fixes_is_accepted(
    topology: dict[str, str], field: str, text: str
) -> None:
    parse_spec(_expression_spec(topology, field, text))


def test_the_fixed_values_are_those_the_kernels_use() -> None:
    """What the check substitutes is what the decode kernel sets (the tree lowering
    substitutes TREE_FIXED itself; the template writes its own, kept equal here)."""
    from attngen.render import templates_root
    from attngen.symbols import DECODE_FIXED, kv_len, q_len, q_pos

    assert dict(DECODE_FIXED.values) == {q_len: 1, q_pos: kv_len - 1}
    decode = templates_root().joinpath("sequence_decode.py.j2").read_text()
    for line in ("q_len = 1", "q_lo = kv_len - 1", "q_pos = q_lo"):
        assert f"    {line}\n" in decode, line


BRIEF_SPECS = {
    "integer constant": (
        "name: c\nheads: {q: 4, kv: 4}\nhead_dim: 64\ndtype: fp16\n"
        "topology: {kind: sequence, queries: prefill}\n"
        'mask:\n  - expr: "q_pos < kv_pos + 100000000000000000000"\n',
        "mask[0].expr: the constant '100000000000000000000' is out of the integer range at "
        "column 18 (given: 'q_pos < kv_pos + 100000000000000000000'). allowed: whole "
        "constants from -1073741824 to 1073741824 (2**30)",
    ),
    "tree q_len": (
        "name: t\nheads: {q: 4, kv: 4}\nhead_dim: 64\ndtype: fp16\n"
        "topology: {kind: tree, queries: token}\nscore_mod: score + log(q_len - 1)\n",
        "score_mod: in a tree spec q_len is 1 (each query is one token), so 'log(q_len - 1)' "
        "is log(0) = -inf at column 9",
    ),
}


@pytest.mark.parametrize("label", sorted(BRIEF_SPECS))
def test_an_expression_the_kernels_cannot_compute_stops_the_build_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], label: str
) -> None:
    """Once built, then failed in every check case (the constant) or at the build with
    'cannot print infinity' (the tree): now exit 2, one line naming file and field, and
    nothing written."""
    cli = pytest.importorskip("attngen.cli")
    text, message = BRIEF_SPECS[label]
    good, bad, out = tmp_path / "good.yaml", tmp_path / "bad.yaml", tmp_path / "out"
    good.write_text(GOOD)
    bad.write_text(text)
    assert cli.main(["build", str(good), str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: {message}" in err, err
    assert not out.exists() or not any(out.iterdir()), "a failed build left files behind"
