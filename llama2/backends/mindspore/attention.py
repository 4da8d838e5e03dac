"""The attention math of the MindSpore backend: RoPE (rotate-half) and causal grouped-query attention."""

from __future__ import annotations

import math

import mindspore as ms
from mindspore import Tensor, ops

__all__ = ["rotate_half", "apply_rope", "attention", "allowed_slots", "score_bias", "write_slots"]

# Large finite negative score for masked slots: a row with every slot masked gets a uniform (finite) softmax
# instead of NaN.
MASKED_SCORE = -1e30


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last axis (the HF rotary layout)."""
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (batch, heads, seq, head_dim) by per-row angles; cos/sin (batch, 1, seq, head_dim) in fp32."""
    return (x.astype(ms.float32) * cos + rotate_half(x.astype(ms.float32)) * sin).astype(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, grouped-query.

    q (batch, n_heads, s, d); k, v (batch, n_kv_heads, L, d), already rotated; bias fp32 (batch, 1, s, L), 0 on
    allowed slots and MASKED_SCORE elsewhere (`score_bias`). Query head h reads key/value head h // n_rep
    (consecutive query heads share a kv head). Scores and softmax are computed in fp32. Returns (batch, n_heads,
    s, d) in q's dtype. Written to keep few (s, L)-sized intermediates: a compiled MindSpore graph on CPU keeps
    each one for the backward pass. Masked slots are added to, not replaced, so their raw scores must be finite
    (a KV cache starts at zeros and is written with `write_slots`, which keeps it so).
    """
    b, n_heads, s, d = q.shape
    n_kv = k.shape[1]
    qg = (q * (1.0 / math.sqrt(d))).reshape(b, n_kv, n_heads // n_kv, s, d)  # group g = h // n_rep
    scores = ops.matmul(qg, k.expand_dims(2).swapaxes(-1, -2))  # (b, n_kv, n_rep, s, L)
    if scores.dtype != ms.float32:
        scores = scores.astype(ms.float32)
    probs = ops.softmax(scores + bias.expand_dims(1), -1)
    if probs.dtype != v.dtype:
        probs = probs.astype(v.dtype)
    return ops.matmul(probs, v.expand_dims(2)).reshape(b, n_heads, s, d)


def score_bias(allowed: Tensor) -> Tensor:
    """fp32 additive attention bias from a bool mask: 0 where allowed, MASKED_SCORE elsewhere (no gradient)."""
    return ops.stop_gradient(ops.where(allowed, 0.0, MASKED_SCORE).astype(ms.float32))


def allowed_slots(key_mask: Tensor, start: int | Tensor, s: int) -> Tensor:
    """bool (batch, 1, s, L): query i (at slot start + i) may see slot j iff j <= start + i and key_mask[j]."""
    length = key_mask.shape[1]
    slot = ops.arange(0, length, dtype=ms.int32).reshape(1, length)
    query_slot = (ops.arange(0, s, dtype=ms.int32) + start).reshape(s, 1)
    causal = slot <= query_slot  # (s, L)
    return ops.logical_and(causal.expand_dims(0), key_mask.astype(ms.bool_).expand_dims(1)).expand_dims(1)


def write_slots(cache: Tensor, new: Tensor, start: int | Tensor) -> Tensor:
    """cache (batch, n_kv, L, d) with `new` (batch, n_kv, t, d) written at slots [start, start + t); static shapes."""
    length, t = cache.shape[2], new.shape[2]
    rel = ops.arange(0, length, dtype=ms.int32) - start
    inside = ops.logical_and(rel >= 0, rel < t).reshape(1, 1, length, 1)
    spread = ops.gather(new, ops.clip(rel, 0, t - 1), 2)  # (batch, n_kv, L, d): new[rel] at each slot
    return ops.where(inside, spread, cache)
