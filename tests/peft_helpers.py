"""Shared helpers of the PEFT tests: a tiny GQA config, model construction per backend, random adapter weights."""

from __future__ import annotations

import numpy as np

from llama2.core.config import ModelConfig
from llama2.core.model import Model, create

BACKENDS = ("mindspore", "torch")
# GQA (n_kv_heads < n_heads) so that k/v shapes differ from q/o shapes.
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=32)


def tiny(backend: str, mode: str = "eager", seed: int = 0, config: ModelConfig = CFG) -> Model:
    """A seeded random tiny model (MindSpore in PyNative unless `mode` says otherwise, to skip compilation)."""
    return (
        create(config, backend=backend, seed=seed, mode=mode)
        if backend == "mindspore"
        else create(config, backend=backend, seed=seed)
    )


def randomize(model: Model, names: list[str], seed: int = 1, std: float = 0.2) -> None:
    """Give adapter parameters non-trivial values (LoRA B starts at zero, which would hide every bug)."""
    rng = np.random.default_rng(seed)
    for n in names:
        shape = model.runtime.specs[n].shape
        model.runtime.set_param(n, (rng.standard_normal(shape) * std).astype(np.float32))


def ids(batch: int = 2, seq: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, CFG.vocab_size, (batch, seq))
