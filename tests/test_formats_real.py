"""Checkpoint formats against real files and independent references.

- llama2.c stories260K.bin: top-5 and greedy ids from BOS equal the run.c reference recorded in SOURCES.md.
- The tiny random GGUF: shapes, and its embedded vocabulary equals tokenizer.model (sentencepiece as the oracle).
- Rotary layout: a Meta-layout checkpoint run through Meta's own interleaved-RoPE attention (re-implemented here
  from Meta's llama/model.py) equals HF transformers on our converted weights; the wrong permutations do not.
- GQA: k is permuted with n_kv_heads groups (70B shapes), as Hugging Face's conversion script does.
- GGUF written the way llama.cpp's converter writes it (q/k permuted, F32/F16, tied or not), quantized types.
- Bad files (truncated, wrong shapes, unknown or missing tensors) fail naming the tensor and the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from llama2.core.formats import FormatError, convert, detect_format, open_checkpoint
from llama2.core.formats.base import name_table
from tests.conftest import data_path, hf_logits, make_hf_llama

STORIES = "checkpoints/llama2c-260K-plctlab-unverified/stories260K.bin"
TINY_GGUF = "checkpoints/llama-2-tiny-random-gguf/llama-2-tiny-random.gguf"


# ---- independent references ----------------------------------------------------------------------------------
def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta interleaved -> HF rotate-half, as transformers' convert_llama_weights_to_hf.py writes it (inverse)."""
    import torch

    d1, d2 = w.shape
    t = torch.from_numpy(np.ascontiguousarray(w))
    return t.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2).numpy()


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF -> llama.cpp q/k layout, as llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` does."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def meta_reference_logits(state: dict, params: dict, ids: np.ndarray) -> np.ndarray:
    """Meta's llama/model.py forward (complex interleaved RoPE, repeat_kv), float64, on Meta-named weights."""
    import torch

    w = {k: v.double() for k, v in state.items()}
    dim, nh = params["dim"], params["n_heads"]
    nkv = params.get("n_kv_heads") or nh
    hd, eps, b, t = dim // nh, params["norm_eps"], ids.shape[0], ids.shape[1]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].double() / hd))
    freqs_cis = torch.polar(torch.ones(t, hd // 2, dtype=torch.float64), torch.outer(torch.arange(t).double(), freqs))

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(x):  # (b, t, heads, hd): rotate adjacent pairs (2i, 2i+1)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    h = w["tok_embeddings.weight"][torch.from_numpy(ids)]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for layer in range(params["n_layers"]):
        p = f"layers.{layer}."
        x = rms(h, w[p + "attention_norm.weight"])
        q = rope((x @ w[p + "attention.wq.weight"].T).view(b, t, nh, hd))
        k = rope((x @ w[p + "attention.wk.weight"].T).view(b, t, nkv, hd))
        v = (x @ w[p + "attention.wv.weight"].T).view(b, t, nkv, hd)
        k, v = (z[:, :, :, None, :].expand(b, t, nkv, nh // nkv, hd).reshape(b, t, nh, hd) for z in (k, v))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(2, 3) / hd**0.5 + mask, dim=-1)
        h = h + (att @ v).transpose(1, 2).reshape(b, t, dim) @ w[p + "attention.wo.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        ff = torch.nn.functional.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
        h = h + ff @ w[p + "feed_forward.w2.weight"].T
    out = w.get("output.weight", w["tok_embeddings.weight"])
    return (rms(h, w["norm.weight"]) @ out.T).numpy()


def canonical_logits(tensors: dict[str, np.ndarray], config, ids: np.ndarray) -> np.ndarray:
    """HF transformers (rotate-half RoPE) in float64 on canonical tensors."""
    import torch
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).double().eval()
    hf.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in tensors.items()})
    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()


def random_meta_checkpoint(folder: Path, n_heads: int, n_kv: int, dim: int = 64, seed: int = 0) -> tuple[dict, dict]:
    """A Meta-layout checkpoint with O(1) activations, written with torch.save (not our writer)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hd, hidden, vocab = dim // n_heads, 192, 64

    def lin(o, i):
        return torch.randn(o, i, generator=g) / i**0.5

    state = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=g), "output.weight": lin(vocab, dim)}
    for i in range(2):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": lin(dim, dim) * 2,
            p + "attention.wk.weight": lin(n_kv * hd, dim) * 2,
            p + "attention.wv.weight": lin(n_kv * hd, dim),
            p + "attention.wo.weight": lin(dim, dim),
            p + "feed_forward.w1.weight": lin(hidden, dim),
            p + "feed_forward.w2.weight": lin(dim, hidden),
            p + "feed_forward.w3.weight": lin(hidden, dim),
            p + "attention_norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
            p + "ffn_norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
        }
    state["norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    params = {"dim": dim, "n_layers": 2, "n_heads": n_heads, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": vocab}
    if n_kv != n_heads:
        params["n_kv_heads"] = n_kv
    folder.mkdir(parents=True)
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return state, params


# ---- rotary layout and GQA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [(8, 2), (4, 2), (8, 8)])
def test_rotary_layout_meta_reference_vs_converted(tmp_path, heads):
    n_heads, n_kv = heads
    state, params = random_meta_checkpoint(tmp_path / "meta", n_heads, n_kv)
    ids = np.array([[1, 7, 3, 22, 9, 40, 5, 11, 63, 2]])
    ref = meta_reference_logits(state, params, ids)
    with open_checkpoint(tmp_path / "meta") as ckpt:
        cfg = ckpt.config
        tensors = dict(ckpt.tensors())
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (n_heads, n_kv, 192)
    got = canonical_logits(tensors, cfg, ids)
    assert np.abs(ref).max() > 1.0  # activations are O(1): a layout error cannot hide in tiny numbers
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # our reader agrees with Hugging Face's conversion formula (k permuted with n_kv_heads groups)
    for i in range(2):
        q, k = (state[f"layers.{i}.attention.{n}.weight"].numpy() for n in ("wq", "wk"))
        assert np.array_equal(tensors[f"model.layers.{i}.self_attn.q_proj.weight"], hf_permute(q, n_heads))
        assert np.array_equal(tensors[f"model.layers.{i}.self_attn.k_proj.weight"], hf_permute(k, n_kv))

    # The test can fail: no permutation at all, or k permuted with n_heads groups, changes the logits.
    def variant(k_groups: int | None) -> np.ndarray:
        wrong = dict(tensors)
        for i in range(2):
            q, k = (state[f"layers.{i}.attention.{n}.weight"].numpy() for n in ("wq", "wk"))
            wrong[f"model.layers.{i}.self_attn.q_proj.weight"] = q if k_groups is None else hf_permute(q, n_heads)
            wrong[f"model.layers.{i}.self_attn.k_proj.weight"] = k if k_groups is None else hf_permute(k, k_groups)
        return canonical_logits(wrong, cfg, ids)

    assert np.abs(variant(None) - ref).max() > 1e-2
    if n_kv != n_heads:
        assert np.abs(variant(n_heads) - ref).max() > 1e-2


def test_k_permutation_uses_kv_groups_at_70b_shapes(tmp_path):
    """70B: 64 query heads, 8 kv heads, head_dim 128; k is (1024, 8192). A thin slice of columns keeps it small."""
    from llama2.core.formats.base import to_interleaved, to_rotate_half

    rng = np.random.default_rng(0)
    wk = rng.standard_normal((8 * 128, 16)).astype(np.float32)
    wq = rng.standard_normal((64 * 128, 16)).astype(np.float32)
    assert np.array_equal(to_rotate_half(wk, 8), hf_permute(wk, 8))
    assert np.array_equal(to_rotate_half(wq, 64), hf_permute(wq, 64))
    assert not np.array_equal(to_rotate_half(wk, 64), hf_permute(wk, 8))  # n_heads groups would be wrong
    assert np.array_equal(to_interleaved(to_rotate_half(wk, 8), 8), wk)
    assert np.array_equal(to_interleaved(wk, 8), llamacpp_permute(wk, 64, 8))  # llama.cpp uses the same groups
    # end to end through the Meta writer and reader, split across 8 model-parallel ranks like Meta's 70B
    from llama2.core.config import ModelConfig
    from llama2.core.formats import save_checkpoint
    from llama2.core.formats.base import canonical_shapes

    cfg = ModelConfig(dim=128, n_layers=1, n_heads=16, n_kv_heads=8, hidden_dim=64, vocab_size=32, max_seq_len=64)
    ref = {n: rng.standard_normal(s).astype(np.float32) for n, s in canonical_shapes(cfg).items()}
    out = save_checkpoint(tmp_path / "meta8", "meta", cfg, ref.items(), model_parallel=8)
    import torch

    rank = torch.load(out / "consolidated.03.pth", weights_only=True)
    assert tuple(rank["layers.0.attention.wk.weight"].shape) == (8, 128)  # one kv head per rank
    k_meta = to_interleaved(ref["model.layers.0.self_attn.k_proj.weight"], 8)
    assert np.array_equal(rank["layers.0.attention.wk.weight"].numpy(), k_meta[24:32])
    with open_checkpoint(out) as ckpt:
        got = dict(ckpt.tensors())
    assert all(np.array_equal(got[n], ref[n]) for n in ref)


# ---- llama2.c stories260K ------------------------------------------------------------------------------------
def test_stories260k_matches_run_c_reference():
    from llama2.api import load

    path = data_path(STORIES)
    assert detect_format(path) == "llama2c"
    model = load(path, backend="torch")
    c = model.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512,
    )  # fmt: skip
    assert c.tie_embeddings
    logits = model.forward(np.array([[1]]))[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-logits)[:5]
    assert top.tolist() == [461, 306, 295, 341, 453]
    np.testing.assert_allclose(probs[top], [0.2849, 0.2557, 0.1141, 0.0875, 0.0440], atol=1e-4)
    greedy = model.generate_ids([[1]], max_new_tokens=40, temperature=0.0, eos_id=None)[0]
    expected = (
        "461 461 401 401 401 461 378 455 473 456 435 299 362 409 283 264 283 452 288 13 "
        "431 431 431 431 431 431 431 431 431 431 431 431 431 293 430 417 363 416 315 342"
    )
    assert greedy == [int(x) for x in expected.split()]


# ---- GGUF ----------------------------------------------------------------------------------------------------
def test_tiny_random_gguf_shapes_and_vocab(llama_tokenizer_path):
    import sentencepiece as spm

    path = data_path(TINY_GGUF)
    assert detect_format(path) == "gguf"
    with open_checkpoint(path) as ckpt:
        c = ckpt.config
        assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == (8, 1, 2, 2, 32, 32000)
        assert (c.norm_eps, c.max_seq_len, c.tie_embeddings) == (1e-5, 4096, False)
        tensors = dict(ckpt.tensors())
        pieces, scores = ckpt.vocab
    shapes = {n: (v.shape, v.dtype) for n, v in tensors.items()}
    assert shapes["model.embed_tokens.weight"] == ((32000, 8), np.float16)
    assert shapes["lm_head.weight"] == ((32000, 8), np.float16)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == ((8, 8), np.float16)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == ((32, 8), np.float16)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == ((8, 32), np.float16)
    assert shapes["model.norm.weight"] == ((8,), np.float32)
    assert len(tensors) == 12
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    assert pieces == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert np.array_equal(np.float32(scores), np.float32([sp.get_score(i) for i in range(sp.vocab_size())]))
    from llama2.api import load

    model = load(path, backend="torch", tokenizer=llama_tokenizer_path)
    logits = model.forward(np.array([sp.encode("Hello world")]))
    assert logits.shape == (1, 2, 32000) and np.isfinite(logits).all()


_GGUF_TYPES = {"u32": 4, "f32": 6, "str": 8, "arr": 9}


def write_gguf(path: Path, meta: dict, tensors: list[tuple[str, np.ndarray, int]], align: int = 32) -> Path:
    """A minimal GGUF v3 writer following the spec (ggml type 0 = F32, 1 = F16; others written as raw bytes)."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    def value(v) -> bytes:
        if isinstance(v, str):
            return struct.pack("<I", 8) + s(v)
        if isinstance(v, float):
            return struct.pack("<If", 6, v)
        if isinstance(v, list):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(s(x) for x in v)
        return struct.pack("<II", 4, v)

    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)))
    for k, v in meta.items():
        out += s(k) + value(v)
    offset, blobs = 0, []
    for name, arr, ggml_type in tensors:
        out += s(name) + struct.pack("<I", arr.ndim) + b"".join(struct.pack("<Q", d) for d in reversed(arr.shape))
        out += struct.pack("<IQ", ggml_type, offset)
        data = np.ascontiguousarray(arr).tobytes()
        blobs.append(data + b"\0" * (-len(data) % align))
        offset += len(blobs[-1])
    out += b"\0" * (-len(out) % align)
    path.write_bytes(bytes(out) + b"".join(blobs))
    return path


def gguf_from_hf(path: Path, tensors: dict[str, np.ndarray], cfg, *, f16: bool = True) -> Path:
    """Write canonical tensors as llama.cpp's converter would: GGUF names, q/k permuted, 2-D tensors in F16."""
    meta = {
        "general.architecture": "llama",
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.dim,
        "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
    }
    table = name_table("gguf", cfg)
    out = []
    for name, arr in tensors.items():
        if name.endswith("q_proj.weight"):
            arr = llamacpp_permute(arr, cfg.n_heads, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            arr = llamacpp_permute(arr, cfg.n_heads, cfg.n_kv_heads)
        half = f16 and arr.ndim == 2
        out.append((table[name], arr.astype(np.float16 if half else np.float32), 1 if half else 0))
    return write_gguf(path, meta, out)


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory):
    """(n_heads, n_kv, tie) -> (HF dir, canonical tensors, HF model)."""
    from safetensors.numpy import load_file

    root = tmp_path_factory.mktemp("hf_small")
    out = {}
    for heads, tie in (((8, 2), False), ((8, 2), True), ((4, 2), False), ((8, 8), True)):
        d = root / f"m{heads[0]}{heads[1]}{int(tie)}"
        model = make_hf_llama(d, n_heads=heads[0], n_kv_heads=heads[1], dim=32, tie=tie, seed=3)
        out[(*heads, tie)] = (d, load_file(d / "model.safetensors"), model)
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_llamacpp_layout_undone_and_tying(tmp_path, hf_small, tie):
    src, ref, model = hf_small[(8, 2, tie)]
    cfg = open_checkpoint(src).config
    for f16 in (False, True):
        path = gguf_from_hf(tmp_path / f"m{int(f16)}.gguf", ref, cfg, f16=f16)
        with open_checkpoint(path) as ckpt:
            assert ckpt.config == cfg
            got = dict(ckpt.tensors())
        assert set(got) == set(ref)
        for n, v in ref.items():
            expected = v.astype(np.float16) if f16 and v.ndim == 2 else v
            assert got[n].dtype == expected.dtype and np.array_equal(got[n], expected), n
    from llama2.cli import main

    argv = ["convert", "--input", str(tmp_path / "m0.gguf"), "--output", str(tmp_path / "hf"), "--from", "gguf"]
    assert main([*argv, "--to", "hf"]) == 0
    back = tmp_path / "hf"
    with open_checkpoint(back) as ckpt:
        assert ckpt.config.tie_embeddings is tie
        assert ("lm_head.weight" in dict(ckpt.tensors())) is not tie
    from llama2.api import load

    ids = np.array([[1, 5, 9, 3, 7, 100]])
    np.testing.assert_allclose(
        load(tmp_path / "m0.gguf", backend="torch").forward(ids), hf_logits(model, ids), atol=1e-5
    )


def test_gguf_quantized_tensor_is_a_clear_error(tmp_path, hf_small):
    src, ref, _ = hf_small[(4, 2, False)]
    cfg = open_checkpoint(src).config
    path = gguf_from_hf(tmp_path / "q.gguf", ref, cfg)
    blob = path.read_bytes()
    # retype attn_v of layer 0 to Q8_0 (ggml type 8): find its info record and patch the type field
    key = b"blk.0.attn_v.weight"
    at = blob.index(key) + len(key) + 4 + 2 * 8
    patched = blob[:at] + struct.pack("<I", 8) + blob[at + 4 :]
    path.write_bytes(patched)
    with pytest.raises(FormatError, match=r"'blk\.0\.attn_v\.weight' in .*q\.gguf is Q8_0; only F32, F16 and BF16"):
        list(open_checkpoint(path).tensors())


# ---- logits after loading any format -------------------------------------------------------------------------
@pytest.mark.parametrize("key", [(8, 2, False), (8, 2, True), (4, 2, False), (8, 8, True)])
def test_logits_equal_after_loading_every_format(tmp_path, hf_small, key):
    from llama2.api import load

    src, ref, model = hf_small[key]
    cfg = open_checkpoint(src).config
    ids = np.array([[1, 5, 9, 3, 7, 100, 42]])
    expected = hf_logits(model, ids)
    paths = {
        "hf": src,
        "meta": convert(src, tmp_path / "meta", dst_format="meta", model_parallel=2),
        "mindspore": convert(src, tmp_path / "m.ckpt", dst_format="mindspore"),
        "llama2c": convert(src, tmp_path / "m.bin", dst_format="llama2c"),
        "gguf": gguf_from_hf(tmp_path / "m.gguf", ref, cfg, f16=False),
    }
    first = None
    for fmt, path in paths.items():
        got = load(path, backend="torch").forward(ids)
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=fmt)
        if first is None:
            first = got
        assert np.array_equal(got, first), fmt  # identical tensors, identical logits


# ---- HF sharding and pytorch_model*.bin ----------------------------------------------------------------------
def test_hf_sharded_writing_respects_limit_and_sharded_bin_reads(tmp_path, hf_small):
    from llama2.core.formats.hf import read_safetensors_header

    src, ref, model = hf_small[(4, 2, False)]
    limit = 20_000
    out = convert(src, tmp_path / "sharded", dst_format="hf", max_shard_size=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"]) == set(ref)
    assert {out / f for f in index["weight_map"].values()} == set(shards)
    biggest = max(v.nbytes for v in ref.values())
    for f in shards:
        header, start = read_safetensors_header(f)
        data = f.stat().st_size - start
        assert data <= limit or len(header) == 1 and data == biggest  # only a lone oversized tensor may exceed
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in ref.values())
    # pytorch_model*.bin as transformers 4.x wrote them (torch.save of state-dict shards + index); transformers 5
    # only writes safetensors, so the files are made here with torch.save.
    import torch

    state = {k: torch.from_numpy(v) for k, v in ref.items()}
    names = list(state)
    single, sharded = tmp_path / "bin1", tmp_path / "bin2"
    for d in (single, sharded):
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
    torch.save(state | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}, single / "pytorch_model.bin")
    parts = [names[:7], names[7:15], names[15:]]
    wmap = {}
    for i, part in enumerate(parts):
        fname = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({k: state[k] for k in part}, sharded / fname)
        wmap |= dict.fromkeys(part, fname)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    for d in (single, sharded):
        assert detect_format(d) == "hf"
        with open_checkpoint(d) as ckpt:
            got = dict(ckpt.tensors())
        assert set(got) == set(ref) and all(np.array_equal(got[n], ref[n]) for n in ref), d.name


# ---- bad files -----------------------------------------------------------------------------------------------
def _native(fmt: str, src: Path, tmp: Path):
    """(native tensors, writer(native dict, folder) -> checkpoint path) for one format."""
    import torch

    cfg = open_checkpoint(src).config
    if fmt == "hf":
        from safetensors.numpy import load_file, save_file

        def write(d, folder):
            folder.mkdir()
            (folder / "config.json").write_text((src / "config.json").read_text())
            save_file(d, folder / "model.safetensors")
            return folder

        return load_file(src / "model.safetensors"), write
    if fmt == "meta":
        good = convert(src, tmp / "meta_good", dst_format="meta")

        def write(d, folder):
            folder.mkdir()
            (folder / "params.json").write_text((good / "params.json").read_text())
            torch.save(
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}, folder / "consolidated.00.pth"
            )
            return folder

        return {k: v.numpy() for k, v in torch.load(good / "consolidated.00.pth", weights_only=True).items()}, write
    if fmt == "mindspore":
        ms = pytest.importorskip("mindspore")
        good = convert(src, tmp / "good.ckpt", dst_format="mindspore")

        def write(d, folder):
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(cfg.to_hf()))
            ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in d.items()], str(folder / "w.ckpt"))
            return folder / "w.ckpt"

        loaded = ms.load_checkpoint(str(good))
        return {k: v.asnumpy() for k, v in loaded.items() if k != "llama2_config"}, write
    ref = dict(open_checkpoint(src).tensors())
    table = name_table("gguf", cfg)

    def write(d, folder):
        folder.mkdir()
        return gguf_write_native(folder / "w.gguf", cfg, d)

    return {table[n]: v for n, v in ref.items()}, write


def gguf_write_native(path: Path, cfg, native: dict[str, np.ndarray]) -> Path:
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": cfg.dim,
        "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads,
    }
    return write_gguf(path, meta, [(n, v.astype(np.float32), 0) for n, v in native.items()])


_Q = {"hf": "model.layers.1.self_attn.q_proj.weight", "meta": "layers.1.attention.wq.weight",
      "mindspore": "model.layers.1.attention.wq.weight", "gguf": "blk.1.attn_q.weight"}  # fmt: skip
_UP = {"hf": "model.layers.0.mlp.up_proj.weight", "meta": "layers.0.feed_forward.w3.weight",
       "mindspore": "model.layers.0.feed_forward.w3.weight", "gguf": "blk.0.ffn_up.weight"}  # fmt: skip
_EXTRA = {"hf": "model.layers.0.self_attn.extra.weight", "meta": "layers.0.attention.extra.weight",
          "mindspore": "model.layers.0.attention.extra.weight", "gguf": "blk.0.attn_extra.weight"}  # fmt: skip


@pytest.mark.parametrize("fmt", ["hf", "meta", "mindspore", "gguf"])
def test_bad_files_name_tensor_and_file(tmp_path, hf_small, fmt):
    src, _, _ = hf_small[(4, 2, False)]
    native, write = _native(fmt, src, tmp_path)

    def fails(variant: dict, label: str, *needles: str) -> None:
        path = write(variant, tmp_path / label)
        with pytest.raises(FormatError) as info:
            list(open_checkpoint(path).tensors())
        msg = str(info.value)
        for needle in needles:
            assert needle in msg, (label, msg)

    fname = {"hf": "model.safetensors", "meta": "consolidated.00.pth", "mindspore": "w.ckpt", "gguf": "w.gguf"}[fmt]
    wrong = dict(native)
    wrong[_Q[fmt]] = native[_Q[fmt]][:-2]
    fails(wrong, "shape", _Q[fmt], "shape", fname)
    fails({k: v for k, v in native.items() if k != _UP[fmt]}, "missing", _UP[fmt], "missing", fname)
    fails(native | {_EXTRA[fmt]: native[_UP[fmt]]}, "unknown", _EXTRA[fmt], "unknown", fname)
    # truncated: cut the weights file to 60%
    good = write(native, tmp_path / "good")
    weights = good if good.is_file() else good / fname
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * 0.6)])
    with pytest.raises(FormatError) as info:
        list(open_checkpoint(good).tensors())
    assert fname in str(info.value)
    if fmt != "meta":  # a cut zip archive cannot be opened at all; the others name the tensor that is cut
        assert "truncated" in str(info.value) and "weight" in str(info.value)


def test_bad_llama2c_sizes(tmp_path, hf_small):
    src, _, _ = hf_small[(4, 2, False)]
    path = convert(src, tmp_path / "m.bin", dst_format="llama2c")
    data = path.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(FormatError, match=r"cut\.bin has \d+ bytes but its header implies \d+; tensor '.+' is the "):
        list(open_checkpoint(cut, "llama2c").tensors())
    assert detect_format(path) == "llama2c"
    with pytest.raises(FormatError, match="cannot tell the checkpoint format"):
        detect_format(cut)  # header and size disagree: not recognised as llama2.c
