"""Bad launch arguments of generated sequence modules: a LaunchError naming the problem,
raised before anything is launched (the output buffer stays untouched)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import attngen
from attngen.errors import LaunchError
from attngen.spec import parse_spec

CONFIG = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)


def _spec(queries: str) -> Any:
    return parse_spec({
        "name": f"launch_{queries}", "heads": {"q": 4, "kv": 2}, "head_dim": 16, "dtype": "fp16",
        "topology": {"kind": "sequence", "queries": queries},
        "tensors": {"slopes": {"dims": ["head"], "dtype": "fp32"}},
        "mask": ["causal"], "score_mod": "score - slopes[head] * abs(q_pos - kv_pos)",
    })


@pytest.fixture(scope="module")
def prefill() -> Any:
    return attngen.load(_spec("prefill"))


@pytest.fixture(scope="module")
def decode() -> Any:
    return attngen.load(_spec("decode"))


def _inputs() -> dict[str, Any]:
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    return dict(
        q=torch.randn(12, 4, 16, dtype=torch.float16),
        k=torch.randn(12, 2, 16, dtype=torch.float16),
        v=torch.randn(12, 2, 16, dtype=torch.float16),
        cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), slopes=torch.rand(4),
    )


BAD_PREFILL: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "q dtype": (lambda a: a.update(q=a["q"].float()), "q must be torch.float16"),
    "k heads": (lambda a: a.update(k=torch.randn(12, 4, 16, dtype=torch.float16)), "k must be [*, 2, 16]"),
    "v tokens": (lambda a: a.update(v=a["v"][:7]), "k and v must hold the same tokens"),
    "q dims": (lambda a: a.update(q=a["q"][:, :, None]), "q must have 3 dims"),
    "offsets dtype": (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"].long()), "cu_seqlens_k must be an int32 vector"),
    "offsets count": (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32)), "cu_seqlens_k has 2 entries"),
    "q longer than kv": (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 3, 12], dtype=torch.int32)), "q_len <= kv_len"),
    "missing tensor": (lambda a: a.update(slopes=None), "tensor 'slopes' is required"),
    "tensor shape": (lambda a: a.update(slopes=torch.rand(2)), "tensor 'slopes' must have shape (4,)"),
    "tensor dtype": (lambda a: a.update(slopes=torch.rand(4, dtype=torch.float64)), "tensor 'slopes' must be torch.float32"),
    "device": (lambda a: a.update(k=a["k"].to("meta")), "k is on meta"),
}


@pytest.mark.parametrize("case", sorted(BAD_PREFILL))
def test_prefill_rejects(prefill: Any, case: str) -> None:
    args = _inputs()
    spoil, message = BAD_PREFILL[case]
    spoil(args)
    out = torch.full((12, 4, 16), 7.0, dtype=torch.float16)
    with pytest.raises(LaunchError, match=message.replace("[", r"\[").replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        prefill.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"),
                          args.pop("cu_seqlens_k"), out=out, config=CONFIG, **args)
    assert bool((out == 7.0).all()), "nothing may be written before the error"


def test_decode_rejects_wrong_batch(decode: Any) -> None:
    q = torch.randn(3, 4, 16, dtype=torch.float16)
    k = torch.randn(12, 2, 16, dtype=torch.float16)
    with pytest.raises(LaunchError, match="cu_seqlens_k has 3 entries; expected batch"):
        decode.attention(q, k, k.clone(), torch.tensor([0, 5, 12], dtype=torch.int32),
                         config=CONFIG, slopes=torch.rand(4))


@pytest.mark.parametrize("family", ["prefill", "decode"])
def test_cpu_tensors_outside_the_interpreter_are_refused(
    family: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU tensors run only under Triton's interpreter; without it the call says so
    before anything is launched, not from deep inside the autotuner's CUDA timer."""
    module = request.getfixturevalue(family)
    monkeypatch.setattr(module, "_INTERPRET", False)
    args = _inputs()
    out = torch.full((12, 4, 16), 7.0, dtype=torch.float16)
    q, k, v, cu_q, cu_k = (args.pop(name) for name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"))
    lengths: tuple[torch.Tensor, ...] = (cu_q, cu_k)
    if family == "decode":
        q, out, lengths = q[:2], out[:2], (cu_k,)
    with pytest.raises(LaunchError, match=r"q is on cpu; these kernels run on a CUDA GPU, or on CPU tensors under "
                                          r"Triton's interpreter \(TRITON_INTERPRET=1"):
        module.attention(q, k, v, *lengths, out=out, **args)
    assert bool((out == 7.0).all()), "nothing may be written before the error"


def test_bad_config(prefill: Any) -> None:
    args = _inputs()
    with pytest.raises(LaunchError, match="block_m=1 must be a power of two"):
        prefill.attention(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                          config=dict(CONFIG, block_m=1), slopes=args["slopes"])


def test_good_call_runs(prefill: Any) -> None:
    args = _inputs()
    out = prefill.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"),
                            args.pop("cu_seqlens_k"), config=CONFIG, **args)
    assert out.shape == (12, 4, 16) and not out.isnan().any()


@pytest.mark.parametrize("block", [24, 8])
def test_block_sizes_must_be_powers_of_two(prefill: Any, block: int) -> None:
    args = _inputs()
    with pytest.raises(LaunchError, match=f"block_n={block} must be a power of two"):
        prefill.attention(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                          config=dict(CONFIG, block_n=block), slopes=args["slopes"])


def test_unaligned_kv_falls_back_to_pointer_loads(prefill: Any) -> None:
    """A contiguous K/V view that starts off a 16-byte boundary cannot be read by the
    tensor-memory engine; the kernel must still be right (pointer loads)."""
    args = _inputs()
    big_k = torch.randn(12 * 2 * 16 + 1, dtype=torch.float16)
    big_v = torch.randn(12 * 2 * 16 + 1, dtype=torch.float16)
    k = big_k[1:].view(12, 2, 16).copy_(args["k"])
    v = big_v[1:].view(12, 2, 16).copy_(args["v"])
    assert k.data_ptr() % 16 != 0
    _, _, use_tma = prefill._kv_descriptors(k, v, 16)
    assert not use_tma
    ref = prefill.attention(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                            config=CONFIG, slopes=args["slopes"])
    out = prefill.attention(args["q"], k, v, args["cu_seqlens_q"], args["cu_seqlens_k"],
                            config=CONFIG, slopes=args["slopes"])
    torch.testing.assert_close(out, ref)


def test_tensors_past_32_bit_offsets_are_refused(prefill: Any) -> None:
    args = _inputs()
    huge = torch.empty(2**31 // 32 + 1, 2, 16, dtype=torch.float16, device="meta")
    with pytest.raises(LaunchError, match="fewer than 2\\*\\*31"):
        prefill.attention(args["q"].to("meta"), huge, huge, args["cu_seqlens_q"].to("meta"),
                          args["cu_seqlens_k"].to("meta"), config=CONFIG, slopes=args["slopes"].to("meta"))
