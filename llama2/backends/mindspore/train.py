"""`MindSporeTrainState`: summed-NLL gradients, accumulation, global-norm clipping, torch-exact AdamW."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from llama2.core.backend import IGNORE_INDEX, OptimConfig, TrainState

if TYPE_CHECKING:
    from llama2.backends.mindspore.runtime import MindSporeRuntime

__all__ = ["MindSporeTrainState", "data_parallel_size", "all_reduce_sum"]


def data_parallel_size() -> int:
    """Number of processes in the initialized `mindspore.communication` world (1 when not initialized)."""
    from mindspore.communication import GlobalComm, get_group_size

    if not GlobalComm.INITED:
        return 1
    return int(get_group_size())


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over every process of the world group."""
    return ops.AllReduce(ops.ReduceOp.SUM)(x)


class MindSporeTrainState(TrainState):
    """One optimizer step = `accumulate` calls (gradients of the summed NLL are added up) and one `apply`."""

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
        grad_fn = ms.value_and_grad(runtime.loss_sum, None, weights=self.params)

        def step(ids, labels):
            return grad_fn(ids, labels)

        self._step = ms.jit(step) if runtime.compiled else step
        self.grads: list[Tensor] | None = None
        self.exp_avg = [ops.zeros(p.shape, ms.float32) for p in self.params]
        self.exp_avg_sq = [ops.zeros(p.shape, ms.float32) for p in self.params]
        self.step = 0

    def accumulate(self, ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        ids, labels = np.asarray(ids), np.asarray(labels)
        if ids.ndim != 2 or labels.shape != ids.shape:
            raise ValueError(f"ids and labels must both be (batch, seq); got {ids.shape} and {labels.shape}")
        if ids.shape[1] > self.runtime.config.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_seq_len {self.runtime.config.max_seq_len}")
        self.runtime._check_vocab(ids)
        n_tokens = int((labels != IGNORE_INDEX).sum())
        loss, grads = self._step(Tensor(ids.astype(np.int32)), Tensor(labels.astype(np.int32)))
        if self.grads is None:
            self.grads = list(grads)
        else:
            self.grads = [a + g for a, g in zip(self.grads, grads)]
        return float(loss.asnumpy()), n_tokens

    def apply(self, lr: float, n_tokens: int) -> float:
        if self.grads is None:
            raise RuntimeError("apply() called before any accumulate() in this step")
        grads = self.grads
        if data_parallel_size() > 1:
            grads = [all_reduce_sum(g) for g in grads]
            n_tokens = int(all_reduce_sum(Tensor(np.array([n_tokens], np.float32))).asnumpy()[0])
        if n_tokens <= 0:
            raise ValueError(f"apply() needs a positive token count, got {n_tokens}")
        scale = 1.0 / float(n_tokens)
        grads = [g * scale for g in grads]
        norm = float(ops.sqrt(sum((ops.square(g).sum() for g in grads), ops.zeros((), ms.float32))).asnumpy())
        o = self.optim
        if o.grad_clip is not None and o.grad_clip > 0:
            coef = min(float(o.grad_clip) / (norm + 1e-6), 1.0)  # torch.nn.utils.clip_grad_norm_
            grads = [g * coef for g in grads]
        self.step += 1
        beta1, beta2 = (float(b) for b in o.betas)
        step_size = float(lr) / (1.0 - beta1**self.step)
        bias2_sqrt = math.sqrt(1.0 - beta2**self.step)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            wd = float(o.weight_decay) if (p.ndim > 1 or o.decay_1d) else 0.0
            m = self.exp_avg[i] * beta1 + g * (1.0 - beta1)
            v = self.exp_avg_sq[i] * beta2 + g * g * (1.0 - beta2)
            self.exp_avg[i], self.exp_avg_sq[i] = m, v
            new = p * (1.0 - float(lr) * wd) if wd else p * 1.0
            new = new - step_size * m / (ops.sqrt(v) / bias2_sqrt + float(o.eps))
            ops.assign(p, new)
        self.grads = None
        return norm

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """`values` summed over the data-parallel world (so rank 0 logs the global loss); identity in one process."""
        values = np.asarray(values)
        if data_parallel_size() == 1:
            return values
        return all_reduce_sum(Tensor(values.astype(np.float32))).asnumpy().astype(values.dtype)

    def state_dict(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"step": np.array(self.step, np.float32)}
        for name, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
            out[f"exp_avg.{name}"] = m.asnumpy().astype(np.float32)
            out[f"exp_avg_sq.{name}"] = v.asnumpy().astype(np.float32)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "step" not in state:
            raise KeyError("optimizer state is missing 'step'")
        exp_avg, exp_avg_sq = [], []
        for name, p in zip(self.names, self.params):
            for key, dest in ((f"exp_avg.{name}", exp_avg), (f"exp_avg_sq.{name}", exp_avg_sq)):
                if key not in state:
                    raise KeyError(f"optimizer state is missing {key!r}")
                value = np.asarray(state[key], np.float32)
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {key!r} has shape {value.shape}, expected {tuple(p.shape)}")
                dest.append(Tensor(value))
        self.exp_avg, self.exp_avg_sq = exp_avg, exp_avg_sq
        self.step = int(np.asarray(state["step"]))
        self.grads = None
