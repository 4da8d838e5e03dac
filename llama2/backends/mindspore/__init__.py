"""MindSpore backend (primary): registers itself as "mindspore" in `llama2.core.registry.BACKENDS`."""

from llama2.backends.mindspore.backend import MindSporeBackend
from llama2.core.registry import BACKENDS

__all__ = ["MindSporeBackend", "BACKEND"]

BACKEND = MindSporeBackend()
BACKENDS.register("mindspore", BACKEND)
