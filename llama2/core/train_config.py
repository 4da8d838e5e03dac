"""Training and parallelism settings (`TrainConfig`, `ParallelConfig`) and the YAML run files that hold them.

A YAML run file has these sections (all optional; names follow the MindFormers seed where it has one):

    run_mode: train            # train | finetune | predict | eval (informational)
    backend: mindspore         # top-level run options: backend, mode, device, dtype, out_dir, data, eval_data,
    model:                     #   tokenizer, load_checkpoint
      preset: llama2-7b        # any ModelConfig preset; other keys override ModelConfig fields
    training:                  # alias: runner
      steps: 1000
      batch_size: 32
    optimizer: {type: AdamW, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, grad_clip: 1.0}
    lr_schedule: {type: cosine, lr: 3.0e-4, min_lr: 3.0e-5, warmup_steps: 2000}   # or warmup_ratio: 0.03
    parallel_config: {data_parallel: 8, model_parallel: 1, pipeline_stage: 1, micro_batch_num: 1, ...}

Other sections (finetune, lora, prefix, generation, evaluation, ...) are kept verbatim in `RunConfig.extra` for the
commands that own them. Unknown keys inside the sections above are errors naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from llama2.core.backend import OptimConfig
from llama2.core.config import PRESETS, ModelConfig

__all__ = ["TrainConfig", "ParallelConfig", "RunConfig", "load_run_config", "config_search_dirs", "resolve_config"]
__all__ += ["resolve_train_config", "resolve_run_options", "FIXED_ON_RESUME", "RUN_OPTION_DEFAULTS"]

# TrainConfig fields a resumed run cannot change: they fix which samples each step reads (and how many tokens).
FIXED_ON_RESUME = ("batch_size", "seq_length", "seed", "shuffle")
RUN_OPTION_DEFAULTS = {"backend": "mindspore", "mode": "graph", "device": "cpu", "dtype": "float32"}

_TOP_LEVEL = ("run_mode", "backend", "mode", "device", "dtype", "out_dir", "data", "eval_data", "tokenizer")
_TOP_LEVEL += ("load_checkpoint",)
# lr_schedule.type: ours and the seed's (MindFormers) names
_SCHEDULE_ALIASES = {"cosine": "cosine", "cosinewithwarmuplr": "cosine", "constant": "constant"}
_SCHEDULE_ALIASES["constantwarmuplr"] = "constant"


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be positive, got {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class TrainConfig:
    """One training run: steps, batch shape, AdamW, learning-rate schedule, seeding and checkpointing.

    batch_size is the global number of sequences per optimizer step (all data-parallel ranks together);
    micro_batch_size (per rank, default: the whole per-rank batch) sets gradient accumulation. min_lr defaults to
    lr / 10 (the Llama 2 recipe). save_every=0 saves only at the end; keep is how many checkpoints stay on disk.
    """

    steps: int = attrs.field(default=1000, validator=_positive)
    batch_size: int = attrs.field(default=8, validator=_positive)
    micro_batch_size: int | None = attrs.field(default=None, validator=_positive)
    seq_length: int | None = attrs.field(default=None, validator=_positive)
    lr: float = attrs.field(default=3e-4, validator=_non_negative)
    min_lr: float | None = attrs.field(default=None, validator=_non_negative)
    warmup_steps: int = attrs.field(default=0, validator=_non_negative)
    schedule: str = attrs.field(default="cosine", validator=attrs.validators.in_(("cosine", "constant")))
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), converter=lambda v: tuple(float(x) for x in v))
    eps: float = attrs.field(default=1e-8, validator=_positive)
    weight_decay: float = attrs.field(default=0.1, validator=_non_negative)
    grad_clip: float | None = attrs.field(default=1.0, validator=_positive)
    seed: int = 0
    shuffle: bool = True
    save_every: int = attrs.field(default=0, validator=_non_negative)
    keep: int = attrs.field(default=3, validator=_positive)
    log_every: int = attrs.field(default=1, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def optim(self) -> OptimConfig:
        return OptimConfig(betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, grad_clip=self.grad_clip)

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "train config") -> TrainConfig:
        return _build(cls, data, source)


@attrs.frozen(kw_only=True)
class ParallelConfig:
    """How a run is split over devices (the seed's `parallel_config` names).

    data_parallel * model_parallel * pipeline_stage must equal the device (process) count; micro_batch_num (the
    pipeline's micro-batches per step) must be >= pipeline_stage; model_parallel must divide n_heads, n_kv_heads
    and hidden_dim; pipeline_stage must divide n_layers. Model (tensor) parallelism trains on GPU/Ascend through
    MindSpore's semi-auto parallel (strategy from `llama2.core.parallel.derive_strategy`; unverified on hardware),
    pipeline parallelism is not trained yet; on CPU only data parallelism works. vocab_emb_dp keeps the embedding
    and LM head replicated (data parallel only); recompute recomputes each block's activations in the backward
    pass (every backend and layout); use_seq_parallel has no effect yet (docs/distributed.md).
    """

    data_parallel: int = attrs.field(default=1, validator=_positive)
    model_parallel: int = attrs.field(default=1, validator=_positive)
    pipeline_stage: int = attrs.field(default=1, validator=_positive)
    micro_batch_num: int = attrs.field(default=1, validator=_positive)
    vocab_emb_dp: bool = True
    use_seq_parallel: bool = False
    recompute: bool = False

    def __attrs_post_init__(self) -> None:
        if self.micro_batch_num < self.pipeline_stage:
            raise ValueError(
                f"ParallelConfig.micro_batch_num ({self.micro_batch_num}) must be >= pipeline_stage "
                f"({self.pipeline_stage}) so that every pipeline stage has work"
            )

    @property
    def device_count(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @property
    def sharded(self) -> bool:
        """True when model or pipeline parallelism is used (needs semi-auto parallel on GPU/Ascend)."""
        return self.model_parallel > 1 or self.pipeline_stage > 1

    def validate(
        self, *, world_size: int | None = None, device: str | None = None, model: ModelConfig | None = None
    ) -> None:
        """Check this layout against the process count, the device kind and the model shape (each when given)."""
        if world_size is not None and self.device_count != world_size:
            raise ValueError(
                f"ParallelConfig: data_parallel * model_parallel * pipeline_stage = {self.data_parallel} * "
                f"{self.model_parallel} * {self.pipeline_stage} = {self.device_count}, but {world_size} "
                f"process(es) are running (launch {self.device_count} with msrun/torchrun, or change it)"
            )
        if device == "cpu" and self.sharded:
            raise ValueError(
                f"ParallelConfig: model_parallel={self.model_parallel}, pipeline_stage={self.pipeline_stage} need "
                "GPU or Ascend devices (MindSpore semi-auto parallel); on CPU only data_parallel is supported"
            )
        if model is None:
            return
        mp, pp = self.model_parallel, self.pipeline_stage
        for field in ("n_heads", "n_kv_heads", "hidden_dim"):
            if getattr(model, field) % mp:
                raise ValueError(
                    f"ParallelConfig.model_parallel={mp} must divide the model's {field} ({getattr(model, field)}); "
                    "each model-parallel rank holds whole heads and an equal share of the MLP"
                )
        if model.n_layers % pp:
            raise ValueError(
                f"ParallelConfig.pipeline_stage={pp} must divide the model's n_layers ({model.n_layers}); "
                "each stage holds n_layers / pipeline_stage layers"
            )

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "parallel_config") -> ParallelConfig:
        return _build(cls, data, source)


def _build(cls: type, data: dict[str, Any], source: str) -> Any:
    known = {a.name for a in attrs.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; expected some of {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None


@attrs.frozen(kw_only=True)
class RunConfig:
    """A parsed YAML run file."""

    model: ModelConfig | None = None
    train: TrainConfig = attrs.field(factory=TrainConfig)
    parallel: ParallelConfig = attrs.field(factory=ParallelConfig)
    options: dict[str, Any] = attrs.field(factory=dict)  # top-level run options (backend, out_dir, data, ...)
    extra: dict[str, Any] = attrs.field(factory=dict)  # sections owned by other commands
    given: frozenset[str] = frozenset()  # TrainConfig fields the file actually set
    source: str = ""

    def pretrain_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `llama2.pretraining.pretrain` that the file sets explicitly."""
        kw: dict[str, Any] = {k: getattr(self.train, k) for k in sorted(self.given)}
        kw.update(self.options)
        kw.pop("run_mode", None)
        if self.parallel != ParallelConfig():
            kw["parallel"] = self.parallel
        return kw


def resolve_train_config(
    given: dict[str, Any],
    *,
    saved: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    source: str = "the run",
    log: Any = None,
) -> TrainConfig:
    """The TrainConfig of a run: explicitly `given` values over the resumed run's `saved` train_config (from its
    trainer_state.json) or, for a fresh run, over `defaults` and TrainConfig's own defaults.

    On resume, a given value that differs from the run's in a FIXED_ON_RESUME field raises ResumeMismatchError
    (it would change the data order or the sample length mid-run); other changes (steps, lr, schedule, ...) are
    applied and reported through `log`.
    """
    from llama2.core.run_dir import ResumeMismatchError

    known = {a.name for a in attrs.fields(TrainConfig)}
    base = dict(defaults or {})
    if saved is not None:
        base.update({k: v for k, v in saved.items() if k in known})
    config = TrainConfig.from_dict({**base, **given}, f"{source}: training settings")
    if saved is None:
        return config
    now = config.to_dict()
    changed = [(k, saved[k], now[k]) for k in sorted(given) if k in saved and saved[k] != now[k]]
    fixed = [c for c in changed if c[0] in FIXED_ON_RESUME]
    if fixed:
        what = "; ".join(f"{k} was {old!r} in the run, {new!r} now" for k, old, new in fixed)
        raise ResumeMismatchError(
            f"cannot resume {source}: {what}. {', '.join(FIXED_ON_RESUME)} fix which samples each step reads and "
            "cannot change mid-run; leave them out to continue with the run's values (steps, lr, schedule, "
            "save_every, ... may change), or train in a new out_dir"
        )
    if log is not None:
        for k, old, new in changed:
            log(f"resuming with {k} {new!r} (the run had {old!r})")
    return config


def resolve_run_options(given: dict[str, Any], saved: dict[str, Any] | None) -> dict[str, Any]:
    """backend, mode, device, dtype: the given ones, else the resumed run's (trainer_state.json), else defaults."""
    out = {}
    for key, default in RUN_OPTION_DEFAULTS.items():
        value = given.get(key)
        if value is None and saved is not None:
            value = saved.get(key)
        out[key] = default if value is None else value
    return out


def config_search_dirs() -> list[Path]:
    """Where bare config names are looked up: the packaged presets (llama2/configs)."""
    return [Path(__file__).resolve().parents[1] / "configs"]


def resolve_config(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a packaged config (`pretrain_llama2_7b`, with or without `.yaml`)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for d in config_search_dirs():
        for cand in (d / p.name, d / f"{p.name}.yaml"):
            if cand.exists():
                return cand
    names = sorted(f.stem for d in config_search_dirs() for f in d.glob("*.yaml"))
    raise FileNotFoundError(f"config {str(name_or_path)!r} not found; packaged configs: {', '.join(names)}")


def load_run_config(path: str | Path) -> RunConfig:
    """Parse a YAML run file (a path or a packaged config name) into a `RunConfig`."""
    import yaml

    file = resolve_config(path)
    src = str(file)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{src}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{src}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    options = {k: raw.pop(k) for k in _TOP_LEVEL if k in raw}

    model = None
    model_sec = raw.pop("model", None)
    if model_sec is not None:
        model = _model_from_section(_section(model_sec, "model", src), src)

    train: dict[str, Any] = {}
    for name in ("training", "runner"):
        if name in raw:
            train.update(_section(raw.pop(name), name, src))
    opt = _section(raw.pop("optimizer", {}) or {}, "optimizer", src)
    opt_type = str(opt.pop("type", "AdamW"))
    if opt_type.lower() not in ("adamw", "fp32stateadamweightdecay", "adamweightdecay"):
        raise ValueError(f"{src}: optimizer.type {opt_type!r} is not supported; use AdamW")
    _take(opt, train, ("betas", "eps", "weight_decay", "grad_clip"), f"{src}: optimizer")
    sched = _section(raw.pop("lr_schedule", {}) or {}, "lr_schedule", src)
    if "type" in sched:
        kind = str(sched.pop("type"))
        if kind.lower() not in _SCHEDULE_ALIASES:
            raise ValueError(f"{src}: lr_schedule.type {kind!r} unknown; use one of {sorted(_SCHEDULE_ALIASES)}")
        train["schedule"] = _SCHEDULE_ALIASES[kind.lower()]
    ratio = sched.pop("warmup_ratio", None)
    _take(sched, train, ("lr", "min_lr", "warmup_steps"), f"{src}: lr_schedule")
    if ratio is not None:
        train["warmup_steps"] = int(round(float(ratio) * int(train.get("steps", TrainConfig().steps))))
    given = frozenset(train)
    tc = TrainConfig.from_dict(train, f"{src}: training")
    parallel = ParallelConfig.from_dict(
        _section(raw.pop("parallel_config", {}) or {}, "parallel_config", src), f"{src}: parallel_config"
    )
    if model is not None:
        parallel.validate(world_size=parallel.device_count, device="gpu", model=model)
    return RunConfig(model=model, train=tc, parallel=parallel, options=options, extra=raw, given=given, source=src)


def _section(value: Any, name: str, src: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{src}: section {name!r} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _take(sec: dict[str, Any], into: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        if k in sec:
            into[k] = sec.pop(k)
    if sec:
        raise ValueError(f"{where}: unknown key(s) {sorted(sec)}; expected some of {sorted(keys)}")


def _model_from_section(sec: dict[str, Any], src: str) -> ModelConfig:
    preset = sec.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"{src}: model.preset {preset!r} unknown; known presets: {', '.join(sorted(PRESETS))}")
        try:
            return ModelConfig.from_preset(preset, **sec)
        except TypeError as exc:
            raise ValueError(f"{src}: model: {exc}") from None
    return ModelConfig.from_dict(sec, f"{src}: model")
