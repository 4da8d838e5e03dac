"""Prefix tuning: prefix k/v shapes under GQA, trainable count, padded batches, KV-cache generation, MLP folding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from llama2 import peft
from llama2.core.generation import GenerationConfig, generate_ids
from llama2.core.graph import build_graph, named_params
from tests.peft_helpers import BACKENDS, CFG, ids, randomize, tiny

NV = 3


def _attn(model, layer: int = 0):
    rt = model.runtime
    root = rt.module if model.backend == "torch" else rt.net
    return root.model.layers[layer].self_attn


def _prefix_kv(model, batch: int) -> tuple[np.ndarray, np.ndarray]:
    attn = _attn(model)
    if model.backend == "torch":
        import torch

        k, v = attn.kv_prefix(batch, torch.float32)
        return k.detach().numpy(), v.detach().numpy()
    k, v = attn.extra_kv(batch)
    return k.asnumpy(), v.asnumpy()


def _prefixed(backend: str, **options):
    m = tiny(backend)
    peft.attach_adapter(m, "prefix", n_virtual=NV, **options)
    randomize(m, peft.adapter_params(m), std=0.5)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_shapes_and_count(backend):
    m = _prefixed(backend)
    k, v = _prefix_kv(m, batch=5)
    assert k.shape == v.shape == (5, CFG.n_kv_heads, NV, CFG.head_dim)
    np.testing.assert_array_equal(k[3], m.runtime.get_param("model.layers.0.self_attn.prefix_key"))
    np.testing.assert_array_equal(v[0], m.runtime.get_param("model.layers.0.self_attn.prefix_value"))
    expect = CFG.n_layers * 2 * CFG.n_kv_heads * NV * CFG.head_dim
    assert m.runtime.num_parameters(trainable_only=True) == expect
    assert len(peft.adapter_params(m)) == 2 * CFG.n_layers


def test_prefix_mlp_count():
    g = peft.apply_adapter(build_graph(CFG), "prefix", n_virtual=NV, projection_dim=8)
    base = set(named_params(build_graph(CFG)))
    extra = {n: s for n, s in named_params(g).items() if n not in base}
    kv2 = 2 * CFG.n_kv_heads * CFG.head_dim
    assert sum(int(np.prod(s.shape)) for s in extra.values()) == CFG.n_layers * (NV * CFG.dim + CFG.dim * 8 + 8 * kv2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_changes_output_and_padded_batch(backend):
    m = tiny(backend)
    x = ids(batch=2, seq=8)
    base = m.forward(x)
    peft.attach_adapter(m, "prefix", n_virtual=NV)
    randomize(m, peft.adapter_params(m), std=0.5)
    full = m.forward(x)
    assert np.abs(full - base).max() > 1e-3
    # left padding: row 0 has 3 pad tokens; its real tokens give the same logits as that row alone
    padded = x.copy()
    padded[0, :3] = 0
    mask = np.ones_like(padded)
    mask[0, :3] = 0
    out = m.forward(padded, mask)
    assert np.isfinite(out).all()
    alone = m.forward(x[:1, 3:])
    np.testing.assert_allclose(out[0, 3:], alone[0], atol=1e-5)
    np.testing.assert_allclose(out[1], full[1], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_generation_equals_full_forward(backend):
    m = _prefixed(backend)
    prompts = [[5, 9, 14, 20, 7], [11, 3]]  # different lengths: the batch is left-padded
    steps = 4
    got = generate_ids(m.runtime, prompts, GenerationConfig(max_new_tokens=steps), eos_id=None)
    for prompt, new in zip(prompts, got):
        seq = list(prompt)
        for _ in range(steps):  # greedy with a full forward (no cache) each step
            seq.append(int(np.argmax(m.forward(np.array([seq]))[0, -1])))
        assert new == seq[len(prompt) :]
    # and the logits of one cached decode step equal the full forward's
    rt = m.runtime
    seq = np.array([prompts[0]])
    cache = rt.new_cache(1, 16)
    kv = np.zeros((1, 16), np.int32)
    kv[:, :6] = 1
    rt.decode(cache, seq, np.arange(5)[None], kv, 0)
    step = rt.decode(cache, np.array([[got[0][0]]]), np.array([[5]]), kv, 5)
    full = m.forward(np.array([prompts[0] + [got[0][0]]]))
    np.testing.assert_allclose(step[0, -1], full[0, -1], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_reparameterization_folded_at_save(backend, tmp_path):
    m = _prefixed(backend, projection_dim=8)
    x = ids()
    want = m.forward(x)
    peft.save_adapter(m, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["adapters"] == [{"name": "prefix", "config": {"n_virtual": NV, "projection_dim": 0}}]
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    expect = [f"model.layers.{i}.self_attn.prefix_{kv}" for i in range(2) for kv in ("key", "value")]
    assert sorted(tensors) == sorted(expect)  # folded: no MLP tensors in the file
    fresh = tiny(backend)
    peft.load_adapter(fresh, tmp_path / "ad")
    np.testing.assert_allclose(fresh.forward(x), want, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_and_prefix_compose(backend, tmp_path):
    m = tiny(backend)
    peft.attach_adapter(m, "lora", r=2, targets=["q_proj", "v_proj"])
    peft.attach_adapter(m, "prefix", n_virtual=2)
    names = peft.adapter_params(m)
    assert sum(".lora_" in n for n in names) == 4 * CFG.n_layers and sum("prefix_" in n for n in names) == 4
    assert sorted(m.runtime.trainable_names()) == sorted(names)
    randomize(m, names)
    x = ids()
    want = m.forward(x)
    peft.save_adapter(m, tmp_path / "ad")
    fresh = tiny(backend)
    peft.load_adapter(fresh, tmp_path / "ad")
    assert list(peft.attached_adapters(fresh.runtime)) == ["lora", "prefix"]
    np.testing.assert_array_equal(fresh.forward(x), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_training_updates_only_prefix(backend):
    from llama2.core.backend import OptimConfig

    m = tiny(backend, mode="graph")
    peft.attach_adapter(m, "prefix", n_virtual=NV, projection_dim=8)
    rt = m.runtime
    before = {n: rt.get_param(n) for n in rt.specs}
    rt.train(True)
    state = rt.train_state(OptimConfig())
    x = ids(batch=4, seq=12, seed=5)
    labels = np.roll(x, -1, axis=1)
    labels[:, -1] = -100
    losses = []
    for _ in range(4):
        loss, n = state.accumulate(x, labels)
        state.apply(5e-2, n)
        losses.append(loss / n)
    rt.train(False)
    mine = set(peft.adapter_params(m))
    assert any(".prefix_mlp.dense_out" in n for n in mine)
    for n, v in before.items():
        changed = np.abs(rt.get_param(n) - v).max() > 0
        assert changed == (n in mine), n
    assert losses[-1] < losses[0]
