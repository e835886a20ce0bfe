"""attngen: a compiler for attention variants.

A YAML spec in, a specialized and verified Triton kernel module out::

    import attngen
    mod = attngen.load("specs/causal_prefill.yaml")
    out = mod.attention(q, k, v, cu_seqlens_q, cu_seqlens_k)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from types import ModuleType


def load(spec: Any) -> ModuleType:
    """Build (through the cache) and import the kernel module of a spec or spec path."""
    from attngen.runtime import load as _load

    return _load(spec)


__all__ = ["__version__", "load"]
