"""Every backend against HF transformers and against each other: logits, KV cache, bad input, one AdamW step.

Each backend-neutral test is parametrized over the registered backends ("mindspore", "torch").
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import llama2
from llama2.core.backend import IGNORE_INDEX, OptimConfig
from llama2.core.config import ModelConfig
from llama2.core.model import build_runtime
from llama2.core.registry import BACKENDS
from tests.conftest import hf_logits, make_hf_llama

BACKEND_NAMES = ["mindspore", "torch"]
HEADS = [(8, 2), (4, 2), (8, 8)]
VOCAB = 96


def _backend(name: str) -> str:
    if name not in BACKENDS:
        pytest.skip(f"backend {name!r} is not registered")
    return name


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """One random HF checkpoint per (n_heads, n_kv_heads), with the HF model kept as the oracle."""
    out = {}
    for n_heads, n_kv in HEADS:
        d = tmp_path_factory.mktemp(f"hf_{n_heads}_{n_kv}")
        model = make_hf_llama(d, n_heads=n_heads, n_kv_heads=n_kv, dim=32, vocab_size=VOCAB, max_seq_len=32, seed=3)
        out[(n_heads, n_kv)] = (d, model)
    return out


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    """llama2 models per (backend, heads), loaded once."""
    cache = {}

    def get(backend: str, heads: tuple[int, int]):
        key = (backend, heads)
        if key not in cache:
            cache[key] = llama2.load(hf_dirs[heads][0], backend=_backend(backend))
        return cache[key]

    return get


def _ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq)).astype(np.int64)


# ---- logits parity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_logits_match_hf(hf_dirs, loaded, backend, heads):
    ids = _ids(2, 11)
    ours = loaded(backend, heads).forward(ids)
    ref = hf_logits(hf_dirs[heads][1], ids)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (2, 11, VOCAB)
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_logits_torch_equal_mindspore(loaded, heads):
    ids = _ids(2, 9, seed=1)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding in row 1
    a = loaded("mindspore", heads).runtime.forward(ids, mask)
    b = loaded("torch", heads).runtime.forward(ids, mask)
    assert np.isfinite(a).all() and np.isfinite(b).all()  # pad positions too (their values are unspecified)
    real = mask.astype(bool)
    assert np.abs(a[real] - b[real]).max() <= 1e-4


# ---- KV cache ---------------------------------------------------------------------------------------------------
def _decode_all(rt, ids: np.ndarray, mask: np.ndarray, prefill: int) -> np.ndarray:
    """Logits at every position: prefill `prefill` tokens, then one token per step through the KV cache."""
    b, n = ids.shape
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    kv_mask = np.zeros((b, n), np.int32)
    cache = rt.new_cache(b, n)
    kv_mask[:, :prefill] = mask[:, :prefill]
    steps = [rt.decode(cache, ids[:, :prefill], positions[:, :prefill], kv_mask, 0, last_only=False)]
    for s in range(prefill, n):
        kv_mask[:, s] = mask[:, s]
        steps.append(rt.decode(cache, ids[:, s : s + 1], positions[:, s : s + 1], kv_mask, s, last_only=True))
    return np.concatenate(steps, axis=1)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_kv_cache_decode_equals_full_forward(loaded, backend):
    rt = loaded(backend, (8, 2)).runtime
    ids = _ids(1, 12, seed=2)
    mask = np.ones_like(ids)
    full = rt.forward(ids)
    inc = _decode_all(rt, ids, mask, prefill=5)  # prefill 5, then 7 single steps
    assert inc.shape == full.shape
    assert np.abs(inc - full).max() <= 1e-5

    # Left-padded batch of 2: row 1 has 4 pads. Both rows equal their unpadded single-row forward.
    ids2 = _ids(2, 12, seed=3)
    mask2 = np.ones_like(ids2)
    mask2[1, :4] = 0
    ids2[1, :4] = 0
    inc2 = _decode_all(rt, ids2, mask2, prefill=5)
    assert np.isfinite(inc2).all()  # pad slots included
    assert np.abs(inc2[0] - rt.forward(ids2[:1])[0]).max() <= 1e-5
    assert np.abs(inc2[1, 4:] - rt.forward(ids2[1:, 4:])[0]).max() <= 1e-5
    assert np.abs(inc2[mask2 == 1] - rt.forward(ids2, mask2)[mask2 == 1]).max() <= 1e-5


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_later_tokens_never_change_earlier_logits(loaded, backend):
    model = loaded(backend, (4, 2))
    ids = _ids(1, 12, seed=4)
    changed = ids.copy()
    changed[0, 7:] = (changed[0, 7:] + 1) % VOCAB
    a, b = model.forward(ids), model.forward(changed)
    assert np.array_equal(a[:, :7], b[:, :7]) or np.abs(a[:, :7] - b[:, :7]).max() <= 1e-6
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3


# ---- bad input --------------------------------------------------------------------------------------------------
def test_missing_config_json(tmp_path, hf_dirs):
    src = hf_dirs[(4, 2)][0]
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises((FileNotFoundError, ValueError), match="config.json"):
        llama2.load(tmp_path)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_shape_mismatch_names_tensor_and_shapes(tmp_path, hf_dirs, backend):
    src = hf_dirs[(4, 2)][0]
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 48  # weights say 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*expected"):
        llama2.load(tmp_path, backend=_backend(backend))


def test_unknown_backend_lists_known(hf_dirs):
    with pytest.raises(KeyError, match="mindspore") as err:
        llama2.load(hf_dirs[(4, 2)][0], backend="tensorflow")
    assert "tensorflow" in str(err.value) and "torch" in str(err.value)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_missing_tokenizer(tmp_path, hf_dirs, backend):
    d = hf_dirs[(4, 2)][0]
    with pytest.raises(FileNotFoundError, match="nope.model"):
        llama2.load(d, backend=_backend(backend), tokenizer=tmp_path / "nope.model")
    model = llama2.load(d, backend=backend)  # no tokenizer.model beside the weights
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate("hello", max_new_tokens=2)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_bad_ids_and_absent_device(loaded, backend):
    model = loaded(backend, (4, 2))
    with pytest.raises(ValueError, match="token ids must be in"):
        model.forward(np.array([[1, VOCAB]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(np.zeros((1, 33), np.int64))
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=VOCAB, hidden_dim=64, max_seq_len=32)
    with pytest.raises(ValueError, match="float32"):
        build_runtime(cfg, backend, device="cpu", dtype="bfloat16")
    if not _has_gpu(backend):
        with pytest.raises(RuntimeError, match="gpu"):
            build_runtime(cfg, backend, device="gpu")


def _has_gpu(backend: str) -> bool:
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    from llama2.backends.mindspore.device import device_available

    return device_available("gpu")


# ---- training ---------------------------------------------------------------------------------------------------
def test_one_adamw_step_same_on_both_backends():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=64, max_seq_len=32)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(2, 10))
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    results = {}
    for name in BACKEND_NAMES:
        rt = build_runtime(cfg, _backend(name))
        rt.init_weights(7)
        state = rt.train_state(OptimConfig())
        loss, n = state.accumulate(ids[:1], labels[:1])
        loss2, n2 = state.accumulate(ids[1:], labels[1:])  # two micro-batches, token-weighted
        # lr 1e-3: Adam's first update is lr * g / (|g| + eps), so a weight whose gradient is near eps moves by up to
        # lr on a float32 rounding difference; 1e-3 (already above Llama's 3e-4) keeps that within the tolerance.
        norm = state.apply(1e-3, n + n2)
        after = dict(rt.state_dict())
        results[name] = (loss + loss2, n + n2, norm, after, rt.forward(ids))
    (l_ms, n_ms, g_ms, w_ms, f_ms), (l_t, n_t, g_t, w_t, f_t) = results["mindspore"], results["torch"]
    assert n_ms == n_t == 2 * 9 - 3
    assert abs(l_ms - l_t) / n_ms <= 1e-4 and abs(g_ms - g_t) <= 1e-4
    for k in w_ms:
        assert np.abs(w_ms[k] - w_t[k]).max() <= 1e-4, k
    assert np.abs(f_ms - f_t).max() <= 1e-4


# ---- weight files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_load_sharded_safetensors_and_pytorch_bin(tmp_path, hf_dirs, backend):
    """`llama2.load` reads sharded safetensors (with the index) and pytorch_model.bin; logits equal HF's."""
    import torch

    src, hf = hf_dirs[(8, 2)]
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((src / "config.json").read_text())
    torch.save({k: v.detach().clone() for k, v in hf.state_dict().items()}, binary / "pytorch_model.bin")
    ids = _ids(2, 10, seed=5)
    ref = hf_logits(hf, ids)
    for d in (sharded, binary):
        got = llama2.load(d, backend=_backend(backend)).forward(ids)
        assert np.abs(got - ref).max() <= 1e-4, d.name


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_load_reads_one_tensor_at_a_time(hf_dirs, backend, monkeypatch):
    """Every tensor read from the file is released before the one after next is read: no second full copy."""
    import itertools
    import weakref

    from llama2.core.formats import hf as hf_format

    read = hf_format._read_st_tensor
    live: set[int] = set()
    most = [0]
    counter = itertools.count()

    def tracked(*args, **kwargs):
        arr = read(*args, **kwargs)
        key = next(counter)
        live.add(key)
        weakref.finalize(arr, live.discard, key)
        most[0] = max(most[0], len(live))
        return arr

    monkeypatch.setattr(hf_format, "_read_st_tensor", tracked)
    model = llama2.load(hf_dirs[(8, 2)][0], backend=_backend(backend))
    n_tensors = len(model.runtime.param_names())
    assert n_tensors > 10
    assert most[0] <= 2, f"{most[0]} of {n_tensors} tensors read from the file were alive at once"
    assert not live  # nothing read from the file is kept by the runtime
    assert np.isfinite(model.forward(_ids(1, 4))).all()


