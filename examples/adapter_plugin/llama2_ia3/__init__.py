"""IA3 as a llama2 adapter plugin: y = (x W^T) * ia3_l, W frozen, ia3_l (out,) trainable, initialized to ones."""

from __future__ import annotations

import attrs

from llama2.core.backend import Backend
from llama2.core.graph import Linear, Llama, Node, ParamSpec, replace_nodes
from llama2.peft.base import Adapter, AdapterConfig
from llama2.peft.lora import target_matches

__all__ = ["IA3Config", "IA3Linear", "IA3", "ADAPTER"]


@attrs.frozen(kw_only=True)
class IA3Config(AdapterConfig):
    targets: tuple[str, ...] = attrs.field(default=("k_proj", "v_proj", "up_proj"), converter=tuple)


@attrs.frozen
class IA3Linear(Node):
    in_features: int
    out_features: int

    def params(self) -> dict[str, ParamSpec]:
        return {
            "weight": ParamSpec((self.out_features, self.in_features), trainable=False),
            "ia3_l": ParamSpec((self.out_features,), init="ones"),
        }


def _lower_torch(node: IA3Linear, backend: Backend):
    import torch
    import torch.nn.functional as F

    class TorchIA3Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(node.out_features, node.in_features))
            self.ia3_l = torch.nn.Parameter(torch.ones(node.out_features))

        def forward(self, x):
            return F.linear(x, self.weight) * self.ia3_l.to(x.dtype)

    return TorchIA3Linear()


def _lower_mindspore(node: IA3Linear, backend: Backend):
    from mindspore import nn, ops

    from llama2.backends.mindspore.layers import cast_like, zeros_param

    class IA3LinearCell(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.weight = zeros_param((node.out_features, node.in_features), "weight", requires_grad=False)
            self.ia3_l = zeros_param((node.out_features,), "ia3_l")

        def construct(self, x):
            return ops.dense(x, cast_like(self.weight, x)) * cast_like(self.ia3_l, x)

    return IA3LinearCell()


class IA3(Adapter):
    name = "ia3"
    config_cls = IA3Config
    node_types = (IA3Linear,)

    def apply(self, graph: Llama, config: IA3Config) -> Llama:
        def fn(path: str, node: Node):
            if type(node) is Linear and target_matches(config.targets, path):
                return IA3Linear(node.in_features, node.out_features)
            return None

        return replace_nodes(graph, fn)

    def register_lowerings(self, backend: Backend) -> None:
        lowerings = {"torch": _lower_torch, "mindspore": _lower_mindspore}
        if backend.name not in lowerings:
            raise NotImplementedError(f"the ia3 plugin has no lowering for backend {backend.name!r}")
        backend.lowering(IA3Linear)(lowerings[backend.name])


ADAPTER = IA3()
