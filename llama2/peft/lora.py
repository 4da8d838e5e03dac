"""LoRA (Hu et al. 2021): y = x W^T + scale * B(A(dropout(x))), W frozen, A (r, in), B (out, r) zero-initialized.

A graph rewrite of the chosen `Linear` nodes into `LoRALinear` nodes. Names follow PEFT:
`model.layers.0.self_attn.q_proj.weight` (the frozen base weight), `...q_proj.lora_A.weight`,
`...q_proj.lora_B.weight`. scale = alpha / r, or alpha / sqrt(r) with `use_rslora`. Under GQA the k/v projections
get B of shape (n_kv_heads * head_dim, r) automatically from the base Linear's out_features.
"""

from __future__ import annotations

import math
import re

import attrs

from llama2.core.graph import Linear, Llama, Node, ParamSpec, named_nodes, replace_nodes
from llama2.core.registry import ADAPTERS
from llama2.peft.base import Adapter, AdapterConfig, AdapterLinear

__all__ = ["LoRAConfig", "LoRALinear", "LoRA", "target_matches", "DEFAULT_TARGETS"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def target_matches(targets: tuple[str, ...], path: str) -> bool:
    """A target is a module name ("q_proj": the last path component) or a regex fully matching the dotted path."""
    last = path.rsplit(".", 1)[-1]
    return any(t == last or re.fullmatch(t, path) is not None for t in targets)


def _positive_int(instance, attribute, value) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be a positive integer, got {value!r}")


def _dropout(instance, attribute, value) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be in [0, 1), got {value!r}")


@attrs.frozen(kw_only=True)
class LoRAConfig(AdapterConfig):
    """r: rank; alpha: scaling numerator; dropout on the LoRA input (training only); targets: module names or
    regexes over dotted paths; use_rslora: scale alpha/sqrt(r) instead of alpha/r."""

    r: int = attrs.field(default=8, validator=_positive_int)
    alpha: float = 16.0
    dropout: float = attrs.field(default=0.0, validator=_dropout)
    targets: tuple[str, ...] = attrs.field(default=DEFAULT_TARGETS, converter=tuple)
    use_rslora: bool = False

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> LoRAConfig:
        """As `AdapterConfig.from_dict`, with `rank` accepted as an alias of `r` (the CLI's --rank)."""
        if "rank" in data:
            if "r" in data:
                where = f" in {source}" if source else ""
                raise ValueError(f"LoRAConfig: give the rank as `r` or as `rank`, not both{where}")
            data = {("r" if k == "rank" else k): v for k, v in data.items()}
        return super().from_dict(data, source)

    @property
    def scale(self) -> float:
        return float(self.alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)


@attrs.frozen
class LoRALinear(Node):
    """A frozen base `weight` (out, in) plus the low-rank update B @ A times `scale`."""

    in_features: int
    out_features: int
    r: int
    scale: float
    dropout: float
    lora_A: AdapterLinear
    lora_B: AdapterLinear

    def params(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec((self.out_features, self.in_features), trainable=False)}

    @classmethod
    def wrap(cls, base: Linear, config: LoRAConfig) -> LoRALinear:
        # A as PEFT's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), i.e. std 1/sqrt(3 * in).
        a = AdapterLinear(base.in_features, config.r, init="normal", std=1.0 / math.sqrt(3.0 * base.in_features))
        b = AdapterLinear(config.r, base.out_features, init="zeros")
        return cls(base.in_features, base.out_features, config.r, config.scale, float(config.dropout), a, b)

    def base(self) -> Linear:
        return Linear(self.in_features, self.out_features)


class LoRA(Adapter):
    name = "lora"
    config_cls = LoRAConfig
    node_types = (LoRALinear,)
    lowering_modules = {"torch": "llama2.peft.lowering_torch", "mindspore": "llama2.peft.lowering_mindspore"}

    def apply(self, graph: Llama, config: LoRAConfig) -> Llama:
        hit: list[str] = []

        def fn(path: str, node: Node):
            if type(node) is Linear and target_matches(config.targets, path):
                hit.append(path)
                return LoRALinear.wrap(node, config)
            return None

        new = replace_nodes(graph, fn)
        if not hit:
            linears = [p for p, n in named_nodes(graph) if type(n) is Linear][:4]
            raise ValueError(
                f"LoRA targets {list(config.targets)} matched no Linear node; targets are module names "
                f"(q_proj, v_proj, ...) or regexes over dotted paths such as {linears}"
            )
        return new


ADAPTERS.register("lora", LoRA())
