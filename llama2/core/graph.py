"""Framework-neutral graph of Llama 2.

Nodes are small frozen attrs classes. Each node lists its own parameters (`ParamSpec`) and its child nodes; the
dotted path of children gives the canonical (Hugging Face) parameter names, e.g.
`model.layers.0.self_attn.q_proj.weight`. Backends lower each node kind once into native modules whose attribute
names mirror the child names, so native parameter names equal the canonical ones.

Adapters (LoRA, prefix tuning, plugins) are graph rewrites: `replace_nodes` swaps chosen nodes for adapter nodes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from llama2.core.config import ModelConfig

__all__ = [
    "ParamSpec",
    "Node",
    "Embedding",
    "RMSNorm",
    "Linear",
    "Attention",
    "SwiGLU",
    "Block",
    "Decoder",
    "Llama",
    "build_graph",
    "named_nodes",
    "named_params",
    "replace_nodes",
]


@attrs.frozen
class ParamSpec:
    """One parameter: shape and initializer.

    `init` is one of "normal" (N(0, std)), "zeros", "ones". `trainable=False` marks frozen buffers.
    """

    shape: tuple[int, ...]
    init: str = "normal"
    std: float = 0.02
    trainable: bool = True


@attrs.frozen
class Node:
    """Base of every graph node."""

    def params(self) -> dict[str, ParamSpec]:
        """This node's own parameters, by local name."""
        return {}

    def children(self) -> dict[str, Node | tuple[Node, ...]]:
        """Child nodes by attribute name (attrs fields holding nodes or tuples of nodes)."""
        out: dict[str, Node | tuple[Node, ...]] = {}
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if isinstance(value, Node) or (
                isinstance(value, tuple) and value and all(isinstance(v, Node) for v in value)
            ):
                out[field.name] = value
        return out


@attrs.frozen
class Embedding(Node):
    num_embeddings: int
    dim: int

    def params(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec((self.num_embeddings, self.dim))}


@attrs.frozen
class RMSNorm(Node):
    """y = x / sqrt(mean(x^2) + eps) * weight; statistics in fp32."""

    dim: int
    eps: float = 1e-5

    def params(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec((self.dim,), init="ones")}


@attrs.frozen
class Linear(Node):
    """y = x @ weight.T (weight stored (out, in), as torch and HF do); no bias in Llama 2."""

    in_features: int
    out_features: int

    def params(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec((self.out_features, self.in_features))}


@attrs.frozen
class Attention(Node):
    """Causal grouped-query attention with rotary embeddings (rotate-half layout).

    Query head h reads key/value head h // (n_heads // n_kv_heads).
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads


@attrs.frozen
class SwiGLU(Node):
    """down(silu(gate(x)) * up(x))."""

    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


@attrs.frozen
class Block(Node):
    """h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    input_layernorm: RMSNorm
    self_attn: Attention
    post_attention_layernorm: RMSNorm
    mlp: SwiGLU


@attrs.frozen
class Decoder(Node):
    embed_tokens: Embedding
    layers: tuple[Block, ...]
    norm: RMSNorm


@attrs.frozen
class Llama(Node):
    """The whole model. `lm_head` is None when the output projection is tied to the embedding."""

    config: ModelConfig = attrs.field(eq=False, repr=False)
    model: Decoder
    lm_head: Linear | None


def build_graph(config: ModelConfig) -> Llama:
    """The Llama 2 graph for `config`."""
    c = config

    def block() -> Block:
        attn = Attention(
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            rope_theta=c.rope_theta,
            q_proj=Linear(c.dim, c.n_heads * c.head_dim),
            k_proj=Linear(c.dim, c.kv_dim),
            v_proj=Linear(c.dim, c.kv_dim),
            o_proj=Linear(c.n_heads * c.head_dim, c.dim),
        )
        mlp = SwiGLU(Linear(c.dim, c.hidden_dim), Linear(c.dim, c.hidden_dim), Linear(c.hidden_dim, c.dim))
        return Block(RMSNorm(c.dim, c.norm_eps), attn, RMSNorm(c.dim, c.norm_eps), mlp)

    decoder = Decoder(
        embed_tokens=Embedding(c.vocab_size, c.dim),
        layers=tuple(block() for _ in range(c.n_layers)),
        norm=RMSNorm(c.dim, c.norm_eps),
    )
    head = None if c.tie_embeddings else Linear(c.dim, c.vocab_size)
    return Llama(config=c, model=decoder, lm_head=head)


def named_nodes(node: Node, prefix: str = "") -> Iterator[tuple[str, Node]]:
    """Depth-first (path, node) pairs, the root first with path ""."""
    yield prefix, node
    for name, child in node.children().items():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, tuple):
            for i, sub in enumerate(child):
                yield from named_nodes(sub, f"{path}.{i}")
        else:
            yield from named_nodes(child, path)


def named_params(node: Node) -> dict[str, ParamSpec]:
    """Every parameter of the graph by canonical dotted name, in a stable order."""
    out: dict[str, ParamSpec] = {}
    for path, sub in named_nodes(node):
        for name, spec in sub.params().items():
            out[f"{path}.{name}" if path else name] = spec
    return out


def _rebuild(node: Node, path: str, fn: Callable[[str, Node], Node | None]) -> Node:
    changes: dict[str, Any] = {}
    for name, child in node.children().items():
        sub_path = f"{path}.{name}" if path else name
        if isinstance(child, tuple):
            new = tuple(_rebuild(c, f"{sub_path}.{i}", fn) for i, c in enumerate(child))
            if any(a is not b for a, b in zip(new, child)):
                changes[name] = new
        else:
            new_child = _rebuild(child, sub_path, fn)
            if new_child is not child:
                changes[name] = new_child
    if changes:
        node = attrs.evolve(node, **changes)
    replaced = fn(path, node)
    return node if replaced is None else replaced


def replace_nodes(root: Node, fn: Callable[[str, Node], Node | None]) -> Node:
    """Rewrite a graph bottom-up: `fn(path, node)` returns a replacement node or None to keep it."""
    return _rebuild(root, "", fn)


def match_paths(pattern: str | list[str], path: str) -> bool:
    """True when `path` matches any of the regular expression(s) with `re.search`."""
    patterns = [pattern] if isinstance(pattern, str) else pattern
    return any(re.search(p, path) for p in patterns)
