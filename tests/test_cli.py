"""The `llama2` command line as a new user meets it: run folders, tokenizer paths, one-line errors and warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama2.cli import main
from tests.conftest import REPO, data_path

TOK512 = "tokenizer/tok512-llama2c-fork/tok512.model"


def _tiny_config(vocab_size: int = 512):
    from llama2.core.config import ModelConfig

    sizes = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=32)
    return ModelConfig(vocab_size=vocab_size, **sizes)


@pytest.fixture
def bare_model(tmp_path) -> Path:
    """A tiny random HF checkpoint (vocab 512) with no tokenizer.model beside it."""
    from llama2.core.model import create

    out = tmp_path / "bare"
    create(_tiny_config(), backend="torch", seed=1).save(out)
    assert not (out / "tokenizer.model").exists()
    return out


@pytest.fixture
def run_dir(tmp_path) -> tuple[Path, dict[int, dict[str, np.ndarray]]]:
    """A training run folder with checkpoints at steps 2 and 5 (different weights), tok512 stored with them."""
    from llama2.core.model import create
    from llama2.core.run_dir import save_checkpoint

    tok = data_path(TOK512)
    run = tmp_path / "run"
    weights = {}
    for step, seed in ((2, 1), (5, 2)):
        model = create(_tiny_config(), backend="torch", seed=seed)
        weights[step] = dict(model.runtime.state_dict())
        save_checkpoint(run, step, config=model.config, tensors=weights[step].items(), tokenizer_file=tok)
    return run, weights


# ---- 1. `llama2 info` on a training run folder ----------------------------------------------------------------
def test_info_accepts_run_dir_and_names_the_step(run_dir, capsys):
    run, weights = run_dir
    assert main(["info", "--model", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["run_dir"] == str(run) and info["step"] == 5
    assert Path(info["path"]).resolve().parent == (run / "checkpoints").resolve()
    assert info["format"] == "hf" and info["tokenizer"] is not None
    assert info["num_parameters"] == sum(a.size for a in weights[5].values())
    assert main(["info", "--model", str(run)]) == 0
    assert "newest intact checkpoint: step 5" in capsys.readouterr().out


# ---- 2. a tokenizer given as a path string -------------------------------------------------------------------
def test_load_with_tokenizer_path_string(bare_model):
    import sentencepiece as spm

    import llama2
    from llama2.data.tokenizer import Tokenizer

    tok = data_path(TOK512)
    ref = spm.SentencePieceProcessor(model_file=str(tok))
    for given in (str(tok), tok):  # str and PathLike
        model = llama2.load(str(bare_model), backend="torch", tokenizer=given)
        assert isinstance(model.tokenizer, Tokenizer)
        assert model.tokenizer.vocab_size == ref.vocab_size() == 512
        assert model.tokenizer.encode("Once upon a time", bos=False) == ref.encode("Once upon a time")
        assert isinstance(model.generate("Once upon", max_new_tokens=3)[0], str)


def test_cli_generate_with_tokenizer_flag(bare_model, capsys):
    tok = data_path(TOK512)
    argv = ["generate", "--model", str(bare_model), "--backend", "torch", "--tokenizer", str(tok)]
    assert main([*argv, "--prompt", "Once upon", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["prompt"] == "Once upon" and isinstance(out[0]["completion"], str)


# ---- 3 & 4. user errors: one line, exit status 2, no traceback -----------------------------------------------
def _rows(tmp_path: Path) -> Path:
    np.save(tmp_path / "rows.npy", np.random.default_rng(0).integers(3, 512, size=(2, 17)).astype(np.int32))
    return tmp_path / "rows.npy"


def _one_line_error(capsys, command: str, *expected: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    first = err.splitlines()[0]
    assert first.startswith(f"llama2 {command}: error: "), err
    for text in expected:
        assert text in first, err
    return err


def test_user_errors_exit_2_with_one_line(bare_model, tmp_path, capsys):
    rows = _rows(tmp_path)
    ev = ["evaluate", "--model", str(bare_model), "--backend", "torch", "--data", str(rows)]
    assert main([*ev, "--metric", "perplexity", "--limit", "20"]) == 2  # TypeError from the metric's option check
    _one_line_error(capsys, "evaluate", "limit")
    assert main([*ev, "--metric", "no_such_metric"]) == 2  # KeyError from the registry, shown without quotes
    err = _one_line_error(capsys, "evaluate", "no_such_metric", "perplexity")
    assert not err.splitlines()[0].endswith("'")
    assert main(["evaluate", "--model", str(bare_model), "--backend", "torch", "--device", "ascend",
                 "--data", str(rows)]) == 2  # fmt: skip
    _one_line_error(capsys, "evaluate", "ascend")
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys, "info", str(tmp_path / "missing"))
    assert main(["convert", "--input", str(bare_model), "--output", str(bare_model)]) == 2  # FileExistsError
    _one_line_error(capsys, "convert", "exists")
    assert main(["prepare", "wiki", "--input", str(tmp_path / "none.txt"), "--tokenizer", str(data_path(TOK512)),
                 "--seq-length", "8", "--output", str(tmp_path / "w.npy")]) == 2  # fmt: skip
    _one_line_error(capsys, "prepare wiki", "none.txt")


def test_missing_tokenizer_message_names_flag_and_keyword(bare_model, capsys):
    import llama2

    argv = ["generate", "--model", str(bare_model), "--backend", "torch", "--prompt", "Hi", "--max-new-tokens", "2"]
    assert main(argv) == 2
    _one_line_error(capsys, "generate", "--tokenizer PATH", "tokenizer=PATH")
    with pytest.raises(ValueError, match=r"--tokenizer PATH.*tokenizer=PATH to llama2\.load"):
        llama2.load(bare_model, backend="torch").generate("Hi", max_new_tokens=2)


def test_debug_shows_the_exception_and_interrupts_pass(tmp_path, monkeypatch):
    import llama2.commands.info as info

    missing = ["info", "--model", str(tmp_path / "missing")]
    with pytest.raises(FileNotFoundError):
        main(["--debug", *missing])
    with pytest.raises(FileNotFoundError):
        main([*missing, "--debug"])
    monkeypatch.setenv("LLAMA2_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(missing)
    monkeypatch.delenv("LLAMA2_DEBUG")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(missing)


def test_cli_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LLAMA2_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "llama2", "info", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"llama2 info: error: no checkpoint at {tmp_path / 'missing'}"


# ---- 5. warnings print as one clean line ---------------------------------------------------------------------
def test_score_squad_warning_is_one_line(tmp_path, capsys):
    context = "Denver Broncos won Super Bowl 50."
    data = {
        "version": "1.1",
        "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
            {"id": "q1", "question": "Who won?", "answers": [{"text": "Denver Broncos", "answer_start": 0}]},
            {"id": "q2", "question": "Which game?", "answers": [{"text": "Super Bowl 50", "answer_start": 19}]},
        ]}]}],
    }  # fmt: skip
    (tmp_path / "dev.json").write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / "preds.json").write_text(json.dumps({"q1": "the Denver Broncos"}), encoding="utf-8")
    argv = ["score-squad", "--data", str(tmp_path / "dev.json"), "--predictions", str(tmp_path / "preds.json")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    # official rules: articles dropped, so q1 is an exact match; the unanswered q2 scores 0
    assert json.loads(captured.out) == {"exact_match": 50.0, "f1": 50.0}
    assert captured.err.splitlines() == ["llama2 score-squad: warning: 1 unanswered question(s) receive score 0"]


# ---- 6. the closing summary only on rank 0 -------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1])
def test_training_summary_on_rank_0_only(tmp_path, monkeypatch, capsys, rank):
    import llama2.api
    import llama2.pretraining

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    calls = []
    monkeypatch.setattr(llama2.pretraining, "pretrain", lambda *a, **k: calls.append("pretrain"))
    monkeypatch.setattr(llama2.api, "finetune", lambda *a, **k: calls.append("finetune"))
    out = str(tmp_path / "out")
    assert main(["pretrain", "--preset", "tiny", "--data", "rows.npy", "--out", out]) == 0
    assert main(["finetune", "--model", "m", "--method", "full", "--data", "sft.npy", "--out", out]) == 0
    assert calls == ["pretrain", "finetune"]
    printed = capsys.readouterr().out
    if rank == 0:
        assert f"checkpoints and metrics.jsonl in {out}" in printed and "finetuned (full)" in printed
    else:
        assert printed == ""


# ---- 7. a YAML tokenizer path that does not exist yields to the tokenizer beside --model ---------------------
def _finetune_kwargs(argv: list[str]) -> dict:
    from llama2.cli import build_parser
    from llama2.commands.finetune import build_kwargs

    return build_kwargs(build_parser().parse_args(["finetune", *argv]))[1]


def test_finetune_yaml_tokenizer_yields_to_model_tokenizer(run_dir, bare_model, tmp_path, monkeypatch, capsys):
    run, _ = run_dir
    monkeypatch.chdir(tmp_path)  # the packaged config's `tokenizer: tokenizer.model` is relative to here
    base = ["--config", "lora_llama2_7b", "--data", "sft.npy", "--out", "o"]
    assert not (tmp_path / "tokenizer.model").exists()
    kwargs = _finetune_kwargs([*base, "--model", str(run)])
    assert "tokenizer" not in kwargs  # llama2.load then takes the one stored with the checkpoint
    err = capsys.readouterr().err
    assert "'tokenizer.model' not found" in err and "tokenizer.model beside the model" in err
    tok = data_path(TOK512)
    assert _finetune_kwargs([*base, "--model", str(run), "--tokenizer", str(tok)])["tokenizer"] == str(tok)
    # a model without a tokenizer keeps the YAML path, so loading names the missing file
    assert _finetune_kwargs([*base, "--model", str(bare_model)])["tokenizer"] == "tokenizer.model"
    # an existing YAML path is used as given
    (tmp_path / "tokenizer.model").write_bytes(tok.read_bytes())
    assert _finetune_kwargs([*base, "--model", str(run)])["tokenizer"] == "tokenizer.model"


# ---- 8. GGUF -> HF: the embedded vocabulary is not written as tokenizer.model --------------------------------
def test_convert_gguf_notes_the_tokenizer(tmp_path, capsys):
    gguf = data_path("checkpoints/llama-2-tiny-random-gguf/llama-2-tiny-random.gguf")
    tok = data_path("tokenizer/llama2/tokenizer.model")
    assert main(["convert", "--input", str(gguf), "--output", str(tmp_path / "hf")]) == 0
    assert "not written as tokenizer.model" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    argv = ["convert", "--input", str(gguf), "--output", str(tmp_path / "hf2"), "--tokenizer", str(tok)]
    assert main(argv) == 0
    assert "note:" not in capsys.readouterr().err
    assert (tmp_path / "hf2" / "tokenizer.model").read_bytes() == tok.read_bytes()
