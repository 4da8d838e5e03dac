"""Model-parallel training plumbing: the fused MindSpore step (the graph semi-auto parallel compiles), data read
by data-parallel index, per-rank local-slice saves joined into full checkpoints, and the CPU refusals.

Semi-auto parallel itself cannot compile on CPU ("Invalid communication backend: CPU"), so the sharded run is
tested only where a multi-GPU/Ascend machine runs the suite (`test_model_parallel_pretrain_on_devices`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from llama2.core import dist_checkpoint as dc
from llama2.core import run_dir as rd
from llama2.core.backend import IGNORE_INDEX
from llama2.core.config import ModelConfig
from llama2.core.parallel import derive_strategy
from llama2.core.train_config import ParallelConfig, TrainConfig
from llama2.core.trainer import DataOrder, TrainData, Trainer

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=97, max_seq_len=16)


def _data(n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, 17))


def _mindspore_runtime():
    from llama2.core.model import build_runtime

    rt = build_runtime(CFG, "mindspore", mode="graph")
    rt.init_weights(0)
    return rt


def test_fused_step_equals_accumulate_apply(tmp_path: Path) -> None:
    """FusedTrainState (grad + clipping + AdamW in one graph; what semi-auto parallel compiles) trains exactly
    like MindSporeTrainState: 3 steps with active clipping and weight decay, then an unscored step skipped."""
    pytest.importorskip("mindspore")
    ids = _data()
    labels = ids.copy()
    labels[6:] = IGNORE_INDEX  # step 4 (no shuffle, batch 2) scores nothing
    data = TrainData(ids, labels)
    for rows in (np.arange(8), np.array([7, 0, 6])):  # the fused path counts tokens without building the batch
        assert data.scored_tokens(rows) == int((data.batch(rows)[1] != IGNORE_INDEX).sum())
        assert TrainData(ids).scored_tokens(rows) == TrainData(ids).batch(rows)[1].size
    train = TrainConfig(steps=4, batch_size=2, lr=3e-3, schedule="constant", grad_clip=0.5, shuffle=False)
    runs = {}
    for fused in (False, True):
        rt = _mindspore_runtime()
        state = rt.train_state(train.optim(), strategy=derive_strategy(CFG, ParallelConfig())) if fused else None
        t = Trainer(rt, train, data, None, rank=0, world_size=1, progress=False, train_state=state, log=lambda m: None)
        assert t.fused is fused
        runs[fused] = (t.fit(), dict(rt.state_dict()), t.state.state_dict())
    (h0, w0, o0), (h1, w1, o1) = runs[False], runs[True]
    for a, b in zip(h0, h1):
        assert a["tokens"] == b["tokens"] and a.get("skipped") == b.get("skipped")
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert h1[0]["grad_norm"] > train.grad_clip  # clipping was active
    assert h1[3]["skipped"] is True and o1["step"] == 3
    for name in w0:
        np.testing.assert_allclose(w1[name], w0[name], rtol=0, atol=1e-6, err_msg=name)
    for name in o0:
        np.testing.assert_allclose(o1[name], o0[name], rtol=0, atol=1e-6, err_msg=name)


def test_fused_state_refuses_micro_batches_and_pipeline() -> None:
    pytest.importorskip("mindspore")
    rt = _mindspore_runtime()
    train = TrainConfig(steps=1, batch_size=4, micro_batch_size=2)
    state = rt.train_state(train.optim(), strategy=derive_strategy(CFG, ParallelConfig()))
    with pytest.raises(ValueError, match="one fused step per update"):
        Trainer(rt, train, TrainData.from_any(_data()), None, rank=0, world_size=1, train_state=state)
    pp = ParallelConfig(pipeline_stage=2, micro_batch_num=2)
    with pytest.raises(ValueError, match="pipeline-parallel training is not supported yet"):
        rt.train_state(train.optim(), strategy=derive_strategy(CFG, pp))


class _RowRecorder:
    """A fused train state double: records the rows each simulated rank is given, updates nothing."""

    fused = True
    strategy = None

    def __init__(self, dp_index: int, dp: int) -> None:
        self.data_shard = (dp_index, dp)
        self.rows: list[np.ndarray] = []
        self.tokens: list[int] = []

    def step_batch(self, ids: np.ndarray, labels: np.ndarray, lr: float, n_tokens: int) -> tuple[float, float]:
        self.rows.append(ids.copy())
        self.tokens.append(n_tokens)
        return 1.0, 0.0

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"step": np.array(0, np.float32)}


def test_ranks_read_rows_by_data_parallel_index() -> None:
    """dp=2 x mp=2 (4 ranks): the 2 model-parallel ranks of a data-parallel index read the same rows, and the two
    indices read the two halves of each global batch (DataOrder's seeded permutation)."""
    from llama2.core.model import build_runtime

    par = ParallelConfig(data_parallel=2, model_parallel=2)
    strategy = derive_strategy(CFG, par)
    data = TrainData.from_any(_data(16))
    train = TrainConfig(steps=3, batch_size=4, seed=5)
    rt = build_runtime(CFG, "torch", mode="eager")
    seen = {}
    for rank in range(4):
        dp_index = strategy.rank_coords(rank)[0]
        state = _RowRecorder(dp_index, par.data_parallel)
        t = Trainer(rt, train, data, None, rank=rank, world_size=4, progress=False, train_state=state)
        hist = t.fit()
        assert [h["tokens"] for h in hist] == state.tokens == [4 * 16] * 3  # the global batch's count
        seen[rank] = state.rows
    order = DataOrder(16, 4, seed=5)
    for rank in range(4):
        dp_index = strategy.rank_coords(rank)[0]
        for step, rows in enumerate(seen[rank]):
            expected = data.input_ids[order.indices(step, dp_index, 2)][:, :-1]
            assert np.array_equal(rows, expected), (rank, step)
    assert [strategy.rank_coords(r)[0] for r in range(4)] == [0, 0, 1, 1]


class _Sliced:
    """A sharded train state double for one simulated rank: holds the rank's slices of a full optimizer state."""

    fused = True

    def __init__(self, strategy, rank: int, opt: dict[str, np.ndarray], sliced: bool = True) -> None:
        self.strategy = strategy
        self.sliced = sliced
        self.data_shard = (strategy.rank_coords(rank)[0], strategy.parallel.data_parallel)
        self.opt = dict(dc.rank_part(opt.items(), strategy, rank)) if sliced else dict(opt)

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.opt

    def barrier(self) -> None:  # ranks run one after another here; rank 0 last
        pass


@pytest.mark.parametrize("sliced", [True, False])
def test_sharded_save_joins_local_slices(tmp_path: Path, sliced: bool) -> None:
    """mp=2: each rank saves only the slices it holds (or, before the first compiled step, cuts them from its
    whole weights); rank 0 joins them into checkpoints/step_N, bit for bit the full tensors (model and optimizer),
    which resume and `llama2.load` read. A slice of the wrong shape is named."""
    from llama2.core.model import build_runtime

    rt = build_runtime(CFG, "torch", mode="eager")
    rt.init_weights(3)
    full = dict(rt.state_dict())
    opt = {f"exp_avg.{n}": v * 0.5 for n, v in full.items()} | {f"exp_avg_sq.{n}": v * v for n, v in full.items()}
    opt["step"] = np.array(7.0, np.float32)
    strategy = derive_strategy(CFG, ParallelConfig(model_parallel=2), world_size=2)
    train = TrainConfig(steps=1, batch_size=2, keep=2)
    data = TrainData.from_any(_data())
    for rank in (1, 0):
        local = dict(dc.rank_part(full.items(), strategy, rank)) if sliced else full
        t = Trainer(
            rt,
            train,
            data,
            tmp_path,
            rank=rank,
            world_size=2,
            progress=False,
            train_state=_Sliced(strategy, rank, opt, sliced),
            model_tensors=lambda local=local: local.items(),
        )
        t.step = 1
        out = t.save()
        assert (out is None) == (rank == 1)
    q = "model.layers.0.self_attn.q_proj.weight"
    part = load_file(str(tmp_path / "distributed" / "step_00000001" / "rank_1" / "model.safetensors"))
    assert part[q].shape == (16, 32) and np.array_equal(part[q], full[q][16:])
    merged = dict(rd.read_model_tensors(out))
    assert sorted(merged) == sorted(full)
    for n in full:
        assert merged[n].tobytes() == full[n].tobytes(), n
    saved_opt = rd.read_optimizer_state(out)
    for n in opt:
        assert saved_opt[n].tobytes() == np.asarray(opt[n], np.float32).tobytes(), n
    wrong = dict(dc.rank_part(full.items(), strategy, 0)) | {q: full[q]}
    with pytest.raises(ValueError, match=r"rank 0: tensor 'model.layers.0.self_attn.q_proj.weight' has shape"):
        dc.save_rank_part(tmp_path / "bad", 0, strategy, wrong.items(), local=True)


def test_model_parallel_pretrain_refusals(tmp_path: Path) -> None:
    """One CPU process asked for model_parallel=2: the process count and the device are named."""
    from llama2 import pretrain

    par = {"data_parallel": 1, "model_parallel": 2}
    with pytest.raises(ValueError, match=r"= 2, but 1 process\(es\) are running"):
        pretrain("tiny", data=_data(8), out_dir=tmp_path / "a", steps=1, batch_size=2, parallel=par, progress=False)
    with pytest.raises(ValueError, match="on CPU only data_parallel is supported"):
        ParallelConfig(model_parallel=2).validate(world_size=2, device="cpu", model=CFG)
    assert not (tmp_path / "a").exists()


def _gpu_count() -> int:
    try:
        from mindspore import device_context

        return int(device_context.gpu.device_count()) if device_context.gpu.is_available() else 0
    except Exception:
        return 0


@pytest.mark.skipif(
    _gpu_count() < 2, reason="model-parallel training needs >= 2 GPUs (semi-auto parallel cannot run on CPU)"
)
def test_model_parallel_pretrain_on_devices(tmp_path: Path) -> None:
    """2 GPUs, model_parallel=2 under msrun: the same losses and grad norms as one process (1e-4), and the merged
    step-3 checkpoint equals the single-process weights (1e-4), so the slices were joined in MindSpore's order."""
    import json
    import subprocess
    import sys

    data = tmp_path / "data.npy"
    np.save(data, _data(8))
    common = ["pretrain", "--preset", "tiny", "--data", str(data), "--steps", "3", "--batch-size", "4"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "llama2", *common, "--device", "gpu", "--out", str(single)], check=True)
    yaml = tmp_path / "mp2.yaml"
    yaml.write_text("parallel_config: {data_parallel: 1, model_parallel: 2}\n")
    mp = tmp_path / "mp2"
    launch = [sys.executable, "-m", "llama2", "launch", "--nproc", "2", "--"]
    subprocess.run([*launch, *common, "--config", str(yaml), "--device", "gpu", "--out", str(mp)], check=True)

    def metrics(run: Path, key: str) -> list[float]:
        return [json.loads(x)[key] for x in (run / "metrics.jsonl").read_text().splitlines()]

    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics(mp, key), metrics(single, key), rtol=0, atol=1e-4, err_msg=key)
    ref = dict(rd.read_model_tensors(single / "checkpoints" / "step_00000003"))
    got = dict(rd.read_model_tensors(mp / "checkpoints" / "step_00000003"))
    assert sorted(got) == sorted(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-4, err_msg=name)


