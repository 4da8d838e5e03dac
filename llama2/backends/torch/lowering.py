"""Lowering of each graph node kind into a `torch.nn.Module`.

Module attribute names mirror the graph's child names, so `named_parameters()` yields the canonical (Hugging Face)
names. `LOWERINGS` is the public default table; `register_lowerings(backend)` installs it with
`backend.lowering(NodeType)`, and adapters add their own node kinds the same way.

Every module below `Llama` takes the hidden states plus one `Context` (RoPE cos/sin gathered per row, the boolean
attention mask, the KV cache and its write offset), so the attention math lives in `attention()` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llama2.core.backend import Backend, rope_tables
from llama2.core.graph import Attention, Block, Decoder, Embedding, Linear, Llama, Node, RMSNorm, SwiGLU

__all__ = [
    "LOWERINGS",
    "register_lowerings",
    "Context",
    "KVCache",
    "attention",
    "apply_rope",
    "TorchEmbedding",
    "TorchRMSNorm",
    "TorchLinear",
    "TorchAttention",
    "TorchSwiGLU",
    "TorchBlock",
    "TorchDecoder",
    "TorchLlama",
]

Lowering = Callable[[Node, Backend], nn.Module]
LOWERINGS: dict[type, Lowering] = {}


def _lowers(node_type: type) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        LOWERINGS[node_type] = fn
        return fn

    return deco


def register_lowerings(backend: Backend) -> None:
    """Register the default lowering of every core node kind on `backend`."""
    for node_type, fn in LOWERINGS.items():
        backend.lowering(node_type)(fn)


def _param(*shape: int) -> nn.Parameter:
    # Zeros: a runtime is built "uninitialized or zero"; weights come from init_weights() or a checkpoint.
    return nn.Parameter(torch.zeros(*shape, dtype=torch.float32))


# ---- context passed down the layers --------------------------------------------------------------------------
class KVCache:
    """Preallocated keys/values per layer: (batch, n_kv_heads, max_len, head_dim) in the compute dtype."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, **tensor_kw) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, **tensor_kw) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, **tensor_kw) for _ in range(n_layers)]
        self.batch = batch
        self.max_len = max_len


