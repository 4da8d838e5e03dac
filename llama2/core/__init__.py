"""Backend-neutral core: config, graph, registries, generation, training loop, checkpoint formats."""

from llama2.core.config import PRESETS, ModelConfig
from llama2.core.graph import build_graph

__all__ = ["ModelConfig", "PRESETS", "build_graph"]
