"""Merging LoRA into the base weights: W' = W + scale * B @ A (computed in float64, stored float32).

`merge_lora(model)` rewrites each `LoRALinear` back into a plain `Linear` holding the merged weight, so a merged
model has no LoRA node and merging again is a no-op (idempotent); `unmerge_lora` restores the LoRA nodes and the
base weights (W = W' - scale * B @ A). `merge_lora_checkpoint` streams a base checkpoint plus an adapter folder into
a merged full checkpoint without building a model (`llama2 merge-lora`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama2.core.graph import named_nodes, replace_nodes
from llama2.peft.base import _runtime, attached_adapters, rebuild
from llama2.peft.lora import LoRA, LoRAConfig, LoRALinear

__all__ = ["merge_lora", "unmerge_lora", "lora_delta", "merge_lora_checkpoint"]


def lora_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """scale * B @ A in float64: the weight update of one LoRA layer, (out, in)."""
    return float(scale) * (b.astype(np.float64) @ a.astype(np.float64))


def merge_lora(model: Any) -> Any:
    """Fold the attached LoRA into the base weights (no-op without LoRA). Model in place; a Runtime is returned."""
    runtime = _runtime(model)
    adapters = attached_adapters(runtime)
    if "lora" not in adapters:
        return model
    factors: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    merged: dict[str, np.ndarray] = {}
    for path, node in named_nodes(runtime.graph):
        if isinstance(node, LoRALinear):
            a, b = runtime.get_param(f"{path}.lora_A.weight"), runtime.get_param(f"{path}.lora_B.weight")
            w = runtime.get_param(f"{path}.weight")
            merged[f"{path}.weight"] = (w.astype(np.float64) + lora_delta(a, b, node.scale)).astype(np.float32)
            factors[path] = (a, b, node.scale)
    graph = replace_nodes(runtime.graph, lambda p, n: n.base() if isinstance(n, LoRALinear) else None)
    cfg = adapters.pop("lora")
    result = rebuild(model, graph, lambda n: merged[n] if n in merged else runtime.get_param(n), adapters)
    _runtime(result).merged_lora = {"config": cfg, "factors": factors}
    return result


def unmerge_lora(model: Any) -> Any:
    """Undo `merge_lora`: restore the LoRA nodes and subtract their update from the base weights."""
    runtime = _runtime(model)
    state = getattr(runtime, "merged_lora", None)
    if not state:
        raise ValueError("this model has no merged LoRA to unmerge (merge_lora was not called on it)")
    cfg: LoRAConfig = state["config"]
    factors = state["factors"]
    graph = LoRA().apply(runtime.graph, cfg)
    values: dict[str, np.ndarray] = {}
    for path, (a, b, scale) in factors.items():
        w = runtime.get_param(f"{path}.weight")
        values[f"{path}.weight"] = (w.astype(np.float64) - lora_delta(a, b, scale)).astype(np.float32)
        values[f"{path}.lora_A.weight"], values[f"{path}.lora_B.weight"] = a, b

    def weights(name: str) -> np.ndarray:
        return values[name] if name in values else runtime.get_param(name)

    result = rebuild(model, graph, weights, {**attached_adapters(runtime), "lora": cfg})
    _runtime(result).merged_lora = {}
    return result


def merge_lora_checkpoint(
    base: str | Path, adapter: str | Path, output: str | Path, fmt: str = "hf", **save_options: Any
) -> Path:
    """Stream checkpoint `base` with the LoRA adapter folder `adapter` merged in; write `output` in format `fmt`."""
    from safetensors.numpy import load_file

    from llama2.core.formats import open_checkpoint, save_checkpoint
    from llama2.peft.io import WEIGHTS_NAME, check_architecture, read_adapter_config

    adapter = Path(adapter)
    meta = read_adapter_config(adapter)
    names = [e["name"] for e in meta["adapters"]]
    if names != ["lora"]:
        raise ValueError(
            f"adapter {adapter} holds {names}; only a LoRA-only adapter can be merged into full weights "
            "(prefix tuning adds attention slots that no base weight can express)"
        )
    cfg = LoRAConfig.from_dict(meta["adapters"][0]["config"], source=str(adapter / "adapter_config.json"))
    tensors = load_file(str(adapter / WEIGHTS_NAME))
    targets = sorted({k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    for t in targets:
        if f"{t}.lora_B.weight" not in tensors:
            raise ValueError(f"{adapter / WEIGHTS_NAME} has {t}.lora_A.weight but no {t}.lora_B.weight")
    target_set = set(targets)
    with open_checkpoint(base) as ckpt:
        check_architecture(meta["base_model"], ckpt.config, str(adapter))
        seen: set[str] = set()

        def merged() -> Iterator[tuple[str, np.ndarray]]:
            for name, value in ckpt.tensors():
                path = name[: -len(".weight")] if name.endswith(".weight") else None
                if path in target_set:
                    a, b = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
                    value = (np.asarray(value, np.float64) + lora_delta(a, b, cfg.scale)).astype(np.float32)
                    seen.add(path)
                yield name, value
            missing = sorted(set(targets) - seen)
            if missing:
                raise ValueError(f"base checkpoint {base} has no weight for LoRA target(s) {missing[:5]}")

        options = dict(save_options)
        if ckpt.tokenizer_path is not None and fmt != "llama2c":
            options.setdefault("tokenizer_path", ckpt.tokenizer_path)
        return save_checkpoint(output, fmt, ckpt.config, merged(), **options)
