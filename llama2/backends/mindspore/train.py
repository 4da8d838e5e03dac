"""`MindSporeTrainState`: summed-NLL gradients, accumulation, global-norm clipping, torch-exact AdamW."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from llama2.core.backend import IGNORE_INDEX, OptimConfig, TrainState

if TYPE_CHECKING:
    from llama2.backends.mindspore.runtime import MindSporeRuntime

__all__ = ["AdamWUpdate", "AdamWTrainState", "MindSporeTrainState", "data_parallel_size", "all_reduce_sum"]


def data_parallel_size() -> int:
    """Number of processes in the initialized `mindspore.communication` world (1 when not initialized)."""
    from mindspore.communication import GlobalComm, get_group_size

    if not GlobalComm.INITED:
        return 1
    return int(get_group_size())


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over every process of the world group."""
    return ops.AllReduce(ops.ReduceOp.SUM)(x)


class AdamWUpdate(nn.Cell):
    """Scale by 1/tokens, global-norm clipping and one torch-exact AdamW step over every parameter, in one call.

    Holds the moments as Parameters so that the whole update is one compiled graph under `mindspore.jit` (op by op
    in PyNative it costs ~10 kernel launches per parameter). Step-dependent scalars arrive as tensors, so the graph
    compiles once.
    """

    def __init__(self, params: list[Parameter], weight_decays: list[float], optim: OptimConfig) -> None:
        super().__init__()
        self.params = ParameterTuple(params)
        # clones keep each parameter's parallel layout (semi-auto parallel shards a moment like its parameter)
        self.exp_avg = self.params.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.params.clone(prefix="exp_avg_sq", init="zeros")
        for m in (*self.exp_avg, *self.exp_avg_sq):
            m.requires_grad = False
        self.weight_decays = tuple(float(w) for w in weight_decays)
        self.beta1, self.beta2 = (float(b) for b in optim.betas)
        self.eps = float(optim.eps)
        self.clip = float(optim.grad_clip) if optim.grad_clip is not None and optim.grad_clip > 0 else 0.0
        self.n = len(params)

    def construct(self, grads, scale, lr, step_size, bias2_sqrt):
        grads = [g * scale for g in grads]
        norm = ops.sqrt(ops.stack([ops.square(g).sum() for g in grads]).sum())
        if self.clip > 0:
            coef = ops.minimum(self.clip / (norm + 1e-6), 1.0)  # torch.nn.utils.clip_grad_norm_
            grads = [g * coef for g in grads]
        for i in range(self.n):
            p, g, wd = self.params[i], grads[i], self.weight_decays[i]
            m = self.exp_avg[i] * self.beta1 + g * (1.0 - self.beta1)
            v = self.exp_avg_sq[i] * self.beta2 + g * g * (1.0 - self.beta2)
            ops.assign(self.exp_avg[i], m)
            ops.assign(self.exp_avg_sq[i], v)
            new = p * (1.0 - lr * wd) if wd else p
            ops.assign(p, new - step_size * m / (ops.sqrt(v) / bias2_sqrt + self.eps))
        return norm


