"""`MindSporeRuntime`: a lowered graph with weights, forward, KV-cache decoding and training."""

from __future__ import annotations

from typing import Any

import attrs
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from llama2.core.backend import IGNORE_INDEX, OptimConfig, Runtime, RuntimeOptions, TrainState
from llama2.core.graph import Llama

__all__ = ["KVCache", "MindSporeRuntime", "token_nll_tensor", "summed_nll", "recompute_once", "left_pad_positions"]


@attrs.define
class KVCache:
    """Static-shape cache: k, v are tuples with one (batch, n_kv_heads, max_len, head_dim) tensor per layer.

    Per-layer tensors rather than one stacked array: slicing a layer out of a stacked cache (`StridedSlice`) and
    stacking it back cost ~9 ms per layer and step on CPU, most of a decode step.
    """

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]

    @property
    def batch(self) -> int:
        return int(self.k[0].shape[0])

    @property
    def max_len(self) -> int:
        return int(self.k[0].shape[2])


def left_pad_positions(mask: np.ndarray) -> np.ndarray:
    """RoPE positions cumsum(mask) - 1 per row (clipped at 0 on the left padding)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)


def token_nll_tensor(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token NLL (batch, seq) in fp32; 0 where labels == IGNORE_INDEX."""
    valid = labels != IGNORE_INDEX
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    logp = ops.log_softmax(logits.astype(ms.float32), -1)
    picked = ops.gather_elements(logp, 2, safe.expand_dims(-1)).squeeze(-1)
    return ops.where(valid, -picked, ops.zeros_like(picked))


def recompute_once(cell: nn.Cell) -> None:
    """`cell.recompute()` unless done already (MindSpore allows configuring a cell only once)."""
    if not getattr(cell, "llama2_recompute", False):
        # PyNative: the reentrant form replays dropout masks (tested); use_reentrant=False draws new ones
        cell.recompute()
        cell.llama2_recompute = True


def summed_nll(net: nn.Cell, ids: Tensor, labels: Tensor) -> Tensor:
    """Summed NLL of `net` over scored tokens for full (unpadded) rows of ids: the training objective."""
    b, s = ids.shape
    positions = ops.broadcast_to(ops.arange(0, s, dtype=ms.int32).reshape(1, s), (b, s))
    logits = net(ids, positions, ops.ones((b, s), ms.int32), None, None, 0, False)[0]
    return token_nll_tensor(logits, labels).sum()


