"""A spec in the terms of the kernels ``attngen bench`` compares against (the peers):
torch SDPA and FlexAttention, on the inputs of one benchmark :class:`Shape`.

The translation comes in two kinds. Hand-written ``mask_mod`` functions, one per mask
rule (:func:`rule_mask_fn`), are what FlexAttention is given: a free expression is
:class:`NotSupportedByPeer` rather than guessed. The spec's semantics
(:mod:`attngen.semantics`) compiled to torch closures (:func:`compile_sympy`) give the
``score_mod``, SDPA's dense mask with its additive bias, and the visibility that
``attngen bench`` counts pairs with.

Everything here imports torch lazily and, but for the runners, runs on the CPU; the
mask builders are unit-tested there against the float64 reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy as sp

from attngen import semantics, symbols
from attngen.masks import (
    AllOf,
    AnyOf,
    Causal,
    Document,
    ExprRule,
    Full,
    MaskRule,
    NotRule,
    PrefixLM,
    Sink,
    Window,
)
from attngen.spec import Spec


@dataclass(frozen=True, slots=True)
class Shape:
    """Uniform lengths for a benchmark: ``batch`` sequences of ``q_len`` queries over
    ``kv_len`` keys each (decode: q_len = 1; chunked prefill: q_len < kv_len)."""

    batch: int
    q_len: int
    kv_len: int

    def __str__(self) -> str:
        return f"B={self.batch} Q={self.q_len} KV={self.kv_len}"

    @property
    def q_offset(self) -> int:
        """Position of the first query: queries are the last ``q_len`` of ``kv_len``."""
        return self.kv_len - self.q_len

    def index_env(self, b: Any, h: Any, q_pos: Any, kv_pos: Any) -> dict[str, Any]:
        """The index symbols of :mod:`attngen.symbols` bound for :func:`compile_sympy`."""
        return {"batch": b, "head": h, "q_pos": q_pos, "kv_pos": kv_pos,
                "q_len": self.q_len, "kv_len": self.kv_len}


# ---------------------------------------------------------------------------------------
# Masks as torch functions. ``visible(b, h, q_pos, kv_pos)`` takes broadcastable integer
# tensors; ``tensors`` holds user tensors in the padded layout (per-token ones as
# [batch, kv_len, ...]).

MaskFn = Callable[..., Any]


class NotSupportedByPeer(Exception):
    """The peer cannot express this spec; the table says so instead of a time."""


def rule_mask_fn(rule: MaskRule, tensors: dict[str, Any]) -> MaskFn:
    """A hand-written torch ``(b, h, q_pos, kv_pos) -> bool`` for a rule tree; raises
    :class:`NotSupportedByPeer` for free expressions (written for FlexAttention's
    ``mask_mod``, where a rule we cannot vouch for is better skipped than guessed)."""
    import torch

    match rule:
        case Full():
            return lambda b, h, q, kv: (kv >= 0) | (q >= 0)
        case Causal():
            return lambda b, h, q, kv: kv <= q
        case Window(left, right):
            def window(b: Any, h: Any, q: Any, kv: Any) -> Any:
                ok = (kv >= 0) | (q >= 0)
                if left is not None:
                    ok = ok & (kv >= q - left)
                if right is not None:
                    ok = ok & (kv <= q + right)
                return ok
            return window
        case Sink(tokens):
            return lambda b, h, q, kv: (kv < tokens) | (q < 0)
        case PrefixLM(length, name):
            if name is None:
                return lambda b, h, q, kv: (kv <= q) | (kv < length)
            lengths = tensors[name]
            return lambda b, h, q, kv: (kv <= q) | (kv < lengths[b])
        case Document(name):
            docs = tensors[name]
            return lambda b, h, q, kv: docs[b, q] == docs[b, kv]
        case AllOf(rules) | AnyOf(rules):
            parts = [rule_mask_fn(r, tensors) for r in rules]
            combine = torch.logical_and if isinstance(rule, AllOf) else torch.logical_or

            def combined(b: Any, h: Any, q: Any, kv: Any) -> Any:
                out = parts[0](b, h, q, kv)
                for part in parts[1:]:
                    out = combine(out, part(b, h, q, kv))
                return out
            return combined
        case NotRule(inner):
            fn = rule_mask_fn(inner, tensors)
            return lambda b, h, q, kv: ~fn(b, h, q, kv)
        case ExprRule(text):
            raise NotSupportedByPeer(f"free mask expression {text!r}")
    raise TypeError(rule)


def eval_sympy(expr: sp.Basic, env: dict[str, Any], spec: Spec, tensors: dict[str, Any]) -> Any:
    """Evaluate a semantics expression with torch tensors bound to its symbols."""
    return compile_sympy(expr, spec, tensors)(env)


Env = dict[str, Any]


def compile_sympy(expr: sp.Basic, spec: Spec, tensors: dict[str, Any]) -> Callable[[Env], Any]:
    """Turn a semantics expression into nested closures over torch ops, once, so that
    what FlexAttention traces is plain tensor arithmetic (no sympy walking inside).

    Tensor indices are clamped into their axis (the documented semantics); ``//`` and
    ``%`` keep Python's floor semantics (sympy floor / Mod, torch floor / remainder).
    """
    import torch

    def as_t(x: Any) -> Any:
        return x if isinstance(x, torch.Tensor) else torch.tensor(x)

    def fold(op: Callable[[Any, Any], Any], parts: list[Callable[[Env], Any]]) -> Callable[[Env], Any]:
        def run(env: Env) -> Any:
            out = parts[0](env)
            for part in parts[1:]:
                out = op(out, part(env))
            return out
        return run

    relations: dict[str, Callable[[Any, Any], Any]] = {
        "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    unary: dict[type, Callable[[Any], Any]] = {
        sp.tanh: torch.tanh, sp.exp: torch.exp, sp.log: torch.log, sp.Abs: torch.abs,
        sp.floor: torch.floor, sp.ceiling: torch.ceil}

    def apply(op: Callable[[Any], Any], arg: Callable[[Env], Any]) -> Callable[[Env], Any]:
        return lambda env: op(as_t(arg(env)) * 1.0)

    def build(e: sp.Basic) -> Callable[[Env], Any]:
        if isinstance(e, sp.Symbol):
            name = e.name
            return lambda env: env[name]
        if isinstance(e, sp.logic.boolalg.BooleanTrue | sp.logic.boolalg.BooleanFalse):
            flag = bool(e)
            return lambda env: flag
        if isinstance(e, sp.Integer):
            value: int | float = int(e)
            return lambda env: value
        if isinstance(e, sp.Number):
            number = float(e)
            return lambda env: number
        if isinstance(e, sp.Indexed):
            return build_index(e)
        parts = [build(a) for a in e.args]
        if isinstance(e, sp.Add):
            return fold(lambda a, b: a + b, parts)
        if isinstance(e, sp.Mul):
            return fold(lambda a, b: a * b, parts)
        if isinstance(e, sp.Pow):
            base, exp = parts
            if e.args[1] == -1:
                return lambda env: 1.0 / base(env)
            return lambda env: base(env) ** exp(env)
        if isinstance(e, sp.core.relational.Relational):
            return fold(relations[e.rel_op], parts)
        if isinstance(e, sp.And):
            return fold(lambda a, b: torch.logical_and(as_t(a), as_t(b)), parts)
        if isinstance(e, sp.Or):
            return fold(lambda a, b: torch.logical_or(as_t(a), as_t(b)), parts)
        if isinstance(e, sp.Not):
            (inner,) = parts
            return lambda env: torch.logical_not(as_t(inner(env)))
        if isinstance(e, sp.Piecewise):
            pairs = [(build(p.cond), build(p.expr)) for p in e.args]

            def piecewise(env: Env) -> Any:
                value = pairs[-1][1](env)
                for cond, then in reversed(pairs[:-1]):
                    value = torch.where(as_t(cond(env)), as_t(then(env)), as_t(value))
                return value
            return piecewise
        if isinstance(e, sp.Min):
            return fold(lambda a, b: torch.minimum(as_t(a), as_t(b)), parts)
        if isinstance(e, sp.Max):
            return fold(lambda a, b: torch.maximum(as_t(a), as_t(b)), parts)
        if isinstance(e, sp.Mod):
            return fold(lambda a, b: torch.remainder(as_t(a), b), parts)
        for cls, op in unary.items():
            if isinstance(e, cls):
                return apply(op, parts[0])
        raise NotSupportedByPeer(f"cannot evaluate {type(e).__name__} in {expr}")

    def build_index(e: sp.Indexed) -> Callable[[Env], Any]:
        name = str(e.base)
        dims = spec.tensors[name].dims
        data = tensors[name]
        subs = [build(i) for i in e.indices]
        sizes = []
        for axis, dim in enumerate(dims):
            sizes.append(data.shape[axis + 1] if dim == "token" else data.shape[axis + ("token" in dims[:axis])])

        def load(env: Env) -> Any:
            idx: list[Any] = []
            for dim, sub, size in zip(dims, subs, sizes, strict=True):
                if dim == "token":
                    idx.append(env["batch"])
                idx.append(torch.clamp(as_t(sub(env)).long(), 0, size - 1))
            return data[tuple(idx)]
        return load

    return build(expr)


def semantic_mask_fn(spec: Spec, shape: Shape, tensors: dict[str, Any]) -> MaskFn:
    """The spec's visibility (from :mod:`attngen.semantics`, any expression) as a torch
    function; used to count visible pairs and for SDPA's dense mask, never as a
    FlexAttention ``mask_mod``."""
    predicate = compile_sympy(semantics.visibility(spec), spec, tensors)

    def visible(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return predicate(shape.index_env(b, h, q, kv))

    return visible


def score_mod_fn(spec: Spec, shape: Shape, tensors: dict[str, Any]) -> Callable[..., Any] | None:
    """A FlexAttention ``score_mod`` for the spec (None when it has none)."""
    if spec.score_mod is None:
        return None
    modified = compile_sympy(semantics.score(spec), spec, tensors)

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return modified({"score": score, **shape.index_env(b, h, q_idx + shape.q_offset, kv_idx)})

    return score_mod


def additive_bias(spec: Spec) -> sp.Basic | None:
    """score_mod - score when the score_mod is ``score + bias`` (ALiBi, relative-position
    tables): SDPA can then take the bias as a float mask. None otherwise (softcap)."""
    if spec.score_mod is None:
        return sp.Integer(0)
    mod = semantics.score(spec)
    bias = sp.expand(mod - symbols.score)
    return None if bias.has(symbols.score) else bias


def visibility_depends_on(spec: Spec, name: str) -> bool:
    """Whether the spec's visibility involves the index symbol ``name`` (``head``, …)."""
    exprs = [semantics.visibility(spec)]
    return any(s.name == name for e in exprs for s in e.free_symbols if isinstance(s, sp.Symbol))


