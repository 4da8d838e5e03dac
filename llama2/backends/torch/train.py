"""`TorchTrainState`: token-weighted gradient accumulation, data-parallel reduction, clipping, AdamW."""

from __future__ import annotations

import math

import numpy as np
import torch

from llama2.backends.torch import distributed as D
from llama2.backends.torch.runtime import TorchRuntime, _nll
from llama2.core.backend import IGNORE_INDEX, OptimConfig, TrainState

__all__ = ["TorchTrainState"]


class TorchTrainState(TrainState):
    """AdamW over a runtime's trainable parameters (float32 master weights).

    Under an initialized process group `apply` all-reduces (sums) gradients, token counts and summed NLL, so the
    step equals one process with the global batch; `last_step` then holds the global loss and token count.
    fp16 on GPU uses a dynamic loss scale (a step with inf/NaN gradients is skipped).
    """

    def __init__(self, runtime: TorchRuntime, optim: OptimConfig) -> None:
        self.runtime = runtime
        self.optim = optim
        named = list(runtime.named_trainable())
        if not named:
            raise ValueError("no trainable parameters: set_trainable() froze every parameter")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if not runtime.fsdp:
            D.broadcast_(runtime.module.parameters())  # data parallel starts from rank 0's weights
        decay = [p for p in self.params if p.ndim >= 2 or optim.decay_1d]
        no_decay = [p for p in self.params if not (p.ndim >= 2 or optim.decay_1d)]
        groups = [{"params": decay, "weight_decay": optim.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(optim.betas), eps=optim.eps)
        fp16 = runtime.device.type == "cuda" and runtime.compute_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self._nll_sum = 0.0
        self._n_local = 0
        self.last_step: dict[str, float] = {}

    def accumulate(self, ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        labels = np.asarray(labels)
        if labels.shape != np.shape(ids):
            raise ValueError(f"labels shape {labels.shape} != ids shape {np.shape(ids)}")
        with torch.enable_grad():
            logits = self.runtime.logits(ids)
            nll = _nll(logits, self.runtime._tensor(labels)).sum()
            (self.scaler.scale(nll) if self.scaler else nll).backward()
        value = float(nll.detach())
        n_tokens = int((labels != IGNORE_INDEX).sum())
        self._nll_sum += value
        self._n_local += n_tokens
        return value, n_tokens

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """`values` summed over the process group (the trainer logs the global loss); identity in one process."""
        values = np.asarray(values)
        if not D.is_distributed():
            return values
        t = torch.as_tensor(values, dtype=torch.float64, device=self.runtime.device).clone()
        D.all_reduce_sum_([t])
        return t.cpu().numpy().astype(values.dtype)

    def apply(self, lr: float, n_tokens: int) -> float:
        """Sum over ranks, grads /= global tokens, clip, AdamW step, zero grads; returns the pre-clip norm.

        In one process the divisor is `n_tokens`; under a process group it is the scored tokens accumulated on all
        ranks since the last step."""
        device = self.runtime.device
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        totals = torch.tensor([float(n_tokens), self._nll_sum], dtype=torch.float64, device=device)
        if D.is_distributed():
            # The divisor is the global count: this rank's accumulated tokens summed over ranks (so a caller that
            # already passes the global count, like the trainer after all_reduce_sum, is not counted twice).
            totals[0] = float(self._n_local)
            if self.runtime.fsdp:  # FSDP reduce-scatters the mean; undo the 1/world to get the sum
                for p in self.params:
                    p.grad.mul_(D.world_size())
            else:
                D.all_reduce_sum_([p.grad for p in self.params])
            D.all_reduce_sum_([totals])
        n, nll = float(totals[0]), float(totals[1])
        self._nll_sum, self._n_local = 0.0, 0
        if n <= 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise ValueError("apply(): the step scored 0 tokens (every label is IGNORE_INDEX); nothing to average")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        for p in self.params:
            p.grad.div_(n)
        max_norm = self.optim.grad_clip if self.optim.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # DTensor-aware under FSDP
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_step = {"loss": nll / n, "n_tokens": n}
        return float(norm)

    # ---- optimizer state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        if self.runtime.fsdp:
            raise NotImplementedError("optimizer state under FSDP is sharded; use torch.distributed.checkpoint")
        out: dict[str, np.ndarray] = {}
        step = 0.0
        for name, p in zip(self.names, self.params):
            st = self.optimizer.state.get(p)
            if not st:
                continue
            step = float(st["step"])
            out[f"exp_avg.{name}"] = st["exp_avg"].detach().float().cpu().numpy().copy()
            out[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].detach().float().cpu().numpy().copy()
        out["step"] = np.asarray(step, dtype=np.float32)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "step" not in state:
            raise KeyError("optimizer state has no 'step' entry")
        step = float(np.asarray(state["step"]))
        known = {f"{kind}.{n}" for n in self.names for kind in ("exp_avg", "exp_avg_sq")} | {"step"}
        unknown = sorted(set(state) - known)
        if unknown:
            raise KeyError(f"optimizer state has entries for no trainable parameter: {unknown[:5]}")
        self.optimizer.state.clear()
        if step == 0:
            return
        for name, p in zip(self.names, self.params):
            entry = {}
            for kind in ("exp_avg", "exp_avg_sq"):
                key = f"{kind}.{name}"
                if key not in state:
                    raise KeyError(f"optimizer state (step {step:g}) is missing {key!r}")
                value = np.asarray(state[key], dtype=np.float32)
                if value.shape != tuple(p.shape):
                    raise ValueError(f"optimizer state {key!r} has shape {value.shape}, expected {tuple(p.shape)}")
                entry[kind] = torch.from_numpy(value.copy()).to(p.device)
            self.optimizer.state[p] = {"step": torch.tensor(step, dtype=torch.float32), **entry}
