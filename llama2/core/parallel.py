"""The sharding strategy of a run, derived from `ModelConfig` + `ParallelConfig` as plain data (no backend).

A backend pass walks the neutral graph and decides, for every canonical parameter, which axis is split over the
`model_parallel` devices and which pipeline stage holds it. The rules follow the seed (MindFormers Llama 2):

| parameter (HF layout, weight is (out, in))          | split over model_parallel                      | stage       |
|-----------------------------------------------------|------------------------------------------------|-------------|
| self_attn.{q,k,v}_proj, mlp.gate_proj, mlp.up_proj  | axis 0 (output features; column parallel)      | its layer's |
| self_attn.o_proj, mlp.down_proj                     | axis 1 (input features; row parallel)          | its layer's |
| input_layernorm, post_attention_layernorm           | replicated                                     | its layer's |
| model.embed_tokens                                  | replicated if vocab_emb_dp, else axis 0 (vocab) | 0          |
| lm_head                                             | replicated if vocab_emb_dp, else axis 0 (vocab) | last       |
| model.norm                                          | replicated                                     | last        |

When vocab_emb_dp is False but vocab_size is not divisible by model_parallel, the embedding and the LM head stay
replicated (the seed does the same) and `ParallelStrategy.notes` says so. A tied LM head is the embedding itself
(stage 0). Layer i goes to stage i // (n_layers / pipeline_stage). Parameters of nodes the rules do not know (e.g.
adapters) are replicated, except a LoRA pair on a sharded Linear: lora_B follows a column-parallel base (axis 0),
lora_A a row-parallel one (axis 1).

Rank layout (MindSpore's device matrix): pipeline stage outermost, model parallel innermost, so
rank = stage * (data_parallel * model_parallel) + dp_index * model_parallel + mp_index.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from llama2.core.config import ModelConfig
from llama2.core.graph import Embedding, Llama, Node, RMSNorm, build_graph, named_nodes
from llama2.core.train_config import ParallelConfig

__all__ = [
    "ParamShard",
    "ParallelStrategy",
    "derive_strategy",
    "COLUMN",
    "ROW",
    "VOCAB",
    "REPLICATED",
    "PIPELINE_TRAINING_UNSUPPORTED",
]

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"
PIPELINE_TRAINING_UNSUPPORTED = (
    "ParallelConfig.pipeline_stage={pp}: pipeline-parallel training is not supported yet (its strategy is derived "
    "and its checkpoints merge and re-split, but MindSpore's functional pipeline step was never run on hardware "
    "here); use data_parallel x model_parallel"
)
_COLUMN_NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_NAMES = ("o_proj", "down_proj")


@attrs.frozen
class ParamShard:
    """How one parameter is placed: `split_axis` (None: every model-parallel rank holds it whole) and `stage`."""

    name: str
    shape: tuple[int, ...] = attrs.field(converter=tuple)
    role: str  # column | row | vocab | replicated
    split_axis: int | None
    stage: int

    def part_shape(self, model_parallel: int) -> tuple[int, ...]:
        """Shape of the slice one model-parallel rank holds."""
        if self.split_axis is None:
            return self.shape
        s = list(self.shape)
        s[self.split_axis] //= model_parallel
        return tuple(s)


@attrs.frozen
class ParallelStrategy:
    """Every parameter's `ParamShard`, every layer's stage and the rank layout of one run (JSON-serializable)."""

    model: ModelConfig
    parallel: ParallelConfig
    params: dict[str, ParamShard]
    layer_stages: tuple[int, ...] = attrs.field(converter=tuple)
    layer_recompute: tuple[bool, ...] = attrs.field(converter=tuple)
    notes: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @property
    def world_size(self) -> int:
        return self.parallel.device_count

    def rank_coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_index, stage, mp_index) of a global rank."""
        p = self.parallel
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size}) for this parallel layout")
        stage, in_stage = divmod(rank, p.data_parallel * p.model_parallel)
        dp, mp = divmod(in_stage, p.model_parallel)
        return dp, stage, mp

    def rank_of(self, dp: int, stage: int, mp: int) -> int:
        p = self.parallel
        return stage * p.data_parallel * p.model_parallel + dp * p.model_parallel + mp

    def rank_params(self, rank: int) -> list[str]:
        """Names of the parameters (slices) a rank holds: those of its pipeline stage."""
        _, stage, _ = self.rank_coords(rank)
        return [n for n, s in self.params.items() if s.stage == stage]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "llama2-parallel-strategy",
            "version": 1,
            "model_config": self.model.to_dict(),
            "parallel_config": self.parallel.to_dict(),
            "layer_stages": list(self.layer_stages),
            "layer_recompute": list(self.layer_recompute),
            "notes": list(self.notes),
            "params": {
                n: {"shape": list(s.shape), "role": s.role, "split_axis": s.split_axis, "stage": s.stage}
                for n, s in self.params.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "strategy") -> ParallelStrategy:
        if data.get("format") != "llama2-parallel-strategy":
            raise ValueError(f"{source}: not a llama2 parallel strategy (format {data.get('format')!r})")
        try:
            params = {
                n: ParamShard(n, tuple(d["shape"]), d["role"], d["split_axis"], int(d["stage"]))
                for n, d in data["params"].items()
            }
            return cls(
                model=ModelConfig.from_dict(data["model_config"], f"{source}: model_config"),
                parallel=ParallelConfig.from_dict(data["parallel_config"], f"{source}: parallel_config"),
                params=params,
                layer_stages=data["layer_stages"],
                layer_recompute=data["layer_recompute"],
                notes=data.get("notes", ()),
            )
        except KeyError as exc:
            raise ValueError(f"{source}: missing field {exc}") from None


