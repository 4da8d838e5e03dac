"""Typed registries (backends, adapters, metrics, data formats) with entry-point plugin discovery."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry", "BACKENDS", "ADAPTERS", "METRICS", "DATA_FORMATS"]

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """Name -> object registry of one kind.

    `register(name)` is a decorator; `get(name)` raises KeyError listing the known names. Plugins installed with
    an entry point in `group` are loaded on the first lookup of an unknown name (or on `names()`).
    """

    def __init__(
        self, kind: str, group: str | None = None, builtin: tuple[str, ...] = (), lazy: dict[str, str] | None = None
    ) -> None:
        self.kind = kind
        self.group = group
        self._builtin = builtin  # modules imported lazily to register the built-in entries
        self._lazy = dict(lazy or {})  # name -> module registering just that entry (imported on its first lookup)
        self._items: dict[str, T] = {}
        self._builtin_loaded = False
        self._plugins_loaded = False

    def register(self, name: str, obj: T | None = None, *, override: bool = False) -> Callable[[T], T] | T:
        """Register `obj` as `name`; used bare as `@registry.register("name")`."""

        def deco(target: T) -> T:
            if name in self._items and self._items[name] is not target and not override:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = target
            return target

        return deco(obj) if obj is not None else deco

    def _load_one(self, name: object) -> None:
        """Import the module of one lazily registered built-in entry (e.g. one backend, not all of them)."""
        module = self._lazy.get(name) if isinstance(name, str) else None
        if module is not None and name not in self._items:
            import importlib

            importlib.import_module(module)

    def _load_builtin(self) -> None:
        for lazy_name in self._lazy:
            self._load_one(lazy_name)
        if not self._builtin_loaded:
            self._builtin_loaded = True
            import importlib

            for module in self._builtin:
                importlib.import_module(module)

    def load_plugins(self) -> None:
        """Import every entry point of this registry's group (once)."""
        if self._plugins_loaded or self.group is None:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            if ep.name in self._items:
                continue
            try:
                loaded = ep.load()
            except Exception as exc:  # a broken plugin must not break the library
                log.warning("could not load %s plugin %r (%s): %s", self.kind, ep.name, ep.value, exc)
                continue
            # An entry point may point at the object itself or at a module that registers on import.
            if ep.name not in self._items and not _is_module(loaded):
                self._items[ep.name] = loaded

    def get(self, name: str) -> T:
        self._load_one(name)
        if name not in self._items:
            self._load_builtin()
        if name not in self._items:
            self.load_plugins()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}") from None

    def names(self) -> list[str]:
        self._load_builtin()
        self.load_plugins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_one(name)
        if name not in self._items:
            self._load_builtin()
        if name not in self._items:
            self.load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _is_module(obj: object) -> bool:
    import types

    return isinstance(obj, types.ModuleType)


BACKENDS: Registry = Registry(
    "backend", "llama2.backends", lazy={"mindspore": "llama2.backends.mindspore", "torch": "llama2.backends.torch"}
)
ADAPTERS: Registry = Registry("adapter", "llama2.adapters", builtin=("llama2.peft",))
METRICS: Registry = Registry("metric", "llama2.metrics", builtin=("llama2.metrics",))
DATA_FORMATS: Registry = Registry("data format", "llama2.data_formats", builtin=("llama2.data.records",))
