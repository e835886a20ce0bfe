"""attngen.peers on the CPU: the hand-written peer masks and the sympy→torch evaluator
checked against the float64 reference's visibility and score modification."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import MASKS, SHAPES, make_spec, mask_spec, reference_visible

from attngen import peers, reference
from attngen.bench import make_tensors
from attngen.peers import Shape


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("shape", SHAPES)
def test_rule_and_semantic_masks_match_reference(name: str, shape: Shape) -> None:
    spec = mask_spec(name)
    tensors = make_tensors(spec, shape, "cpu", seed=3)
    mask_fn = peers.rule_mask_fn(spec.mask, tensors)
    semantic_fn = peers.semantic_mask_fn(spec, shape, tensors)
    h = torch.arange(spec.heads.q)[:, None, None]
    q = torch.arange(shape.q_len)[None, :, None] + shape.q_offset
    kv = torch.arange(shape.kv_len)[None, None, :]
    for b in range(shape.batch):
        want = reference_visible(spec, shape, tensors, b)
        got = torch.as_tensor(mask_fn(torch.tensor(b), h, q, kv)).expand(want.shape).numpy()
        sem = torch.as_tensor(semantic_fn(torch.tensor(b), h, q, kv)).expand(want.shape).numpy()
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(sem, want)


def test_free_expression_is_not_supported_by_peer() -> None:
    spec = make_spec({"expr": "(q_pos - kv_pos) % 2 == 0 and kv_pos <= q_pos and head < 2"})
    with pytest.raises(peers.NotSupportedByPeer):
        peers.rule_mask_fn(spec.mask, {})


def test_additive_bias() -> None:
    alibi = make_spec(["causal"], tensors={"slopes": {"dims": ["head"]}},
                      score_mod="score - slopes[head] * (q_pos - kv_pos)")
    assert peers.additive_bias(alibi) is not None
    softcap = make_spec(["causal"], score_mod="30 * tanh(score / 30)")
    assert peers.additive_bias(softcap) is None


def test_score_mod_matches_reference() -> None:
    spec = make_spec(["causal"], tensors={"bias": {"dims": ["head", 8]}},
                     score_mod="30 * tanh(score / 30) + bias[head, q_pos - kv_pos]")
    shape = Shape(1, 6, 9)
    tensors = make_tensors(spec, shape, "cpu")
    mod = peers.score_mod_fn(spec, shape, tensors)
    assert mod is not None
    scores = torch.randn(spec.heads.q, 6, 9, dtype=torch.float64) * 40
    h = torch.arange(spec.heads.q)[:, None, None]
    q = torch.arange(6)[None, :, None]
    kv = torch.arange(9)[None, None, :]
    got = mod(scores, torch.tensor(0), h, q, kv).numpy()
    ref_mod = reference.spec_terms(spec, q_pos=np.arange(6) + 3, kv_pos=np.arange(9), batch=0, q_len=6,
                                      kv_len=9, tensors={n: t.numpy() for n, t in tensors.items()}).score_mod
    np.testing.assert_allclose(got, ref_mod(scores.numpy()), rtol=1e-6, atol=1e-6)
