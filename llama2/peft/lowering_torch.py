"""Torch lowering of the built-in adapter node kinds (LoRALinear, PrefixAttention), registered on first use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama2.backends.torch.lowering import TorchAttention
from llama2.core.backend import Backend
from llama2.peft.lora import LoRALinear
from llama2.peft.prefix import PrefixAttention

__all__ = ["TorchLoRALinear", "TorchPrefixAttention", "register"]


class TorchLoRALinear(nn.Module):
    """x W^T + scale * lora_B(lora_A(dropout(x))); dropout follows `module.train()`."""

    def __init__(self, node: LoRALinear, backend: Backend) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(node.out_features, node.in_features))
        self.lora_A = backend.lower(node.lora_A)
        self.lora_B = backend.lower(node.lora_B)
        self.scale = float(node.scale)
        self.dropout = nn.Dropout(node.dropout) if node.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale


class TorchPrefixAttention(TorchAttention):
    """`TorchAttention` whose `kv_prefix` returns the learned prefix (from its parameters or its MLP)."""

    def __init__(self, node: PrefixAttention, backend: Backend) -> None:
        super().__init__(node, backend)
        self.n_virtual = node.n_virtual
        if node.prefix_mlp is None:
            shape = (node.n_kv_heads, node.n_virtual, node.head_dim)
            self.prefix_key = nn.Parameter(torch.zeros(shape))
            self.prefix_value = nn.Parameter(torch.zeros(shape))
        else:
            self.prefix_mlp = TorchPrefixMLP(node, backend)

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (n_kv_heads, n_virtual, head_dim)."""
        if hasattr(self, "prefix_mlp"):
            return self.prefix_mlp()
        return self.prefix_key, self.prefix_value

    def kv_prefix(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.prefix()
        shape = (batch, *k.shape)
        return k.to(dtype).unsqueeze(0).expand(shape), v.to(dtype).unsqueeze(0).expand(shape)


class TorchPrefixMLP(nn.Module):
    def __init__(self, node: PrefixAttention, backend: Backend) -> None:
        super().__init__()
        mlp = node.prefix_mlp
        self.embedding = nn.Parameter(torch.zeros(mlp.n_virtual, mlp.dim))
        self.dense_in = backend.lower(mlp.dense_in)
        self.dense_out = backend.lower(mlp.dense_out)
        self.n_kv_heads, self.head_dim = node.n_kv_heads, node.head_dim

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dense_out(torch.tanh(self.dense_in(self.embedding)))  # (n_virtual, 2 * kv_dim)
        kv = h.view(h.shape[0], 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]


def register(backend: Backend) -> None:
    backend.lowering(LoRALinear)(TorchLoRALinear)
    backend.lowering(PrefixAttention)(TorchPrefixAttention)
