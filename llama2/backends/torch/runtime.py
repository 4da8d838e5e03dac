"""`TorchBackend` and `TorchRuntime`: the lowered graph on one device, with numpy in and out.

Mode "graph" vs "eager": inference and training run the eager module in both modes. `torch.compile` was measured
on the `small` preset on this project's 2-core CPU machine (see tests/test_backend_torch.py and the report): the
first call costs tens of seconds of Inductor compilation, every new (batch, seq) shape or KV-cache offset
recompiles (generation changes both on every step), and steady-state speed was within noise of eager since the
time goes to matmuls that eager already runs in oneDNN/cuBLAS. On CUDA, mode "graph" compiles the per-layer
blocks (`compile_blocks`), which fuses the RMSNorm/RoPE/SwiGLU element-wise work; with `dynamic=True` so that
changing shapes do not recompile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from llama2.backends.torch.lowering import KVCache, TorchLlama, register_lowerings
from llama2.core.backend import IGNORE_INDEX, Backend, OptimConfig, Runtime, RuntimeOptions, TrainState
from llama2.core.graph import Llama

__all__ = ["TorchBackend", "TorchRuntime", "causal_mask", "resolve_device"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(options: RuntimeOptions) -> torch.device:
    """The torch device for `options.device`; a clear error where that device is absent."""
    if options.device == "cpu":
        if options.dtype != "float32":
            raise ValueError(
                f"RuntimeOptions.dtype={options.dtype!r} with device='cpu': the torch backend computes in float32 "
                "on CPU; use dtype='float32' (bfloat16/float16 autocast is for device='gpu')"
            )
        return torch.device("cpu")
    if options.device in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"RuntimeOptions.device={options.device!r} but torch {torch.__version__} sees no CUDA device "
                f"(torch.cuda.is_available() is False); use device='cpu' or install a CUDA build of torch"
            )
        if options.device_id >= torch.cuda.device_count():
            raise RuntimeError(
                f"RuntimeOptions.device_id={options.device_id} but only {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", options.device_id)
    raise RuntimeError(
        f"RuntimeOptions.device={options.device!r} is not supported by the torch backend "
        "(Ascend runs on the 'mindspore' backend); use device='cpu' or 'gpu'"
    )


def causal_mask(kv_mask: torch.Tensor, t: int, start: int) -> torch.Tensor:
    """bool (b, t, S): query i (cache slot start + i) sees key slot j <= start + i with kv_mask[:, j] set.

    kv_mask: bool (b, S), S = start + t. A query always sees its own slot, so a pad row (whose keys are all
    masked) attends to itself instead of producing NaN.
    """
    s = kv_mask.shape[1]
    q_slot = torch.arange(start, start + t, device=kv_mask.device)[:, None]
    k_slot = torch.arange(s, device=kv_mask.device)[None, :]
    allowed = (k_slot <= q_slot)[None] & kv_mask[:, None, :]
    return allowed | (k_slot == q_slot)[None]


class TorchRuntime(Runtime):
    """The graph lowered to a `TorchLlama`, float32 master weights on `device`, compute in `options.dtype`."""

    backend_name = "torch"

    def __init__(self, graph: Llama, options: RuntimeOptions, module: TorchLlama, fsdp: bool = False) -> None:
        super().__init__(graph, options)
        self.device = resolve_device(options)
        self.compute_dtype = _DTYPES[options.dtype]
        self.module = module.to(self.device)
        self.module.eval()
        self.training = False
        self.fsdp = fsdp
        self._params = dict(self.module.named_parameters())
        missing = [n for n in self.specs if n not in self._params]
        if missing:
            raise RuntimeError(f"torch lowering lost parameter(s) {missing[:5]}; module attribute names must mirror")
        self.net: torch.nn.Module = self.module  # what forward/backward run: the module, compiled or FSDP-wrapped
        if fsdp:
            from llama2.backends.torch.distributed import fsdp_wrap

            self.net = fsdp_wrap(self.module, self.device)
            self._params = dict(self.module.named_parameters())  # FSDP2 swaps in sharded (DTensor) parameters
        elif options.mode == "graph" and self.device.type == "cuda":
            compile_blocks(self.module)

    # ---- weights -------------------------------------------------------------------------------------------
    def get_param(self, name: str) -> np.ndarray:
        p = self._param(name).detach()
        if hasattr(p, "full_tensor"):  # an FSDP shard: gather the whole tensor
            p = p.full_tensor()
        return p.float().cpu().numpy().copy()

    def _set_param(self, name: str, value: np.ndarray) -> None:
        p = self._param(name)
        full = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            if hasattr(p, "device_mesh"):  # an FSDP shard: keep this rank's part
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements)
            p.copy_(full)

    def _param(self, name: str) -> torch.nn.Parameter:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"torch runtime has no parameter {name!r}") from None

    def parameters_by_name(self) -> dict[str, torch.nn.Parameter]:
        """Native parameters by canonical name (shared with the module; for adapters and tests)."""
        return dict(self._params)

    # ---- running -------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision on GPU when dtype is bf16/fp16 (weights stay fp32); a no-op on CPU/float32."""
        if self.device.type == "cuda" and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def _tensor(self, a: np.ndarray, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), device=self.device).to(dtype)

    def _inputs(self, ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[torch.Tensor, ...]:
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be (batch, seq), got shape {ids.shape}")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds config.max_seq_len={self.config.max_seq_len}")
        t_ids = self._tensor(ids)
        if attention_mask is None:
            kv = torch.ones(ids.shape, dtype=torch.bool, device=self.device)
            pos = torch.arange(ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        else:
            if np.shape(attention_mask) != ids.shape:
                raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != ids shape {ids.shape}")
            kv = self._tensor(attention_mask, torch.bool)
            pos = (kv.long().cumsum(1) - 1).clamp_min(0)
        return t_ids, pos, causal_mask(kv, ids.shape[1], 0)

    def logits(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> torch.Tensor:
        """Logits as a torch tensor on the device (compute dtype; grad-enabled unless under inference_mode)."""
        t_ids, pos, mask = self._inputs(ids, attention_mask)
        with self.autocast():
            return self.net(t_ids, pos, mask)

    def forward(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        with torch.inference_mode():
            return self.logits(ids, attention_mask).float().cpu().numpy()

    def token_nll(self, ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        with torch.inference_mode():
            logits = self.logits(ids, attention_mask)
            nll = _nll(logits, self._tensor(labels))
            return nll.cpu().numpy()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds config.max_seq_len={self.config.max_seq_len}")
        c = self.config
        dtype = self.compute_dtype if self.device.type == "cuda" else torch.float32
        return KVCache(c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, dtype=dtype, device=self.device)

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
        t = ids.shape[1]
        end = start + t
        with torch.inference_mode():
            kv = self._tensor(kv_mask[:, :end], torch.bool)
            mask = causal_mask(kv, t, start)
            with self.autocast():
                out = self.net(self._tensor(ids), self._tensor(positions), mask, cache, start, last_only)
            return out.float().cpu().numpy()

    def describe(self) -> dict:
        """Backend, versions and options (for `llama2 info --backend torch` and run metadata)."""
        import attrs

        return {"backend": "torch", "version": torch.__version__, **attrs.asdict(self.options), "fsdp": self.fsdp}

    # ---- training ------------------------------------------------------------------------------------------
    def enable_recompute(self) -> None:
        from llama2.backends.torch.lowering import TorchBlock

        for m in self.module.modules():
            if isinstance(m, TorchBlock):
                m.recompute = True

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        self.module.train(mode)

    def train_state(self, optim: OptimConfig) -> TrainState:
        from llama2.backends.torch.train import TorchTrainState

        return TorchTrainState(self, optim)

    def named_trainable(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) for trainable parameters; sets requires_grad on all parameters accordingly."""
        trainable = set(self.trainable_names())
        for name, p in self._params.items():
            p.requires_grad_(name in trainable)
        for name in self.trainable_names():
            yield name, self._params[name]


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (b, t) in fp32; 0 where labels == IGNORE_INDEX."""
    b, t, v = logits.shape
    flat = logits.float().reshape(b * t, v)
    nll = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(b, t)


def compile_blocks(module: TorchLlama) -> None:
    """`torch.compile` each decoder block in place (dynamic shapes; parameter names unchanged)."""
    for block in module.model.layers:
        block.compile(dynamic=True)


class TorchBackend(Backend):
    """PyTorch backend: eager modules, SDPA attention, DDP-style data parallel, optional FSDP."""

    name = "torch"

    def __init__(self) -> None:
        super().__init__()
        register_lowerings(self)

    def build(self, graph: Llama, options: RuntimeOptions | None = None, fsdp: bool = False) -> TorchRuntime:
        """Lower `graph` once (zero weights). `fsdp=True` shards parameters over the initialized process group."""
        from llama2.backends.torch.distributed import init_from_env, torchrun_device_id

        options = options or RuntimeOptions()
        # under torchrun on GPU: rank i takes cuda:LOCAL_RANK unless a device id is given
        options = attrs.evolve(options, device_id=torchrun_device_id(options.device, options.device_id))
        device = resolve_device(options)  # fail before allocating anything
        init_from_env(
            device_id=device.index
        )  # under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPU)
        module = self.lower(graph)
        if not isinstance(module, TorchLlama):
            raise TypeError(f"the lowering of {type(graph).__name__} must return a TorchLlama, got {type(module)}")
        return TorchRuntime(graph, options, module, fsdp=fsdp)

    def available(self) -> tuple[bool, str]:
        return True, ""
