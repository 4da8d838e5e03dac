"""`llama2 demo` in a reduced form (fewer steps, shorter rows): the whole pipeline runs and learns."""

from __future__ import annotations

import argparse

from llama2.cli import build_parser
from llama2.commands.demo import bundled_corpus, run_demo


def test_bundled_corpus_is_english_text() -> None:
    train, held = bundled_corpus()
    assert len(train) > 50 and len(held) >= 5 and not set(train) & set(held)
    assert sum(map(len, train)) > 300_000 and " the " in train[0]


def test_demo_reduced(tmp_path) -> None:
    args = build_parser().parse_args(["demo", "--out", str(tmp_path / "demo"), "--no-progress"])
    assert args.steps >= 200 and args.tokenizer is None  # the full demo's defaults
    args = argparse.Namespace(
        **{**vars(args), "steps": 30, "seq_length": 64, "vocab_size": 512, "backend": "torch", "mode": "eager"}
    )
    lines: list[str] = []
    res = run_demo(args, say=lines.append)
    assert "byte fallback, split digits" in lines[1]
    from llama2.data.tokenizer import Tokenizer

    tok = Tokenizer(tmp_path / "demo" / "tokenizer.model")
    proto = tok.sp.serialized_model_proto()
    from sentencepiece import sentencepiece_model_pb2 as pb

    spec = pb.ModelProto.FromString(proto).trainer_spec
    assert spec.byte_fallback and spec.split_digits and spec.model_type == pb.TrainerSpec.BPE
    assert tok.vocab_size == 512
    # untrained: about the vocabulary size; 30 steps already cut it by more than half
    assert res["ppl_before"] > 300 and res["ppl_after"] < res["ppl_before"] / 2, res
    assert isinstance(res["sample"], str)
    assert (res["out"] / "checkpoints").is_dir() and res["loss_png"].read_bytes()[:4] == b"\x89PNG"
