"""The float64 reference against independent oracles: hand-computed tiny cases, torch
SDPA (plain causal / full) and FlexAttention on the CPU (eager, un-compiled) for every
mask and score_mod the strategies draw, with closures written by hand per rule kind."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import sympy as sp
import torch
from helpers import fresh, varlen_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import Ctx, MaskCase, ScoreCase, SpecCase, shapes, spec_cases

from attngen.check import make_inputs
from attngen.reference import TIES, attend, evaluate, sequence_reference, spec_terms
from attngen.spec import parse_spec
from attngen.symbols import kv_pos, q_pos

flex = pytest.importorskip("torch.nn.attention.flex_attention")

# ---------------------------------------------------------------------------------------
# The expression walker


def test_floor_division_and_mod_follow_python() -> None:
    x = sp.Symbol("x", integer=True)
    values = np.arange(-7, 8)
    assert evaluate(sp.floor(x / 3), {"x": values}).tolist() == [v // 3 for v in values]
    assert evaluate(sp.Mod(x, 3), {"x": values}).tolist() == [v % 3 for v in values]
    assert evaluate(sp.floor(x / 3), {"x": values}).dtype == np.int64


def test_integer_division_by_zero_is_zero_and_real_division_is_ieee() -> None:
    x, y = sp.Symbol("x", integer=True), sp.Symbol("y", integer=True)
    xs, ys = np.array([7, -7, 0, 7, -7]), np.array([2, 2, 0, 0, -3])
    assert evaluate(sp.floor(x / y), {"x": xs, "y": ys}).tolist() == [3, -4, 0, 0, 2]
    assert evaluate(sp.Mod(x, y), {"x": xs, "y": ys}).tolist() == [1, 1, 0, 0, -1]
    r = sp.Symbol("r", real=True)
    with np.errstate(all="ignore"):
        got = evaluate(sp.Mod(r, y), {"r": np.array([1.5, 1.5]), "y": np.array([0, 2])})
    assert np.isnan(got[0]) and got[1] == 1.5


def test_a_real_comparison_within_float32_rounding_of_its_boundary_leaves_its_row_undecided() -> None:
    """kv * 0.7 < q - 1.8 at q = kv = 6 is 4.2 < 4.2: True in float64, False in float32 as
    a kernel computes it (CI's fuzz draw). Rows with such a key are undecided, exactly
    those where 7 kv = 10 q - 18 for some key; no integer comparison is ever undecided."""
    spec = parse_spec({"name": "t", "heads": {"q": 2, "kv": 1}, "head_dim": 16,
                       "mask": {"expr": "kv_pos * 0.7 < q_pos - 1.8"}})
    batch = varlen_batch([20], heads=(2, 1), head_dim=(16, 16), seed=4)
    ref = sequence_reference(spec, batch["q"], batch["k"], batch["v"], batch["cu_seqlens_q"],
                             batch["cu_seqlens_k"])
    tie = [any(7 * kv == 10 * q - 18 for kv in range(20)) for q in range(20)]
    assert sum(tie) >= 2 and ref.undecided.tolist() == [[t, t] for t in tie]
    causal = parse_spec({"name": "c", "heads": {"q": 2, "kv": 1}, "head_dim": 16, "mask": "causal"})
    plain = sequence_reference(causal, batch["q"], batch["k"], batch["v"], batch["cu_seqlens_q"],
                               batch["cu_seqlens_k"])
    assert not plain.undecided.any()


def test_a_score_comparison_on_its_boundary_is_undecided_where_the_key_is_visible() -> None:
    spec = parse_spec({"name": "t", "heads": {"q": 1, "kv": 1}, "head_dim": 16, "mask": "causal",
                       "score_mod": "where(score > 0.5, score, -3)"})
    terms = spec_terms(spec, q_pos=np.arange(2), kv_pos=np.arange(2), batch=0, q_len=2, kv_len=2,
                       tensors={})
    scores = np.array([[[0.5, 0.5], [0.7, 0.5 + 1e-6]]])
    # [0, 1] is on the boundary but invisible (causal); [1, 1] is within the score band
    assert terms.undecided(scores).tolist() == [[[True, False], [False, True]]]
    assert terms.score_mod(scores).tolist() == [[[-3, -3], [0.7, 0.5 + 1e-6]]]


def test_a_real_floor_within_rounding_of_a_whole_number_goes_either_way() -> None:
    r = sp.Symbol("r", real=True)
    values = {"r": np.array([2.0, 2.0 - 1e-9, 2.5, -1.0])}
    assert evaluate(sp.floor(r), {**values, TIES: True}).tolist() == [2, 2, 2, -1]
    assert evaluate(sp.floor(r), {**values, TIES: False}).tolist() == [1, 1, 2, -2]
    assert evaluate(sp.Mod(r, 2), {**values, TIES: False}).tolist()[:3] == [2.0, pytest.approx(2.0), 0.5]


def test_integer_floor_and_ceiling_are_exact() -> None:
    """sympy holds (x + 2) // 3 as floor(x/3 + 2/3), which float64 rounds below 3 at x = 7
    (7/3 + 2/3 = 2.9999999999999996): it is rounded in integers instead."""
    x = sp.Symbol("x", integer=True)
    values = np.arange(-40, 41)
    floor = sp.floor((x + 2) / 3)
    assert floor.args[0].is_Add, "sympy no longer splits the sum: this test no longer tests it"
    assert evaluate(floor, {"x": values}).tolist() == [(v + 2) // 3 for v in values]
    assert evaluate(sp.ceiling((x + 2) / 3), {"x": values}).tolist() == [-((-v - 2) // 3) for v in values]


def test_indexed_loads_clamp_per_axis() -> None:
    table = np.arange(12).reshape(3, 4)
    node = sp.IndexedBase("t")[q_pos, kv_pos]
    got = evaluate(
        node, {"t": table, "q_pos": np.array([-1, 0, 5])[:, None], "kv_pos": np.array([-3, 2, 9])}
    )
    assert got.tolist() == [[0, 2, 3], [0, 2, 3], [8, 10, 11]]


def test_piecewise_min_max_abs_and_logic() -> None:
    s = sp.Symbol("score", real=True)
    expr = sp.Piecewise((s * 2, sp.Lt(kv_pos, 2)), (sp.Max(sp.Min(s, 1), -1), True))
    got = evaluate(expr, {"score": np.array([-3.0, 0.5, 4.0]), "kv_pos": np.array([0, 3, 3])})
    assert got.tolist() == [-6.0, 0.5, 1.0]
    pred = sp.Or(sp.And(sp.Le(kv_pos, q_pos), sp.Not(sp.Eq(kv_pos, 0))), sp.false)
    got_b = evaluate(pred, {"q_pos": np.array([[1]]), "kv_pos": np.array([0, 1, 2])})
    assert got_b.tolist() == [[False, True, False]]
    assert evaluate(sp.true, {}).item() is True
    assert evaluate(sp.Abs(q_pos - kv_pos), {"q_pos": 2, "kv_pos": np.array([0, 5])}).tolist() == [
        2,
        3,
    ]


def test_transcendental_functions_in_float64() -> None:
    s = sp.Symbol("score", real=True)
    x = np.array([-2.0, 0.3, 5.0])
    got = evaluate(
        30 * sp.tanh(s / 30) + sp.exp(s) - sp.log(sp.Abs(s) + 1) + sp.sqrt(sp.Abs(s)), {"score": x}
    )
    want = 30 * np.tanh(x / 30) + np.exp(x) - np.log(np.abs(x) + 1) + np.sqrt(np.abs(x))
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_unknown_node_is_an_error() -> None:
    with pytest.raises(TypeError, match="cannot evaluate"):
        evaluate(sp.sin(sp.Symbol("score")), {"score": np.zeros(1)})


# ---------------------------------------------------------------------------------------
# The dense core, by hand


def test_single_visible_key_gives_its_value() -> None:
    q, k, v = (np.random.default_rng(0).normal(size=(1, 1, 4)) for _ in range(3))
    out, lse, _ = attend(q, k, v, scale=0.5)
    np.testing.assert_allclose(out, v)
    np.testing.assert_allclose(lse, [[0.5 * float(q[0, 0] @ k[0, 0])]])


def test_two_keys_softmax_by_hand() -> None:
    q = np.array([[[1.0, 0.0]]])
    k = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    v = np.array([[[2.0]], [[4.0]]])
    out, lse, _ = attend(q, k, v, scale=1.0)
    w = math.e / (math.e + 1)
    assert out[0, 0, 0] == pytest.approx(2 * w + 4 * (1 - w), rel=1e-14)
    assert lse[0, 0] == pytest.approx(math.log(math.e + 1), rel=1e-14)


def test_fully_masked_row_is_zero_with_neg_inf_lse() -> None:
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(3, 2, 8)), rng.normal(size=(5, 1, 8)), rng.normal(size=(5, 1, 8))
    visible = np.ones((2, 3, 5), dtype=bool)
    visible[:, 1] = False
    visible[1, 2] = False
    out, lse, _ = attend(q, k, v, scale=0.3, visible=visible)
    assert not np.isnan(out).any()
    assert (out[1] == 0).all() and (lse[1] == -np.inf).all()
    assert (out[2, 1] == 0).all() and lse[2, 1] == -np.inf and np.isfinite(lse[2, 0])


def test_empty_sequences_in_a_batch() -> None:
    spec = parse_spec({"name": "e", "heads": {"q": 2, "kv": 1}, "head_dim": 16, "mask": ["causal"]})
    batch = varlen_batch([0, 3, 0], [0, 4, 2])
    out, lse, _ = sequence_reference(
        spec, batch["q"], batch["k"], batch["v"], batch["cu_seqlens_q"], batch["cu_seqlens_k"]
    )
    assert out.shape == (3, 2, 16) and lse.shape == (3, 2) and out.dtype == torch.float64
    assert torch.isfinite(lse).all()
    # decode with an empty KV: O = 0, LSE = -inf
    q = fresh(2, 2, 16, seed=3)
    out_d, lse_d, _ = sequence_reference(
        spec.model_copy(update={}),
        q,
        batch["k"][:4],
        batch["v"][:4],
        None,
        torch.tensor([0, 0, 4], dtype=torch.int32),
    )
    assert (
        (out_d[0] == 0).all() and (lse_d[0] == -math.inf).all() and torch.isfinite(lse_d[1]).all()
    )


def test_query_longer_than_kv_is_rejected() -> None:
    spec = parse_spec({"name": "e", "heads": {"q": 1, "kv": 1}, "head_dim": 16})
    q, k = fresh(3, 1, 16), fresh(2, 1, 16)
    with pytest.raises(ValueError, match="q_len 3 > kv_len 2"):
        sequence_reference(spec, q, k, k, torch.tensor([0, 3]), torch.tensor([0, 2]))


def test_decode_is_the_last_prefill_row() -> None:
    data = {
        "name": "d",
        "heads": {"q": 4, "kv": 2},
        "head_dim": 32,
        "mask": ["causal", {"window": 5}],
        "score_mod": "20 * tanh(score / 20)",
    }
    prefill = parse_spec(data)
    decode = parse_spec({**data, "topology": {"queries": "decode"}})
    batch = varlen_batch([3, 9], [3, 9], heads=(4, 2), head_dim=(32, 32), seed=5)
    out_p, lse_p, _ = sequence_reference(
        prefill, batch["q"], batch["k"], batch["v"], batch["cu_seqlens_q"], batch["cu_seqlens_k"]
    )
    last = batch["cu_seqlens_q"][1:].long() - 1
    out_d, lse_d, _ = sequence_reference(
        decode, batch["q"][last], batch["k"], batch["v"], None, batch["cu_seqlens_k"]
    )
    torch.testing.assert_close(out_d, out_p[last], rtol=0, atol=0)
    torch.testing.assert_close(lse_d, lse_p[last], rtol=0, atol=0)


def test_per_token_tensor_is_packed_like_the_kv() -> None:
    spec = parse_spec(
        {
            "name": "doc",
            "heads": {"q": 1, "kv": 1},
            "head_dim": 16,
            "tensors": {"doc": {"dims": ["token"], "dtype": "int32"}},
            "mask": [{"document": "doc"}],
        }
    )
    batch = varlen_batch([2, 3], [4, 3], heads=(1, 1), seed=2)
    doc = torch.tensor([0, 0, 1, 1, 7, 7, 8], dtype=torch.int32)
    out = sequence_reference(
        spec,
        batch["q"],
        batch["k"],
        batch["v"],
        batch["cu_seqlens_q"],
        batch["cu_seqlens_k"],
        {"doc": doc},
    ).out
    # sequence 1, query at position 2 (doc 8) sees only key 2 of its own sequence
    torch.testing.assert_close(out[4], batch["v"][6].double(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# torch SDPA for plain causal and full attention


@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 1), (6, 2)])
def test_matches_sdpa(mask: str, hq: int, hkv: int) -> None:
    spec = parse_spec({"name": "s", "heads": {"q": hq, "kv": hkv}, "head_dim": 32, "mask": [mask]})
    lengths = [5, 17, 1]
    batch = varlen_batch(lengths, heads=(hq, hkv), head_dim=(32, 32), seed=hq + hkv)
    out = sequence_reference(
        spec, batch["q"], batch["k"], batch["v"], batch["cu_seqlens_q"], batch["cu_seqlens_k"]
    ).out
    start = 0
    for n in lengths:
        q, k, v = (batch[x][start : start + n].double().transpose(0, 1) for x in "qkv")
        k, v = k.repeat_interleave(hq // hkv, 0), v.repeat_interleave(hq // hkv, 0)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal")
        torch.testing.assert_close(
            out[start : start + n], want.transpose(0, 1), rtol=1e-10, atol=1e-10
        )
        start += n


# ---------------------------------------------------------------------------------------
# FlexAttention (eager, CPU, float64) for every drawn mask and score_mod


def flex_reference(case: SpecCase, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """O and LSE per sequence through torch's flex_attention, with the case's hand-written
    oracles as mask_mod / score_mod."""
    spec = case.spec
    q, k, v = (x.double() for x in (inputs.q, inputs.k, inputs.v))
    cu_k = inputs.cu_seqlens_k.tolist()
    n_seq = len(cu_k) - 1
    cu_q = list(range(n_seq + 1)) if inputs.cu_seqlens_q is None else inputs.cu_seqlens_q.tolist()
    out = torch.zeros(q.shape[0], spec.heads.q, spec.head_dim.v, dtype=torch.float64)
    lse = torch.full((q.shape[0], spec.heads.q), -math.inf, dtype=torch.float64)
    for b in range(n_seq):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        n_q, n_kv = q1 - q0, k1 - k0
        if n_q == 0 or n_kv == 0:
            continue
        o_b, lse_b = _flex_one(
            case, q[q0:q1], k[k0:k1], v[k0:k1], b, n_q, n_kv, _slice_tensors(case, inputs, k0, k1)
        )
        out[q0:q1], lse[q0:q1] = o_b, lse_b
    return out, lse


def _slice_tensors(case: SpecCase, inputs: Any, k0: int, k1: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, decl in case.spec.tensors.items():
        t = inputs.tensors[name]
        out[name] = (
            t[k0:k1].long()
            if decl.dims == ("token",)
            else t.double()
            if decl.is_float
            else t.long()
        )
    return out


def _flex_one(
    case: SpecCase,
    q: Any,
    k: Any,
    v: Any,
    b: int,
    n_q: int,
    n_kv: int,
    tensors: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    offset = n_kv - n_q
    mask: MaskCase = case.mask
    score: ScoreCase = case.score

    def ctx(h: Any, qi: Any, ki: Any) -> Ctx:
        return Ctx(b=b, h=h, q=qi + offset, kv=ki, q_len=n_q, kv_len=n_kv, t=tensors)

    def mask_mod(_b: Any, h: Any, qi: Any, ki: Any) -> Any:
        return mask.oracle(ctx(h, qi, ki))

    score_mod = None
    if score.oracle is not None:
        oracle = score.oracle

        def score_mod(s: Any, _b: Any, h: Any, qi: Any, ki: Any) -> Any:
            return oracle(s, ctx(h, qi, ki))

    hq, hkv = case.spec.heads.q, case.spec.heads.kv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block_mask = flex.create_block_mask(mask_mod, 1, hq, n_q, n_kv, device="cpu")
        o, aux = flex.flex_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            score_mod=score_mod,
            block_mask=block_mask,
            scale=case.spec.softmax_scale,
            enable_gqa=hq != hkv,
            return_aux=flex.AuxRequest(lse=True),
        )
    return o[0].transpose(0, 1), aux.lse[0].transpose(0, 1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=spec_cases(head_dims=(16, 32)), data=st.data())
def test_matches_flex_attention(case: SpecCase, data: st.DataObject) -> None:
    shape = data.draw(shapes(decode=case.spec.topology.queries == "decode", max_len=24))
    inputs = make_inputs(
        case.spec, shape, seed=data.draw(st.integers(0, 2**31 - 1)), device="cpu", dtype="fp32"
    )
    out, lse, _ = sequence_reference(
        case.spec,
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.cu_seqlens_q,
        inputs.cu_seqlens_k,
        inputs.tensors,
    )
    want_o, want_lse = flex_reference(case, inputs)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, want_o, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, want_lse, rtol=1e-9, atol=1e-9)
