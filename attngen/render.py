"""Render: KernelIR -> Python source, and writing it to disk.

One Jinja environment (StrictUndefined: a typo in a template is an error, never an empty
string). Output is byte-deterministic for a spec and attngen version; files are written
atomically and only when their content changes; a content-addressed cache skips the
lowering and rendering of specs seen before.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import jinja2

from attngen import __version__
from attngen.spec import Spec

TEMPLATE_PACKAGE = "attngen.templates"


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def templates_root() -> Traversable:
    """The templates: package data when attngen is installed, else the source tree's
    ``templates/`` (running from a checkout without installing)."""
    try:
        return resources.files(TEMPLATE_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "templates"


def _template_source(name: str) -> str:
    return templates_root().joinpath(name).read_text()


@cache
def templates_digest() -> str:
    """Hash of every template: part of the cache key, so editing one invalidates it."""
    h = hashlib.sha256()
    root = templates_root()
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".j2"):
            h.update(entry.name.encode())
            h.update(entry.read_bytes())
    return h.hexdigest()


def family_template(spec: Spec) -> str:
    return {"sequence": "sequence.py.j2", "tree": "tree.py.j2", "shared_prefix": "tree.py.j2"}[spec.topology.kind]


def cache_key(spec: Spec) -> str:
    h = hashlib.sha256()
    for part in (__version__, templates_digest(), _compiler_digest(), spec.content_hash, spec.name):
        h.update(part.encode())
    return h.hexdigest()[:24]


@cache
def _compiler_digest() -> str:
    """Hash of attngen's own lowering code: a change in it must not reuse old output."""
    h = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("ATTNGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "attngen")
    return Path(root)


def cached_source(spec: Spec) -> Path:
    """The cache file that holds ``spec``'s module source, rendered into it when missing.
    One file serves both reading the source and importing the module (Triton's JIT reads
    kernel source through ``inspect``, so an imported module must be a real file)."""
    path = cache_dir() / f"attngen_{spec.name}_{cache_key(spec)}.py"
    if not path.is_file():
        write_atomic(path, render_uncached(spec))
    return path


def render(spec: Spec) -> str:
    """The generated module's source for ``spec`` (through the cache)."""
    try:
        return cached_source(spec).read_text()
    except OSError:  # a read-only cache costs time, not correctness
        return render_uncached(spec)


def render_uncached(spec: Spec) -> str:
    ir: object
    if spec.topology.kind == "sequence":
        from attngen.ir import lower

        ir = lower(spec)
    else:
        from attngen.tree_ir import lower_tree

        ir = lower_tree(spec)
    source = environment().get_template(family_template(spec)).render(ir=ir)
    try:  # a module that does not parse is never written or cached
        ast.parse(source)
    except SyntaxError as err:
        raise RuntimeError(f"attngen bug: the module rendered for spec {spec.name!r} does not parse "
                           f"(line {err.lineno}: {err.msg}); nothing was written") from err
    return source


def new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave ``path`` with: an existing file keeps its
    own, a new one gets 0o666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def replacing(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` (named to end in ``suffix``) for the block to
    write; when the block ends it is renamed onto ``path``, so a reader sees the old file
    or the new one, never half of one, with the mode ``open(path, "w")`` would give (not
    mkstemp's 0o600). If the block raises, the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, content: str | bytes) -> bool:
    """Write ``content`` (text as UTF-8) to ``path`` through a temporary file and a
    rename; return whether the content changed (an unchanged file is left untouched)."""
    data = content.encode() if isinstance(content, str) else content
    if path.is_file() and path.read_bytes() == data:
        return False
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return True


@dataclass(frozen=True, slots=True)
class BuildResult:
    spec: Spec
    path: Path
    changed: bool
    stale: bool


def generated_path(spec: Spec, out_dir: Path | str) -> Path:
    return Path(out_dir) / f"{spec.name}.py"


def build(spec: Spec, out_dir: Path | str = "generated", *, check: bool = False) -> BuildResult:
    """Render ``spec`` into ``out_dir/<name>.py``. With ``check``, write nothing and
    report whether the file is missing or differs (stale)."""
    path = generated_path(spec, out_dir)
    source = render(spec)
    current = path.read_bytes() if path.is_file() else None
    stale = current != source.encode()
    if check:
        return BuildResult(spec, path, changed=False, stale=stale)
    changed = write_atomic(path, source) if stale else False
    return BuildResult(spec, path, changed=changed, stale=False)