# ---- precision rules --------------------------------------------------------------------------------------------
def _run_rmsnorm(backend: str, x: np.ndarray) -> np.ndarray:
    """A lowered RMSNorm node (weight 1) applied to float16 x on CPU."""
    from llama2.core.graph import RMSNorm

    module = BACKENDS.get(_backend(backend)).lower(RMSNorm(dim=x.shape[-1]))
    if backend == "torch":
        import torch

        with torch.no_grad():
            module.weight.fill_(1.0)
            return module(torch.from_numpy(x)).numpy()
    import mindspore as ms

    module.weight.set_data(ms.Tensor(np.ones(x.shape[-1], np.float32)))
    return module(ms.Tensor(x)).asnumpy()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_rmsnorm_statistics_in_float32_for_float16_input(backend):
    """x = 300 in float16: x*x = 90000 overflows float16 (max 65504), so only fp32 statistics give y = 1."""
    x = np.full((2, 8), 300.0, np.float16)
    x[1] = np.linspace(-400, 400, 8).astype(np.float16)
    y = _run_rmsnorm(backend, x)
    assert y.dtype == np.float16  # the result keeps the input dtype
    xf = x.astype(np.float64)
    ref = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2e-3, atol=2e-3)


def test_rope_tables_computed_in_float64():
    """cos/sin are float32 but exact to float32 rounding even at position 4095 (fp32 angles would be off ~1e-4)."""
    from llama2.core.backend import rope_tables

    cos, sin = rope_tables(128, 4096)
    assert cos.dtype == sin.dtype == np.float32 and cos.shape == (4096, 128)
    inv = 1.0 / (10000.0 ** (np.arange(0, 128, 2, dtype=np.float64) / 128))
    angle = np.outer(np.arange(4096, dtype=np.float64), inv)
    ref_cos = np.cos(np.concatenate([angle, angle], -1))
    assert np.abs(cos - ref_cos).max() <= 1e-7
    angle32 = np.outer(np.arange(4096, dtype=np.float32), inv.astype(np.float32))
    assert np.abs(np.cos(angle32).astype(np.float64) - ref_cos[:, :64]).max() > 1e-5  # the case the rule guards


