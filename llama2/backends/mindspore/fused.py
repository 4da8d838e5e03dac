"""`FusedTrainState`: one compiled MindSpore graph per optimizer update, the form semi-auto parallel trains in.

A step takes this rank's whole share of the global batch and runs gradients of the summed NLL, the 1/tokens
scaling, global-norm clipping and torch-exact AdamW (`AdamWUpdate`) in one `mindspore.jit` function. Without
sharding it is an ordinary single-process (or CPU) step, equal to `MindSporeTrainState` with one micro-batch
(tested). With a sharded `ParallelStrategy` (model_parallel > 1; MindSpore lists AutoParallel for Ascend, GPU is
not listed) the same function is wrapped in
`mindspore.parallel.auto_parallel.AutoParallel(..., "sharding_propagation")`:

- `configure_parallel` gives the cells their shards (the strategy derived from the neutral graph, not the math);
- the inputs' batch axis is split over data_parallel (`dataset_strategy`), so the model-parallel ranks of one
  data-parallel index feed the same rows (the trainer reads its rows by data-parallel index, `data_shard`);
- semi-auto parallel is meant to keep one-device semantics for the global batch, so the loss, the gradient norm
  and the update are expected to be those of one process (unverified here); the trainer passes the global batch's
  token count, which every rank counts itself (all ranks hold the data).

Pipeline parallelism (pipeline_stage > 1) is refused here: MindSpore's functional pipeline path
(`PipelineCell` + `PipelineGradReducer`) could not be run on these machines and is left for hardware that can
check it. The sharded path itself is unverified on GPU/Ascend (none was available; CPU cannot compile
semi-auto parallel: "Invalid communication backend: CPU for semi_auto_parallel").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mindspore as ms
import numpy as np
from mindspore import Tensor

from llama2.backends.mindspore.runtime import summed_nll
from llama2.backends.mindspore.train import AdamWTrainState, data_parallel_size
from llama2.core.backend import OptimConfig
from llama2.core.parallel import PIPELINE_TRAINING_UNSUPPORTED, ParallelStrategy

if TYPE_CHECKING:
    from llama2.backends.mindspore.runtime import MindSporeRuntime

__all__ = ["FusedTrainState"]


class FusedTrainState(AdamWTrainState):
    """One `step_batch(ids, labels, lr, n_tokens)` per optimizer update (the Trainer calls it when `fused` is True)."""

    fused = True

    def __init__(self, runtime: MindSporeRuntime, optim: OptimConfig, strategy: ParallelStrategy) -> None:
        par = strategy.parallel
        if par.pipeline_stage > 1:
            raise ValueError(PIPELINE_TRAINING_UNSUPPORTED.format(pp=par.pipeline_stage))
        if not par.sharded and data_parallel_size() > 1:
            raise ValueError(
                "an unsharded FusedTrainState trains one process: under msrun use MindSporeTrainState (data "
                "parallel, gradients all-reduced) or a ParallelConfig with model_parallel > 1"
            )
        self.strategy = strategy if par.sharded else None
        self.sliced = False  # True once the first compiled sharded step has cut the weights into this rank's slices
        self.rank = 0
        if self.strategy is not None:
            from llama2.backends.mindspore.parallel import configure_parallel

            self.rank = configure_parallel(runtime.net, strategy, runtime.options.device)[0]
            ms.set_context(mode=ms.GRAPH_MODE)  # semi-auto parallel compiles whole graphs
        dp_index = strategy.rank_coords(self.rank)[0] if self.strategy is not None else 0
        self.data_shard = (dp_index, par.data_parallel if self.strategy is not None else 1)
        super().__init__(runtime, optim)
        net, update = runtime.net, self.update

        def loss_fn(ids, labels):
            return summed_nll(net, ids, labels)

        grad_fn = ms.value_and_grad(loss_fn, None, weights=self.params)

        def step(ids, labels, hyper):
            loss, grads = grad_fn(ids, labels)
            return loss, update(grads, hyper[0], hyper[1], hyper[2], hyper[3])

        if self.strategy is None:
            self._step = ms.jit(step) if runtime.compiled else step
        else:
            from mindspore.parallel.auto_parallel import AutoParallel

            wrapped = AutoParallel(ms.jit(step), parallel_mode="sharding_propagation")
            wrapped.dataset_strategy(((par.data_parallel, 1), (par.data_parallel, 1), (1,)))
            self._step = wrapped

    def step_batch(self, ids: np.ndarray, labels: np.ndarray, lr: float, n_tokens: int) -> tuple[float, float]:
        """One update on this rank's rows, given the scored tokens of the whole global batch (> 0); returns (summed
        NLL of the global batch, pre-clip gradient norm)."""
        ids, labels = self.check_batch(ids, labels)
        hyper = Tensor(np.array(self.next_scalars(lr, n_tokens), np.float32))
        loss, norm = self._step(Tensor(ids.astype(np.int32)), Tensor(labels.astype(np.int32)), hyper)
        self.sliced = self.strategy is not None
        return float(loss.asnumpy()), float(norm.asnumpy())

    def accumulate(self, ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        raise RuntimeError("FusedTrainState trains with step_batch(ids, labels, lr, n_tokens): one call per update")

    def apply(self, lr: float, n_tokens: int) -> float:
        raise RuntimeError("FusedTrainState trains with step_batch(ids, labels, lr, n_tokens): one call per update")

    def barrier(self) -> None:
        """Wait for every rank (sharded runs; a no-op in one process)."""
        if self.strategy is not None:
            from mindspore.ops.communication import barrier

            barrier()
