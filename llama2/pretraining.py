"""`pretrain(...)`: train a Llama 2 model from random initialization (or resume a run) on packed token samples."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from llama2.core import run_dir as rd
from llama2.core.config import ModelConfig
from llama2.core.train_config import ParallelConfig, TrainConfig, resolve_run_options, resolve_train_config
from llama2.core.trainer import TrainData, Trainer, detect_rank_world

if TYPE_CHECKING:
    from llama2.core.model import Model

__all__ = ["pretrain", "load_training_data", "resolve_model_config", "explicit_settings", "resumed_data"]

_TRAIN_FIELDS = {a.name for a in attrs.fields(TrainConfig)}


def resolve_model_config(config: ModelConfig | str | dict | None, **overrides: Any) -> ModelConfig:
    """A ModelConfig from an instance, a preset name, a dict of fields, or a YAML run file's `model` section."""
    if isinstance(config, ModelConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = ModelConfig.from_dict(config)
    elif isinstance(config, str | Path) and str(config).endswith((".yaml", ".yml")):
        from llama2.core.train_config import load_run_config

        rc = load_run_config(config)
        if rc.model is None:
            raise ValueError(f"{config}: no 'model' section")
        cfg = rc.model
    elif isinstance(config, str):
        cfg = ModelConfig.from_preset(config)
    else:
        raise TypeError(f"expected a ModelConfig, a preset name or a dict, got {type(config).__name__}")
    return attrs.evolve(cfg, **overrides) if overrides else cfg


def load_training_data(data: Any, seq_length: int | None = None) -> TrainData:
    """Training samples from a path (.npy array, or a records file read with llama2.data.records), an array
    (2-D samples or a 1-D token stream), a dict with input_ids/labels, or a TrainData."""
    if isinstance(data, str | Path):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"training data {path} not found")
        from llama2.data.records import read_columns

        return TrainData.from_any(read_columns(path), seq_length, source=str(path))
    if data is None:
        raise ValueError("pretrain needs data=: a records file, a .npy file or a numpy array of token ids")
    return TrainData.from_any(data, seq_length)


