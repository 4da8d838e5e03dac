"""One lowering function per graph node kind: node -> native MindSpore cell (children lowered recursively).

Adapters register lowerings for their own node kinds on the same backend object:
`BACKENDS.get("mindspore").lowering(MyNode)(fn)` where `fn(node, backend) -> nn.Cell`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llama2.backends.mindspore.layers import (
    AttentionCell,
    BlockCell,
    DecoderCell,
    EmbeddingCell,
    LinearCell,
    LlamaCell,
    RMSNormCell,
    SwiGLUCell,
)
from llama2.core.backend import Backend, rope_tables
from llama2.core.graph import Attention, Block, Decoder, Embedding, Linear, Llama, RMSNorm, SwiGLU

__all__ = ["DEFAULT_LOWERINGS", "register_default_lowerings"]


def lower_embedding(node: Embedding, backend: Backend) -> EmbeddingCell:
    return EmbeddingCell(node.num_embeddings, node.dim)


def lower_rmsnorm(node: RMSNorm, backend: Backend) -> RMSNormCell:
    return RMSNormCell(node.dim, node.eps)


def lower_linear(node: Linear, backend: Backend) -> LinearCell:
    return LinearCell(node.in_features, node.out_features)


def attention_args(node: Attention, backend: Backend) -> tuple:
    """`AttentionCell`'s constructor arguments for `node` (shared with attention subclasses such as prefix)."""
    projections = (node.q_proj, node.k_proj, node.v_proj, node.o_proj)
    return (node.n_heads, node.n_kv_heads, node.head_dim, *(backend.lower(p) for p in projections))


def lower_attention(node: Attention, backend: Backend) -> AttentionCell:
    return AttentionCell(*attention_args(node, backend))


def lower_swiglu(node: SwiGLU, backend: Backend) -> SwiGLUCell:
    return SwiGLUCell(backend.lower(node.gate_proj), backend.lower(node.up_proj), backend.lower(node.down_proj))


def lower_block(node: Block, backend: Backend) -> BlockCell:
    return BlockCell(
        backend.lower(node.input_layernorm),
        backend.lower(node.self_attn),
        backend.lower(node.post_attention_layernorm),
        backend.lower(node.mlp),
    )


def lower_decoder(node: Decoder, backend: Backend) -> DecoderCell:
    layers = [backend.lower(layer) for layer in node.layers]
    return DecoderCell(backend.lower(node.embed_tokens), layers, backend.lower(node.norm))


def lower_llama(node: Llama, backend: Backend) -> LlamaCell:
    c = node.config
    cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta)
    head = None if node.lm_head is None else backend.lower(node.lm_head)
    return LlamaCell(backend.lower(node.model), head, cos, sin)


DEFAULT_LOWERINGS: dict[type, Callable[[Any, Backend], Any]] = {
    Embedding: lower_embedding,
    RMSNorm: lower_rmsnorm,
    Linear: lower_linear,
    Attention: lower_attention,
    SwiGLU: lower_swiglu,
    Block: lower_block,
    Decoder: lower_decoder,
    Llama: lower_llama,
}


def register_default_lowerings(backend: Backend) -> None:
    """Register the base model's lowerings on `backend` (adapters add theirs afterwards)."""
    for node_type, fn in DEFAULT_LOWERINGS.items():
        backend.lowering(node_type)(fn)
