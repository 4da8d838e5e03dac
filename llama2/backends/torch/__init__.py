"""PyTorch backend (second backend): eager modules with SDPA attention, KV cache, AdamW, DDP/FSDP.

`backend` is the registered instance; adapters add node kinds with `backend.lowering(NodeType)` (or through
`llama2.core.registry.BACKENDS.get("torch")`).
"""

from llama2.backends.torch.lowering import LOWERINGS, KVCache, TorchAttention, TorchLlama, attention
from llama2.backends.torch.runtime import TorchBackend, TorchRuntime
from llama2.core.registry import BACKENDS

__all__ = [
    "backend",
    "TorchBackend",
    "TorchRuntime",
    "TorchLlama",
    "TorchAttention",
    "KVCache",
    "LOWERINGS",
    "attention",
]

backend = TorchBackend()
BACKENDS.register("torch", backend)
