"""Adapter-only files: `adapter_config.json` (adapters, their configs, the base architecture) and
`adapter_model.safetensors` (only the adapter tensors, float32, canonical names).

`load_adapter` refuses an adapter saved for another architecture with a message naming the differing fields.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.atomic import atomic_dir
from llama2.core.config import ModelConfig
from llama2.core.formats.base import read_json_file
from llama2.core.graph import named_params
from llama2.peft.base import _runtime, adapter_config, attached_adapters, get_adapter, rebuild

__all__ = [
    "save_adapter",
    "write_adapter_files",
    "load_adapter",
    "adapter_state",
    "read_adapter_config",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_architecture",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "llama2-adapter"
# Fields that may differ between the saved base and the model it is loaded onto (no effect on the weights).
_IGNORED_FIELDS = ("max_seq_len",)


def save_adapter(model: Any, path: str | Path) -> Path:
    """Write the attached adapters of a model/runtime to folder `path` atomically: a temp folder renamed into
    place, holding the new adapter files and hard links to (or copies of) the folder's other files, such as base
    weights saved beside the adapter; a failed save leaves the folder as it was."""
    runtime = _runtime(model)
    adapters = attached_adapters(runtime)
    if not adapters:
        raise ValueError("this model has no adapter attached; nothing to save (use Model.save for full weights)")
    path = Path(path)
    with atomic_dir(path, overwrite=True) as tmp:  # weights and config are replaced together or not at all
        if path.is_dir():
            _carry_over(path, tmp)  # e.g. the base weights the adapter is saved beside
        write_adapter_files(runtime, tmp)
    return path


def _carry_over(src: Path, dst: Path) -> None:
    """Hard-link (copy where links fail) every entry of `src` but the adapter files into `dst`."""

    def link_or_copy(a: str | Path, b: str | Path) -> None:
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)

    for p in src.iterdir():
        if p.name in (CONFIG_NAME, WEIGHTS_NAME):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, dst / p.name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(p, dst / p.name)


def write_adapter_files(model: Any, directory: str | Path) -> None:
    """Write adapter_model.safetensors + adapter_config.json into an existing folder that the caller is writing
    atomically (e.g. a checkpoint's temporary dir); `save_adapter` is the atomic whole-folder save."""
    from safetensors.numpy import save_file

    meta, tensors = adapter_state(_runtime(model))
    directory = Path(directory)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "np"})
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def adapter_state(model: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json content, adapter tensors) of the attached adapters, as `save_adapter` writes them
    (training-time reparameterizations folded). For trainers that checkpoint adapters themselves."""
    runtime = _runtime(model)
    tensors: dict[str, np.ndarray] = {}
    entries = []
    for name, cfg in attached_adapters(runtime).items():
        cfg, arrays = get_adapter(name).export(runtime, cfg)
        entries.append({"name": name, "config": cfg.to_dict()})
        tensors.update({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()})
    meta = {"format": FORMAT, "version": 1, "base_model": runtime.config.to_dict(), "adapters": entries}
    return meta, tensors


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The parsed `adapter_config.json` of folder `path` (or the file itself), validated."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    meta = read_json_file(file, f"no {CONFIG_NAME} in {path}", ValueError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f'{file}: expected a JSON object with "format": "{FORMAT}" (a llama2 adapter config)')
    for key, kind in (("base_model", dict), ("adapters", list)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{file}: field {key!r} must be a JSON {kind.__name__}")
    for i, entry in enumerate(meta["adapters"]):
        if not (
            isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("config"), dict)
        ):
            raise ValueError(f'{file}: adapters[{i}] must be {{"name": str, "config": object}}')
    return meta


def check_architecture(saved: dict[str, Any], config: ModelConfig, source: str) -> None:
    """Raise ValueError naming every architecture field where `saved` differs from `config`."""
    current = config.to_dict()
    diffs = [
        f"{k}: adapter {saved.get(k)!r} vs model {v!r}"
        for k, v in current.items()
        if k not in _IGNORED_FIELDS and saved.get(k, v) != v
    ]
    if diffs:
        raise ValueError(
            f"adapter {source} was trained for a different base architecture ({'; '.join(diffs)}); "
            "load it onto the base model it was trained from"
        )


def load_adapter(model: Any, path: str | Path) -> Any:
    """Attach the adapters saved in folder `path` to a `Model` (in place; returned) or `Runtime` (new one returned).

    The base weights are kept; the adapter tensors must match the adapter graph exactly (no missing or extra
    tensor). Only the adapter parameters are left trainable.
    """
    path = Path(path)
    meta = read_adapter_config(path)
    folder = path if path.is_dir() else path.parent
    runtime = _runtime(model)
    check_architecture(meta["base_model"], runtime.config, str(folder))
    adapters = attached_adapters(runtime)
    graph = runtime.graph
    for entry in meta["adapters"]:
        name = entry["name"]
        if name in adapters:
            raise ValueError(f"adapter {name!r} from {folder} is already attached to this model")
        cfg = adapter_config(name, entry["config"])
        graph = get_adapter(name).apply(graph, cfg)
        adapters[name] = cfg
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    from safetensors.numpy import load_file

    tensors = load_file(str(weights_file))
    wanted = set(named_params(graph)) - set(runtime.specs)
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        raise ValueError(
            f"{weights_file} does not match the adapter config: missing tensor(s) {missing[:5]}, "
            f"unexpected tensor(s) {extra[:5]}"
        )
    base = set(runtime.specs)

    def weights(name: str) -> np.ndarray:
        return runtime.get_param(name) if name in base else tensors[name]

    return rebuild(model, graph, weights, adapters, source=str(weights_file))