def _add_all(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


class AdamWTrainState(TrainState):
    """The trainable parameters of a runtime, their `AdamWUpdate` and its (de)serialization; `step` counts updates."""

    def __init__(self, runtime: MindSporeRuntime, optim: OptimConfig) -> None:
        self.runtime = runtime
        self.optim = optim
        self.names = runtime.trainable_names()
        if not self.names:
            raise ValueError("no trainable parameters: set_trainable froze every parameter")
        self.params = [runtime.params[n] for n in self.names]
        trainable = set(self.names)
        for name, p in runtime.params.items():
            p.requires_grad = name in trainable
        decays = [float(optim.weight_decay) if (p.ndim > 1 or optim.decay_1d) else 0.0 for p in self.params]
        self.update = AdamWUpdate(self.params, decays, optim)
        self.step = 0

    def check_batch(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, labels = np.asarray(ids), np.asarray(labels)
        if ids.ndim != 2 or labels.shape != ids.shape:
            raise ValueError(f"ids and labels must both be (batch, seq); got {ids.shape} and {labels.shape}")
        if ids.shape[1] > self.runtime.config.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_seq_len {self.runtime.config.max_seq_len}")
        self.runtime._check_vocab(ids)
        return ids, labels

    def next_scalars(self, lr: float, n_tokens: int) -> tuple[float, float, float, float]:
        """Advance `step`; the update's (1/tokens, lr, bias-corrected step size, sqrt(1 - beta2^t))."""
        if n_tokens <= 0:
            raise ValueError(f"an optimizer update needs a positive token count, got {n_tokens}")
        self.step += 1
        beta1, beta2 = (float(b) for b in self.optim.betas)
        lr = float(lr)
        return 1.0 / float(n_tokens), lr, lr / (1.0 - beta1**self.step), math.sqrt(1.0 - beta2**self.step)

    def state_dict(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"step": np.array(self.step, np.float32)}
        for name, m, v in zip(self.names, self.update.exp_avg, self.update.exp_avg_sq):
            out[f"exp_avg.{name}"] = m.asnumpy().astype(np.float32)
            out[f"exp_avg_sq.{name}"] = v.asnumpy().astype(np.float32)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "step" not in state:
            raise KeyError("optimizer state is missing 'step'")
        values = []
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            for key, dest in (
                (f"exp_avg.{name}", self.update.exp_avg[i]),
                (f"exp_avg_sq.{name}", self.update.exp_avg_sq[i]),
            ):
                if key not in state:
                    raise KeyError(f"optimizer state is missing {key!r}")
                value = np.asarray(state[key], np.float32)
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {key!r} has shape {value.shape}, expected {tuple(p.shape)}")
                values.append((dest, value))
        for dest, value in values:  # all checked first: a bad state leaves the moments untouched
            ops.assign(dest, Tensor(value))
        self.step = int(np.asarray(state["step"]))


class MindSporeTrainState(AdamWTrainState):
    """One optimizer step = `accumulate` calls (gradients of the summed NLL are added up) and one `apply`."""

    def __init__(self, runtime: MindSporeRuntime, optim: OptimConfig) -> None:
        super().__init__(runtime, optim)
        grad_fn = ms.value_and_grad(runtime.loss_sum, None, weights=self.params)

        def step(ids, labels):
            return grad_fn(ids, labels)

        self._step = ms.jit(step) if runtime.compiled else step
        self.grads: tuple[Tensor, ...] | None = None
        update = self.update

        def update_step(grads, scale, lr, step_size, bias2_sqrt):
            return update(grads, scale, lr, step_size, bias2_sqrt)

        self._update = ms.jit(update_step) if runtime.compiled else update_step
        self._add = ms.jit(_add_all) if runtime.compiled else _add_all

    def accumulate(self, ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        ids, labels = self.check_batch(ids, labels)
        n_tokens = int((labels != IGNORE_INDEX).sum())
        loss, grads = self._step(Tensor(ids.astype(np.int32)), Tensor(labels.astype(np.int32)))
        self.grads = tuple(grads) if self.grads is None else self._add(ms.mutable(self.grads), ms.mutable(tuple(grads)))
        return float(loss.asnumpy()), n_tokens

    def apply(self, lr: float, n_tokens: int) -> float:
        if self.grads is None:
            raise RuntimeError("apply() called before any accumulate() in this step")
        grads = self.grads
        if data_parallel_size() > 1:
            grads = [all_reduce_sum(g) for g in grads]
            n_tokens = int(all_reduce_sum(Tensor(np.array([n_tokens], np.float32))).asnumpy()[0])
        # a plain tuple of tensors would be a constant: one compilation per step
        scalars = (Tensor(x, ms.float32) for x in self.next_scalars(lr, n_tokens))
        norm = self._update(ms.mutable(tuple(grads)), *scalars)
        self.grads = None
        return float(norm.asnumpy())

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        super().load_state_dict(state)
        self.grads = None

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """`values` summed over the data-parallel world (so rank 0 logs the global loss); identity in one process."""
        values = np.asarray(values)
        if data_parallel_size() == 1:
            return values
        return all_reduce_sum(Tensor(values.astype(np.float32))).asnumpy().astype(values.dtype)
