"""Prefix tuning (Li & Liang 2021): per layer, `n_virtual` trainable key/value slots that every query attends to.

A graph rewrite of each `Attention` into a `PrefixAttention` holding `prefix_key` and `prefix_value`, each
(n_kv_heads, n_virtual, head_dim): sized by the key/value heads, so GQA models get n_kv_heads (not n_heads) rows.
The prefix is not rotated (it has no position); the attention mask is widened by the virtual slots, which every
query (also on left-padding rows, and in KV-cache decoding) may attend to. The backends prepend the prefix through
their attention hook (`AttentionCell.extra_kv` / `TorchAttention.kv_prefix`).

Optional reparameterization (`projection_dim > 0`): during training the prefix is produced per layer by a small MLP
(embedding (n_virtual, dim) -> Linear -> tanh -> Linear -> 2 * kv_dim), as in the paper; `save_adapter` folds it
into plain prefix_key/prefix_value tensors, so saved adapters never carry the MLP.
"""

from __future__ import annotations

import attrs
import numpy as np

from llama2.core.backend import Runtime
from llama2.core.graph import Attention, Llama, Node, ParamSpec, named_nodes, replace_nodes
from llama2.core.registry import ADAPTERS
from llama2.peft.base import Adapter, AdapterConfig, AdapterLinear, AdapterPart

__all__ = ["PrefixConfig", "PrefixAttention", "PrefixMLP", "PrefixTuning", "fold_prefix_mlp"]


def _nonneg(instance, attribute, value) -> None:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"PrefixConfig.{attribute.name} must be a non-negative integer, got {value!r}")


@attrs.frozen(kw_only=True)
class PrefixConfig(AdapterConfig):
    """n_virtual: virtual tokens per layer; projection_dim: hidden width of the training-time MLP (0: none)."""

    n_virtual: int = attrs.field(default=16, validator=_nonneg)
    projection_dim: int = attrs.field(default=0, validator=_nonneg)

    def __attrs_post_init__(self) -> None:
        if self.n_virtual <= 0:
            raise ValueError(f"PrefixConfig.n_virtual must be positive, got {self.n_virtual}")


@attrs.frozen
class PrefixMLP(AdapterPart):
    """embedding (n_virtual, dim) -> dense_in -> tanh -> dense_out -> (n_virtual, 2 * kv_dim): keys then values."""

    n_virtual: int
    dim: int
    dense_in: AdapterLinear
    dense_out: AdapterLinear

    def params(self) -> dict[str, ParamSpec]:
        return {"embedding": ParamSpec((self.n_virtual, self.dim))}


@attrs.frozen
class PrefixAttention(Attention):
    """`Attention` plus trainable prefix keys/values (or the MLP producing them)."""

    n_virtual: int = 16
    prefix_mlp: PrefixMLP | None = None

    def params(self) -> dict[str, ParamSpec]:
        if self.prefix_mlp is not None:
            return {}
        shape = (self.n_kv_heads, self.n_virtual, self.head_dim)
        return {"prefix_key": ParamSpec(shape), "prefix_value": ParamSpec(shape)}

    def base(self) -> Attention:
        return Attention(
            self.n_heads, self.n_kv_heads, self.head_dim, self.rope_theta, self.q_proj, self.k_proj, self.v_proj,
            self.o_proj,
        )  # fmt: skip


def fold_prefix_mlp(
    embedding: np.ndarray, w_in: np.ndarray, w_out: np.ndarray, n_kv_heads: int, head_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (prefix_key, prefix_value) an MLP produces, each (n_kv_heads, n_virtual, head_dim), in float32.

    Shared by the folding at save time and (as the reference) by the tests of the in-graph MLP.
    """
    h = np.tanh(embedding.astype(np.float64) @ w_in.astype(np.float64).T) @ w_out.astype(np.float64).T
    n_virtual = embedding.shape[0]
    kv = h.reshape(n_virtual, 2, n_kv_heads, head_dim).transpose(1, 2, 0, 3)
    return kv[0].astype(np.float32), kv[1].astype(np.float32)


class PrefixTuning(Adapter):
    name = "prefix"
    config_cls = PrefixConfig
    node_types = (PrefixAttention,)
    lowering_modules = {"torch": "llama2.peft.lowering_torch", "mindspore": "llama2.peft.lowering_mindspore"}

    def apply(self, graph: Llama, config: PrefixConfig) -> Llama:
        c = graph.config

        def fn(path: str, node: Node):
            if type(node) is not Attention:
                return None
            mlp = None
            if config.projection_dim:
                kv2 = 2 * node.n_kv_heads * node.head_dim
                mlp = PrefixMLP(
                    config.n_virtual,
                    c.dim,
                    AdapterLinear(c.dim, config.projection_dim),
                    AdapterLinear(config.projection_dim, kv2),
                )
            fields = {f.name: getattr(node, f.name) for f in attrs.fields(Attention)}
            return PrefixAttention(**fields, n_virtual=config.n_virtual, prefix_mlp=mlp)

        return replace_nodes(graph, fn)

    def export(self, runtime: Runtime, config: PrefixConfig) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
        if not config.projection_dim:
            return super().export(runtime, config)
        out: dict[str, np.ndarray] = {}
        for path, node in named_nodes(runtime.graph):
            if isinstance(node, PrefixAttention) and node.prefix_mlp is not None:
                g = runtime.get_param
                k, v = fold_prefix_mlp(
                    g(f"{path}.prefix_mlp.embedding"),
                    g(f"{path}.prefix_mlp.dense_in.weight"),
                    g(f"{path}.prefix_mlp.dense_out.weight"),
                    node.n_kv_heads,
                    node.head_dim,
                )
                out[f"{path}.prefix_key"], out[f"{path}.prefix_value"] = k, v
        return attrs.evolve(config, projection_dim=0), out


ADAPTERS.register("prefix", PrefixTuning())