def batch_dependent(spec: Spec) -> bool:
    """Whether visibility can differ between sequences (user tensors or ``batch``)."""
    return bool(spec.tensors) or visibility_depends_on(spec, "batch")


# ---------------------------------------------------------------------------------------
# Runners: each peer as a ready-to-time callable on padded [B, H, S, D] inputs (GPU).

Runner = Callable[[Spec, Shape, Any, Any, Any, dict[str, Any]], tuple[Callable[[], Any], str]]


def peer_inputs(q: Any, k: Any, v: Any, shape: Shape) -> tuple[Any, Any, Any]:
    """Packed [B*S, H, D] → padded [B, H, S, D] (contiguous copies, made before timing)."""
    def pad(x: Any, s: int) -> Any:
        return x.view(shape.batch, s, x.shape[1], x.shape[2]).transpose(1, 2).contiguous()
    return pad(q, shape.q_len), pad(k, shape.kv_len), pad(v, shape.kv_len)


def sdpa_runner(spec: Spec, shape: Shape, q: Any, k: Any, v: Any, tensors: dict[str, Any]) -> tuple[Callable[[], Any], str]:
    """torch SDPA: the flash backend where it can express the spec (plain causal/full),
    else a dense float mask (visibility, plus an additive bias) on efficient/math."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = spec.heads.group > 1
    mask = spec.mask
    plain = spec.score_mod is None and spec.head_dim.qk == spec.head_dim.v
    rules = mask.rules if isinstance(mask, AllOf) else (mask,)
    causal_only = all(isinstance(r, Causal | Full) for r in rules)
    is_causal = any(isinstance(r, Causal) for r in rules)
    if plain and causal_only and (not is_causal or shape.q_len in (1, shape.kv_len)):
        # SDPA's is_causal is top-left aligned: right for q_len == kv_len; a single
        # decode query sees every key, which is no mask at all.
        causal = is_causal and shape.q_len > 1

        def flash() -> Any:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=spec.softmax_scale,
                                                      enable_gqa=gqa)
        return flash, "flash"
    bias = additive_bias(spec)
    if bias is None:
        raise NotSupportedByPeer("score_mod is not an additive bias")
    b = torch.arange(shape.batch, device=q.device)[:, None, None, None]
    h = torch.arange(spec.heads.q, device=q.device)[None, :, None, None]
    qp = torch.arange(shape.q_len, device=q.device)[None, None, :, None] + shape.q_offset
    kp = torch.arange(shape.kv_len, device=q.device)[None, None, None, :]
    visible = torch.as_tensor(semantic_mask_fn(spec, shape, tensors)(b, h, qp, kp), device=q.device)
    env = shape.index_env(b, h, qp, kp)
    add = torch.as_tensor(eval_sympy(bias, env, spec, tensors), device=q.device, dtype=torch.float32)
    dense = torch.where(visible, add, torch.tensor(float("-inf"), device=q.device)).to(q.dtype)
    if gqa:
        k, v = k.repeat_interleave(spec.heads.group, 1), v.repeat_interleave(spec.heads.group, 1)

    def masked() -> Any:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=spec.softmax_scale)
    return masked, "dense mask"


def flex_runner(spec: Spec, shape: Shape, q: Any, k: Any, v: Any, tensors: dict[str, Any]) -> tuple[Callable[[], Any], str]:
    """FlexAttention, compiled, with a BlockMask from the rules' hand-written mask_mod."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    offset = shape.q_offset
    visible = rule_mask_fn(spec.mask, tensors)

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return visible(b, h, q_idx + offset, kv_idx)

    per_batch = batch_dependent(spec)
    block_mask = create_block_mask(mask_mod, shape.batch if per_batch else None, None,
                                   shape.q_len, shape.kv_len, device=q.device)
    score_mod = score_mod_fn(spec, shape, tensors)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run() -> Any:
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=spec.softmax_scale,
                        enable_gqa=spec.heads.group > 1)
    return run, "compiled"


#: The peers, in table order: (name, runner).
PEERS: tuple[tuple[str, Runner], ...] = (("torch SDPA", sdpa_runner), ("FlexAttention", flex_runner))
