"""Bit-exact round trips HF -> {Meta, MindSpore, llama2.c} -> HF, Meta model-parallel split/merge, tying, sharding."""

from __future__ import annotations

import json

import attrs
import numpy as np
import pytest

from llama2.core.formats import convert, detect_format, open_checkpoint, save_checkpoint
from tests.conftest import hf_logits, make_hf_llama

HEADS = [(8, 2), (4, 2), (8, 8)]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """(n_heads, n_kv_heads, tie) -> (HF dir, reference tensors from the saved safetensors, HF model)."""
    from safetensors.numpy import load_file

    out = {}
    root = tmp_path_factory.mktemp("hf")
    for i, (nh, nkv) in enumerate(HEADS):
        for tie in (False, True):
            d = root / f"hf_{nh}_{nkv}_{int(tie)}"
            model = make_hf_llama(d, n_heads=nh, n_kv_heads=nkv, dim=32, tie=tie, seed=i)
            (d / "tokenizer.model").write_bytes(b"stand-in tokenizer")
            out[(nh, nkv, tie)] = (d, load_file(d / "model.safetensors"), model)
    return out


def _assert_same(ckpt, ref: dict[str, np.ndarray]) -> None:
    got = dict(ckpt.tensors())
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype, name
        assert np.array_equal(got[name], ref[name]), name


@pytest.mark.parametrize("fmt,out_name", [("meta", "meta"), ("mindspore", "ms"), ("llama2c", "model.bin")])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("heads", HEADS)
def test_hf_roundtrip_bit_exact(hf_models, tmp_path, heads, tie, fmt, out_name):
    src, ref, _ = hf_models[(*heads, tie)]
    mid = convert(src, tmp_path / out_name, dst_format=fmt)
    assert detect_format(mid) == fmt
    with open_checkpoint(mid) as ckpt:
        cfg = open_checkpoint(src).config
        expected = attrs.evolve(cfg, max_seq_len=4096) if fmt == "meta" else cfg  # params.json has no max_seq_len
        assert ckpt.config == expected
        assert ckpt.config.tie_embeddings is tie
        _assert_same(ckpt, ref)
        if fmt != "llama2c":
            assert ckpt.tokenizer_path is not None and ckpt.tokenizer_path.read_bytes() == b"stand-in tokenizer"
    back = convert(mid, tmp_path / "back", dst_format="hf")
    with open_checkpoint(back) as ckpt:
        _assert_same(ckpt, ref)
        assert ("lm_head.weight" in dict(ckpt.tensors())) is not tie


