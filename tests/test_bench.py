"""The parts of attngen.bench that run without a GPU: shapes, pair counting checked
against the float64 reference's visibility, floors and presets. (The peer masks are
tested in test_peers.)"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import MASKS, SHAPES, make_spec, mask_spec, reference_visible

from attngen import bench
from attngen.errors import AttngenError
from attngen.peers import Shape
from attngen.spec import load_spec, parse_spec


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("shape", SHAPES)
def test_count_matches_reference(name: str, shape: Shape) -> None:
    spec = mask_spec(name)
    tensors = bench.make_tensors(spec, shape, "cpu", seed=3)
    total = sum(int(reference_visible(spec, shape, tensors, b).sum()) for b in range(shape.batch))
    assert bench.count_visible(spec, shape, tensors, rows=4).pairs == total


def test_free_expression_is_counted() -> None:
    spec = make_spec({"expr": "(q_pos - kv_pos) % 2 == 0 and kv_pos <= q_pos and head < 2"})
    shape = Shape(2, 6, 6)
    want = sum(int(reference_visible(spec, shape, {}, b).sum()) for b in range(2))
    counts = bench.count_visible(spec, shape, {})
    assert counts.pairs == want
    # only query heads 0 and 1 see anything: both in KV head 0
    assert counts.kv_positions == 2 * 6


def test_causal_count_is_analytic() -> None:
    spec = make_spec(["causal"], q=8, kv=2)
    counts = bench.count_visible(spec, Shape(3, 100, 100), {})
    assert counts.pairs == 3 * 8 * 100 * 101 // 2
    assert counts.kv_positions == 3 * 2 * 100
    chunked = bench.count_visible(spec, Shape(2, 10, 50), {})
    assert chunked.pairs == 2 * 8 * sum(41 + i for i in range(10))


def test_decode_window_sinks_count() -> None:
    spec = make_spec(["causal", {"any": [{"window": {"left": 7, "right": 0}}, {"sink": 2}]}], queries="decode")
    counts = bench.count_visible(spec, Shape(4, 1, 20), {})
    assert counts.pairs == 4 * 4 * (8 + 2)
    assert counts.kv_positions == 4 * 2 * (8 + 2)
    short = bench.count_visible(spec, Shape(1, 1, 5), {})
    assert short.pairs == 4 * 5


def test_floors() -> None:
    rates = bench.DeviceRates("test", hbm_gbps=4000.0, matmul_tflops=800.0, torch_version="x", triton_version="y")
    prefill = make_spec(["causal"], q=32, kv=32)
    shape = Shape(4, 4096, 4096)
    counts = bench.VisibleCounts(pairs=4 * 32 * 4096 * 4097 // 2, kv_positions=4 * 32 * 4096)
    work = bench.required_work(prefill, shape, counts)
    assert work.flops == counts.pairs * 4 * 32
    floor, kind = bench.floor_us(prefill, work, rates)
    assert kind == "matmul"
    assert math.isclose(floor, work.flops / 800e12 * 1e6)

    decode = make_spec(["causal"], q=32, kv=8, queries="decode")
    dshape = Shape(8, 1, 32768)
    dcounts = bench.VisibleCounts(pairs=8 * 32 * 4100, kv_positions=8 * 8 * 4100)
    dwork = bench.required_work(decode, dshape, dcounts)
    es = 2  # fp16
    assert dwork.bytes == es * (8 * 32 * 32 + 8 * 8 * 4100 * 64 + 8 * 32 * 32)
    dfloor, dkind = bench.floor_us(decode, dwork, rates)
    assert dkind == "hbm" and math.isclose(dfloor, dwork.bytes / 4000e9 * 1e6)


def test_parse_shape() -> None:
    prefill = make_spec(["causal"])
    decode = make_spec(["causal"], queries="decode")
    assert bench.parse_shape("4x4096", prefill) == Shape(4, 4096, 4096)
    assert bench.parse_shape("2x512x4096", prefill) == Shape(2, 512, 4096)
    assert bench.parse_shape("8x32768", decode) == Shape(8, 1, 32768)
    for bad, spec in (("4", prefill), ("2x4096x512", prefill), ("axb", prefill), ("1x2x3", decode)):
        with pytest.raises(AttngenError):
            bench.parse_shape(bad, spec)


def test_presets_match_example_specs() -> None:
    """The BENCHMARKS.md cases are the example specs a user can read in specs/."""
    for preset in bench.PRESETS.values():
        spec = parse_spec(preset.spec)
        assert spec.content_hash == load_spec(f"specs/{spec.name}.yaml").content_hash
    decode = bench.PRESETS["decode_window_sinks_32k"]
    spec = parse_spec(decode.spec)
    assert (spec.heads.q, spec.heads.kv, spec.head_dim.qk, decode.shape.kv_len) == (32, 8, 128, 32768)
    prefill = bench.PRESETS["prefill_causal"]
    assert prefill.shape == Shape(4, 4096, 4096)


def test_bench_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(AttngenError, match="CUDA"):
        bench.measure_rates()


@pytest.mark.gpu
def test_bench_prefill_small_on_gpu() -> None:
    spec = make_spec(["causal", {"window": 64}], q=4, kv=2)
    results = bench.run_cases([(spec, Shape(2, 256, 256))], progress=False)
    (result,) = results
    assert result.attngen_us() and result.floor_us > 0
    assert "attngen" in bench.format_table(results)
