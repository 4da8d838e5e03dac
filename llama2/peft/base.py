"""The adapter protocol and the operations every adapter shares.

An adapter is a graph rewrite (`Adapter.apply(graph, config)`) that adds new node kinds, plus the per-backend
lowering of those node kinds (registered lazily by `Adapter.register_lowerings(backend)` with
`backend.lowering(NodeType)`). Adapters are registered by name in `llama2.core.registry.ADAPTERS` (built-in
"lora" and "prefix"; plugins through the `llama2.adapters` entry point group).

`attach_adapter(model, name, ...)` rewrites a model's graph, rebuilds its runtime on the same backend, copies the
base weights, initializes the adapter parameters (seeded) and freezes everything but the adapter parameters.
Adapters compose: attach LoRA, then prefix tuning, to the same model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import numpy as np

from llama2.core.backend import Backend, Runtime, init_array
from llama2.core.graph import Linear, Llama, Node, ParamSpec, named_nodes, named_params
from llama2.core.registry import ADAPTERS, BACKENDS

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterLinear",
    "AdapterPart",
    "apply_adapter",
    "attach_adapter",
    "adapter_config",
    "adapter_params",
    "attached_adapters",
    "get_adapter",
    "is_adapter_param",
]


@attrs.frozen(kw_only=True)
class AdapterConfig:
    """Base of adapter configs (attrs, frozen): plain JSON-able fields, `to_dict` / `from_dict`."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> AdapterConfig:
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            where = f" in {source}" if source else ""
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}{where}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


@attrs.frozen
class AdapterLinear(Linear):
    """A `Linear` inside an adapter node with its own initializer (e.g. LoRA's zero-initialized B).

    It lowers exactly as `Linear` (found through the MRO), so the parameter is `<path>.weight`.
    """

    init: str = "normal"
    std: float = 0.02

    def params(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec((self.out_features, self.in_features), init=self.init, std=self.std)}


class Adapter:
    """One adapter kind. Subclasses set `name`, `config_cls`, `node_types`, `lowering_modules` and `apply`.

    lowering_modules: backend name -> importable module exposing `register(backend)`, imported the first time a
    graph with this adapter is built on that backend (so importing `llama2.peft` loads no deep-learning library).
    """

    name: ClassVar[str] = "?"
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    node_types: ClassVar[tuple[type, ...]] = ()
    lowering_modules: ClassVar[dict[str, str]] = {}

    def apply(self, graph: Llama, config: AdapterConfig) -> Llama:
        """The rewritten graph (a pure function of the graph and the config)."""
        raise NotImplementedError

    def param_names(self, graph: Llama) -> list[str]:
        """Canonical names of this adapter's parameters in `graph`: every parameter of its node kinds that the
        node spec marks trainable (the frozen base weight a node wraps is not an adapter parameter)."""
        out: list[str] = []
        for path, node in named_nodes(graph):
            if isinstance(node, self.node_types):
                out.extend(f"{path}.{n}" for n in adapter_local_params(node))
        return out

    def export(self, runtime: Runtime, config: AdapterConfig) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
        """(config, tensors) to save; an adapter may fold a training-time reparameterization here."""
        return config, {n: runtime.get_param(n) for n in self.param_names(runtime.graph)}

    def register_lowerings(self, backend: Backend) -> None:
        """Make sure `backend` can lower this adapter's node kinds (imports the backend's lowering module once)."""
        if all(t in getattr(backend, "_lowerings", {}) for t in self.node_types):
            return
        module = self.lowering_modules.get(backend.name)
        if module is None:
            raise NotImplementedError(
                f"adapter {self.name!r} has no lowering for backend {backend.name!r} "
                f"(it supports: {', '.join(sorted(self.lowering_modules)) or 'none'})"
            )
        importlib.import_module(module).register(backend)


class AdapterPart(Node):
    """Marker base for nodes owned by an adapter (every parameter below one belongs to the adapter)."""


def adapter_local_params(node: Node) -> list[str]:
    """Local names (relative to adapter node `node`) of its adapter parameters: its own trainable parameters and
    every parameter below children that are `AdapterLinear` / `AdapterPart` (not the base children it wraps)."""
    out = [n for n, spec in node.params().items() if spec.trainable]
    for path, sub in named_nodes(node):
        if not path or not _owned(node, path):
            continue
        out.extend(f"{path}.{n}" for n in sub.params())
    return out