@dataclass
class Context:
    """What every attention layer needs besides its input.

    cos, sin: (batch, t, head_dim) RoPE tables gathered at each row's positions. mask: bool (batch, t, S), True
    where query i may attend key slot j (S = t without cache, start + t with one). cache/start: where to write the
    new keys/values (slots [start, start + t)); `layer` is set by the decoder before each block.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor
    cache: KVCache | None = None
    start: int = 0
    layer: int = 0


# ---- the attention math ----------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (b, heads, t, d); cos/sin: (b, t, d) float32 (math in fp32, result in x's dtype)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    n_rep: int,
) -> torch.Tensor:
    """Grouped-query attention. q: (b, h, t, d); k, v: (b, kv_h, S, d); mask: bool (b, t, S), True = attend.

    Query head h reads key/value head h // n_rep. Returns (b, h, t, d).
    """
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))


# ---- modules -------------------------------------------------------------------------------------------------
class TorchEmbedding(nn.Module):
    def __init__(self, node: Embedding) -> None:
        super().__init__()
        self.weight = _param(node.num_embeddings, node.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class TorchRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight with the statistics in fp32; the result keeps x's dtype."""

    def __init__(self, node: RMSNorm) -> None:
        super().__init__()
        self.eps = node.eps
        self.weight = _param(node.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * y.to(x.dtype)


class TorchLinear(nn.Module):
    """y = x @ weight.T; weight stored (out, in)."""

    def __init__(self, node: Linear) -> None:
        super().__init__()
        self.weight = _param(node.out_features, node.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class TorchAttention(nn.Module):
    """Projections + RoPE + KV cache around `attention()`.

    Adapters extend it by overriding `kv_prefix` (extra key/value slots, e.g. prefix tuning): the prefix is
    prepended to the keys/values and every query may attend to it.
    """

    def __init__(self, node: Attention, backend: Backend) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = node.n_heads, node.n_kv_heads, node.head_dim
        self.n_rep = node.n_rep
        self.q_proj = backend.lower(node.q_proj)
        self.k_proj = backend.lower(node.k_proj)
        self.v_proj = backend.lower(node.v_proj)
        self.o_proj = backend.lower(node.o_proj)

    def kv_prefix(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Extra (keys, values), each (batch, n_kv_heads, p, head_dim), attended by every query; None here."""
        return None

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            end = ctx.start + t
            keys, values = ctx.cache.keys[ctx.layer], ctx.cache.values[ctx.layer]
            keys[:, :, ctx.start : end] = k
            values[:, :, ctx.start : end] = v
            k, v = keys[:, :, :end], values[:, :, :end]
        mask = ctx.mask
        prefix = self.kv_prefix(b, k.dtype)
        if prefix is not None:
            pk, pv = prefix
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            mask = torch.cat([mask.new_ones(b, t, pk.shape[2]), mask], dim=2)
        out = attention(q, k, v, mask, self.n_rep)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class TorchSwiGLU(nn.Module):
    def __init__(self, node: SwiGLU, backend: Backend) -> None:
        super().__init__()
        self.gate_proj = backend.lower(node.gate_proj)
        self.up_proj = backend.lower(node.up_proj)
        self.down_proj = backend.lower(node.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TorchBlock(nn.Module):
    def __init__(self, node: Block, backend: Backend) -> None:
        super().__init__()
        self.input_layernorm = backend.lower(node.input_layernorm)
        self.self_attn = backend.lower(node.self_attn)
        self.post_attention_layernorm = backend.lower(node.post_attention_layernorm)
        self.mlp = backend.lower(node.mlp)

        self.recompute = False  # activation checkpointing while training (TorchRuntime.enable_recompute)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.recompute and ctx.cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, ctx, use_reentrant=False)
        return self._forward(x, ctx)

    def _forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class TorchDecoder(nn.Module):
    def __init__(self, node: Decoder, backend: Backend) -> None:
        super().__init__()
        self.embed_tokens = backend.lower(node.embed_tokens)
        self.layers = nn.ModuleList(backend.lower(layer) for layer in node.layers)
        self.norm = backend.lower(node.norm)

    def forward(self, ids: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            ctx.layer = i
            x = layer(x, ctx)
        return self.norm(x)


class TorchLlama(nn.Module):
    """The whole model: `forward(ids, positions, mask, cache, start) -> logits` (compute dtype)."""

    def __init__(self, node: Llama, backend: Backend) -> None:
        super().__init__()
        c = node.config
        self.config = c
        self.model = backend.lower(node.model)
        self.lm_head = None if node.lm_head is None else backend.lower(node.lm_head)
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta)
        self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """ids, positions: int64 (b, t); mask: bool (b, t, S). Logits (b, t, vocab), or (b, 1, vocab) if last_only.

        last_only skips the output projection of every position but the last (a prompt's prefill needs only that).
        """
        ctx = Context(cos=self.rope_cos[positions], sin=self.rope_sin[positions], mask=mask, cache=cache, start=start)
        h = self.model(ids, ctx)
        if last_only:
            h = h[:, -1:]
        if self.lm_head is None:  # tied: the output projection is the embedding matrix
            return F.linear(h, self.model.embed_tokens.weight.to(h.dtype))
        return self.lm_head(h)


# ---- the default lowering table ------------------------------------------------------------------------------
@_lowers(Embedding)
def lower_embedding(node: Embedding, backend: Backend) -> nn.Module:
    return TorchEmbedding(node)


@_lowers(RMSNorm)
def lower_rmsnorm(node: RMSNorm, backend: Backend) -> nn.Module:
    return TorchRMSNorm(node)


@_lowers(Linear)
def lower_linear(node: Linear, backend: Backend) -> nn.Module:
    return TorchLinear(node)


@_lowers(Attention)
def lower_attention(node: Attention, backend: Backend) -> nn.Module:
    return TorchAttention(node, backend)


@_lowers(SwiGLU)
def lower_swiglu(node: SwiGLU, backend: Backend) -> nn.Module:
    return TorchSwiGLU(node, backend)


@_lowers(Block)
def lower_block(node: Block, backend: Backend) -> nn.Module:
    return TorchBlock(node, backend)


@_lowers(Decoder)
def lower_decoder(node: Decoder, backend: Backend) -> nn.Module:
    return TorchDecoder(node, backend)


@_lowers(Llama)
def lower_llama(node: Llama, backend: Backend) -> nn.Module:
    return TorchLlama(node, backend)