_RECOMPUTE_CASES = [("mindspore", "graph"), ("mindspore", "eager"), ("torch", "eager")]


def _enable_recompute(rt) -> None:
    if rt.backend_name == "mindspore" and rt.compiled:  # CPU graph mode: it warns that memory will not go down
        with pytest.warns(UserWarning, match="does not lower memory"):
            rt.enable_recompute()
            rt.enable_recompute()  # idempotent (MindSpore refuses configuring a cell twice)
    else:
        rt.enable_recompute()


@pytest.mark.parametrize(("backend", "mode"), _RECOMPUTE_CASES)
def test_recompute_changes_memory_not_numbers(backend: str, mode: str) -> None:
    """Activation recomputation (ParallelConfig.recompute / --recompute) trains to the same weights, and the
    blocks are really recomputed (MindSpore: the cells carry a recompute wrapper; torch: the block runs again)."""
    from llama2.core.model import build_runtime

    data = TrainData.from_any(_data())
    train = TrainConfig(steps=2, batch_size=4, lr=3e-3, grad_clip=0.5)
    weights = []
    for recompute in (False, True):
        rt = build_runtime(CFG, backend, mode=mode)
        rt.init_weights(0)
        if recompute:
            _enable_recompute(rt)
        hist = Trainer(rt, train, data, None, rank=0, world_size=1, progress=False).fit()
        weights.append((dict(rt.state_dict()), [h["loss"] for h in hist]))
    (w0, l0), (w1, l1) = weights
    np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-6)
    for name in w0:
        np.testing.assert_allclose(w1[name], w0[name], rtol=0, atol=1e-6, err_msg=name)
    if backend == "mindspore":
        assert all(block._recompute_cell is not None for block in rt.net.model.layers)
    else:  # the checkpointed block runs its forward again during backward
        blocks = [m for m in rt.module.modules() if getattr(m, "recompute", False) is True]
        assert len(blocks) == CFG.n_layers
        seen = []
        blocks[0].mlp.register_forward_pre_hook(lambda *a: seen.append(1))
        ids = _data(2)
        rt.train_state(train.optim()).accumulate(ids[:, :-1], ids[:, 1:])
        assert len(seen) == 2