def _owned(root: Node, path: str) -> bool:
    """True when the direct child of `root` on `path` is adapter-owned (nested adapters belong to themselves)."""
    first = path.split(".", 1)[0]
    child = getattr(root, first)
    return isinstance(child, AdapterLinear | AdapterPart)


def get_adapter(name: str) -> Adapter:
    """The registered adapter `name` (built-in or plugin); KeyError lists the known names."""
    adapter = ADAPTERS.get(name)
    if isinstance(adapter, type):  # a plugin may register the class itself
        adapter = adapter()
    return adapter


def adapter_config(name: str, config: AdapterConfig | dict[str, Any] | None = None, **options: Any) -> AdapterConfig:
    """An adapter's config from a config object, a dict, and/or keyword options (unknown keys are errors)."""
    cls = get_adapter(name).config_cls
    if isinstance(config, AdapterConfig):
        return attrs.evolve(config, **options) if options else config
    data = dict(config or {})
    data.update(options)
    return cls.from_dict(data, source=f"{name} adapter options")


def apply_adapter(graph: Llama, name: str, config: AdapterConfig | dict[str, Any] | None = None, **options) -> Llama:
    """Rewrite `graph` with adapter `name` (pure graph transformation; no weights involved)."""
    return get_adapter(name).apply(graph, adapter_config(name, config, **options))


def attached_adapters(runtime: Runtime) -> dict[str, AdapterConfig]:
    """Adapters attached to a runtime, in the order they were applied (name -> config)."""
    return dict(getattr(runtime, "adapters", {}))


def adapter_params(model: Any, name: str | None = None) -> list[str]:
    """Canonical names of the adapter parameters of a model/runtime (of adapter `name`, or of all attached)."""
    runtime = _runtime(model)
    names = [name] if name is not None else list(attached_adapters(runtime))
    out: list[str] = []
    for n in names:
        out.extend(get_adapter(n).param_names(runtime.graph))
    return out


def is_adapter_param(model: Any) -> Callable[[str], bool]:
    """A predicate for `runtime.set_trainable`: True for the attached adapters' parameters only."""
    names = set(adapter_params(model))
    return names.__contains__


def _runtime(model: Any) -> Runtime:
    return model if isinstance(model, Runtime) else model.runtime


def rebuild(
    model: Any, graph: Llama, weights: Callable[[str], np.ndarray | None], adapters: dict, source: str = ""
) -> Any:
    """Build `graph` on the model's backend with the same options; weights(name) gives each tensor (None: init).

    A `Model` is updated in place and returned; a bare `Runtime` input returns the new runtime.
    """
    old = _runtime(model)
    backend = BACKENDS.get(old.backend_name)
    for name in adapters:
        get_adapter(name).register_lowerings(backend)
    new = backend.build(graph, old.options)
    seed = int(getattr(old.options, "seed", 0))
    rng = np.random.default_rng(seed + 7919)
    for pname, spec in new.specs.items():
        value = weights(pname)
        new.set_param(pname, init_array(spec, rng) if value is None else value, source)
    new.adapters = dict(adapters)
    new.merged_lora = dict(getattr(old, "merged_lora", {}))
    if adapters:
        names = set()
        for name in adapters:
            names.update(get_adapter(name).param_names(graph))
        new.set_trainable(names.__contains__)
    if getattr(old, "training", False):
        new.train(True)
    if isinstance(model, Runtime):
        return new
    model.runtime = new
    return model


def attach_adapter(
    model: Any, name: str, config: AdapterConfig | dict[str, Any] | None = None, *, seed: int | None = None, **options
) -> Any:
    """Add adapter `name` to a `Model` (in place; returned) or `Runtime` (a new runtime is returned).

    Base weights are copied, adapter parameters initialized from their specs (seeded by `seed`, default the
    runtime seed), and only the adapter parameters (of every attached adapter) stay trainable.
    """
    runtime = _runtime(model)
    attached = attached_adapters(runtime)
    if name in attached:
        raise ValueError(f"adapter {name!r} is already attached to this model")
    cfg = adapter_config(name, config, **options)
    graph = get_adapter(name).apply(runtime.graph, cfg)
    old_names = set(runtime.specs)
    rng = np.random.default_rng(int(runtime.options.seed if seed is None else seed))
    specs = named_params(graph)

    def weights(pname: str) -> np.ndarray:
        return runtime.get_param(pname) if pname in old_names else init_array(specs[pname], rng)

    return rebuild(model, graph, weights, {**attached, name: cfg})
