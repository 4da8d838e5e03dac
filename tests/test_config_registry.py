"""ModelConfig presets and validation; registries and entry-point discovery."""

from __future__ import annotations

import pytest

from llama2.core.config import ModelConfig
from llama2.core.graph import build_graph, named_params
from llama2.core.registry import ADAPTERS, BACKENDS, METRICS, Registry


@pytest.mark.parametrize(
    "name,count",
    [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192)],
)
def test_preset_parameter_counts(name, count):
    cfg = ModelConfig.from_preset(name)
    assert cfg.num_parameters() == count
    # The graph's parameter specs agree with the closed form.
    total = sum(int(__import__("math").prod(s.shape)) for s in named_params(build_graph(cfg)).values())
    assert total == count


def test_small_presets():
    small = ModelConfig.from_preset("small")
    assert (small.dim, small.n_layers, small.n_heads, small.hidden_dim, small.vocab_size) == (288, 6, 6, 768, 32000)
    tiny = ModelConfig.from_preset("tiny")
    assert 0.5e6 < tiny.num_parameters() < 1.5e6
    assert ModelConfig.from_preset("llama2-70b").n_kv_heads == 8


def test_config_validation_messages():
    with pytest.raises(ValueError, match="dim .* divisible by n_heads"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="n_heads .* divisible by n_kv_heads"):
        ModelConfig(dim=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_layers must be positive"):
        ModelConfig(n_layers=0)
    with pytest.raises(KeyError, match="known presets"):
        ModelConfig.from_preset("llama3")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"dim": 64, "heads": 4}, source="x.yaml")


def test_config_is_frozen_and_hf_round_trip():
    cfg = ModelConfig.from_preset("tiny")
    with pytest.raises(AttributeError):
        cfg.dim = 3
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_canonical_names_follow_hf():
    names = list(named_params(build_graph(ModelConfig.from_preset("tiny"))))
    assert names[0] == "model.embed_tokens.weight"
    assert "model.layers.3.self_attn.k_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert names[-1] == "lm_head.weight"
    tied = named_params(build_graph(ModelConfig.from_preset("tiny", tie_embeddings=True)))
    assert "lm_head.weight" not in tied


def test_registry_lookup_errors_list_known_names():
    reg: Registry = Registry("widget")
    reg.register("a", object())

    @reg.register("deco")
    class Deco:  # decorator registration returns the class unchanged
        pass

    assert reg.get("deco") is Deco and reg.names() == ["a", "deco"] and "deco" in reg
    with pytest.raises(KeyError, match="known widgets: a, deco"):
        reg.get("b")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", object())


def test_unknown_backend_names_known_ones():
    with pytest.raises(KeyError, match="unknown backend 'jax'.*known backends"):
        BACKENDS.get("jax")


def test_entry_point_discovery(monkeypatch):
    import importlib.metadata as md

    class EP:
        name = "plug"
        value = "x:y"

        def load(self):
            return "the plugin"

    monkeypatch.setattr(md, "entry_points", lambda group: [EP()] if group == "llama2.test" else [])
    reg: Registry = Registry("thing", "llama2.test")
    assert reg.get("plug") == "the plugin"
    assert reg.names() == ["plug"]


def test_plugin_entry_point_groups():
    assert (BACKENDS.group, ADAPTERS.group, METRICS.group) == ("llama2.backends", "llama2.adapters", "llama2.metrics")
    assert {"mindspore", "torch"} <= set(BACKENDS.names())
