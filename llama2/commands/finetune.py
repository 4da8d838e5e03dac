"""Supervised finetuning on SFT data: full, LoRA, prefix tuning or a plugin adapter (`llama2.finetune`).

--data is a file written by `llama2 prepare sft` (.mindrecord/.npy/.npz), or a conversation/Alpaca JSON tokenized on
the fly with the model's tokenizer (then --seq-length is required). Metrics go to OUT/metrics.jsonl, checkpoints to
OUT/checkpoints/step_N (full: the whole model, `llama2 generate --model OUT`; adapters: only the adapter, plus
OUT/adapter/ at the end). Adapter options: the flags below, or --option KEY=VALUE (value parsed as JSON) for
plugin adapters. `llama2 finetune --out OUT --resume` continues a run with its recorded model, method, adapter
options, data and settings (flags given override them, except --batch-size, --seq-length, --seed, --data and
adapter options).

Tokenizer: --tokenizer wins; else the YAML file's `tokenizer:` when that path exists; else the tokenizer.model beside
the --model weights (the packaged configs' `tokenizer: tokenizer.model` is relative to the current folder, so it
is skipped with a note when missing there and the model has its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COMMAND = "finetune"
HELP = "finetune a model on SFT data (full, lora, prefix, or a plugin adapter)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint to start from (HF dir, .ckpt, Meta, llama2.c, run dir)")
    p.add_argument("--config", help="YAML run file or packaged config name (finetune_llama2_7b, lora_llama2_7b)")
    p.add_argument("--data", help="SFT records (.mindrecord/.npy/.npz) or conversation/Alpaca JSON")
    p.add_argument("--method", help="full (default), lora, prefix or an installed adapter plugin")
    p.add_argument("--out", dest="out_dir", help="run directory (metrics, checkpoints, adapter)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    p.add_argument("--batch-size", type=int, help="sequences per step, all ranks (default 8)")
    p.add_argument("--micro-batch-size", type=int, help="per-rank micro-batch (gradient accumulation)")
    p.add_argument("--seq-length", type=int, help="positions per sample (required for JSON data)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-5 full, 1e-4 adapters)")
    p.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--schedule", choices=["cosine", "constant"])
    p.add_argument("--weight-decay", type=float, help="default 0")
    p.add_argument("--grad-clip", type=float, help="default 1.0")
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 0: only at the end)")
    p.add_argument("--keep", type=int, help="checkpoints kept on disk (default 3)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--backend", help="mindspore (default) or torch")
    p.add_argument("--mode", choices=["graph", "eager"])
    p.add_argument("--device", help="cpu (default), gpu, ascend")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one beside the weights)")
    p.add_argument("--template", help="fastchat template for JSON data (default vicuna_v1.1)")
    p.add_argument("--overflow", choices=["truncate", "drop"], help="too-long JSON samples (default truncate)")
    p.add_argument(
        "--recompute",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in backward: less memory, slower (default: parallel_config's recompute)",
    )
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", dest="r", type=int, help="LoRA rank (default 8)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha (default 16)")
    lora.add_argument("--dropout", type=float, help="LoRA dropout (default 0)")
    lora.add_argument("--targets", help="comma-separated module names/regexes (default q_proj,k_proj,v_proj,o_proj)")
    lora.add_argument("--rslora", dest="use_rslora", action="store_true", default=None, help="scale alpha/sqrt(r)")
    prefix = p.add_argument_group("prefix tuning")
    prefix.add_argument("--n-virtual", type=int, help="virtual tokens per layer (default 16)")
    prefix.add_argument("--projection-dim", type=int, help="hidden width of the training-time MLP (default 0)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any adapter option")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def adapter_options(args: argparse.Namespace) -> dict[str, Any]:
    """The adapter options given on the command line (flags left unset are not passed)."""
    opts: dict[str, Any] = {}
    for key in ("r", "alpha", "dropout", "use_rslora", "n_virtual", "projection_dim"):
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    if args.targets:
        opts["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    for item in args.option:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            opts[key] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key] = raw
    return opts


# The seed's (MindFormers pet_config) and Hugging Face PEFT's names for adapter options.
_ALIASES = {
    "lora_rank": "r",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "pre_seq_len": "n_virtual",
    "prefix_token_num": "n_virtual",
    "num_virtual_tokens": "n_virtual",
    "mid_dim": "projection_dim",
}
_RUN_KEYS = ("steps", "epochs", "batch_size", "micro_batch_size", "seq_length", "lr", "min_lr", "warmup_steps")
_RUN_KEYS += ("schedule", "weight_decay", "grad_clip", "seed", "save_every", "keep", "backend", "mode", "device")
_RUN_KEYS += ("dtype", "tokenizer", "template", "overflow", "data", "out_dir", "method")
_FROM_FILE = ("betas", "eps", "log_every")


def build_kwargs(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(model path, keyword arguments for llama2.finetune): the YAML file's values, overridden by the flags."""
    kwargs: dict[str, Any] = {}
    model = args.model
    file_tokenizer = None
    if args.config:
        from llama2.core.train_config import load_run_config

        rc = load_run_config(args.config)
        file_kw = rc.pretrain_kwargs()
        if model is None:
            model = file_kw.get("load_checkpoint")
        kwargs.update({k: v for k, v in file_kw.items() if k in _RUN_KEYS + _FROM_FILE})
        file_tokenizer = kwargs.get("tokenizer")
        if rc.parallel.sharded:
            raise ValueError(
                f"{rc.source}: parallel_config has model_parallel={rc.parallel.model_parallel}, pipeline_stage="
                f"{rc.parallel.pipeline_stage}, but finetune is data parallel only (one process per data-parallel "
                "rank, each holding the whole model); set them to 1 or use a smaller model"
            )
        if rc.parallel.recompute:
            kwargs["recompute"] = True
        section = rc.extra.get("finetune") or {}
        if not isinstance(section, dict):
            raise ValueError(f"{rc.source}: section 'finetune' must be a mapping")
        method = args.method or section.get("method", "full")
        kwargs["method"] = method
        for key in ("epochs", "seq_length", "template", "overflow"):
            if key in section:
                kwargs[key] = section[key]
        adapter = rc.extra.get(method) if method != "full" else None
        if adapter is not None:
            if not isinstance(adapter, dict):
                raise ValueError(f"{rc.source}: section {method!r} must be a mapping of adapter options")
            kwargs.update({_ALIASES.get(k, k): v for k, v in adapter.items()})
    for key in _RUN_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            kwargs[key] = value
    if args.steps is not None:
        kwargs.pop("epochs", None)
    elif args.epochs is not None:
        kwargs.pop("steps", None)
    kwargs.update(adapter_options(args))
    if args.recompute is not None:  # the flag wins over the YAML file's parallel_config
        kwargs["recompute"] = args.recompute
    kwargs["resume"] = bool(args.resume)
    kwargs["progress"] = not args.no_progress
    if model is None and not args.resume:
        raise ValueError("finetune needs --model (or load_checkpoint: in the YAML file); --resume takes the run's")
    if args.tokenizer is None and file_tokenizer is not None and model is not None:
        _drop_missing_file_tokenizer(kwargs, model, args.config)
    for key, flag in (("data", "--data"), ("out_dir", "--out")):
        if kwargs.get(key) is None and not (args.resume and key == "data"):
            raise ValueError(f"finetune needs {flag} (or {key}: in the YAML file)")
    return model, kwargs


