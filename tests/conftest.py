"""Shared fixtures: real data location, tiny random HF Llama checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLAMA2_TEST_DATA", REPO.parent / "shared" / "data"))


def data_path(rel: str) -> Path:
    """Path of a file under LLAMA2_TEST_DATA; skips the test with the reason when it is absent."""
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"test data {rel} not found under LLAMA2_TEST_DATA={DATA} (see shared/data/SOURCES.md)")
    return p


@pytest.fixture
def llama_tokenizer_path() -> Path:
    return data_path("tokenizer/llama2/tokenizer.model")


def make_hf_llama(
    out_dir: Path,
    *,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    dim: int = 32,
    n_layers: int = 2,
    hidden_dim: int = 64,
    vocab_size: int = 128,
    max_seq_len: int = 64,
    tie: bool = False,
    seed: int = 0,
    safe_serialization: bool = True,
):
    """Save a random-weight fp32 `transformers.LlamaForCausalLM` to `out_dir`; returns the HF model (eval)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        intermediate_size=hidden_dim,
        vocab_size=vocab_size,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        torch_dtype="float32",
    )
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    # Non-trivial norm weights so that a missing norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return model


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.from_numpy(attention_mask)
            pos = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
            kwargs["position_ids"] = torch.from_numpy(pos)
        return model(torch.from_numpy(ids.astype(np.int64)), **kwargs).logits.float().numpy()
