"""ParallelConfig validation and the sharding strategy derivation (pure Python, no devices)."""

from __future__ import annotations

import re

import pytest

from llama2.core.config import ModelConfig
from llama2.core.graph import build_graph, named_params
from llama2.core.parallel import ParallelStrategy, derive_strategy
from llama2.core.train_config import ParallelConfig

COLUMN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
COLUMN += ("mlp.gate_proj.weight", "mlp.up_proj.weight")
ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def _par(**kw) -> ParallelConfig:
    return ParallelConfig(**{"data_parallel": 2, "model_parallel": 4, "pipeline_stage": 2, "micro_batch_num": 2, **kw})


@pytest.mark.parametrize("vocab_emb_dp", [True, False])
def test_13b_dp2_mp4_pp2(vocab_emb_dp: bool) -> None:
    cfg = ModelConfig.from_preset("llama2-13b")
    s = derive_strategy(cfg, _par(vocab_emb_dp=vocab_emb_dp))
    shapes = named_params(build_graph(cfg))
    assert set(s.params) == set(shapes)  # every parameter has a placement
    assert s.layer_stages == tuple([0] * 20 + [1] * 20)
    for name, shard in s.params.items():
        assert shard.shape == tuple(shapes[name].shape)
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            assert shard.stage == (0 if layer < 20 else 1), name
            expected = 0 if suffix in COLUMN else 1 if suffix in ROW else None
            assert suffix in COLUMN + ROW + NORMS
            assert shard.split_axis == expected, name
            if expected is not None:
                part = list(shard.shape)
                part[expected] //= 4
                assert shard.part_shape(4) == tuple(part)
    vocab_axis = None if vocab_emb_dp else 0
    assert (s.params["model.embed_tokens.weight"].split_axis, s.params["model.embed_tokens.weight"].stage) == (
        vocab_axis,
        0,
    )
    assert (s.params["lm_head.weight"].split_axis, s.params["lm_head.weight"].stage) == (vocab_axis, 1)
    assert (s.params["model.norm.weight"].split_axis, s.params["model.norm.weight"].stage) == (None, 1)
    # the column-parallel k/v/gate shards are whole heads / equal MLP slices
    assert s.params["model.layers.0.self_attn.k_proj.weight"].part_shape(4) == (5120 // 4, 5120)
    assert s.params["model.layers.0.mlp.down_proj.weight"].part_shape(4) == (5120, 13824 // 4)


def test_rank_layout_and_json_round_trip() -> None:
    s = derive_strategy(ModelConfig.from_preset("llama2-13b"), _par())
    coords = [s.rank_coords(r) for r in range(16)]
    assert len(set(coords)) == 16
    assert coords[0] == (0, 0, 0) and coords[1] == (0, 0, 1) and coords[4] == (1, 0, 0) and coords[8] == (0, 1, 0)
    assert all(s.rank_of(*c) == r for r, c in enumerate(coords))
    assert all(n.startswith("model.layers.") or n == "model.embed_tokens.weight" for n in s.rank_params(0))
    assert "lm_head.weight" in s.rank_params(15) and "model.embed_tokens.weight" not in s.rank_params(15)
    assert ParallelStrategy.from_dict(s.to_dict()) == s


def test_vocab_not_divisible_falls_back_to_replicated() -> None:
    cfg = ModelConfig.from_preset("llama2-13b", vocab_size=32001)
    s = derive_strategy(cfg, _par(vocab_emb_dp=False))
    assert s.params["lm_head.weight"].split_axis is None and s.notes


def test_tied_embeddings_and_lora_graph() -> None:
    from llama2.core.graph import Linear, replace_nodes
    from llama2.peft.lora import LoRAConfig, LoRALinear

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=128, vocab_size=256, tie_embeddings=True)
    s = derive_strategy(cfg, ParallelConfig(model_parallel=2))
    assert "lm_head.weight" not in s.params
    assert s.params["model.layers.1.self_attn.q_proj.weight"].split_axis == 0

    lora = LoRAConfig(r=4)
    graph = replace_nodes(
        build_graph(cfg),
        lambda path, node: LoRALinear.wrap(node, lora) if isinstance(node, Linear) and path != "lm_head" else None,
    )
    s = derive_strategy(cfg, ParallelConfig(model_parallel=2), graph=graph)
    p = s.params
    assert p["model.layers.0.self_attn.q_proj.weight"].split_axis == 0  # base weight as before
    assert p["model.layers.0.self_attn.q_proj.lora_B.weight"].split_axis == 0  # B (out, r) follows the column split
    assert p["model.layers.0.self_attn.q_proj.lora_A.weight"].split_axis is None
    assert p["model.layers.0.mlp.down_proj.lora_A.weight"].split_axis == 1  # A (r, in) follows the row split
    assert p["model.layers.0.mlp.down_proj.lora_B.weight"].split_axis is None


@pytest.mark.parametrize(
    "model_kw, par_kw, world, message",
    [
        ({}, {}, 8, r"data_parallel \* model_parallel \* pipeline_stage = 2 \* 4 \* 2 = 16, but 8 process"),
        (
            {"n_heads": 40, "dim": 5120},
            {"model_parallel": 3, "data_parallel": 1},
            6,
            r"must divide the model's n_heads \(40\)",
        ),
        ({"n_layers": 41}, {}, 16, r"pipeline_stage=2 must divide the model's n_layers \(41\)"),
        ({"hidden_dim": 13826}, {}, 16, r"model_parallel=4 must divide the model's hidden_dim \(13826\)"),
        ({"n_kv_heads": 2}, {}, 16, r"model_parallel=4 must divide the model's n_kv_heads \(2\)"),
    ],
)
def test_invalid_layouts(model_kw: dict, par_kw: dict, world: int, message: str) -> None:
    cfg = ModelConfig.from_preset("llama2-13b", **model_kw)
    with pytest.raises(ValueError, match=message):
        derive_strategy(cfg, _par(**par_kw), world_size=world)


def test_micro_batch_num_and_cpu_errors() -> None:
    with pytest.raises(ValueError, match=r"micro_batch_num \(1\) must be >= pipeline_stage \(2\)"):
        ParallelConfig(pipeline_stage=2, micro_batch_num=1)
    with pytest.raises(ValueError, match="need GPU or Ascend"):
        _par().validate(world_size=16, device="cpu")
    ParallelConfig(data_parallel=2).validate(world_size=2, device="cpu")  # data parallel is fine on CPU
    with pytest.raises(ValueError, match="unknown ParallelConfig field"):
        ParallelConfig.from_dict({"data_paralel": 2})


def test_mindspore_cell_plan() -> None:
    from llama2.backends.mindspore.parallel import cell_shard_plan

    s = derive_strategy(ModelConfig.from_preset("llama2-13b"), _par(recompute=True))
    plan = cell_shard_plan(s)
    q = plan["model.layers.0.self_attn.q_proj"]
    assert q.in_strategy == ((2, 1, 1),) and q.parameter_plan == {"model.layers.0.self_attn.q_proj.weight": (4, 1)}
    o = plan["model.layers.39.self_attn.o_proj"]
    assert o.in_strategy == ((2, 1, 4),) and o.parameter_plan == {"model.layers.39.self_attn.o_proj.weight": (1, 4)}
    assert o.stage == 1
    assert plan["model.layers.25"].stage == 1 and plan["model.layers.25"].recompute
    assert plan["model.embed_tokens"].in_strategy == ((2, 1),) and plan["model.embed_tokens"].stage == 0


def test_mindspore_configure_parallel_refuses_cpu() -> None:
    pytest.importorskip("mindspore")
    from llama2.backends.mindspore.parallel import configure_parallel

    s = derive_strategy(ModelConfig.from_preset("tiny"), ParallelConfig(model_parallel=2))
    with pytest.raises(ValueError, match="on CPU only data_parallel is supported"):
        configure_parallel(object(), s, "cpu")


def test_msrun_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """On GPU/Ascend under msrun a worker takes DEVICE_ID (its local rank) unless a device id is given."""
    from llama2.backends.mindspore.parallel import msrun_device_id

    for k in ("MS_ROLE", "MS_SCHED_PORT", "DEVICE_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DEVICE_ID", "3")
    assert msrun_device_id("gpu", 0) == 0  # not under msrun
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_SCHED_PORT", "8118")
    assert msrun_device_id("gpu", 0) == 3 and msrun_device_id("ascend", 0) == 3
    assert msrun_device_id("gpu", 5) == 5  # an explicit device id wins
    assert msrun_device_id("cpu", 0) == 0
    monkeypatch.setenv("DEVICE_ID", "x")
    with pytest.raises(ValueError, match="DEVICE_ID environment variable must be an integer"):
        msrun_device_id("gpu", 0)


def test_cell_plan_matches_the_lowered_network() -> None:
    """Every cell and parameter `configure_parallel` would touch exists in the real MindSpore lowering, and the
    `Cell.shard` keywords it passes exist in this MindSpore."""
    pytest.importorskip("mindspore")
    import inspect

    import mindspore as ms

    from llama2.backends.mindspore.parallel import cell_shard_plan
    from llama2.core.model import build_runtime

    cfg = ModelConfig.from_preset("tiny")
    rt = build_runtime(cfg, "mindspore", mode="eager")
    cells = dict(rt.net.cells_and_names())
    plan = cell_shard_plan(
        derive_strategy(
            cfg,
            ParallelConfig(data_parallel=1, model_parallel=2, pipeline_stage=2, micro_batch_num=2, vocab_emb_dp=False),
        )
    )
    assert set(plan) <= set(cells), sorted(set(plan) - set(cells))
    for path, p in plan.items():
        own = {q.name for q in cells[path].get_parameters()}
        assert set(p.parameter_plan) <= own, path
    assert {"in_strategy", "parameter_plan"} <= set(inspect.signature(ms.nn.Cell.shard).parameters)


def test_init_from_env_refuses_a_stale_rank_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer slices data by RANK_ID; if it disagrees with the rank MindSpore assigned, fail loudly."""
    pytest.importorskip("mindspore")
    import mindspore.communication as comm

    from llama2.backends.mindspore.parallel import init_from_env

    monkeypatch.setattr(comm.GlobalComm, "INITED", True)
    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    monkeypatch.setattr(comm, "get_group_size", lambda: 2)
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_SCHED_PORT", "8118")
    monkeypatch.setenv("RANK_ID", "1")
    assert init_from_env() == (1, 2)
    monkeypatch.setenv("RANK_ID", "0")
    with pytest.raises(RuntimeError, match="assigned this process rank 1 but RANK_ID=0"):
        init_from_env()