# ---- `--backend` on the command line ----------------------------------------------------------------------------
def test_backend_flag_on_every_model_command():
    from llama2.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("generate", "info", "pretrain", "finetune", "evaluate"):
        assert "--backend" in sub[command]._option_string_actions, command


def test_cli_pretrain_finetune_evaluate_on_torch(tmp_path, capsys, monkeypatch):
    """`--backend torch` reaches the runtime in `llama2 pretrain`, `llama2 finetune` and `llama2 evaluate`."""
    from llama2.cli import main
    from llama2.data.records import write_records

    asked: list[str] = []
    get = BACKENDS.get
    monkeypatch.setattr(BACKENDS, "get", lambda name: asked.append(name) or get(name))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "rows.npy", rng.integers(3, 512, size=(8, 17)).astype(np.int32))
    ids = rng.integers(3, 512, size=(8, 17)).astype(np.int32)
    labels = ids.copy()
    labels[:, :8] = IGNORE_INDEX
    write_records(tmp_path / "sft.npz", {"input_ids": ids, "labels": labels})
    common = ["--steps", "2", "--batch-size", "4", "--backend", "torch", "--no-progress"]
    pre = ["pretrain", "--preset", "tiny", "--vocab-size", "512", "--max-seq-len", "32", "--data"]
    assert main([*pre, str(tmp_path / "rows.npy"), "--out", str(tmp_path / "pre"), *common]) == 0
    (state,) = (tmp_path / "pre").glob("checkpoints/*/trainer_state.json")
    assert json.loads(state.read_text())["backend"] == "torch"
    assert asked and set(asked) == {"torch"}
    asked.clear()
    fin = ["finetune", "--model", str(tmp_path / "pre"), "--data", str(tmp_path / "sft.npz"), "--method", "lora"]
    assert main([*fin, "--out", str(tmp_path / "fin"), *common]) == 0
    assert (tmp_path / "fin" / "adapter" / "adapter_config.json").is_file()
    assert asked and set(asked) == {"torch"}
    asked.clear()
    capsys.readouterr()
    ev = ["evaluate", "--model", str(tmp_path / "pre"), "--metric", "perplexity", "--data", str(tmp_path / "rows.npy")]
    assert main([*ev, "--backend", "torch", "--json", "--no-progress"]) == 0
    assert asked and set(asked) == {"torch"}
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = llama2.evaluate(
        llama2.load(tmp_path / "pre", backend="torch"), "perplexity", data=tmp_path / "rows.npy", progress=False
    )
    assert got["tokens"] == ref["tokens"] == 8 * 16
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)