class MindSporeRuntime(Runtime):
    backend_name = "mindspore"

    def __init__(self, graph: Llama, options: RuntimeOptions, net: nn.Cell, compute_dtype: ms.Type) -> None:
        super().__init__(graph, options)
        self.net = net
        self.compute_dtype = compute_dtype
        for _, cell in net.cells_and_names():
            if hasattr(cell, "compute_dtype"):
                cell.compute_dtype = compute_dtype
        self.params: dict[str, ms.Parameter] = {p.name: p for p in net.get_parameters()}
        missing = [n for n in self.specs if n not in self.params]
        extra = [n for n in self.params if n not in self.specs]
        if missing or extra:
            raise RuntimeError(
                f"mindspore lowering produced parameter names that differ from the graph's canonical names: "
                f"missing {missing[:5]}, unexpected {extra[:5]} (cell attribute names must mirror graph child names)"
            )
        for name, p in self.params.items():
            if tuple(p.shape) != tuple(self.specs[name].shape):
                raise RuntimeError(
                    f"lowered parameter {name!r} has shape {tuple(p.shape)}, graph says {tuple(self.specs[name].shape)}"
                )
        self.training = False

        def run(ids, positions, key_mask, cache_k, cache_v, start, last_only):
            return net(ids, positions, key_mask, cache_k, cache_v, start, last_only)

        def nll(ids, positions, key_mask, labels):
            logits = net(ids, positions, key_mask, None, None, 0, False)[0]
            return token_nll_tensor(logits, labels)

        self.compiled = options.mode == "graph"
        # mindspore.jit compiles once per input shape (and reuses it for every later call with that shape); the
        # generation loop pads prompts and caches to multiples of this so nearby lengths share one compilation.
        self.length_bucket = 16 if self.compiled else 1
        self._fns = (run, nll)
        self._jit_fns()

    # ---- weights -------------------------------------------------------------------------------------------
    def get_param(self, name: str) -> np.ndarray:
        if name not in self.params:
            raise KeyError(f"unknown parameter {name!r}; the model has {len(self.params)} parameters")
        return self.params[name].asnumpy().astype(np.float32, copy=True)

    def _set_param(self, name: str, value: np.ndarray) -> None:
        param = self.params[name]
        ops.assign(param, Tensor(np.ascontiguousarray(value, dtype=np.float32)))

    # ---- inference -----------------------------------------------------------------------------------------
    def _inputs(self, ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[Tensor, Tensor, Tensor]:
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be an integer array (batch, seq), got {ids.dtype} {ids.shape}")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_seq_len {self.config.max_seq_len}")
        self._check_vocab(ids)
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from ids shape {ids.shape}")
        return Tensor(ids.astype(np.int32)), Tensor(left_pad_positions(mask)), Tensor(mask)

    def _check_vocab(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")

    def forward(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        t_ids, positions, mask = self._inputs(ids, attention_mask)
        logits, _, _ = self._run(t_ids, positions, mask, None, None, 0, False)
        return logits.asnumpy()

    def token_nll(self, ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        t_ids, positions, mask = self._inputs(ids, attention_mask)
        labels = np.asarray(labels)
        if labels.shape != tuple(t_ids.shape):
            raise ValueError(f"labels shape {labels.shape} differs from ids shape {tuple(t_ids.shape)}")
        return self._nll(t_ids, positions, mask, Tensor(labels.astype(np.int32))).asnumpy()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        if not 0 < max_len <= c.max_seq_len:
            raise ValueError(f"cache max_len must be in [1, max_seq_len={c.max_seq_len}], got {max_len}")
        shape = (batch, c.n_kv_heads, max_len, c.head_dim)
        k = tuple(ops.zeros(shape, self.compute_dtype) for _ in range(c.n_layers))
        v = tuple(ops.zeros(shape, self.compute_dtype) for _ in range(c.n_layers))
        return KVCache(k, v)

    def decode(
        self,
        cache: KVCache,
        ids: np.ndarray,
        positions: np.ndarray,
        kv_mask: np.ndarray,
        start: int,
        last_only: bool = True,
    ) -> np.ndarray:
        ids, positions, kv_mask = self._check_decode_args(cache.batch, cache.max_len, ids, positions, kv_mask, start)
        self._check_vocab(ids)
        logits, k, v = self._run(
            Tensor(ids.astype(np.int32)),
            Tensor(positions.astype(np.int32)),
            Tensor(kv_mask.astype(np.int32)),
            ms.mutable(cache.k) if self.compiled else cache.k,  # inputs, not constants of the compiled graph
            ms.mutable(cache.v) if self.compiled else cache.v,
            Tensor(int(start), ms.int32) if self.compiled else int(start),
            bool(last_only),
        )
        cache.k, cache.v = tuple(k), tuple(v)
        return logits.asnumpy()

    # ---- training ------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        """Set the cells' training flag (adapter dropout). A compiled graph reads it as a constant, so the jitted
        functions are rebuilt when it changes and some cell depends on it (`nn.Dropout`, or a cell with
        `depends_on_training = True`); call before the first `accumulate` of a train state."""
        if bool(mode) != self.training:
            self.net.set_train(bool(mode))
            mode_dependent = any(
                isinstance(c, nn.Dropout) or getattr(c, "depends_on_training", False)
                for _, c in self.net.cells_and_names()
            )
            if mode_dependent:
                self._jit_fns()
        super().train(mode)

    def _jit_fns(self) -> None:
        """(Re)build the forward functions; a compiled graph bakes in the cells' flags (training, recompute)."""
        run, nll = self._fns
        self._run, self._nll = (ms.jit(run), ms.jit(nll)) if self.compiled else (run, nll)

    def enable_recompute(self) -> None:
        if self.options.device == "cpu" and self.compiled:
            import warnings

            warnings.warn(
                "recompute on MindSpore CPU graph mode does not lower memory (measured: +8% peak RSS, +20% step "
                "time); it is meant for GPU/Ascend. On CPU, mode='eager' trains in ~5x less memory than graph mode",
                stacklevel=2,
            )
        for block in self.net.model.layers:
            recompute_once(block)
        self._jit_fns()  # a graph compiled before would keep the activations

    def train_state(self, optim: OptimConfig, strategy: Any = None) -> TrainState:
        """Gradient accumulation + AdamW (`MindSporeTrainState`); with a `ParallelStrategy` (llama2.core.parallel),
        one fused step per update under semi-auto parallel (`FusedTrainState`, GPU/Ascend for a sharded one)."""
        if strategy is not None:
            from llama2.backends.mindspore.fused import FusedTrainState

            return FusedTrainState(self, optim, strategy)
        from llama2.backends.mindspore.train import MindSporeTrainState

        return MindSporeTrainState(self, optim)

    def loss_sum(self, ids: Tensor, labels: Tensor) -> Tensor:
        """Summed NLL over scored tokens for full (unpadded) rows: the training objective."""
        return summed_nll(self.net, ids, labels)

    def describe(self) -> dict[str, Any]:
        return {"backend": "mindspore", "version": ms.__version__, **attrs.asdict(self.options)}
