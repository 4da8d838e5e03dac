"""Parameter-efficient finetuning: adapters as graph rewrites with per-backend lowerings.

Built-in adapters: "lora" (`LoRAConfig`) and "prefix" (`PrefixConfig`); plugins register in
`llama2.core.registry.ADAPTERS` through the `llama2.adapters` entry point group. See docs/peft.md.
"""

from llama2.peft.base import (
    Adapter,
    AdapterConfig,
    AdapterLinear,
    adapter_config,
    adapter_params,
    apply_adapter,
    attach_adapter,
    attached_adapters,
    get_adapter,
    is_adapter_param,
)
from llama2.peft.io import adapter_state, load_adapter, read_adapter_config, save_adapter
from llama2.peft.lora import LoRA, LoRAConfig, LoRALinear
from llama2.peft.merge import merge_lora, merge_lora_checkpoint, unmerge_lora
from llama2.peft.prefix import PrefixAttention, PrefixConfig, PrefixTuning

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterLinear",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "PrefixAttention",
    "PrefixConfig",
    "PrefixTuning",
    "adapter_config",
    "adapter_params",
    "adapter_state",
    "apply_adapter",
    "attach_adapter",
    "attached_adapters",
    "get_adapter",
    "is_adapter_param",
    "load_adapter",
    "merge_lora",
    "merge_lora_checkpoint",
    "read_adapter_config",
    "save_adapter",
    "unmerge_lora",
]
