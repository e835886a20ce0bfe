"""Shared test helpers: the tolerance table (re-exported from :mod:`attngen.check`, its
one home), closeness assertions in float64, seeded fresh data, poisoning and packed
variable-length batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attngen.check import TOLERANCES, TORCH_DTYPES, Tolerance, compare

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
    return getattr(torch, TORCH_DTYPES.get(name, name))


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
    errors = compare(lse, ref)
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
