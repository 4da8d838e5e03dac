"""The public API: `load`, `pretrain`, `finetune`, `evaluate`, `generate`. Thin: each calls into core/data/metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama2.core.model import Model, build_runtime

__all__ = ["load", "pretrain", "finetune", "evaluate", "generate"]


def load(
    path: str | Path,
    backend: str = "mindspore",
    tokenizer: Any = None,
    fmt: str | None = None,
    **options: Any,
) -> Model:
    """Load a checkpoint (HF dir, Meta, MindSpore .ckpt, llama2.c .bin, GGUF, or a training run dir).

    The tokenizer is `tokenizer` (path or Tokenizer) or else tokenizer.model found beside the weights. `options`
    are RuntimeOptions fields (device, dtype, mode, ...). Weights are copied in one tensor at a time.
    """
    from llama2.core.formats import open_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    run_ckpt = _run_checkpoint(path)
    if run_ckpt is not None:
        path = run_ckpt
    base = _adapter_run_base(path)
    if base is not None:  # an adapter finetune's checkpoint: the base model it started from + the adapter
        if tokenizer is None and (path / "tokenizer.model").is_file():
            tokenizer = path / "tokenizer.model"
        model = load(base, backend=backend, tokenizer=tokenizer, **options)
        from llama2.peft import load_adapter

        load_adapter(model, path)
        return model
    ckpt = open_checkpoint(path, fmt)
    if tokenizer is None and ckpt.tokenizer_path is not None:
        tokenizer = ckpt.tokenizer_path
    if isinstance(tokenizer, str | Path):
        if not Path(tokenizer).exists():
            raise FileNotFoundError(f"tokenizer file {tokenizer} not found")
    runtime = build_runtime(ckpt.config, backend, **options)
    runtime.load_state(ckpt.tensors(), source=str(path))
    model = Model(runtime, tokenizer)
    _attach_adapters(model, path)
    return model


def _run_checkpoint(path: Path) -> Path | None:
    """The latest checkpoint when `path` is a training run directory, else None."""
    if not (path.is_dir() and (path / "checkpoints").is_dir()):
        return None
    import warnings

    from llama2.core.run_dir import latest_checkpoint

    return latest_checkpoint(path, on_skip=lambda msg: warnings.warn(f"{path}: {msg}", stacklevel=3))


def _adapter_run_base(path: Path) -> Path | None:
    """The base model of an adapter finetune's checkpoint dir (its trainer_state.json names it), else None."""
    import json

    from llama2.core.run_dir import STATE_FILE

    state_file = path / STATE_FILE
    if not (path.is_dir() and state_file.is_file()):
        return None
    try:
        finetune = json.loads(state_file.read_text(encoding="utf-8")).get("finetune") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not finetune.get("adapter"):
        return None
    base = finetune.get("base_model")
    if base is None or not Path(base).exists():
        raise FileNotFoundError(
            f"{path} holds only the {finetune.get('method', 'adapter')} adapter of a finetune run; its base model "
            + (f"{base} is gone" if base else "was not recorded (it was finetuned from an in-memory Model)")
            + ". Load the base and attach the adapter: model = llama2.load(BASE); "
            f"llama2.peft.load_adapter(model, {str(path)!r}) (or the run's adapter/ folder); or merge them into a "
            f"full checkpoint with `llama2 merge-lora --model BASE --adapter {path} --output OUT` (LoRA)"
        )
    return Path(base)


def _attach_adapters(model: Model, path: Path) -> None:
    """Apply adapter files saved beside the weights (adapter_config.json), when present."""
    if path.is_dir() and (path / "adapter_config.json").exists():
        from llama2.peft import load_adapter

        load_adapter(model, path)


def pretrain(config: Any = None, **kwargs: Any) -> Model | None:
    """Pretrain a model from a config/preset on a records file (config None + resume=True: continue the run in
    out_dir with its recorded settings); see `llama2.pretraining.pretrain`."""
    from llama2.pretraining import pretrain as _pretrain

    return _pretrain(config, **kwargs)


def finetune(model: Model | str | Path | None = None, **kwargs: Any) -> Model:
    """Supervised finetuning (full, LoRA, prefix or a plugin adapter; model None + resume=True: continue the run in
    out_dir with its recorded base model and settings); see `llama2.finetuning.finetune`."""
    from llama2.finetuning import finetune as _finetune

    return _finetune(model, **kwargs)


def _split_load_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options for `load`, the rest): backend, tokenizer, fmt and the RuntimeOptions fields except `seed` (which
    stays with the caller's options: a sampling seed for generation; loaded weights need no init seed)."""
    import attrs

    from llama2.core.backend import RuntimeOptions

    keys = {"backend", "tokenizer", "fmt"} | {f.name for f in attrs.fields(RuntimeOptions)} - {"seed"}
    load_kw = {k: v for k, v in kwargs.items() if k in keys}
    rest = {k: v for k, v in kwargs.items() if k not in keys}
    return load_kw, rest


def evaluate(model: Model | str | Path, metric: str, **kwargs: Any) -> dict[str, float]:
    """Evaluate with a registered metric ("perplexity", "squad", plugins); see `llama2.evaluation.evaluate`.

    With a checkpoint path, `backend`, `tokenizer`, `fmt`, `device`, `dtype`, `mode` and `device_id` go to `load`.
    """
    from llama2.evaluation import evaluate as _evaluate

    if not isinstance(model, Model):
        load_kw, kwargs = _split_load_options(kwargs)
        model = load(model, **load_kw)
    return _evaluate(model, metric, **kwargs)


def generate(model: Model | str | Path, prompts: str | Sequence[str], **options: Any) -> list[str]:
    """Continuations of `prompts` (a model or a checkpoint path); options as `Model.generate`.

    With a checkpoint path, `backend`, `tokenizer`, `fmt`, `device`, `dtype`, `mode` and `device_id` go to `load`.
    """
    if not isinstance(model, Model):
        load_kw, options = _split_load_options(options)
        model = load(model, **load_kw)
    return model.generate(prompts, **options)
