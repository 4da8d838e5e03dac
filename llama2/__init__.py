"""llama2: Llama 2 on MindSpore and PyTorch.

    from llama2 import load, pretrain, finetune, evaluate, generate

Heavy frameworks are imported only when first needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "llama2.api",
    "pretrain": "llama2.api",
    "finetune": "llama2.api",
    "evaluate": "llama2.api",
    "generate": "llama2.api",
    "Model": "llama2.core.model",
    "ModelConfig": "llama2.core.config",
    "GenerationConfig": "llama2.core.generation",
    "Tokenizer": "llama2.data.tokenizer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llama2' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