# ---- torchrun device choice and decode argument checks (torch) ----------------------------------------------------
@pytest.mark.parametrize(
    "env, device, device_id, expected",
    [
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "gpu", 0, 3),  # torchrun rank on cuda:LOCAL_RANK
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "cuda", 0, 3),
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "gpu", 1, 1),  # an explicit device id wins
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "cpu", 0, 0),  # CPU has no device ids
        ({"WORLD_SIZE": "1", "LOCAL_RANK": "3"}, "gpu", 0, 0),  # a single process keeps cuda:0
        ({}, "gpu", 0, 0),
    ],
)
def test_torchrun_device_id(monkeypatch, env, device, device_id, expected):
    pytest.importorskip("torch")
    from llama2.backends.torch.distributed import torchrun_device_id

    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert torchrun_device_id(device, device_id) == expected


def test_torchrun_device_id_bad_local_rank(monkeypatch):
    pytest.importorskip("torch")
    from llama2.backends.torch.distributed import torchrun_device_id

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        torchrun_device_id("gpu", 0)
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(RuntimeError, match="LOCAL_RANK is unset"):
        torchrun_device_id("gpu", 0)


def test_torch_build_places_torchrun_rank_on_its_local_gpu(monkeypatch):
    """TorchBackend.build resolves the device from the options after the LOCAL_RANK mapping (checked without a GPU:
    the device resolution is intercepted before anything is allocated)."""
    _backend("torch")
    import llama2.backends.torch.runtime as rt
    from llama2.core.backend import RuntimeOptions
    from llama2.core.graph import build_graph

    seen: list[RuntimeOptions] = []

    class Stop(Exception):
        pass

    def fake_resolve(options):
        seen.append(options)
        raise Stop

    monkeypatch.setattr(rt, "resolve_device", fake_resolve)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    graph = build_graph(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=VOCAB, hidden_dim=64, max_seq_len=32))
    for options, expected in ((RuntimeOptions(device="gpu"), 1), (RuntimeOptions(device="gpu", device_id=5), 5)):
        with pytest.raises(Stop):
            BACKENDS.get("torch").build(graph, options)
        assert seen[-1].device_id == expected


def test_torch_decode_checks_arguments(loaded):
    rt = loaded("torch", (4, 2)).runtime
    cache = rt.new_cache(2, 8)
    ids = np.ones((2, 1), np.int64)
    mask = np.ones((2, 8), np.int64)
    with pytest.raises(ValueError, match="positions must be in \\[0, max_seq_len=32\\)"):
        rt.decode(cache, ids, np.full((2, 1), 32), mask, 0)
    with pytest.raises(ValueError, match="positions must be in"):
        rt.decode(cache, ids, np.full((2, 1), -1), mask, 0)
    with pytest.raises(ValueError, match="positions shape"):
        rt.decode(cache, ids, np.zeros((2, 2), np.int64), mask, 0)
    with pytest.raises(ValueError, match="context overflow"):
        rt.decode(cache, ids, np.zeros((2, 1), np.int64), mask, 8)
    with pytest.raises(ValueError, match="batch 1 differs from the cache batch 2"):
        rt.decode(cache, ids[:1], np.zeros((1, 1), np.int64), mask[:1], 0)
    with pytest.raises(ValueError, match="kv_mask shape"):
        rt.decode(cache, ids, np.zeros((2, 1), np.int64), mask[:, :4], 0)
    out = rt.decode(cache, ids, np.full((2, 1), 31), mask, 0)  # the last position is allowed
    assert out.shape == (2, 1, VOCAB) and np.isfinite(out).all()