def pretrain(
    config_or_preset: ModelConfig | str | dict | Model | None = None,
    data: Any = None,
    out_dir: str | Path | None = None,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
    seq_length: int | None = None,
    lr: float | None = None,
    min_lr: float | None = None,
    warmup_steps: int | None = None,
    weight_decay: float | None = None,
    grad_clip: float | None = None,
    seed: int | None = None,
    save_every: int | None = None,
    keep: int | None = None,
    resume: bool = False,
    backend: str | None = None,
    mode: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer: Any = None,
    parallel: ParallelConfig | dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    **train_options: Any,
) -> Model | None:
    """Pretrain a model on `data` and return it; checkpoints, metrics.jsonl and trainer state go to `out_dir`.

    config_or_preset: a ModelConfig, a preset name (`tiny`, `small`, `llama2-7b`, ...), a dict, a YAML run file's
    path, or a `Model` (trained in place, keeping its weights and backend); None with `resume=True` takes the
    config of the run's checkpoint. data: see `load_training_data`. The other arguments
    are `TrainConfig` fields (extra ones, e.g. `schedule`, `betas`, `log_every`, go in `train_options`) and
    RuntimeOptions (backend, mode, device, dtype). None means "not given": a fresh run takes the defaults (steps
    1000, batch_size 8, lr 3e-4, min_lr lr/10, warmup_steps 0, weight_decay 0.1, grad_clip 1.0 (0: no clipping),
    seed 0, save_every 0, keep 3, backend mindspore, mode graph, device cpu, dtype float32).

    `resume=True` continues from the newest readable checkpoint in `out_dir` exactly where it stopped, with the
    run's model config, training settings, backend/mode/device/dtype and data file (all in its
    trainer_state.json): `pretrain(None, out_dir=run, resume=True)`. Values given explicitly override them
    (e.g. a larger `steps` to train longer, a new `lr`), except batch_size, seq_length, seed, shuffle and other
    data, which would change what the remaining steps read: those raise ResumeMismatchError.
    `stop_after` ends the run early after that step (for tests/demos).

    `parallel` (a ParallelConfig or dict; default, or any layout of one device: data parallel over the launched
    processes; `recompute` recomputes activations in the backward pass, kept on resume): model_parallel > 1
    trains under MindSpore semi-auto parallel on GPU/Ascend (docs/distributed.md; not verified on hardware here)
    and returns None, since every process holds only its slices: load the result with `llama2.load(out_dir)`.
    """
    from llama2.core.model import Model, build_runtime

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if out_dir is None:
        raise ValueError("pretrain needs out_dir= (checkpoints and metrics.jsonl go there)")
    out_dir = Path(out_dir)
    unknown = sorted(set(train_options) - _TRAIN_FIELDS)
    if unknown:
        raise TypeError(f"pretrain() got unknown option(s) {unknown}; TrainConfig fields: {sorted(_TRAIN_FIELDS)}")
    given = dict(
        steps=steps,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        seed=seed,
        save_every=save_every,
        keep=keep,
        **train_options,
    )
    given = explicit_settings(given)

    given_model = config_or_preset if isinstance(config_or_preset, Model) else None
    resume_from, state, source = rd.resume_point(out_dir, resume)
    run_config = rd.read_model_config(resume_from) if resume_from is not None else None
    if config_or_preset is None:
        config_or_preset = run_config
    if config_or_preset is None:
        raise ValueError("pretrain needs a model config or preset name (or resume=True on a run dir with checkpoints)")
    config = given_model.config if given_model is not None else resolve_model_config(config_or_preset)
    if run_config is not None and run_config != config:
        raise ValueError(
            f"{resume_from / rd.CONFIG_FILE}: the run's model config differs from the requested one; "
            "resume with the same config (or config=None to take the run's)"
        )
    train = resolve_train_config(
        given, saved=None if state is None else state.get("train_config", {}), source=source, log=log
    )
    opts = resolve_run_options(dict(backend=backend, mode=mode, device=device, dtype=dtype), state)
    data = resumed_data(data, state, source)

    if tokenizer is None and given_model is not None:
        tokenizer = given_model.tokenizer
    tok, tok_file = _tokenizer(tokenizer, config)
    if tok_file is None and resume_from is not None and (resume_from / rd.TOKENIZER_FILE).is_file():
        tok_file = resume_from / rd.TOKENIZER_FILE
    dataset = load_training_data(data, train.seq_length)

    rank, world = detect_rank_world()
    par = parallel if isinstance(parallel, ParallelConfig) else ParallelConfig.from_dict(dict(parallel or {}))
    if world > 1 and par.device_count == 1:  # no layout given (maybe only recompute): data parallel over all
        par = attrs.evolve(par, data_parallel=world)
    saved_par = (state or {}).get("parallel_config") or {}
    if parallel is None and saved_par.get("recompute"):  # a resumed run keeps its recompute setting
        par = attrs.evolve(par, recompute=True)
    par.validate(world_size=world, device=opts["device"], model=config)
    if par.pipeline_stage > 1:
        from llama2.core.parallel import PIPELINE_TRAINING_UNSUPPORTED

        raise ValueError(PIPELINE_TRAINING_UNSUPPORTED.format(pp=par.pipeline_stage))
    if par.sharded and (given_model is not None or opts["backend"] != "mindspore"):
        raise ValueError(
            f"ParallelConfig: model_parallel={par.model_parallel} needs the MindSpore backend (semi-auto parallel) "
            f"and a config or preset rather than a loaded Model (got backend {opts['backend']!r}"
            f"{', a loaded Model' if given_model is not None else ''})"
        )

    if given_model is not None:
        runtime = given_model.runtime
        ro = runtime.options
        opts = {"backend": runtime.backend_name, "mode": ro.mode, "device": ro.device, "dtype": ro.dtype}
    else:
        runtime = build_runtime(
            config, opts["backend"], mode=opts["mode"], device=opts["device"], dtype=opts["dtype"], seed=train.seed
        )
        runtime.init_weights(train.seed)
    if par.recompute and not par.sharded:  # a sharded run sets it per cell with the strategy
        runtime.enable_recompute()
    train_state = None
    if par.sharded:  # one fused step under MindSpore semi-auto parallel (GPU/Ascend; unverified on hardware here)
        from llama2.core.parallel import derive_strategy

        train_state = runtime.train_state(train.optim(), strategy=derive_strategy(config, par, world_size=world))
    trainer = Trainer(
        runtime,
        train,
        dataset,
        out_dir,
        rank=rank,
        world_size=world,
        tokenizer_file=tok_file,
        progress=progress,
        log=log,
        extra_state={"parallel_config": par.to_dict(), **opts},
        data_path=data if isinstance(data, str | Path) else None,
        train_state=train_state,
    )
    if resume_from is not None:
        trainer.resume()
    elif trainer.is_writer and trainer.metrics_path.exists():
        trainer.metrics_path.unlink()  # a fresh run in a dir without checkpoints: start a new log
    if rank == 0:
        log(
            f"pretraining {config.num_parameters():,} parameters on {dataset.n_samples} samples x "
            f"{dataset.seq_length} tokens: steps {trainer.step}->{train.steps}, batch {train.batch_size} "
            f"(micro {trainer.micro}, {world} rank(s)), lr {train.lr:g}, backend {opts['backend']}/{opts['mode']}, "
            f"out {out_dir}"
        )
    trainer.fit(stop_after=stop_after)
    if trainer.step < train.steps and trainer.last_saved != trainer.step:  # stopped early: keep the position
        trainer.save()
    if par.sharded:  # each process holds slices only: load the result with llama2.load(out_dir)
        return None
    if given_model is not None:
        given_model.tokenizer = tok if tok is not None else given_model.tokenizer
        return given_model
    return Model(runtime, tok)


def explicit_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The training settings actually given (None = not given); grad_clip=0 means no clipping."""
    out = {k: v for k, v in values.items() if v is not None}
    if out.get("grad_clip") == 0:
        out["grad_clip"] = None
    return out


def resumed_data(data: Any, state: dict[str, Any] | None, source: str) -> Any:
    """`data` if given, else the data file the resumed run recorded in its trainer_state.json."""
    if data is not None or state is None:
        return data
    path = (state.get("data") or {}).get("path") if isinstance(state.get("data"), dict) else None
    if path is None:
        raise ValueError(
            f"{source}: the run recorded no data file (it was trained on in-memory data or by an older version); "
            "pass data= (--data) to resume it"
        )
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{source}: the run's data file {path} is gone; pass data= (--data) with its new location"
        )
    return path


def _tokenizer(tokenizer: Any, config: ModelConfig) -> tuple[Any, Path | None]:
    """(Tokenizer or None, its .model file) checked against the model's vocabulary size."""
    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, str | Path):
        from llama2.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(tokenizer)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'path', '')} has {tokenizer.vocab_size} pieces but the model's "
            f"vocab_size is {config.vocab_size}; pick a config with vocab_size={tokenizer.vocab_size} "
            f"(e.g. ModelConfig.from_preset(..., vocab_size={tokenizer.vocab_size}) or --vocab-size)"
        )
    path = getattr(tokenizer, "path", None)
    return tokenizer, Path(path) if path is not None else None