def _tokenizer_beside(model: Any) -> Path | None:
    """The tokenizer.model that `llama2.load(model)` would find beside the weights (None if none or unreadable)."""
    from llama2.core.formats import open_checkpoint
    from llama2.core.run_dir import latest_checkpoint

    path = Path(model)
    try:
        if path.is_dir() and (path / "checkpoints").is_dir():
            path = latest_checkpoint(path)
        with open_checkpoint(path) as ckpt:
            return ckpt.tokenizer_path
    except (OSError, ValueError):  # not a readable checkpoint: loading it reports that later
        return None


def _drop_missing_file_tokenizer(kwargs: dict[str, Any], model: Any, config: str) -> None:
    """A YAML `tokenizer:` path that does not exist yields to the tokenizer.model beside the model's weights.

    The packaged configs say `tokenizer: tokenizer.model`, relative to the current folder; --tokenizer always wins,
    and an existing YAML path is used as given.
    """
    path = Path(kwargs["tokenizer"])
    if path.exists():
        return
    beside = _tokenizer_beside(model)
    if beside is None:
        return  # kept: loading names the missing file
    del kwargs["tokenizer"]
    print(
        f"llama2 finetune: {config}: tokenizer {str(path)!r} not found; using {beside} beside the model "
        "(--tokenizer PATH to choose another)",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    from llama2.api import finetune
    from llama2.core.trainer import detect_rank_world
    from llama2.peft import attached_adapters

    model, kwargs = build_kwargs(args)
    tuned = finetune(model, **kwargs)
    method = kwargs.get("method") or next(iter(attached_adapters(tuned.runtime)), "full")  # --resume: the run's
    if detect_rank_world()[0] == 0:  # once per run, not once per torchrun/msrun process
        out = kwargs["out_dir"]
        where = f"{out}/adapter" if method != "full" else f"{out}/checkpoints (llama2.load('{out}'))"
        print(f"finetuned ({method}); metrics in {out}/metrics.jsonl (llama2 plot {out}), weights in {where}")
    return 0
