"""Shared test helpers: the tolerance table (re-exported from :mod:`attngen.check`, its
one home), closeness assertions in float64, seeded fresh data, poisoning and packed
variable-length batches."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from hypothesis import Phase

from attngen import reference
from attngen.check import TOLERANCES, Tolerance, compare, compare_lse
from attngen.peers import Shape
from attngen.spec import TORCH_DTYPE_NAMES, Spec, spec_from_mapping

__all__ = [
    "TOLERANCES",
    "Tolerance",
    "assert_close",
    "assert_lse_close",
    "fresh",
    "poisoned",
    "torch_dtype",
    "varlen_batch",
]


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, TORCH_DTYPE_NAMES.get(name, name))


def assert_close(out: Any, ref: Any, dtype: str, *, what: str = "O") -> None:
    """``out`` matches ``ref`` within the tolerance of ``dtype`` (relative ‖out−ref‖/‖ref‖
    and max-abs, computed in float64); NaN anywhere fails."""
    tol = TOLERANCES[dtype]
    errors = compare(out, ref)
    assert not errors.nan, f"{what}: NaN in output"
    assert not errors.inf_mismatch, f"{what}: -inf pattern differs from the reference"
    assert errors.within(tol.out_rel, tol.out_abs), (
        f"{what} ({dtype}): rel {errors.rel:.3e} (tol {tol.out_rel:g}), "
        f"max-abs {errors.max_abs:.3e} (tol {tol.out_abs:g})"
    )


def assert_lse_close(lse: Any, ref: Any, dtype: str) -> None:
    """LSE within the LSE tolerance; -inf exactly where the reference has -inf."""
    tol = TOLERANCES[dtype]
    errors = compare_lse(lse, ref)
    assert not errors.nan, "LSE: NaN in output"
    assert not errors.inf_mismatch, "LSE: -inf pattern differs from the reference"
    assert errors.within(tol.lse_rel, tol.lse_abs), (
        f"LSE ({dtype}): rel {errors.rel:.3e} (tol {tol.lse_rel:g}), max-abs {errors.max_abs:.3e} (tol {tol.lse_abs:g})"
    )


def fresh(
    *shape: int, dtype: str | torch.dtype = "fp32", seed: int = 0, device: str = "cpu"
) -> torch.Tensor:
    """N(0, 1) data (never zeros), seeded, in ``dtype`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    tdtype = dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=tdtype)


def poisoned(*shape: int, dtype: str | torch.dtype = "fp32", device: str = "cpu") -> torch.Tensor:
    """A NaN-filled buffer: anything a kernel leaves unwritten stays NaN."""
    tdtype = dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)
    return torch.full(shape, math.nan, dtype=tdtype, device=device)


def varlen_batch(
    q_lens: Sequence[int],
    kv_lens: Sequence[int] | None = None,
    *,
    heads: tuple[int, int] = (2, 1),
    head_dim: tuple[int, int] = (16, 16),
    dtype: str = "fp32",
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """A packed variable-length batch: q/k/v, int32 cu_seqlens and max lengths.

    ``kv_lens`` defaults to ``q_lens`` (plain prefill); each q_len must be <= its kv_len.
    """
    kv_lens = list(q_lens) if kv_lens is None else list(kv_lens)
    assert all(q <= kv for q, kv in zip(q_lens, kv_lens, strict=True)), "q_len must be <= kv_len"
    hq, hkv = heads
    dqk, dv = head_dim

    def offsets(lens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32, device=device)

    return {
        "q": fresh(sum(q_lens), hq, dqk, dtype=dtype, seed=seed, device=device),
        "k": fresh(sum(kv_lens), hkv, dqk, dtype=dtype, seed=seed + 1, device=device),
        "v": fresh(sum(kv_lens), hkv, dv, dtype=dtype, seed=seed + 2, device=device),
        "cu_seqlens_q": offsets(q_lens),
        "cu_seqlens_k": offsets(kv_lens),
        "max_seqlen_q": max(q_lens, default=0),
        "max_seqlen_k": max(kv_lens, default=0),
    }


# ---------------------------------------------------------------------------------------
# Small specs and masks shared by the peer and bench tests (CPU only).


def make_spec(mask: object, *, q: int = 4, kv: int = 2, tensors: dict | None = None,
              queries: str = "prefill", score_mod: str | None = None) -> Spec:
    data = {"name": "t", "heads": {"q": q, "kv": kv}, "head_dim": 32, "dtype": "fp16",
            "topology": {"kind": "sequence", "queries": queries}, "mask": mask,
            "tensors": tensors or {}}
    if score_mod:
        data["score_mod"] = score_mod
    return spec_from_mapping(data)


def reference_visible(spec: Spec, shape: Shape, tensors: dict, b: int) -> np.ndarray:
    """[Hq, q_len, kv_len] from attngen.reference (independent of the peers' evaluator)."""
    layout = {}
    for name, t in tensors.items():
        a = t.numpy()
        layout[name] = a[b] if "token" in spec.tensors[name].dims else a
    visible = reference.spec_terms(
        spec, q_pos=np.arange(shape.q_len) + shape.q_offset, kv_pos=np.arange(shape.kv_len),
        batch=b, q_len=shape.q_len, kv_len=shape.kv_len, tensors=layout).visible
    return np.asarray(visible)


#: The GPU property tests compile a kernel for each example, so shrinking a failure can
#: outlast a device call (session 47 lost its failing draw that way): there they report the
#: first failing draw as drawn, unless ATTNGEN_GPU_SHRINK=1.
GPU_PHASES = tuple(p for p in Phase if p is not Phase.shrink or os.environ.get("ATTNGEN_GPU_SHRINK") == "1")

MASKS = {
    "causal": ["causal"],
    "full": "full",
    "window": ["causal", {"window": {"left": 5, "right": 0}}],
    "window_two_sided": {"window": {"left": 3, "right": 2}},
    "window_sinks": ["causal", {"any": [{"window": 7}, {"sink": 2}]}],
    "prefix_len": {"prefix_lm": 6},
    "prefix_tensor": {"prefix_lm": "plen"},
    "document": ["causal", {"document": "doc"}],
    "not_sink": ["causal", {"not": {"sink": 3}}],
    "any_all": {"any": [{"all": ["causal", {"window": 2}]}, {"document": "doc"}]},
}
SHAPES = [Shape(3, 13, 13), Shape(2, 5, 17), Shape(2, 1, 11)]
TENSORS = {"plen": {"dims": ["batch"], "dtype": "int32"}, "doc": {"dims": ["token"], "dtype": "int32"}}


def mask_spec(name: str) -> Spec:
    """The spec of ``MASKS[name]``, declaring the tensors that mask uses."""
    mask = MASKS[name]
    used = {n: d for n, d in TENSORS.items() if f"'{n}'" in str(mask)}
    return make_spec(mask, tensors=used)
