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
