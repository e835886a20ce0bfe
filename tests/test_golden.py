"""Golden test: rendering specs/ reproduces generated/ byte for byte.

generated/ is checked in so that a reviewer sees the code a spec change produces. If
this fails after an intended change, run ``attngen build specs/*.yaml`` and commit the
diff of generated/ with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from attngen.render import generated_path, render_uncached
from attngen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.mark.parametrize("spec_file", SPECS, ids=[p.stem for p in SPECS])
def test_generated_module_is_current(spec_file: Path) -> None:
    spec = load_spec(spec_file)
    path = generated_path(spec, ROOT / "generated")
    assert path.is_file(), f"{path} is missing: run `attngen build specs/*.yaml`"
    assert path.read_text() == render_uncached(spec), (
        f"{path} is stale: run `attngen build specs/*.yaml` and commit generated/")


def test_every_generated_module_has_a_spec() -> None:
    names = {load_spec(p).name for p in SPECS}
    orphans = sorted(p.name for p in (ROOT / "generated").glob("*.py") if p.stem not in names)
    assert not orphans, f"generated/ holds modules no spec produces: {orphans}"


def test_rendering_is_deterministic() -> None:
    spec = load_spec(SPECS[0])
    assert render_uncached(spec) == render_uncached(spec)


@pytest.mark.parametrize("topology", [{"kind": "sequence", "queries": "prefill"},
                                      {"kind": "sequence", "queries": "decode"},
                                      {"kind": "tree", "queries": "node"}])
def test_any_description_renders_a_module_whose_docstrings_read_it_back(topology: dict[str, str]) -> None:
    """A description is free text: quotes that would close a docstring, backslashes that
    would start an escape (\\N{...} does not even parse) and several lines."""
    import ast

    from attngen.spec import parse_spec

    text = 'First """quoted""" line, a path C:\\new\\N{x}\nsecond line ending in a backslash \\'
    spec = parse_spec({"name": "odd_text", "description": text, "heads": {"q": 4, "kv": 2},
                       "head_dim": 64, "topology": topology})
    tree = ast.parse(render_uncached(spec))
    module_doc = ast.get_docstring(tree, clean=False)
    first, rest = text.split("\n")
    assert module_doc == f"odd_text: {first}\n\n{rest}\n"
    attention = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "attention")
    attention_doc = ast.get_docstring(attention)
    assert attention_doc is not None and attention_doc.startswith(text + "\n\n")


def test_a_one_line_description_is_said_once() -> None:
    spec = load_spec(ROOT / "specs" / "causal_prefill.yaml")
    head = render_uncached(spec).split('"""')[1]
    assert head == f"causal_prefill: {spec.description}"
