"""Native MindSpore cells for the graph node kinds.

Attribute names mirror the graph's child names, so MindSpore's automatic parameter prefixes give the canonical
(HF) names, e.g. `model.layers.0.self_attn.q_proj.weight`. Master weights are float32 `Parameter`s; each cell
computes in the dtype of its input (set once by the embedding's `compute_dtype`).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from llama2.backends.mindspore.attention import allowed_slots, apply_rope, attention, score_bias, write_slots

__all__ = [
    "zeros_param",
    "linear",
    "EmbeddingCell",
    "RMSNormCell",
    "LinearCell",
    "AttentionCell",
    "SwiGLUCell",
    "BlockCell",
    "DecoderCell",
    "LlamaCell",
]


def zeros_param(shape: tuple[int, ...], name: str, requires_grad: bool = True) -> Parameter:
    """A float32 parameter of zeros (weights are set afterwards by the runtime)."""
    return Parameter(Tensor(np.zeros(shape, np.float32)), name=name, requires_grad=requires_grad)


def cast_like(w: Tensor, x: Tensor) -> Tensor:
    return w if w.dtype == x.dtype else w.astype(x.dtype)


_MATMUL_NT = ops.MatMul(transpose_b=True)


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T for x (..., in) and weight (out, in), computed in x's dtype.

    One 2-D `MatMul(transpose_b=True)`: `ops.dense` transposes the weight on every call on CPU (measured 4-10x
    slower for the 32000 x 288 LM head).
    """
    y = _MATMUL_NT(x.reshape(-1, x.shape[-1]), cast_like(weight, x))
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


class EmbeddingCell(nn.Cell):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = zeros_param((num_embeddings, dim), "weight")
        self.compute_dtype = ms.float32  # the dtype every later cell computes in

    def construct(self, ids: Tensor) -> Tensor:
        out = ops.gather(self.weight, ids, 0)
        return out if self.compute_dtype == ms.float32 else out.astype(self.compute_dtype)


class RMSNormCell(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight with the statistics in fp32 (as HF: normalize, cast back, scale)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = zeros_param((dim,), "weight")
        self.eps = float(eps)

    def construct(self, x: Tensor) -> Tensor:
        xf = x.astype(ms.float32)
        y = xf * ops.rsqrt(ops.mean(xf * xf, -1, keep_dims=True) + self.eps)
        return cast_like(self.weight, x) * y.astype(x.dtype)


class LinearCell(nn.Cell):
    """y = x @ weight.T, weight (out, in)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = zeros_param((out_features, in_features), "weight")

    def construct(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)


class AttentionCell(nn.Cell):
    """Projections, RoPE, optional KV-cache write, `attention`, output projection.

    Extension point for adapters: override `extra_kv(batch)` to return (key, value) prefix tensors
    (batch, n_kv_heads, P, head_dim) that every query may attend to (prefix tuning); the projections are child
    cells that an adapter's own lowering may replace.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, q_proj, k_proj, v_proj, o_proj) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.o_proj = o_proj

    def extra_kv(self, batch: int):
        """Prefix (key, value) tensors to prepend, or None (the base model has none)."""
        return None

    def construct(self, x, cos, sin, bias, cache_k=None, cache_v=None, start=0):
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.n_heads, self.head_dim).swapaxes(1, 2)
        k = self.k_proj(x).reshape(b, s, self.n_kv_heads, self.head_dim).swapaxes(1, 2)
        v = self.v_proj(x).reshape(b, s, self.n_kv_heads, self.head_dim).swapaxes(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_k is not None:  # keys/values of every slot so far, the new ones written at [start, start + s)
            k, v = write_slots(cache_k, k, start), write_slots(cache_v, v, start)
        keys, values, mask = k, v, bias
        extra = self.extra_kv(b)
        if extra is not None:
            keys = ops.cat((extra[0].astype(k.dtype), k), 2)
            values = ops.cat((extra[1].astype(v.dtype), v), 2)
            visible = ops.zeros((b, 1, s, extra[0].shape[2]), ms.float32)
            mask = ops.cat((visible, bias), 3)
        out = attention(q, keys, values, mask).swapaxes(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(out), k, v


class SwiGLUCell(nn.Cell):
    def __init__(self, gate_proj, up_proj, down_proj) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    def construct(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class BlockCell(nn.Cell):
    def __init__(self, input_layernorm, self_attn, post_attention_layernorm, mlp) -> None:
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp

    def construct(self, x, cos, sin, bias, cache_k=None, cache_v=None, start=0):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, cache_k, cache_v, start)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class DecoderCell(nn.Cell):
    """Embedding, blocks, final norm; caches are tuples of per-layer (batch, n_kv, max_len, head_dim) tensors."""

    def __init__(self, embed_tokens, layers: list, norm) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.CellList(layers)
        self.norm = norm
        self.n_layers = len(layers)

    def construct(self, ids, cos, sin, bias, cache_k=None, cache_v=None, start=0):
        h = self.embed_tokens(ids)
        ks = ()
        vs = ()
        for i in range(self.n_layers):
            if cache_k is None:
                h, k, v = self.layers[i](h, cos, sin, bias)
            else:
                h, k, v = self.layers[i](h, cos, sin, bias, cache_k[i], cache_v[i], start)
            ks = ks + (k,)
            vs = vs + (v,)
        return self.norm(h), ks, vs


class LlamaCell(nn.Cell):
    """The whole model: per-row RoPE angles, the visibility mask, the decoder, the (possibly tied) LM head.

    construct(ids, positions, key_mask, cache_k=None, cache_v=None, start=0, last_only=False) returns
    (float32 logits, new cache_k, new cache_v), caches as tuples of per-layer tensors; without a cache the keys
    are the sequence itself and the returned caches are None.
    """

    def __init__(self, model, lm_head, cos: np.ndarray, sin: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.lm_head = lm_head
        self.tied = lm_head is None
        self.rope_cos = Tensor(cos)
        self.rope_sin = Tensor(sin)

    def construct(self, ids, positions, key_mask, cache_k=None, cache_v=None, start=0, last_only=False):
        s = ids.shape[1]
        cos = ops.gather(self.rope_cos, positions, 0).expand_dims(1)  # (batch, 1, s, head_dim)
        sin = ops.gather(self.rope_sin, positions, 0).expand_dims(1)
        bias = score_bias(allowed_slots(key_mask, start, s))  # once for every layer
        h, ks, vs = self.model(ids, cos, sin, bias, cache_k, cache_v, start)
        if last_only:
            h = h[:, -1:]
        if self.tied:
            logits = linear(h, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(h)
        if cache_k is None:
            return logits.astype(ms.float32), None, None
        return logits.astype(ms.float32), ks, vs
