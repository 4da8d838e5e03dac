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


# Meta's Llama-2-7b-hf config.json as published on the Hugging Face hub
LLAMA2_7B_HF = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


def _as_hf(cfg: dict) -> dict:
    """What transformers itself makes of a config.json dict (its LlamaConfig is the oracle for the defaults)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(**cfg)
    params = getattr(hf, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    return {
        "norm_eps": hf.rms_norm_eps,
        "max_seq_len": hf.max_position_embeddings,
        "rope_theta": theta,
        "n_kv_heads": hf.num_key_value_heads,
        "tie_embeddings": hf.tie_word_embeddings,
    }


@pytest.mark.parametrize("extra", [{}, {"rope_theta": 500000.0, "num_key_value_heads": 2}])
def test_from_hf_defaults_follow_transformers(extra):
    minimal = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
        **extra,
    }
    cfg = ModelConfig.from_hf(minimal)
    assert {k: getattr(cfg, k) for k in _as_hf(minimal)} == _as_hf(minimal)
    # a config.json written by transformers (5: rope_theta inside rope_parameters, head_dim spelled out)
    transformers = pytest.importorskip("transformers")
    assert ModelConfig.from_hf(transformers.LlamaConfig(**minimal).to_dict()) == cfg


def test_from_hf_real_llama2_config():
    cfg = ModelConfig.from_hf(LLAMA2_7B_HF)
    assert cfg == ModelConfig.from_preset("llama2-7b")
    assert cfg.norm_eps == 1e-5 and cfg.rope_theta == 10000.0 and cfg.max_seq_len == 4096


@pytest.mark.parametrize(
    "field, value",
    [
        ("head_dim", 64),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
    ],
)
def test_from_hf_refuses_what_it_cannot_represent(field, value):
    with pytest.raises(ValueError, match=rf"config\.json: {field}"):
        ModelConfig.from_hf({**LLAMA2_7B_HF, field: value})


def test_from_hf_accepts_explicit_no_ops():
    same = {"head_dim": 128, "attention_bias": False, "mlp_bias": False, "rope_scaling": {"rope_type": "default"}}
    assert ModelConfig.from_hf({**LLAMA2_7B_HF, **same}) == ModelConfig.from_hf(LLAMA2_7B_HF)


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