@pytest.mark.parametrize("heads", HEADS)
def test_meta_model_parallel_split_merge(hf_models, tmp_path, heads):
    import torch

    src, ref, _ = hf_models[(*heads, False)]
    mp1 = convert(src, tmp_path / "mp1", dst_format="meta")
    mp2 = convert(src, tmp_path / "mp2", dst_format="meta", model_parallel=2)
    assert sorted(p.name for p in mp2.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    whole = torch.load(mp1 / "consolidated.00.pth", weights_only=True)
    parts = [torch.load(mp2 / f"consolidated.0{r}.pth", weights_only=True, mmap=True) for r in range(2)]
    split_dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    for name, full in whole.items():
        kind = name.split(".")[-2]
        dim = split_dims.get(kind)
        if dim is None:  # norms are replicated
            assert all(torch.equal(p[name], full) for p in parts), name
        else:
            assert parts[0][name].shape[dim] == full.shape[dim] // 2, name
            assert torch.equal(torch.cat([p[name] for p in parts], dim=dim), full), name
    with open_checkpoint(mp2) as ckpt:
        _assert_same(ckpt, ref)


def test_meta_params_json(tmp_path, hf_models):
    src, _, _ = hf_models[(8, 2, False)]
    out = convert(src, tmp_path / "meta", dst_format="meta")
    params = json.loads((out / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and params["n_heads"] == 8 and params["dim"] == 32
    from llama2.core.formats.meta import meta_hidden_dim

    assert meta_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == 64
    # Meta's released shapes: 7B and 70B hidden sizes come out of multiple_of / ffn_dim_multiplier.
    assert meta_hidden_dim(4096, 256, None) == 11008
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672
    # params.json without n_kv_heads means n_kv_heads = n_heads.
    nh = convert(hf_models[(8, 8, False)][0], tmp_path / "meta88", dst_format="meta")
    assert "n_kv_heads" not in json.loads((nh / "params.json").read_text())
    assert open_checkpoint(nh).config.n_kv_heads == 8


def test_hf_sharded_and_transformers_load(hf_models, tmp_path):
    import transformers

    src, ref, model = hf_models[(4, 2, False)]
    sharded = convert(src, tmp_path / "sharded", dst_format="hf", max_shard_size="10KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    with open_checkpoint(sharded) as ckpt:
        _assert_same(ckpt, ref)
    ids = np.array([[1, 5, 9, 3, 7]])
    reloaded = transformers.LlamaForCausalLM.from_pretrained(sharded).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(model, ids))
    # pytorch_model*.bin reading: tests/test_formats_real.py (transformers 5 no longer writes .bin files)


def test_dtypes(hf_models, tmp_path):
    src, ref, _ = hf_models[(8, 2, False)]
    half = convert(src, tmp_path / "half", dst_format="hf", dtype="float16")
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "float16"
    got = dict(open_checkpoint(half).tensors())
    assert all(got[n].dtype == np.float16 and np.array_equal(got[n], ref[n].astype(np.float16)) for n in ref)
    bf = convert(src, tmp_path / "bf.ckpt", dst_format="mindspore", dtype="bfloat16")
    got = dict(open_checkpoint(bf).tensors())
    for n in ref:  # bf16 keeps 8 mantissa bits
        np.testing.assert_allclose(got[n], ref[n], rtol=2**-8, atol=1e-30)


def test_mindspore_interop(hf_models, tmp_path):
    ms = pytest.importorskip("mindspore")
    src, ref, _ = hf_models[(8, 2, False)]
    ours = convert(src, tmp_path / "ours.ckpt", dst_format="mindspore")
    loaded = ms.load_checkpoint(str(ours))
    assert np.array_equal(
        loaded["model.layers.0.attention.wq.weight"].asnumpy(), ref["model.layers.0.self_attn.q_proj.weight"]
    )
    assert np.array_equal(loaded["model.norm_out.weight"].asnumpy(), ref["model.norm.weight"])
    assert np.array_equal(loaded["model.tok_embeddings.embedding_weight"].asnumpy(), ref["model.embed_tokens.weight"])
    # A file written by MindSpore itself, with MindFormers' extra training entries and config.json beside it.
    folder = tmp_path / "theirs"
    folder.mkdir()
    items = [{"name": k, "data": v} for k, v in loaded.items() if k != "llama2_config"]
    ms.save_checkpoint(items, str(folder / "llama.ckpt"), append_dict={"epoch_num": 1, "step_num": 10})
    (folder / "config.json").write_text(json.dumps(open_checkpoint(src).config.to_hf()))
    with open_checkpoint(folder) as ckpt:
        assert ckpt.format == "mindspore"
        _assert_same(ckpt, ref)


def test_cli_convert_and_info(hf_models, tmp_path, capsys):
    from llama2.cli import main

    src, ref, _ = hf_models[(8, 2, True)]
    out = tmp_path / "m.ckpt"
    assert main(["convert", "--input", str(src), "--output", str(out)]) == 0
    assert detect_format(out) == "mindspore"
    assert main(["convert", "--input", str(src), "--output", str(out)]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--input", str(out), "--output", str(tmp_path / "meta"), "--to", "meta",
                 "--model-parallel", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path / "meta"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "meta"
    assert info["num_parameters"] == sum(v.size for v in ref.values())
    assert info["config"]["n_kv_heads"] == 2 and info["config"]["tie_embeddings"] is True


def test_save_rejects_wrong_tensors(tmp_path, hf_models):
    from llama2.core.formats import FormatError

    src, ref, _ = hf_models[(4, 2, False)]
    cfg = open_checkpoint(src).config
    items = list(ref.items())
    for fmt, name in (("hf", "hf"), ("mindspore", "x.ckpt"), ("meta", "meta"), ("llama2c", "x.bin")):
        bad = [(n, v[:, :-1] if n.endswith("q_proj.weight") else v) for n, v in items]
        with pytest.raises(FormatError, match=r"q_proj\.weight.*shape"):
            save_checkpoint(tmp_path / name, fmt, cfg, bad)
        with pytest.raises(FormatError, match=r"lm_head\.weight.*missing"):
            save_checkpoint(tmp_path / name, fmt, cfg, [(n, v) for n, v in items if n != "lm_head.weight"])
        assert not (tmp_path / name).exists()  # nothing half-written
