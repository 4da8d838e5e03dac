"""`finetune(...)`: supervised finetuning of a Llama 2 model: full, LoRA, prefix tuning or a plugin adapter.

The data is SFT samples (input_ids + labels with -100 on every prompt token, see `llama2.data.sft`): a records
file written by `llama2 prepare sft` (.mindrecord / .npy / .npz), or a conversation / Alpaca JSON file tokenized on the
fly with the model's tokenizer. Training reuses the pretraining `Trainer` (token-weighted loss over the supervised
tokens, AdamW, warmup + cosine, metrics.jsonl, atomic checkpoints, exact resume).

Methods: "full" trains every weight in place. Any other name is looked up in the adapter registry
(`llama2.core.registry.ADAPTERS`: "lora", "prefix", plugins from the `llama2.adapters` entry point group): the
model's graph is rewritten by the adapter, the base weights are copied over unchanged, only the adapter's
parameters train, and only they are saved (checkpoints and OUT_DIR/adapter/).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llama2.core import run_dir as rd
from llama2.core.train_config import resolve_run_options, resolve_train_config
from llama2.core.trainer import TrainData, Trainer, detect_rank_world

if TYPE_CHECKING:
    from llama2.core.model import Model

__all__ = ["finetune", "load_sft_data", "resolve_method", "ADAPTER_DIR", "DEFAULT_LR"]

ADAPTER_DIR = "adapter"
DEFAULT_LR = {"full": 1e-5}  # adapters default to 1e-4 unless their entry says otherwise (`default_lr`)
_JSON_SUFFIXES = (".json", ".jsonl")


def resolve_method(method: str) -> Any:
    """None for "full", else the registered adapter entry; a ValueError lists every known method."""
    from llama2.core.registry import ADAPTERS

    if method == "full":
        return None
    if not isinstance(method, str) or method not in ADAPTERS:
        known = ", ".join(["full", *ADAPTERS.names()])
        raise ValueError(f"unknown finetuning method {method!r}; known methods: {known}")
    return ADAPTERS.get(method)


def load_sft_data(
    data: Any,
    *,
    tokenizer: Any = None,
    seq_length: int | None = None,
    template: str | None = None,
    overflow: str = "truncate",
    log: Callable[[str], None] | None = None,
) -> TrainData:
    """SFT training samples from a records file (.mindrecord/.npz/.npy), a conversation or Alpaca JSON file
    (tokenized with `tokenizer` into samples of seq_length + 1 tokens), a dict of arrays, or a TrainData."""
    if isinstance(data, str | Path) and str(data).lower().endswith(_JSON_SUFFIXES):
        from llama2.data.sft import DEFAULT_TEMPLATE, build_sft_samples, load_conversations

        if tokenizer is None:
            raise ValueError(
                f"{data}: tokenizing a JSON file needs a tokenizer (the model has none; pass --tokenizer PATH "
                "on the command line, tokenizer= in Python)"
            )
        if seq_length is None:
            raise ValueError(f"{data}: tokenizing a JSON file needs seq_length= (tokens per sample)")
        records, problems = load_conversations(data)
        columns, report = build_sft_samples(
            records, tokenizer, seq_length, overflow=overflow, template=template or DEFAULT_TEMPLATE
        )
        skipped = len(problems) + len(report.skipped)
        if log is not None:
            log(f"{data}: {report.summary()}" + (f"; {len(problems)} malformed record(s) skipped" if problems else ""))
            for p in (problems + report.skipped)[:5]:
                log(f"  skipped record {p['index']}: {p['reason']}")
        if report.samples == 0:
            raise ValueError(f"{data}: no usable SFT sample ({skipped} record(s) skipped)")
        return TrainData.from_any(columns, source=str(data))
    if isinstance(data, str | Path):
        from llama2.data.sft import read_sft

        if not Path(data).exists():
            raise FileNotFoundError(f"SFT data {data} not found")
        td = TrainData.from_any(read_sft(data), seq_length, source=str(data))
    else:
        from llama2.pretraining import load_training_data

        td = load_training_data(data, seq_length)
    if td.labels is None:
        raise ValueError(
            f"{data if isinstance(data, str | Path) else 'data'}: no 'labels' column; SFT data needs labels with "
            "-100 on prompt tokens (write it with `llama2 prepare sft`)"
        )
    return td


def _steps(steps: int | None, epochs: float | None, n_samples: int, batch_size: int) -> int:
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if steps is not None:
        return int(steps)
    per_epoch = n_samples // batch_size
    if per_epoch == 0:
        raise ValueError(f"the data has {n_samples} sample(s), fewer than batch_size {batch_size}")
    return max(1, math.ceil((1.0 if epochs is None else float(epochs)) * per_epoch))


def _load_model(model: Any, tokenizer: Any, backend: str, options: dict[str, Any]) -> Model:
    from llama2.core.model import Model

    if isinstance(tokenizer, str | Path):
        from llama2.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(tokenizer)
    if isinstance(model, Model):
        if tokenizer is not None:
            if tokenizer.vocab_size > model.config.vocab_size:
                raise ValueError(
                    f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                    f"{model.config.vocab_size}; they must match"
                )
            model.tokenizer = tokenizer
        return model
    from llama2.api import load

    return load(model, backend=backend, tokenizer=tokenizer, **options)


def finetune(
    model: Model | str | Path | None = None,
    data: Any = None,
    *,
    method: str | None = None,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
    seq_length: int | None = None,
    lr: float | None = None,
    min_lr: float | None = None,
    warmup_steps: int | None = None,
    schedule: str | None = None,
    weight_decay: float | None = None,
    grad_clip: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    seed: int | None = None,
    save_every: int | None = None,
    keep: int | None = None,
    log_every: int | None = None,
    resume: bool = False,
    backend: str | None = None,
    mode: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer: Any = None,
    template: str | None = None,
    overflow: str | None = None,
    adapter_config: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    recompute: bool | None = None,
    **adapter_options: Any,
) -> Model:
    """Finetune `model` (a Model, or a checkpoint path loaded with `llama2.load`) on SFT `data`; returns it.

    method: "full" (default), "lora", "prefix" or a plugin adapter's name; `adapter_options` (e.g. rank=8,
    alpha=16, targets=[...], n_virtual=16) or `adapter_config` configure the adapter. steps or epochs (default 1
    epoch) set the length; lr defaults to 1e-5 for full finetuning and 1e-4 for adapters; weight_decay 0,
    grad_clip 1.0 (0: none), the other settings as `llama2.pretrain`. None means "not given". data: see
    `load_sft_data` (JSON data is tokenized with the model's tokenizer into seq_length + 1 token samples).

    out_dir gets metrics.jsonl and checkpoints/step_N (full: the whole model, loadable with `llama2.load(out_dir)`;
    adapters: only the adapter's tensors, plus OUT_DIR/adapter/ written at the end; `llama2.load(out_dir)` loads
    the base model recorded at finetune time (when `model` was a path) and attaches the newest adapter). A given
    Model is updated in place (full: its weights; adapters: its runtime is rebuilt with the adapter attached).

    `resume=True` continues the run in out_dir with its recorded settings (method, adapter options, base model
    path, data file, template, training settings, backend/mode/device/dtype): `finetune(None, out_dir=run,
    resume=True)`. Given values override them, except batch_size, seq_length, seed, data, method and adapter
    options, which would change the data or the trained graph mid-run (ResumeMismatchError).
    `recompute=True` recomputes each block's activations in the backward pass (less memory, same numbers; None:
    the resumed run's setting, else off).
    Finetuning is data parallel over the launched processes (msrun/torchrun); model parallelism is pretrain's.
    """
    from llama2.pretraining import explicit_settings, resumed_data

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if out_dir is None:
        raise ValueError("finetune needs out_dir= (checkpoints and metrics.jsonl go there)")
    out_dir = Path(out_dir)
    resume_from, state, source = rd.resume_point(out_dir, resume)
    saved_ft = (state or {}).get("finetune") or {}
    if method is None:
        method = saved_ft.get("method", "full")
    elif state is not None and saved_ft.get("method", method) != method:
        raise rd.ResumeMismatchError(
            f"cannot resume {source}: the run finetunes with method {saved_ft['method']!r}, not {method!r}; "
            "leave method out to continue it, or use a new out_dir"
        )
    entry = resolve_method(method)
    if entry is None and (adapter_options or adapter_config is not None):
        raise TypeError(f"method 'full' takes no adapter options; got {sorted(adapter_options) or 'adapter_config'}")
    saved_adapter = (saved_ft.get("adapter") or {}).get("config") if entry is not None else None
    if saved_adapter is not None:
        adapter_config = _resumed_adapter_config(method, saved_adapter, adapter_config, adapter_options, source)
        adapter_options = {}
    template = template if template is not None else saved_ft.get("template")
    overflow = overflow if overflow is not None else saved_ft.get("overflow", "truncate")
    data = resumed_data(data, state, source)
    opts = resolve_run_options(dict(backend=backend, mode=mode, device=device, dtype=dtype), state)

    base_path = _base_path(model) or saved_ft.get("base_model")  # a resumed run keeps the base it started from
    if model is None and state is not None:
        if entry is None:
            model = resume_from  # a full finetune's checkpoint holds the whole model
        else:
            model = base_path = saved_ft.get("base_model")
            if model is None or not Path(model).exists():
                raise FileNotFoundError(
                    f"{source}: the run's base model {model or '(not recorded)'} is not there; pass the base model "
                    "(model= / --model) to resume this adapter run"
                )
    if model is None:
        raise ValueError("finetune needs a model (a Model or a checkpoint path), or resume=True on a run dir")
    base = _load_model(model, tokenizer, opts["backend"], {k: opts[k] for k in ("mode", "device", "dtype")})
    saved_train = None if state is None else state.get("train_config", {})
    if seq_length is None and saved_train is not None:
        seq_length = saved_train.get("seq_length")
    dataset = load_sft_data(
        data, tokenizer=base.tokenizer, seq_length=seq_length, template=template, overflow=overflow, log=log
    )
    given = dict(
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        schedule=schedule,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        betas=betas,
        eps=eps,
        seed=seed,
        save_every=save_every,
        keep=keep,
        log_every=log_every,
    )
    given = explicit_settings(given)
    if steps is not None or epochs is not None or saved_train is None:
        size = given.get("batch_size", (saved_train or {}).get("batch_size", 8))
        given["steps"] = _steps(steps, epochs, dataset.n_samples, size)
    defaults = {"weight_decay": 0.0, "lr": DEFAULT_LR.get(method, getattr(entry, "default_lr", 1e-4))}
    train = resolve_train_config(given, saved=saved_train, defaults=defaults, source=source, log=log)

    if entry is None:
        tuned, adapter = base, None
        tuned.runtime.set_trainable(lambda name: True)
    elif resume_from is not None and method in _attached(base):  # resuming in the same process: already attached
        if saved_adapter is not None:
            _resumed_adapter_config(method, saved_adapter, _attached(base)[method], {}, source)
        tuned, adapter = base, _Adapter(base, method)
    else:
        from llama2.peft import attach_adapter

        tuned = attach_adapter(base, method, adapter_config, seed=train.seed, **adapter_options)
        adapter = _Adapter(tuned, method)

    recompute = bool(saved_ft.get("recompute", False)) if recompute is None else bool(recompute)
    if recompute:
        tuned.runtime.enable_recompute()
    rank, world = detect_rank_world()
    tok_file = getattr(tuned.tokenizer, "path", None)
    trainer_kwargs: dict[str, Any] = {}
    if adapter is not None:
        trainer_kwargs["model_tensors"] = adapter.tensors
        trainer_kwargs["checkpoint_names"] = adapter.names  # resume loads exactly the adapter's tensors
        trainer_kwargs["on_save"] = adapter.write_files
    ro = tuned.runtime.options
    trainer = Trainer(
        tuned.runtime,
        train,
        dataset,
        out_dir,
        rank=rank,
        world_size=world,
        tokenizer_file=tok_file,
        progress=progress,
        log=log,
        extra_state={
            "finetune": {
                "method": method,
                "adapter": None if adapter is None else adapter.describe(),
                "base_model": base_path,
                "template": template,
                "overflow": overflow,
                "recompute": recompute,
            },
            "backend": tuned.runtime.backend_name,
            "mode": ro.mode,
            "device": ro.device,
            "dtype": ro.dtype,
        },
        data_path=data if isinstance(data, str | Path) else None,
        **trainer_kwargs,
    )
    if resume:
        trainer.resume()
    if rank == 0:
        rt = tuned.runtime
        log(
            f"finetuning ({method}) {rt.num_parameters(trainable_only=True):,} of {rt.num_parameters():,} "
            f"parameters on {dataset.n_samples} samples x {dataset.seq_length} tokens: steps {trainer.step}->"
            f"{train.steps}, batch {train.batch_size}, lr {train.lr:g}, out {out_dir}"
        )
    trainer.fit(stop_after=stop_after)
    if stop_after is not None and trainer.step < train.steps:
        trainer.save()
    if adapter is not None and rank == 0:
        adapter.save(out_dir / ADAPTER_DIR)
    return tuned


def _base_path(model: Any) -> str | None:
    """The absolute path of a base model given as a path (a training run dir: its newest checkpoint), else None."""
    if not isinstance(model, str | Path):
        return None
    path = Path(model).resolve()
    if path.is_dir() and (path / rd.CHECKPOINTS).is_dir():
        path = rd.latest_checkpoint(path)
    return str(path)


def _resumed_adapter_config(
    method: str, saved: dict[str, Any], config: Any, options: dict[str, Any], source: str
) -> Any:
    """The run's adapter config; given options must equal it (another adapter cannot continue the run)."""
    import json

    from llama2.peft.base import adapter_config as make_config

    if config is None and not options:
        return make_config(method, saved)
    default = make_config(method).to_dict()
    wanted = json.loads(json.dumps(make_config(method, config, **options).to_dict()))
    if config is not None:
        given = set(wanted)
    else:  # option names, and fields that an alias (LoRA's `rank`) set away from the default
        given = {k for k in options if k in wanted} | {k for k, v in wanted.items() if v != default[k]}
    diffs = [
        f"finetune.adapter.config.{k}: {saved.get(k)!r} in the checkpoint, {wanted[k]!r} now"
        for k in sorted(given)
        if saved.get(k) != wanted[k]
    ]
    if diffs:
        raise rd.ResumeMismatchError(
            f"cannot resume {source}: the adapter options differ from the run's ({'; '.join(diffs)}); leave them "
            "out to continue the run with its adapter, or use a new out_dir"
        )
    return make_config(method, saved)


def _attached(model: Model) -> dict[str, Any]:
    from llama2.peft import attached_adapters

    return attached_adapters(model.runtime)


class _Adapter:
    """The adapter being trained: its parameter names, its tensors (for checkpoints) and its files."""

    def __init__(self, model: Model, method: str) -> None:
        from llama2.peft import adapter_params

        self.model = model
        self.method = method
        self.names = adapter_params(model, method)
        trainable = set(self.names)
        model.runtime.set_trainable(trainable.__contains__)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        rt = self.model.runtime
        for name in self.names:
            yield name, rt.get_param(name)

    def save(self, directory: Path) -> None:
        """OUT_DIR/adapter, written atomically as a whole."""
        from llama2.peft import save_adapter

        save_adapter(self.model, directory)

    def write_files(self, directory: Path) -> None:
        """The adapter's files inside a checkpoint being written (its temporary dir)."""
        from llama2.peft.io import write_adapter_files

        write_adapter_files(self.model, directory)

    def describe(self) -> dict[str, Any]:
        cfg = _attached(self.model)[self.method]
        return {"method": self.method, "config": cfg.to_dict()}