@pytest.mark.parametrize(("backend", "mode"), _RECOMPUTE_CASES)
def test_recompute_replays_dropout_masks(backend: str, mode: str) -> None:
    """LoRA with dropout 0.3: one update with recomputation equals one without (the recomputed forward draws the
    same dropout mask), and differs from dropout 0 (the dropout was active)."""
    from llama2.core.backend import OptimConfig
    from llama2.core.model import create
    from llama2.peft import attach_adapter

    ids = _data(4)

    def one_update(dropout: float, recompute: bool) -> dict[str, np.ndarray]:
        model = attach_adapter(
            create(CFG, backend=backend, seed=1, mode=mode), "lora", None, seed=0, r=4, dropout=dropout
        )
        rt = model.runtime
        if recompute:
            _enable_recompute(rt)
        rt.train(True)
        state = rt.train_state(OptimConfig())
        if backend == "mindspore":
            import mindspore as ms

            ms.set_seed(123)
        else:
            import torch

            torch.manual_seed(123)
        _, n = state.accumulate(ids[:, :-1], ids[:, 1:])
        state.apply(1e-2, n)
        return {k: v for k, v in rt.state_dict() if "lora" in k}

    one_update(0.3, False)  # MindSpore's first seeded graph in a process draws differently: warm it up
    plain, again, recomputed, no_dropout = (
        one_update(0.3, False),
        one_update(0.3, False),
        one_update(0.3, True),
        one_update(0.0, False),
    )
    assert plain and any(not np.array_equal(plain[k], no_dropout[k]) for k in plain)
    for k in plain:
        assert np.array_equal(again[k], plain[k]), k
        np.testing.assert_allclose(recomputed[k], plain[k], rtol=0, atol=1e-6, err_msg=k)


