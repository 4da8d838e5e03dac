"""The contract between core and a backend.

A `Backend` lowers each graph node kind once into a native module (registered per node type, so adapters add
their own node kinds) and wraps the result in a `Runtime`. Everything backend-neutral (generation, training loop,
metrics, checkpoint formats) talks to a `Runtime` with numpy arrays only.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
import numpy as np

from llama2.core.config import ModelConfig
from llama2.core.graph import Llama, Node, ParamSpec, named_params

__all__ = ["Backend", "Runtime", "TrainState", "OptimConfig", "RuntimeOptions", "rope_tables", "IGNORE_INDEX"]

IGNORE_INDEX = -100

DEVICES = ("cpu", "gpu", "ascend", "cuda")
DTYPES = ("float32", "float16", "bfloat16")


@attrs.frozen(kw_only=True)
class RuntimeOptions:
    """Where and how a backend runs the graph.

    device: "cpu", "gpu"/"cuda" or "ascend"; dtype: compute dtype ("float32", "float16", "bfloat16"); master
    weights stay float32. mode: "graph" (compiled: `mindspore.jit` / `torch.compile`) or "eager" (PyNative /
    plain torch, for debugging).
    """

    device: str = attrs.field(default="cpu", validator=attrs.validators.in_(DEVICES))
    dtype: str = attrs.field(default="float32", validator=attrs.validators.in_(DTYPES))
    mode: str = attrs.field(default="graph", validator=attrs.validators.in_(("graph", "eager")))
    seed: int = 0
    device_id: int = 0


@attrs.frozen(kw_only=True)
class OptimConfig:
    """AdamW with decoupled weight decay (torch semantics); global-norm gradient clipping."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    decay_1d: bool = False  # weight decay on 1-D params (norm weights); off as in most Llama recipes


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (max_len, head_dim) in float32 for the rotate-half layout, computed in float64."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


