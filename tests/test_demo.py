"""`llama2 demo` in a reduced form (fewer steps, shorter rows): the whole pipeline runs and learns."""

from __future__ import annotations

import argparse

import pytest

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


def test_demo_on_real_files_with_given_tokenizer(tmp_path) -> None:
    """`--text/--eval-text/--tokenizer`: WikiText-2 articles and an existing SentencePiece model (llama2.c's 512-piece
    tokenizer; the Llama 2 one works the same way, with a 32,000-row embedding). The held-out token count is
    checked against sentencepiece itself; `llama2.load(run)` then finds the tokenizer stored with the checkpoint."""
    import sentencepiece as spm

    import llama2
    from llama2.data.wikitext import split_articles
    from tests.conftest import data_path

    tok_path = data_path("tokenizer/tok512-llama2c-fork/tok512.model")
    articles = split_articles(data_path("wikitext-2/tokens-v1/valid.txt").read_text(encoding="utf-8"))
    (tmp_path / "train.tokens").write_text("\n".join(articles[:2]) + "\n", encoding="utf-8")
    (tmp_path / "eval.tokens").write_text(articles[2] + "\n", encoding="utf-8")
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--text", str(tmp_path / "train.tokens"), "--no-progress"]
    argv += ["--eval-text", str(tmp_path / "eval.tokens"), "--tokenizer", str(tok_path)]
    argv += ["--steps", "12", "--seq-length", "64", "--batch-size", "4", "--backend", "torch", "--mode", "eager"]
    lines: list[str] = []
    res = run_demo(build_parser().parse_args(argv), say=lines.append)
    assert "2 training documents" in lines[0] and f"{tok_path} (512 pieces)" in lines[1]
    assert not (out / "tokenizer.model").exists()  # no tokenizer was trained
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    assert res["eval_tokens"] == sum(len(sp.encode(a)) for a in articles[2:3])  # BOS + text, all but BOS scored
    assert res["ppl_before"] > 300 and res["ppl_after"] < res["ppl_before"] / 2, res
    model = llama2.load(res["out"], backend="torch")
    assert model.config.vocab_size == 512 and model.tokenizer.encode("The") == sp.encode("The")
    model = llama2.load(res["out"], backend="torch", tokenizer=tok_path)
    assert isinstance(model.generate("The", max_new_tokens=4, temperature=0.0)[0], str)


def test_demo_bad_text(tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    args = build_parser().parse_args(["demo", "--out", str(tmp_path / "d"), "--text", str(empty), "--no-progress"])
    with pytest.raises(ValueError, match=f"{empty}: the file is empty"):
        run_demo(args, say=lambda m: None)
    args = build_parser().parse_args(["demo", "--out", str(tmp_path / "d"), "--text", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="missing"):
        run_demo(args, say=lambda m: None)
