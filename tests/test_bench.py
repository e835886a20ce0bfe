"""The parts of attngen.bench that run without a GPU: shapes, pair counting, floors,
and the hand-written peer masks checked against the float64 reference's visibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attngen import bench, reference
from attngen.errors import AttngenError
from attngen.spec import Spec, load_spec, parse_spec, spec_from_mapping


def make_spec(mask: object, *, q: int = 4, kv: int = 2, tensors: dict | None = None,
              queries: str = "prefill", score_mod: str | None = None) -> Spec:
    data = {"name": "t", "heads": {"q": q, "kv": kv}, "head_dim": 32, "dtype": "fp16",
            "topology": {"kind": "sequence", "queries": queries}, "mask": mask,
            "tensors": tensors or {}}
    if score_mod:
        data["score_mod"] = score_mod
    return spec_from_mapping(data)


def reference_visible(spec: Spec, shape: bench.Shape, tensors: dict, b: int) -> np.ndarray:
    """[Hq, q_len, kv_len] from attngen.reference (independent of bench's evaluator)."""
    layout = {}
    for name, t in tensors.items():
        a = t.numpy()
        layout[name] = a[b] if "token" in spec.tensors[name].dims else a
    offset = shape.kv_len - shape.q_len
    visible, _ = reference.spec_terms(
        spec, q_pos=np.arange(shape.q_len) + offset, kv_pos=np.arange(shape.kv_len),
        batch=b, q_len=shape.q_len, kv_len=shape.kv_len, tensors=layout)
    return np.asarray(visible)


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
TENSORS = {"plen": {"dims": ["batch"], "dtype": "int32"}, "doc": {"dims": ["token"], "dtype": "int32"}}


def _used_tensors(mask: object) -> dict:
    text = str(mask)
    return {n: d for n, d in TENSORS.items() if f"'{n}'" in text}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("shape", [bench.Shape(3, 13, 13), bench.Shape(2, 5, 17), bench.Shape(2, 1, 11)])
def test_rule_mask_matches_reference(name: str, shape: bench.Shape) -> None:
    spec = make_spec(MASKS[name], tensors=_used_tensors(MASKS[name]))
    tensors = bench.make_tensors(spec, shape, "cpu", seed=3)
    mask_fn = bench.rule_mask_fn(spec.mask, tensors)
    semantic_fn = bench.semantic_mask_fn(spec, shape, tensors)
    offset = shape.kv_len - shape.q_len
    h = torch.arange(spec.heads.q)[:, None, None]
    q = torch.arange(shape.q_len)[None, :, None] + offset
    kv = torch.arange(shape.kv_len)[None, None, :]
    total = 0
    for b in range(shape.batch):
        want = reference_visible(spec, shape, tensors, b)
        got = torch.as_tensor(mask_fn(torch.tensor(b), h, q, kv)).expand(want.shape).numpy()
        sem = torch.as_tensor(semantic_fn(torch.tensor(b), h, q, kv)).expand(want.shape).numpy()
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(sem, want)
        total += int(want.sum())
    assert bench.count_visible(spec, shape, tensors, rows=4).pairs == total


def test_free_expression_is_not_supported_by_peer_but_counted() -> None:
    spec = make_spec({"expr": "(q_pos - kv_pos) % 2 == 0 and kv_pos <= q_pos and head < 2"})
    with pytest.raises(bench.NotSupportedByPeer):
        bench.rule_mask_fn(spec.mask, {})
    shape = bench.Shape(2, 6, 6)
    want = sum(int(reference_visible(spec, shape, {}, b).sum()) for b in range(2))
    counts = bench.count_visible(spec, shape, {})
    assert counts.pairs == want
    # only query heads 0 and 1 see anything: both in KV head 0
    assert counts.kv_positions == 2 * 6


def test_causal_count_is_analytic() -> None:
    spec = make_spec(["causal"], q=8, kv=2)
    counts = bench.count_visible(spec, bench.Shape(3, 100, 100), {})
    assert counts.pairs == 3 * 8 * 100 * 101 // 2
    assert counts.kv_positions == 3 * 2 * 100
    chunked = bench.count_visible(spec, bench.Shape(2, 10, 50), {})
    assert chunked.pairs == 2 * 8 * sum(41 + i for i in range(10))


def test_decode_window_sinks_count() -> None:
    spec = make_spec(["causal", {"any": [{"window": {"left": 7, "right": 0}}, {"sink": 2}]}], queries="decode")
    counts = bench.count_visible(spec, bench.Shape(4, 1, 20), {})
    assert counts.pairs == 4 * 4 * (8 + 2)
    assert counts.kv_positions == 4 * 2 * (8 + 2)
    short = bench.count_visible(spec, bench.Shape(1, 1, 5), {})
    assert short.pairs == 4 * 5


def test_floors() -> None:
    rates = bench.DeviceRates("test", hbm_gbps=4000.0, matmul_tflops=800.0, torch_version="x", triton_version="y")
    prefill = make_spec(["causal"], q=32, kv=32)
    shape = bench.Shape(4, 4096, 4096)
    counts = bench.VisibleCounts(pairs=4 * 32 * 4096 * 4097 // 2, kv_positions=4 * 32 * 4096)
    work = bench.required_work(prefill, shape, counts)
    assert work.flops == counts.pairs * 4 * 32
    floor, kind = bench.floor_us(prefill, work, rates)
    assert kind == "matmul"
    assert math.isclose(floor, work.flops / 800e12 * 1e6)

    decode = make_spec(["causal"], q=32, kv=8, queries="decode")
    dshape = bench.Shape(8, 1, 32768)
    dcounts = bench.VisibleCounts(pairs=8 * 32 * 4100, kv_positions=8 * 8 * 4100)
    dwork = bench.required_work(decode, dshape, dcounts)
    es = 2  # fp16
    assert dwork.bytes == es * (8 * 32 * 32 + 8 * 8 * 4100 * 64 + 8 * 32 * 32)
    dfloor, dkind = bench.floor_us(decode, dwork, rates)
    assert dkind == "hbm" and math.isclose(dfloor, dwork.bytes / 4000e9 * 1e6)


def test_parse_shape() -> None:
    prefill = make_spec(["causal"])
    decode = make_spec(["causal"], queries="decode")
    assert bench.parse_shape("4x4096", prefill) == bench.Shape(4, 4096, 4096)
    assert bench.parse_shape("2x512x4096", prefill) == bench.Shape(2, 512, 4096)
    assert bench.parse_shape("8x32768", decode) == bench.Shape(8, 1, 32768)
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
    assert prefill.shape == bench.Shape(4, 4096, 4096)


def test_additive_bias() -> None:
    alibi = make_spec(["causal"], tensors={"slopes": {"dims": ["head"]}},
                      score_mod="score - slopes[head] * (q_pos - kv_pos)")
    assert bench.additive_bias(alibi) is not None
    softcap = make_spec(["causal"], score_mod="30 * tanh(score / 30)")
    assert bench.additive_bias(softcap) is None


def test_score_mod_matches_reference() -> None:
    spec = make_spec(["causal"], tensors={"bias": {"dims": ["head", 8]}},
                     score_mod="30 * tanh(score / 30) + bias[head, q_pos - kv_pos]")
    shape = bench.Shape(1, 6, 9)
    tensors = bench.make_tensors(spec, shape, "cpu")
    mod = bench.score_mod_fn(spec, shape, tensors)
    assert mod is not None
    scores = torch.randn(spec.heads.q, 6, 9, dtype=torch.float64) * 40
    h = torch.arange(spec.heads.q)[:, None, None]
    q = torch.arange(6)[None, :, None]
    kv = torch.arange(9)[None, None, :]
    got = mod(scores, torch.tensor(0), h, q, kv).numpy()
    _, ref_mod = reference.spec_terms(spec, q_pos=np.arange(6) + 3, kv_pos=np.arange(9), batch=0, q_len=6,
                                      kv_len=9, tensors={n: t.numpy() for n, t in tensors.items()})
    np.testing.assert_allclose(got, ref_mod(scores.numpy()), rtol=1e-6, atol=1e-6)


def test_bench_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(AttngenError, match="CUDA"):
        bench.measure_rates()


@pytest.mark.gpu
def test_bench_prefill_small_on_gpu() -> None:
    spec = make_spec(["causal", {"window": 64}], q=4, kv=2)
    results = bench.run_cases([(spec, bench.Shape(2, 256, 256))], progress=False)
    (result,) = results
    assert result.attngen_us() and result.floor_us > 0
    assert "attngen" in bench.format_table(results)