class TrainState(abc.ABC):
    """Gradient accumulation and AdamW for one runtime's trainable parameters.

    One optimizer step = any number of `accumulate` calls, then one `apply`. Losses are token-weighted: the
    gradient of the summed NLL is accumulated and `apply` divides by the token count of the whole step.
    """

    @abc.abstractmethod
    def accumulate(self, ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """Add d(sum NLL)/dparams for one micro-batch; labels == IGNORE_INDEX are not scored.

        ids, labels: int (batch, seq), labels already aligned with ids (label[t] is the target after ids[..t]).
        Returns (sum of NLL, number of scored tokens).
        """

    @abc.abstractmethod
    def apply(self, lr: float, n_tokens: int) -> float:
        """grads /= n_tokens, clip to the global norm, one AdamW update, zero grads; returns the pre-clip norm."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state as float32 arrays (keys like `exp_avg.<param>`, `exp_avg_sq.<param>`, `step`)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


class Runtime(abc.ABC):
    """A lowered graph on one backend: weights, forward, KV-cache decoding, training."""

    backend_name: str = "?"

    def __init__(self, graph: Llama, options: RuntimeOptions) -> None:
        self.graph = graph
        self.options = options
        self.specs: dict[str, ParamSpec] = named_params(graph)

    @property
    def config(self) -> ModelConfig:
        return self.graph.config

    # ---- weights -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def get_param(self, name: str) -> np.ndarray:
        """A parameter as a float32 numpy copy."""

    @abc.abstractmethod
    def _set_param(self, name: str, value: np.ndarray) -> None:
        """Overwrite a parameter in place (shape already checked)."""

    def set_param(self, name: str, value: np.ndarray, source: str = "") -> None:
        spec = self.specs.get(name)
        where = f" in {source}" if source else ""
        if spec is None:
            raise KeyError(f"unexpected tensor {name!r}{where}; the model has no such parameter")
        value = np.asarray(value)
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(
                f"tensor {name!r}{where} has shape {tuple(value.shape)}, expected {tuple(spec.shape)} from the config"
            )
        self._set_param(name, value.astype(np.float32, copy=False))

    def param_names(self) -> list[str]:
        return list(self.specs)

    def state_dict(self) -> Iterator[tuple[str, np.ndarray]]:
        """(canonical name, float32 array) pairs, one tensor at a time."""
        for name in self.specs:
            yield name, self.get_param(name)

    def load_state(self, items: Iterable[tuple[str, np.ndarray]], *, strict: bool = True, source: str = "") -> None:
        """Copy tensors in one at a time; with `strict`, every parameter must be given exactly once."""
        seen: set[str] = set()
        for name, value in items:
            self.set_param(name, value, source)
            seen.add(name)
        missing = [n for n in self.specs if n not in seen]
        if strict and missing:
            where = f" {source}" if source else ""
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise KeyError(f"checkpoint{where} is missing tensor(s) {missing[:5]}{more}")

    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter from its spec with a seeded numpy generator (backend-independent)."""
        rng = np.random.default_rng(seed)
        for name, spec in self.specs.items():
            self._set_param(name, init_array(spec, rng))

    def num_parameters(self, trainable_only: bool = False) -> int:
        names = self.trainable_names() if trainable_only else list(self.specs)
        return int(sum(int(np.prod(self.specs[n].shape)) for n in names))

    # ---- inference -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits float32 (batch, seq, vocab) for int ids (batch, seq).

        attention_mask (batch, seq) of 0/1 marks real tokens (left padding); positions are cumsum(mask) - 1 per
        row, so a left-padded row gives the same logits as the unpadded one. Pad rows must not produce NaN.
        """

    @abc.abstractmethod
    def token_nll(self, ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Per-token negative log-likelihood float32 (batch, seq); 0 where labels == IGNORE_INDEX."""

    @abc.abstractmethod
    def new_cache(self, batch: int, max_len: int) -> Any:
        """An empty KV cache with room for `max_len` positions (max_len <= config.max_seq_len)."""

    @abc.abstractmethod
    def decode(
        self,
        cache: Any,
        ids: np.ndarray,
        positions: np.ndarray,
        kv_mask: np.ndarray,
        start: int,
        last_only: bool = True,
    ) -> np.ndarray:
        """Run `ids` (batch, t) through the model, writing their keys/values at cache slots [start, start + t).

        positions (batch, t): RoPE positions per row. kv_mask (batch, max_len) of 0/1: which cache slots may be
        attended to (slots >= start + t are ignored anyway: attention is causal in slot order).
        Returns float32 logits (batch, 1, vocab) if `last_only`, else (batch, t, vocab).
        """

    def _check_decode_args(
        self, cache_batch: int, cache_max_len: int, ids: Any, positions: Any, kv_mask: Any, start: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, positions, kv_mask) as arrays after the checks every `decode` shares; ValueError naming the
        argument otherwise: ids (batch, t) with batch == the cache's, slots [start, start + t) inside the cache,
        positions (batch, t) in [0, max_seq_len), kv_mask (batch, cache max_len)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"decode: ids must be (batch, t), got shape {ids.shape}")
        b, t = ids.shape
        if b != cache_batch:
            raise ValueError(f"decode: ids batch {b} differs from the cache batch {cache_batch}")
        if start < 0 or start + t > cache_max_len:
            raise ValueError(
                f"decode: context overflow: writing {t} token(s) at slot {start} needs {start + t} slots, "
                f"the cache has {cache_max_len}"
            )
        positions = np.asarray(positions)
        if positions.shape != (b, t):
            raise ValueError(f"decode: positions shape {positions.shape} differs from ids shape {(b, t)}")
        max_len = self.config.max_seq_len
        if positions.size and (positions.min() < 0 or positions.max() >= max_len):
            raise ValueError(
                f"decode: positions must be in [0, max_seq_len={max_len}), got min {positions.min()} "
                f"max {positions.max()}"
            )
        kv_mask = np.asarray(kv_mask)
        if kv_mask.shape != (b, cache_max_len):
            raise ValueError(f"decode: kv_mask shape {kv_mask.shape}, expected {(b, cache_max_len)}")
        return ids, positions, kv_mask

    # ---- training ------------------------------------------------------------------------------------------
    def trainable_names(self) -> list[str]:
        return [n for n in self.specs if self._trainable.get(n, self.specs[n].trainable)]

    def set_trainable(self, predicate: Callable[[str], bool]) -> None:
        """Freeze every parameter for which predicate(name) is False."""
        self._trainable = {n: bool(predicate(n)) for n in self.specs}

    @property
    def _trainable(self) -> dict[str, bool]:
        return self.__dict__.setdefault("_trainable_map", {})

    @_trainable.setter
    def _trainable(self, value: dict[str, bool]) -> None:
        self.__dict__["_trainable_map"] = value

    @abc.abstractmethod
    def train_state(self, optim: OptimConfig) -> TrainState:
        """A `TrainState` over `trainable_names()` (call after `set_trainable`)."""

    def train(self, mode: bool = True) -> None:
        """Switch dropout (adapters) on or off; the base model has none."""
        self.training = mode

    def enable_recompute(self) -> None:
        """Recompute each decoder block's activations in the backward pass instead of keeping them (activation
        checkpointing: less memory, one more forward per block). Same numbers; call before training starts."""
        raise NotImplementedError(f"the {self.backend_name} backend cannot recompute activations")


def init_array(spec: ParamSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.init == "zeros":
        return np.zeros(spec.shape, np.float32)
    if spec.init == "ones":
        return np.ones(spec.shape, np.float32)
    if spec.init == "normal":
        return (rng.standard_normal(spec.shape, dtype=np.float32) * spec.std).astype(np.float32)
    raise ValueError(f"unknown init {spec.init!r}")


class Backend(abc.ABC):
    """A backend: one lowering function per node type, and `build` to make a `Runtime`.

    Adapters register lowerings for their node kinds with `@backend.lowering(NodeType)`; the lowering is found
    through the node type's MRO, so a subclass falls back to its base's lowering.
    """

    name: str = "?"

    def __init__(self) -> None:
        self._lowerings: dict[type, Callable[..., Any]] = {}

    def lowering(self, node_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._lowerings[node_type] = fn
            return fn

        return deco

    def lower(self, node: Node) -> Any:
        """The native module for `node` (children lowered recursively by the node's lowering)."""
        for cls in type(node).__mro__:
            fn = self._lowerings.get(cls)
            if fn is not None:
                return fn(node, self)
        raise NotImplementedError(
            f"backend {self.name!r} has no lowering for node kind {type(node).__name__}; "
            f"known: {sorted(c.__name__ for c in self._lowerings)}"
        )

    @abc.abstractmethod
    def build(self, graph: Llama, options: RuntimeOptions | None = None) -> Runtime:
        """Lower `graph` once and return a runtime (weights uninitialized or zero)."""

    def available(self) -> tuple[bool, str]:
        """(usable here, reason if not)."""
        return True, ""
