"""Distributed checkpoints: per-rank parts + strategy, bit-exact merge, re-split, and the trainer's per-rank save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from llama2.cli import main
from llama2.core import dist_checkpoint as dc
from llama2.core.config import ModelConfig
from llama2.core.graph import build_graph, named_params
from llama2.core.parallel import derive_strategy
from llama2.core.train_config import ParallelConfig

CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=128, vocab_size=256, max_seq_len=32)


def _tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in named_params(build_graph(cfg)).items():
        x = rng.standard_normal(spec.shape).astype(np.float32)
        x.flat[0] = np.float32(1e-38)  # denormal-ish and negative zero must survive exactly
        x.flat[-1] = np.float32(-0.0)
        out[name] = x
    return out


def _save_all(root: Path, tensors: dict[str, np.ndarray], par: ParallelConfig) -> None:
    s = derive_strategy(CFG, par)
    opt = {f"exp_avg.{n}": v * 0.5 for n, v in tensors.items()}
    opt["step"] = np.array(3.0, np.float32)
    for rank in range(s.world_size):
        dc.save_rank_part(root, rank, s, tensors.items(), optimizer_state=opt)


def _bits_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].shape == b[n].shape and a[n].dtype == b[n].dtype, n
        assert a[n].tobytes() == b[n].tobytes(), n


def test_parts_hold_their_slices(tmp_path: Path) -> None:
    t = _tensors(CFG)
    par = ParallelConfig(data_parallel=2, model_parallel=2, pipeline_stage=2, micro_batch_num=2)
    _save_all(tmp_path, t, par)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"rank_{r}" for r in range(8)]
    r5 = load_file(str(tmp_path / "rank_5" / "model.safetensors"))  # dp 0, stage 1, mp 1
    assert "model.embed_tokens.weight" not in r5 and "lm_head.weight" in r5
    q = "model.layers.3.self_attn.q_proj.weight"
    assert np.array_equal(r5[q], t[q][32:])
    o = "model.layers.2.self_attn.o_proj.weight"
    assert np.array_equal(r5[o], t[o][:, 32:])
    assert "model.layers.0.self_attn.q_proj.weight" not in r5


def test_merge_round_trip_is_bit_exact(tmp_path: Path) -> None:
    t = _tensors(CFG)
    dist = tmp_path / "dist"
    _save_all(dist, t, ParallelConfig(data_parallel=2, model_parallel=2, pipeline_stage=2, micro_batch_num=2))
    _bits_equal(dict(dc.merged_tensors(dist, check_replicas=True)), t)
    opt = dc.merged_optimizer_state(dist)
    assert opt is not None and float(opt["step"]) == 3.0
    _bits_equal({k: v for k, v in opt.items() if k != "step"}, {f"exp_avg.{n}": v * 0.5 for n, v in t.items()})
    out = dc.merge(dist, tmp_path / "merged")
    _bits_equal(load_file(str(out / "model.safetensors")), t)

    # re-split the merged checkpoint for another model-parallel size and merge again
    dc.split(out, tmp_path / "mp4", ParallelConfig(model_parallel=4))
    assert load_file(str(tmp_path / "mp4" / "rank_3" / "model.safetensors"))[
        "model.layers.0.mlp.gate_proj.weight"
    ].shape == (32, 64)
    _bits_equal(dict(dc.merged_tensors(tmp_path / "mp4")), t)


def test_merge_detects_diverged_replica_and_missing_rank(tmp_path: Path) -> None:
    t = _tensors(CFG)
    par = ParallelConfig(data_parallel=2, model_parallel=2)
    s = derive_strategy(CFG, par)
    for rank in range(4):
        tensors = dict(t)
        if rank == 3:  # dp replica 1, mp 1
            q = "model.layers.1.self_attn.q_proj.weight"
            tensors[q] = t[q].copy()
            tensors[q][-1, -1] = np.nextafter(t[q][-1, -1], np.float32(1))  # one ulp off in the mp 1 slice
        dc.save_rank_part(tmp_path, rank, s, tensors.items())
    dict(dc.merged_tensors(tmp_path))  # replicas are not compared by default
    with pytest.raises(ValueError, match="differs between data-parallel replicas"):
        dict(dc.merged_tensors(tmp_path, check_replicas=True))
    import shutil

    shutil.rmtree(tmp_path / "rank_2")
    with pytest.raises(FileNotFoundError, match="rank_2"):
        dc.read_strategy(tmp_path)


def test_merge_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t = _tensors(CFG, seed=1)
    _save_all(tmp_path / "dist", t, ParallelConfig(model_parallel=2))
    assert main(["merge", "--input", str(tmp_path / "dist"), "--output", str(tmp_path / "m.ckpt")]) == 0
    from llama2.core.formats import open_checkpoint

    with open_checkpoint(tmp_path / "m.ckpt") as ck:
        _bits_equal(dict(ck.tensors()), t)
    args = ["merge", "--input", str(tmp_path / "m.ckpt"), "--output", str(tmp_path / "re"), "--model-parallel", "4"]
    assert main(args) == 0
    _bits_equal(dict(dc.merged_tensors(tmp_path / "re")), t)
    assert (
        main(["merge", "--input", str(tmp_path / "m.ckpt"), "--output", str(tmp_path / "x"), "--model-parallel", "3"])
        == 2
    )
    assert "model_parallel=3 must divide" in capsys.readouterr().err


def test_adapter_only_parts_merge_to_tensors_not_a_model(tmp_path: Path) -> None:
    """A LoRA finetune's rank parts hold only adapter tensors: merged_tensors joins them, merge explains."""
    lora = {"model.layers.0.self_attn.q_proj.lora_A.weight": np.arange(8 * 64, dtype=np.float32).reshape(8, 64)}
    for rank in range(2):
        dc.save_rank_checkpoint(tmp_path, 2, rank, 2, CFG, lora.items(), replicas=True)
    _bits_equal(dict(dc.merged_tensors(tmp_path, check_replicas=True)), lora)
    with pytest.raises(ValueError, match="adapter-only checkpoint"):
        dc.merge(tmp_path, tmp_path / "merged")


