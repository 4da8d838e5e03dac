"""Shared format helpers: `read_json_file` errors as the HF / Meta / adapter readers raise them, and the q/k RoPE
permutation dispatch (k with n_kv_heads groups) checked against transformers' and llama.cpp's formulas."""

from __future__ import annotations

import numpy as np
import pytest

from llama2.core.config import ModelConfig
from llama2.core.formats.base import FormatError, qk_to_interleaved, qk_to_rotate_half, read_json_file
from tests.test_formats_real import hf_permute, llamacpp_permute


def test_read_json_file(tmp_path) -> None:
    good = tmp_path / "ok.json"
    good.write_text('{"dim": 8, "name": "é"}', encoding="utf-8")
    assert read_json_file(good, "unused") == {"dim": 8, "name": "é"}
    with pytest.raises(FileNotFoundError, match=r"missing\.json not found: needed for X"):
        read_json_file(tmp_path / "missing.json", "needed for X")
    bad = tmp_path / "bad.json"
    bad.write_text('{"dim": 8,')
    with pytest.raises(FormatError, match=r"bad\.json is not valid JSON \(.*line 1"):
        read_json_file(bad, "unused")
    bad.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(KeyError, match=r"bad\.json is not valid JSON"):
        read_json_file(bad, "unused", KeyError)


def test_config_readers_name_file_and_problem(tmp_path) -> None:
    from llama2.core.formats.hf import HFCheckpoint
    from llama2.core.formats.meta import MetaCheckpoint
    from llama2.peft import read_adapter_config

    with pytest.raises(FileNotFoundError, match="config.json not found: an HF checkpoint needs config.json"):
        HFCheckpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="params.json not found: a Meta checkpoint needs params.json"):
        MetaCheckpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in"):
        read_adapter_config(tmp_path)
    for name in ("config.json", "params.json", "adapter_config.json"):
        (tmp_path / name).write_text("{oops")
    with pytest.raises(FormatError, match=r"config\.json is not valid JSON \(Expecting"):
        HFCheckpoint(tmp_path)
    with pytest.raises(FormatError, match=r"params\.json is not valid JSON \(Expecting"):
        MetaCheckpoint(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON \(Expecting") as info:
        read_adapter_config(tmp_path)
    assert type(info.value) is ValueError  # the adapter reader keeps its plain ValueError


def test_qk_permutation_dispatch() -> None:
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=16, hidden_dim=32)
    rng = np.random.default_rng(0)
    wq = rng.standard_normal((64, 64)).astype(np.float32)
    wk = rng.standard_normal((2 * 8, 64)).astype(np.float32)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert np.array_equal(qk_to_rotate_half(q, wq, cfg), hf_permute(wq, 8))
    assert np.array_equal(qk_to_rotate_half(k, wk, cfg), hf_permute(wk, 2))
    assert np.array_equal(qk_to_interleaved(q, wq, cfg), llamacpp_permute(wq, 8, 8))
    assert np.array_equal(qk_to_interleaved(k, wk, cfg), llamacpp_permute(wk, 8, 2))
    assert np.array_equal(qk_to_interleaved(k, qk_to_rotate_half(k, wk, cfg), cfg), wk)
    v = "model.layers.0.self_attn.v_proj.weight"
    assert qk_to_rotate_half(v, wk, cfg) is wk and qk_to_interleaved(v, wk, cfg) is wk
