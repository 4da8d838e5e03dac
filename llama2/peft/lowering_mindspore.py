"""MindSpore lowering of the built-in adapter node kinds (LoRALinear, PrefixAttention), registered on first use.

Dropout follows the cells' training flag (`runtime.train(True)` calls `net.set_train`); it is read when a graph is
compiled, so the MindSpore runtime recompiles its jitted functions when the mode changes.
"""

from __future__ import annotations

from mindspore import nn, ops

from llama2.backends.mindspore.layers import AttentionCell, linear, zeros_param
from llama2.backends.mindspore.lowering import attention_args
from llama2.core.backend import Backend
from llama2.peft.lora import LoRALinear
from llama2.peft.prefix import PrefixAttention

__all__ = ["LoRALinearCell", "PrefixAttentionCell", "register"]


class LoRALinearCell(nn.Cell):
    """x W^T + scale * lora_B(lora_A(dropout(x))); W (out, in) frozen."""

    def __init__(self, node: LoRALinear, backend: Backend) -> None:
        super().__init__()
        self.weight = zeros_param((node.out_features, node.in_features), "weight", requires_grad=False)
        self.lora_A = backend.lower(node.lora_A)
        self.lora_B = backend.lower(node.lora_B)
        self.scale = float(node.scale)
        self.use_dropout = node.dropout > 0
        self.dropout = nn.Dropout(p=float(node.dropout)) if self.use_dropout else None

    def construct(self, x):
        h = x
        if self.use_dropout:
            h = self.dropout(x)
        return linear(x, self.weight) + self.lora_B(self.lora_A(h)) * self.scale


class PrefixMLPCell(nn.Cell):
    def __init__(self, node: PrefixAttention, backend: Backend) -> None:
        super().__init__()
        mlp = node.prefix_mlp
        self.embedding = zeros_param((mlp.n_virtual, mlp.dim), "embedding")
        self.dense_in = backend.lower(mlp.dense_in)
        self.dense_out = backend.lower(mlp.dense_out)
        self.n_virtual, self.n_kv_heads, self.head_dim = mlp.n_virtual, node.n_kv_heads, node.head_dim

    def construct(self):
        h = self.dense_out(ops.tanh(self.dense_in(self.embedding)))  # (n_virtual, 2 * kv_dim)
        kv = h.reshape(self.n_virtual, 2, self.n_kv_heads, self.head_dim).transpose(1, 2, 0, 3)
        return kv[0], kv[1]


class PrefixAttentionCell(AttentionCell):
    """`AttentionCell` whose `extra_kv` returns the learned prefix, broadcast over the batch."""

    def __init__(self, node: PrefixAttention, backend: Backend) -> None:
        super().__init__(*attention_args(node, backend))
        self.n_virtual = node.n_virtual
        self.use_mlp = node.prefix_mlp is not None
        if self.use_mlp:
            self.prefix_mlp = PrefixMLPCell(node, backend)
        else:
            shape = (node.n_kv_heads, node.n_virtual, node.head_dim)
            self.prefix_key = zeros_param(shape, "prefix_key")
            self.prefix_value = zeros_param(shape, "prefix_value")

    def extra_kv(self, batch: int):
        if self.use_mlp:
            k, v = self.prefix_mlp()
        else:
            k, v = self.prefix_key, self.prefix_value
        shape = (batch, self.n_kv_heads, self.n_virtual, self.head_dim)
        return ops.broadcast_to(k.expand_dims(0), shape), ops.broadcast_to(v.expand_dims(0), shape)


def register(backend: Backend) -> None:
    backend.lowering(LoRALinear)(LoRALinearCell)
    backend.lowering(PrefixAttention)(PrefixAttentionCell)
