"""Load generated modules and hand them to callers.

``load(spec)`` imports the module straight from its file in the content-addressed
cache (rendered there on first use), so two specs never share a module and an
unchanged spec is imported once per process.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from attngen.render import cache_key, cached_source
from attngen.spec import Spec, load_spec

_LOADED: dict[str, ModuleType] = {}


def as_spec(spec: Spec | str | Path) -> Spec:
    return spec if isinstance(spec, Spec) else load_spec(spec)


def load(spec: Spec | str | Path) -> Any:
    """Import the generated kernel module of ``spec`` (a Spec or a path to its YAML)."""
    spec = as_spec(spec)
    key = cache_key(spec)
    if key in _LOADED:
        return _LOADED[key]
    module = import_path(cached_source(spec), f"attngen_generated.{spec.name}_{key}")
    _LOADED[key] = module
    return module


def import_path(path: Path, module_name: str) -> ModuleType:
    """Import a Python file as a module. Triton's JIT reads kernel source through
    ``inspect``, so the module must come from a real file on disk."""
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    loader_spec.loader.exec_module(module)
    return module