def test_recompute_flags_and_finetune_refuses_model_parallel(tmp_path: Path, capsys) -> None:
    import argparse

    from llama2.cli import main
    from llama2.commands import pretrain as pretrain_cmd

    parser = argparse.ArgumentParser()
    pretrain_cmd.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--data", "x.npy", "--out", "o", "--recompute"])
    _, kwargs = pretrain_cmd.build_kwargs(args)
    assert kwargs["parallel"] == ParallelConfig(recompute=True)
    args = parser.parse_args(["--config", "pretrain_llama2_13b", "--data", "x.npy", "--out", "o"])
    assert pretrain_cmd.build_kwargs(args)[1]["parallel"].recompute is True  # the file's setting
    args = parser.parse_args(["--config", "pretrain_llama2_13b", "--data", "x.npy", "--out", "o", "--no-recompute"])
    assert pretrain_cmd.build_kwargs(args)[1]["parallel"].recompute is False
    from llama2.commands import finetune as finetune_cmd

    fparser = argparse.ArgumentParser()
    finetune_cmd.add_arguments(fparser)
    base = ["--config", "lora_llama2_13b", "--model", "m", "--data", "d.npy", "--out", "o"]
    assert finetune_cmd.build_kwargs(fparser.parse_args(base))[1]["recompute"] is True
    assert finetune_cmd.build_kwargs(fparser.parse_args([*base, "--no-recompute"]))[1]["recompute"] is False
    rc = main(["finetune", "--config", "finetune_llama2_70b", "--model", "m", "--data", "d.npy", "--out", "o"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "finetune_llama2_70b" in err and "model_parallel=8" in err and "data parallel only" in err
