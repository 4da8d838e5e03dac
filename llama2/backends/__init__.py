"""Backends: each lowers the neutral graph once into native modules (MindSpore primary, PyTorch second)."""

from llama2.core.registry import BACKENDS


def get_backend(name: str):
    """The backend registered as `name` (built-ins and `llama2.backends` entry points)."""
    return BACKENDS.get(name)