def test_one_replica_per_slice_is_saved(tmp_path: Path) -> None:
    """dp 2 x mp 2 x pp 2: only the 4 ranks of data-parallel index 0 write; they merge back bit for bit."""
    t = _tensors(CFG)
    par = ParallelConfig(data_parallel=2, model_parallel=2, pipeline_stage=2, micro_batch_num=2)
    s = derive_strategy(CFG, par)
    assert dc.saved_ranks(s) == [0, 1, 4, 5] and dc.saved_ranks(s, replicas=True) == list(range(8))
    opt = {f"exp_avg.{n}": v * 0.5 for n, v in t.items()} | {"step": np.array(2.0, np.float32)}
    written = [
        dc.save_rank_checkpoint(tmp_path, 7, r, 8, CFG, t.items(), parallel=par, optimizer_state=opt) for r in range(8)
    ]
    assert [w is not None for w in written] == [r in (0, 1, 4, 5) for r in range(8)]
    step = tmp_path / "distributed" / "step_00000007"
    assert sorted(p.name for p in step.iterdir()) == ["rank_0", "rank_1", "rank_4", "rank_5"]
    assert sorted(dc.read_strategy(tmp_path)[1]) == [0, 1, 4, 5]
    _bits_equal(dict(dc.merged_tensors(tmp_path)), t)
    assert float(dc.merged_optimizer_state(tmp_path)["step"]) == 2.0
    with pytest.raises(ValueError, match="holds 1 of 2 data-parallel replicas"):
        dict(dc.merged_tensors(tmp_path, check_replicas=True))
    import shutil

    shutil.rmtree(step / "rank_4")
    with pytest.raises(FileNotFoundError, match="no distributed checkpoint found"):
        dc.find_distributed(tmp_path)  # incomplete: a saved rank is missing


def test_trainer_saves_rank_parts(tmp_path: Path) -> None:
    """Two data-parallel ranks simulated in one process (no collectives): only rank 0 writes a part (one copy of
    the weights besides checkpoints/); with save_replicas both do, and --check-replicas compares them."""
    from llama2.core.model import build_runtime
    from llama2.core.train_config import TrainConfig
    from llama2.core.trainer import TrainData, Trainer

    cfg = ModelConfig.from_preset("tiny", n_layers=1, max_seq_len=16)
    data = TrainData.from_any(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 9)))
    train = TrainConfig(steps=1, batch_size=4, lr=1e-3, keep=1)
    par = {"parallel_config": ParallelConfig(data_parallel=2).to_dict()}
    for replicas, out in ((False, tmp_path / "one"), (True, tmp_path / "both")):
        for rank in (0, 1):
            rt = build_runtime(cfg, "torch", mode="eager")
            rt.init_weights(0)
            t = Trainer(
                rt, train, data, out, rank=rank, world_size=2, progress=False, extra_state=par, save_replicas=replicas
            )
            t.fit()
    step = tmp_path / "one" / "distributed" / "step_00000001"
    assert dc.find_distributed(tmp_path / "one") == step
    assert sorted(p.name for p in step.iterdir()) == ["rank_0"]
    rank0 = load_file(str(tmp_path / "one" / "checkpoints" / "step_00000001" / "model.safetensors"))
    _bits_equal(dict(dc.merged_tensors(tmp_path / "one")), rank0)
    _bits_equal(load_file(str(step / "rank_0" / "model.safetensors")), rank0)
    with pytest.raises(ValueError, match="nothing to compare"):
        dict(dc.merged_tensors(tmp_path / "one", check_replicas=True))
    both = dc.find_distributed(tmp_path / "both")
    assert sorted(p.name for p in both.iterdir()) == ["rank_0", "rank_1"]
    _bits_equal(dict(dc.merged_tensors(both)), rank0)
    with pytest.raises(ValueError, match="replicas 0 and 1"):  # no all-reduce here, so the replicas diverged
        dict(dc.merged_tensors(both, check_replicas=True))
