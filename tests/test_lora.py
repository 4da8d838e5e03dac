"""LoRA: shapes under GQA, scaling, merge/unmerge, adapter-only files, dropout, frozen base, merge-lora command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from llama2 import peft
from llama2.core.backend import OptimConfig
from llama2.core.graph import Linear, build_graph, named_nodes, named_params
from llama2.peft.lora import LoRALinear
from tests.peft_helpers import BACKENDS, CFG, ids, randomize, tiny


def test_gqa_shapes_and_names():
    g = peft.apply_adapter(build_graph(CFG), "lora", r=3)
    specs = named_params(g)
    kv = CFG.n_kv_heads * CFG.head_dim
    assert kv < CFG.dim  # the config really is GQA
    p = "model.layers.1.self_attn."
    assert specs[p + "q_proj.lora_A.weight"].shape == (3, CFG.dim)
    assert specs[p + "q_proj.lora_B.weight"].shape == (CFG.dim, 3)
    assert specs[p + "k_proj.lora_B.weight"].shape == (kv, 3)
    assert specs[p + "v_proj.lora_B.weight"].shape == (kv, 3)
    assert specs[p + "o_proj.lora_A.weight"].shape == (3, CFG.dim)
    assert specs[p + "k_proj.weight"].shape == (kv, CFG.dim) and not specs[p + "k_proj.weight"].trainable
    assert specs[p + "k_proj.lora_B.weight"].init == "zeros"
    # default targets: the four attention projections of every layer, nothing in the MLP
    wrapped = [path for path, n in named_nodes(g) if isinstance(n, LoRALinear)]
    assert len(wrapped) == 4 * CFG.n_layers and not any("mlp" in w for w in wrapped)
    # base names are unchanged, so base checkpoints load into the rewritten graph
    assert set(named_params(build_graph(CFG))) <= set(specs)


def test_targets_regex_and_no_match():
    g = peft.apply_adapter(build_graph(CFG), "lora", targets=[r"model\.layers\.0\.mlp\.(up|down)_proj"])
    wrapped = [path for path, n in named_nodes(g) if isinstance(n, LoRALinear)]
    assert wrapped == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="matched no Linear"):
        peft.apply_adapter(build_graph(CFG), "lora", targets=["nope_proj"])
    with pytest.raises(ValueError, match="unknown LoRAConfig field"):
        peft.adapter_config("lora", ranks=4)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling(use_rslora):
    cfg = peft.LoRAConfig(r=16, alpha=8, use_rslora=use_rslora)
    assert cfg.scale == pytest.approx(8 / math.sqrt(16) if use_rslora else 8 / 16)
    g = peft.apply_adapter(build_graph(CFG), "lora", cfg)
    assert all(n.scale == cfg.scale for _, n in named_nodes(g) if isinstance(n, LoRALinear))


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_unmerge(backend):
    m = tiny(backend)
    base_w = {n: m.runtime.get_param(n) for n in m.runtime.specs}
    x = ids()
    base_out = m.forward(x)
    peft.attach_adapter(m, "lora", r=4, alpha=6, use_rslora=True)
    randomize(m, peft.adapter_params(m))
    unmerged = m.forward(x)
    assert np.abs(unmerged - base_out).max() > 1e-3  # the LoRA update is visible
    path = "model.layers.0.self_attn.k_proj"
    a, b = m.runtime.get_param(path + ".lora_A.weight"), m.runtime.get_param(path + ".lora_B.weight")
    peft.merge_lora(m)
    assert not any(isinstance(n, LoRALinear) for _, n in named_nodes(m.runtime.graph))
    assert set(m.runtime.specs) == set(base_w)
    expect = base_w[path + ".weight"] + (6 / math.sqrt(4)) * (b.astype(np.float64) @ a)  # rsLoRA: alpha/sqrt(r)
    np.testing.assert_allclose(m.runtime.get_param(path + ".weight"), expect, atol=1e-6)
    merged = m.forward(x)
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    once = {n: m.runtime.get_param(n) for n in m.runtime.specs}
    peft.merge_lora(m)  # idempotent: a merged model has no LoRA left to merge
    for n, v in once.items():
        np.testing.assert_array_equal(m.runtime.get_param(n), v)
    np.testing.assert_array_equal(m.forward(x), merged)
    peft.unmerge_lora(m)
    assert peft.attached_adapters(m.runtime).keys() == {"lora"}
    for n, v in base_w.items():
        np.testing.assert_allclose(m.runtime.get_param(n), v, atol=1e-6, err_msg=n)
    np.testing.assert_allclose(m.forward(x), unmerged, atol=1e-5)
    with pytest.raises(ValueError, match="no merged LoRA"):
        peft.unmerge_lora(m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_file_roundtrip(backend, tmp_path):
    m = tiny(backend)
    peft.attach_adapter(m, "lora", r=3, alpha=5, targets=["q_proj", "v_proj", r".*mlp\.down_proj"])
    randomize(m, peft.adapter_params(m))
    x = ids()
    want = m.forward(x)
    peft.save_adapter(m, tmp_path / "ad")
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert set(tensors) == set(peft.adapter_params(m)) and all(".lora_" in k for k in tensors)
    assert len(tensors) == 2 * 3 * CFG.n_layers
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["adapters"] == [{"name": "lora", "config": peft.LoRAConfig(
        r=3, alpha=5, targets=("q_proj", "v_proj", r".*mlp\.down_proj")).to_dict()}]  # fmt: skip
    assert meta["base_model"]["n_kv_heads"] == CFG.n_kv_heads
    fresh = tiny(backend)  # the same base weights (same seed), no adapter
    assert np.abs(fresh.forward(x) - want).max() > 1e-3
    peft.load_adapter(fresh, tmp_path / "ad")
    np.testing.assert_array_equal(fresh.forward(x), want)
    assert fresh.runtime.trainable_names() == peft.adapter_params(fresh)
    other = tiny("torch" if backend == "mindspore" else "mindspore")  # the file is backend-neutral
    peft.load_adapter(other, tmp_path / "ad")
    np.testing.assert_allclose(other.forward(x), want, atol=1e-5)


def test_other_architecture_refused(tmp_path):
    m = tiny("torch")
    peft.attach_adapter(m, "lora", r=2)
    peft.save_adapter(m, tmp_path / "ad")
    from llama2.core.config import ModelConfig

    other = tiny("torch", config=ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=64,
                                             hidden_dim=64, max_seq_len=32))  # fmt: skip
    with pytest.raises(ValueError, match=r"different base architecture \(dim: adapter 32 vs model 48; n_kv_heads"):
        peft.load_adapter(other, tmp_path / "ad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_only_in_training(backend):
    # graph mode on MindSpore: the training flag is a compile-time constant there, so this checks the recompile
    m = tiny(backend, mode="graph")
    peft.attach_adapter(m, "lora", r=4, dropout=0.5)
    randomize(m, peft.adapter_params(m))
    x = ids()
    first = m.forward(x)
    np.testing.assert_array_equal(m.forward(x), first)  # eval: deterministic
    m.runtime.train(True)
    a, b = m.forward(x), m.forward(x)
    assert np.abs(a - first).max() > 1e-4 and np.abs(a - b).max() > 1e-4  # dropout active, fresh masks
    m.runtime.train(False)
    np.testing.assert_array_equal(m.forward(x), first)
    peft.merge_lora(m)  # eval output is exactly the no-dropout function
    np.testing.assert_allclose(m.forward(x), first, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_changes_only_lora(backend):
    m = tiny(backend, mode="graph")
    peft.attach_adapter(m, "lora", r=4, alpha=8, dropout=0.1)
    rt = m.runtime
    before = {n: rt.get_param(n) for n in rt.specs}
    rt.train(True)
    state = rt.train_state(OptimConfig(weight_decay=0.1))
    x = ids(batch=4, seq=12, seed=3)
    labels = np.roll(x, -1, axis=1)
    labels[:, -1] = -100
    losses = []
    for _ in range(4):
        loss, n = state.accumulate(x, labels)
        state.apply(3e-2, n)
        losses.append(loss / n)
    rt.train(False)
    lora = set(peft.adapter_params(m))
    assert lora and sorted(rt.trainable_names()) == sorted(lora)
    for n, v in before.items():
        if n in lora:
            continue
        np.testing.assert_array_equal(rt.get_param(n), v, err_msg=f"{n} changed by LoRA training")
    assert any(np.abs(rt.get_param(n) - before[n]).max() > 0 for n in lora if n.endswith("lora_B.weight"))
    assert losses[-1] < losses[0]


def test_merge_lora_command(tmp_path):
    import llama2
    from llama2.cli import main

    m = tiny("torch")
    m.save(tmp_path / "base")
    peft.attach_adapter(m, "lora", r=2, alpha=4)
    randomize(m, peft.adapter_params(m))
    peft.save_adapter(m, tmp_path / "ad")
    x = ids()
    want = m.forward(x)
    rc = main(["merge-lora", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"),
               "--output", str(tmp_path / "merged")])  # fmt: skip
    assert rc == 0
    merged = llama2.load(tmp_path / "merged", backend="torch")
    assert not peft.attached_adapters(merged.runtime)
    np.testing.assert_allclose(merged.forward(x), want, atol=1e-5)
    # the in-memory merge writes the same full checkpoint
    peft.merge_lora(m)
    for name in m.runtime.specs:
        np.testing.assert_allclose(merged.runtime.get_param(name), m.runtime.get_param(name), atol=1e-6)
    # a prefix adapter cannot be merged into full weights
    p = tiny("torch")
    peft.attach_adapter(p, "prefix", n_virtual=2)
    peft.save_adapter(p, tmp_path / "pre")
    rc = main(["merge-lora", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "pre"),
               "--output", str(tmp_path / "bad")])  # fmt: skip
    assert rc == 2 and not (tmp_path / "bad").exists()


def test_linear_untouched_outside_targets():
    g = peft.apply_adapter(build_graph(CFG), "lora", targets=["q_proj"])
    kinds = {path.rsplit(".", 1)[-1]: type(n) for path, n in named_nodes(g) if path.startswith("model.layers.0.")}
    assert kinds["q_proj"] is LoRALinear and kinds["k_proj"] is Linear and kinds["gate_proj"] is Linear


def test_llama2_load_attaches_adapter_beside_weights(tmp_path):
    import llama2

    m = tiny("torch")
    m.save(tmp_path / "run")
    peft.attach_adapter(m, "lora", r=2, targets=["q_proj"])
    randomize(m, peft.adapter_params(m))
    peft.save_adapter(m, tmp_path / "run")  # adapter files beside the base weights
    loaded = llama2.load(tmp_path / "run", backend="torch")
    assert list(peft.attached_adapters(loaded.runtime)) == ["lora"]
    np.testing.assert_array_equal(loaded.forward(ids()), m.forward(ids()))


def test_bad_adapter_folder_errors(tmp_path):
    m = tiny("torch")
    peft.attach_adapter(m, "lora", r=2)
    peft.save_adapter(m, tmp_path / "ad")
    cfg_file = tmp_path / "ad" / "adapter_config.json"
    meta = json.loads(cfg_file.read_text())
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        peft.load_adapter(tiny("torch"), tmp_path)
    meta["adapters"][0]["name"] = "nope"
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(KeyError, match="unknown adapter 'nope'; known adapters: .*lora, prefix"):
        peft.load_adapter(tiny("torch"), tmp_path / "ad")
    meta["adapters"][0] = {"name": "lora", "config": {"r": 4}}  # rank differs from the saved tensors
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="adapter_model.safetensors has shape"):
        peft.load_adapter(tiny("torch"), tmp_path / "ad")
    with pytest.raises(ValueError, match="no adapter attached"):
        peft.save_adapter(tiny("torch"), tmp_path / "none")


def test_rank_is_an_alias_of_r(tmp_path):
    """`rank=` (README, the CLI's --rank) means `r`; giving both is an error; `llama2.finetune(..., rank=)` works."""
    import llama2

    assert peft.adapter_config("lora", rank=4) == peft.LoRAConfig(r=4)
    assert peft.adapter_config("lora", {"rank": 5, "alpha": 10}) == peft.LoRAConfig(r=5, alpha=10)
    with pytest.raises(ValueError, match="not both"):
        peft.adapter_config("lora", rank=4, r=4)
    x = ids(4, 9)
    labels = x.copy()
    labels[:, :4] = -100
    data = {"input_ids": x.astype(np.int32), "labels": labels.astype(np.int32)}
    tuned = llama2.finetune(
        tiny("torch"),
        data=data,
        method="lora",
        rank=3,
        out_dir=tmp_path / "run",
        steps=1,
        batch_size=2,
        backend="torch",
        mode="eager",
        progress=False,
        log=lambda _: None,
    )
    assert peft.attached_adapters(tuned.runtime)["lora"].r == 3
    assert tuned.runtime.specs["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, CFG.dim)