def _node_split(path: str, node: Node, roles: dict[str, str], vocab_split: bool) -> tuple[str, int | None]:
    """(role recorded for children, split axis of this node's own parameters)."""
    leaf = path.rsplit(".", 1)[-1]
    if isinstance(node, Embedding) or path == "lm_head":
        return (VOCAB, 0) if vocab_split else (REPLICATED, None)
    if isinstance(node, RMSNorm):
        return REPLICATED, None
    if leaf in _COLUMN_NAMES:  # a Linear, or an adapter node wrapping one (its own `weight` is the base weight)
        return COLUMN, 0
    if leaf in _ROW_NAMES:
        return ROW, 1
    parent = roles.get(path.rsplit(".", 1)[0] if "." in path else "", REPLICATED)
    # LoRA factors follow the Linear they wrap: B (out, r) on a column-parallel base, A (r, in) on a row one
    if parent == COLUMN and leaf == "lora_B":
        return COLUMN, 0
    if parent == ROW and leaf == "lora_A":
        return ROW, 1
    return REPLICATED, None


def derive_strategy(
    config: ModelConfig, parallel: ParallelConfig, graph: Llama | None = None, world_size: int | None = None
) -> ParallelStrategy:
    """The strategy of `config` under `parallel` (validated first; `graph` defaults to `build_graph(config)`).

    Raises the ValueErrors of `ParallelConfig.validate` (device count, divisibility of heads / layers / widths).
    """
    parallel.validate(world_size=parallel.device_count if world_size is None else world_size, model=config)
    graph = graph if graph is not None else build_graph(config)
    mp, pp = parallel.model_parallel, parallel.pipeline_stage
    notes = []
    vocab_split = not parallel.vocab_emb_dp and mp > 1
    if vocab_split and config.vocab_size % mp:
        vocab_split = False
        notes.append(
            f"vocab_emb_dp=False but vocab_size {config.vocab_size} is not divisible by model_parallel {mp}: "
            "the embedding and LM head stay replicated"
        )
    per_stage = config.n_layers // pp
    layer_stages = tuple(i // per_stage for i in range(config.n_layers))
    last = pp - 1

    def stage_of(path: str) -> int:
        parts = path.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
            return layer_stages[int(parts[2])]
        if path.startswith("model.embed_tokens"):
            return 0
        return last  # model.norm, lm_head

    roles: dict[str, str] = {}
    params: dict[str, ParamShard] = {}
    for path, node in named_nodes(graph):
        role, axis = _node_split(path, node, roles, vocab_split)
        roles[path] = role
        if mp == 1:
            axis = None
        for pname, spec in node.params().items():
            full = f"{path}.{pname}" if path else pname
            if axis is not None and spec.shape[axis] % mp:
                raise ValueError(
                    f"ParallelConfig.model_parallel={mp} must divide axis {axis} of {full} {tuple(spec.shape)}"
                )
            kind = role if axis is not None else REPLICATED
            params[full] = ParamShard(full, tuple(spec.shape), kind, axis, stage_of(full))
    recompute = tuple(bool(parallel.recompute) for _ in range(config.n_layers))
    return ParallelStrategy(config, parallel, params, layer_stages, recompute, tuple(notes))


def env_device_index(var: str, launcher: str) -> int:
    """A launcher's per-process device index from the environment (msrun's DEVICE_ID, torchrun's LOCAL_RANK);
    ValueError naming the variable when it is not a non-negative integer; RuntimeError when it is unset."""
    value = os.environ.get(var)
    if value is None:
        raise RuntimeError(f"{launcher}: {var} is unset in the environment; start the processes with {launcher}")
    try:
        index = int(value)
    except ValueError:
        raise ValueError(f"{launcher}'s {var} environment variable must be an integer, got {value!r}") from None
    if index < 0:
        raise ValueError(f"{launcher}'s {var} environment variable must be >= 0, got {index}")
    return index
