"""Generated kernels against the float64 reference, as properties.

Hypothesis draws a spec from the grammar (masks combined with all/any/not, score mods,
GQA ratios, head dims), shapes (lengths 0, 1 and non-multiples of the tile; chunked
prefill), data and a launch config valid for the shapes; the kernel is loaded through
``attngen.runtime.load`` and compared with ``sequence_reference`` at the shared
per-dtype tolerances. The output buffer is poisoned with NaN first, so unwritten rows
fail. The interpreter class and the GPU class are the same tests with one flag flipped.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from helpers import GPU_PHASES, assert_close, assert_lse_close, fresh, torch_dtype, varlen_batch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from strategies import GPU_HEAD_DIMS, INTERPRETER_HEAD_DIMS, SpecCase, configs, shapes, spec_cases

from attngen.check import (
    SURE_FIT_TILE_BYTES,
    Shape,
    kv_tile_bytes,
    launch,
    make_inputs,
    poisoned_out,
)
from attngen.errors import LaunchError
from attngen.reference import sequence_reference, spec_terms
from attngen.spec import Spec, parse_spec

runtime = pytest.importorskip(
    "attngen.runtime", reason="attngen.runtime (the lead's) is not there yet"
)

SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def run_and_compare(
    spec: Spec, shape: Shape, config: dict[str, int] | None, *, seed: int, device: str
) -> None:
    module = runtime.load(spec)
    inputs = make_inputs(spec, shape, seed=seed, device=device)
    out = poisoned_out(spec, inputs)
    try:
        got, lse = launch(module, inputs, out=out, config=config)
    except LaunchError as err:
        # a tile the GPU's shared memory cannot hold is refused, by name; only big tiles may be
        assert config is not None and "shared memory" in str(err), err
        assert kv_tile_bytes(spec, config["block_n"]) > SURE_FIT_TILE_BYTES, err
        reject()
    assert got.data_ptr() == out.data_ptr(), "the kernel did not write into `out`"
    assert got.dtype == inputs.q.dtype and lse.dtype == torch.float32
    ref_o, ref_lse, _ = sequence_reference(
        spec, inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k, inputs.tensors
    )
    assert not torch.isnan(got).any(), (
        "NaN left in the poisoned output (rows not written, or NaN produced)"
    )
    assert_close(got, ref_o, spec.dtype)
    assert_lse_close(lse, ref_lse, spec.dtype)


class KernelProperties:
    """The property tests; subclasses pick the device, dtypes, sizes and example counts."""

    device: ClassVar[str]
    dtypes: ClassVar[tuple[str, ...]]
    head_dims: ClassVar[tuple[int, ...]]
    blocks: ClassVar[tuple[int, ...]]
    max_len: ClassVar[int]
    max_batch: ClassVar[int]

    def check(self, case: SpecCase, data: st.DataObject) -> None:
        decode = case.spec.topology.queries == "decode"
        shape = data.draw(
            shapes(decode=decode, max_len=self.max_len, max_batch=self.max_batch), label="shape"
        )
        config = data.draw(configs(shape, blocks=self.blocks), label="config")
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        run_and_compare(case.spec, shape, config, seed=seed, device=self.device)


@pytest.mark.interpreter
class TestKernelsInterpreter(KernelProperties):
    device = "cpu"
    dtypes = ("fp16", "fp32")  # bf16 tl.dot is wrong under the interpreter (Triton issue 11584)
    head_dims = INTERPRETER_HEAD_DIMS
    blocks = (16, 32)
    max_len = 40
    max_batch = 3

    @settings(max_examples=150, **SETTINGS)  # type: ignore[arg-type]
    @given(
        case=spec_cases(dtypes=dtypes, queries=("prefill",), head_dims=head_dims), data=st.data()
    )
    def test_prefill_matches_reference(self, case: SpecCase, data: st.DataObject) -> None:
        self.check(case, data)

    @settings(max_examples=120, **SETTINGS)  # type: ignore[arg-type]
    @given(case=spec_cases(dtypes=dtypes, queries=("decode",), head_dims=head_dims), data=st.data())
    def test_decode_matches_reference(self, case: SpecCase, data: st.DataObject) -> None:
        self.check(case, data)


#: Each GPU example compiles a new kernel (seconds); a session with little device time
#: can lower this through the environment.
GPU_EXAMPLES = int(os.environ.get("ATTNGEN_GPU_EXAMPLES", "100"))


@pytest.mark.gpu
class TestKernelsGPU(KernelProperties):
    device = "cuda"
    dtypes = ("fp16", "bf16", "fp32")
    head_dims = GPU_HEAD_DIMS
    blocks = (32, 64, 128)
    max_len = 700
    max_batch = 6

    @settings(max_examples=GPU_EXAMPLES, phases=GPU_PHASES, **SETTINGS)  # type: ignore[arg-type]
    @given(
        case=spec_cases(
            dtypes=dtypes,
            queries=("prefill",),
            head_dims=head_dims,
            max_kv_heads=4,
            groups=(1, 2, 4, 8),
        ),
        data=st.data(),
    )
    def test_prefill_matches_reference(self, case: SpecCase, data: st.DataObject) -> None:
        self.check(case, data)

    @settings(max_examples=GPU_EXAMPLES, phases=GPU_PHASES, **SETTINGS)  # type: ignore[arg-type]
    @given(
        case=spec_cases(
            dtypes=dtypes,
            queries=("decode",),
            head_dims=head_dims,
            max_kv_heads=4,
            groups=(1, 2, 4, 8),
        ),
        data=st.data(),
    )
    def test_decode_matches_reference(self, case: SpecCase, data: st.DataObject) -> None:
        self.check(case, data)


@pytest.mark.gpu
def test_a_tile_too_big_for_shared_memory_is_refused_by_name() -> None:
    """fp32 with head dim 256 and 128 keys a tile: 256 KiB of K and V, more than an H200's
    227 KiB of shared memory. The caller's config is named, not a compiler traceback.
    (Every family launches a caller's config through the same helper; decode stands for
    them: the compile that fails takes about a minute.)"""
    spec = parse_spec({"name": "too_big", "heads": {"q": 2, "kv": 1}, "head_dim": 256,
                       "dtype": "fp32", "mask": "causal", "topology": {"queries": "decode"}})
    inputs = make_inputs(spec, Shape(((1, 300),), decode=True), seed=3, device="cuda")
    config = {"block_n": 128, "num_warps": 4, "num_stages": 1, "num_splits": 2}
    with pytest.raises(LaunchError, match=r"too_big: config \(.*block_n=128.*\) needs more shared memory than this GPU has \(\d+ against \d+\)"):
        launch(runtime.load(spec), inputs, out=poisoned_out(spec, inputs), config=config)


@pytest.mark.parametrize(("queries", "tile"), [("decode", ("block_n",)), ("prefill", ("block_m", "block_n"))])
def test_a_refused_tile_names_only_the_knobs_the_kernel_takes(queries: str, tile: tuple[str, ...]) -> None:
    """The refusal names the config's tile knobs the kernel was given (decode's rows are
    its own, not the caller's block_m), and what the GPU lacked. Triton's refusal is
    stood in for, since only a GPU raises it."""
    from triton.runtime.errors import OutOfResources

    launched: dict[str, Any] = {}

    class Refusing:
        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            def run(*args: Any, **consts: Any) -> None:
                launched.update(consts)
                raise OutOfResources(278528, 232448, "shared memory")

            return run

    spec = parse_spec({"name": "refused", "heads": {"q": 2, "kv": 1}, "head_dim": 64, "dtype": "fp16",
                       "mask": "causal", "topology": {"queries": queries}})
    config = {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3}
    with pytest.raises(LaunchError) as err:
        runtime.load(spec)._launch_tile(Refusing(), (1,), (), {"GROUP": 2}, config, tile)
    shown = ", ".join(f"{key}={config[key]}" for key in (*tile, "num_warps", "num_stages"))
    assert str(err.value) == (f"refused: config ({shown}) needs more shared memory than this GPU has "
                              f"(278528 against 232448): use a smaller {', '.join(tile)} or num_stages")
    assert launched == {"GROUP": 2, **{key.upper(): config[key] for key in tile}, "num_warps": 4, "num_stages": 3}


def test_a_tile_ptxas_fails_on_is_refused_by_name() -> None:
    """Triton 3.6's ptxas 12.8 crashed on some prefill tiles (session 52,
    docs/benchmarks/HISTORY.md). A caller's tile that ptxas fails on is named, with ptxas's
    first line, and the way out (the autotuner skips such tiles); ``attngen check``
    recognizes the refusal and runs the case again at the autotuner's choice. Triton's error
    is stood in for (no ptxas here)."""
    from triton.runtime.errors import PTXASError

    from attngen.check import PTXAS_REFUSED

    crash = PTXASError("`ptxas` failed with error code -11\nsignal 11 in ptxas")

    class Crashing:
        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            def run(*args: Any, **consts: Any) -> None:
                raise crash

            return run

    spec = parse_spec({"name": "crashing", "heads": {"q": 2, "kv": 1}, "head_dim": 64, "dtype": "fp16",
                       "mask": "causal", "topology": {"queries": "prefill"}})
    config = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    with pytest.raises(LaunchError) as err:
        runtime.load(spec)._launch_tile(Crashing(), (1,), (), {}, config, ("block_m", "block_n"))
    assert str(err.value) == (
        "crashing: ptxas could not compile config (block_m=64, block_n=32, num_warps=4, num_stages=2) "
        f"({str(crash).splitlines()[0]}): use another tile, or give no tile and the autotuner, which "
        "skips such tiles, chooses")
    assert "failed with error code -11" in str(err.value) and "signal 11" not in str(err.value)
    assert PTXAS_REFUSED in str(err.value)


# ---------------------------------------------------------------------------------------
# return_lse and out


def _spec(queries: str) -> Spec:
    return parse_spec(
        {
            "name": f"lse_{queries}",
            "heads": {"q": 4, "kv": 2},
            "head_dim": 32,
            "dtype": "fp32",
            "mask": ["causal", {"window": 6}],
            "topology": {"queries": queries},
        }
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("queries", ["prefill", "decode"])
def test_return_lse(device: str, queries: str) -> None:
    spec = _spec(queries)
    module = runtime.load(spec)
    batch = varlen_batch(
        [3, 0, 17], [5, 0, 17], heads=(4, 2), head_dim=(32, 32), seed=7, device=device
    )
    config: dict[str, Any] = {"block_n": 16, "num_warps": 4, "num_stages": 1}
    if queries == "decode":
        config["num_splits"] = 2
        q = batch["q"][:3]
        call = lambda **kw: module.attention(
            q, batch["k"], batch["v"], batch["cu_seqlens_k"], config=config, **kw
        )
        cu_q = None
    else:
        config["block_m"] = 16
        q = batch["q"]
        call = lambda **kw: module.attention(
            q,
            batch["k"],
            batch["v"],
            batch["cu_seqlens_q"],
            batch["cu_seqlens_k"],
            config=config,
            **kw,
        )
        cu_q = batch["cu_seqlens_q"]
    plain = call()
    assert isinstance(plain, torch.Tensor) and plain.shape == (q.shape[0], 4, 32)
    out, lse = call(return_lse=True)
    assert lse.shape == (q.shape[0], 4) and lse.dtype == torch.float32
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # same bits with or without LSE
    ref_o, ref_lse, _ = sequence_reference(
        spec, q, batch["k"], batch["v"], cu_q, batch["cu_seqlens_k"]
    )
    assert_close(out, ref_o, "fp32")
    assert_lse_close(lse, ref_lse, "fp32")
    if queries == "decode":  # the empty sequence: O = 0, LSE = -inf
        assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()


# ---------------------------------------------------------------------------------------
# masks whose visible keys come in pieces: the gaps between them are never read

PIECES_MASKS = {
    "window_sinks": ["causal", {"any": [{"window": {"left": 20, "right": 0}}, {"sink": 3}]}],
    # three pieces: a sink, a band far back and the recent window
    "band": ["causal", {"any": [{"sink": 2}, {"window": {"left": 9, "right": 0}},
                                {"expr": "kv_pos >= q_pos - 130 and kv_pos < q_pos - 100"}]}],
}


@pytest.mark.interpreter
@pytest.mark.parametrize("mask", sorted(PIECES_MASKS))
@pytest.mark.parametrize("queries", ["prefill", "decode"])
def test_gaps_between_pieces_are_never_read(device: str, queries: str, mask: str) -> None:
    """K and V of every tile that holds no visible key are NaN: a kernel that read one
    of them (even masked, since 0 * NaN is NaN) would return NaN. Chunked prefill (the
    last 3 tokens) so that the gaps are the same for every query of the sequence."""
    spec = parse_spec({"name": f"pieces_{mask}", "heads": {"q": 4, "kv": 2}, "head_dim": 32,
                       "dtype": "fp32", "mask": PIECES_MASKS[mask], "topology": {"queries": queries}})
    module = runtime.load(spec)
    kv_lens, block_n = [300, 37, 0, 140, 2], 16
    q_lens = [min(3, n) for n in kv_lens] if queries == "prefill" else [min(1, n) for n in kv_lens]
    batch = varlen_batch(q_lens, kv_lens, heads=(4, 2), head_dim=(32, 32), seed=11, device=device)
    cu_q = batch["cu_seqlens_q"] if queries == "prefill" else None
    q = batch["q"] if queries == "prefill" else fresh(len(kv_lens), 4, 32, seed=12, device=device)
    ref_o, ref_lse, _ = sequence_reference(spec, q, batch["k"], batch["v"], cu_q, batch["cu_seqlens_k"])
    k, v = batch["k"].clone(), batch["v"].clone()
    read = 0
    for b, n in enumerate(kv_lens):
        start, n_q = int(batch["cu_seqlens_k"][b]), max(q_lens[b], 1)
        visible = spec_terms(spec, q_pos=np.arange(n - n_q, n), kv_pos=np.arange(n), batch=b,
                                q_len=n_q, kv_len=n, tensors={}).visible
        seen = np.any(visible, axis=(0, 1))  # by any head and query
        for t in range(0, n, block_n):
            if seen[t:t + block_n].any():
                read += 1
            else:
                k[start + t:start + t + block_n] = float("nan")
                v[start + t:start + t + block_n] = float("nan")
    assert read < sum(-(-n // block_n) for n in kv_lens) / 2, "the gaps should hold most tiles"
    config: dict[str, Any] = {"block_n": block_n, "num_warps": 4, "num_stages": 1}
    if queries == "decode":
        for splits in (1, 2, 5):
            out, lse = module.attention(q, k, v, batch["cu_seqlens_k"], return_lse=True,
                                        config=dict(config, num_splits=splits))
            assert_close(out, ref_o, "fp32")
            assert_lse_close(lse, ref_lse, "fp32")
    else:
        out, lse = module.attention(q, k, v, cu_q, batch["cu_seqlens_k"], return_lse=True,
                                    config=dict(config, block_m=16))
        assert_close(out, ref_o, "fp32")
        assert_lse_close(lse, ref_lse, "fp32")


# ---------------------------------------------------------------------------------------
# 16-bit user tensors: expressions over them compute in fp32, as the reference does


@pytest.mark.interpreter
@pytest.mark.parametrize("tensor_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("queries", ["prefill", "decode"])
def test_16_bit_user_tensors_compute_in_fp32(device: str, queries: str, tensor_dtype: str) -> None:
    """``sqrt(bias * bias) - bias`` over values in [300, 400) is about 0. At the tensor's
    own dtype the product overflows fp16 (the kernel gave NaN) and rounds to a multiple
    of 512 in bf16 (the score then moves by up to 1.5). Loaded as fp32 it matches."""
    spec = parse_spec({
        "name": f"bias_{tensor_dtype}_{queries}", "heads": {"q": 2, "kv": 1}, "head_dim": 16,
        "dtype": "fp32", "topology": {"queries": queries}, "mask": "causal",
        "tensors": {"bias": {"dims": ["token"], "dtype": tensor_dtype}},
        "score_mod": "score + 3 * (sqrt(bias[kv_pos] * bias[kv_pos]) - bias[kv_pos])",
    })
    lengths = [(5, 9), (1, 1), (12, 30)] if queries == "prefill" else [(1, 9), (1, 1), (1, 30)]
    shape = Shape(lengths=tuple(lengths), decode=queries == "decode")
    inputs = make_inputs(spec, shape, seed=3, device=device)
    gen = torch.Generator().manual_seed(4)
    bias = 300 + 100 * torch.rand(inputs.k.shape[0], generator=gen)
    inputs.tensors["bias"] = bias.to(device=device, dtype=torch_dtype(tensor_dtype))
    config = {"block_n": 16, "num_warps": 4, "num_stages": 1}
    if queries == "prefill":
        config["block_m"] = 16
    got, lse = launch(runtime.load(spec), inputs, out=poisoned_out(spec, inputs), config=config)
    ref_o, ref_lse, _ = sequence_reference(
        spec, inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k, inputs.tensors
    )
    assert_close(got, ref_o, "fp32")
    assert_lse_close(lse, ref_lse, "fp32")
