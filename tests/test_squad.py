"""SQuAD v1.1: official normalization and scoring, data preparation, generation-based evaluation."""

from __future__ import annotations

import json
import warnings
import zipfile
from types import SimpleNamespace

import pytest

from llama2.cli import main as cli_main
from llama2.data.squad import (
    PROMPT_TEMPLATE,
    build_samples,
    format_prompt,
    iter_questions,
    load_squad,
    prepare_squad,
    read_prepared,
)
from llama2.evaluation import evaluate
from llama2.metrics.squad import (
    SquadMetric,
    exact_match_score,
    f1_score,
    max_over_golds,
    normalize_answer,
    postprocess,
    score_squad,
)
from tests.conftest import data_path

DEV = "squad/dev-v1.1.json.zip"


@pytest.fixture(scope="module")
def dev():
    return load_squad(data_path(DEV))


@pytest.fixture(scope="module")
def questions(dev):
    return list(iter_questions(dev))


# ---- normalization and per-answer scores ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Cat", "cat"),  # lower + article
        ("a an the", ""),  # only articles: normalizes to nothing
        ("Theory of the Atom", "theory of atom"),  # 'the' only as a whole word
        ("anthem, A Band", "anthem band"),
        ("U.S.", "us"),  # punctuation deleted, not replaced by a space
        ("state-of-the-art", "stateoftheart"),  # '-' deleted first, so 'the' is no longer a word
        ("rock 'n' roll", "rock n roll"),
        ("  lots\tof \n space  ", "lots of space"),
        ("Café Über", "café über"),  # accents are not folded
        ("Arab–Israeli", "arab–israeli"),  # en dash is not in string.punctuation
        ("“quoted”", "“quoted”"),  # neither are curly quotes
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    "pred, gold, em, f1",
    [
        ("Denver Broncos", "denver broncos!", 1.0, 1.0),
        ("the Denver Broncos", "Denver Broncos", 1.0, 1.0),
        ("Denver", "Denver Broncos", 0.0, 2 * 1.0 * 0.5 / 1.5),
        ("Broncos Broncos", "Broncos", 0.0, 2 * 0.5 * 1.0 / 1.5),  # repeated tokens count as a multiset
        ("x b b c", "b b b d", 0.0, 2 * 0.5 * 0.5 / 1.0),  # common = {b: 2}
        ("a b b c", "b b b d", 0.0, 4 / 7),  # "a" is an article: pred tokens b b c
        ("Paris", "London", 0.0, 0.0),
        ("", "", 1.0, 0.0),  # both normalize to nothing: EM 1, F1 0 (num_same == 0)
        ("the", ".", 1.0, 0.0),
        ("cafe", "café", 0.0, 0.0),
    ],
)
def test_em_f1_table(pred: str, gold: str, em: float, f1: float) -> None:
    assert exact_match_score(pred, gold) == em
    assert f1_score(pred, gold) == pytest.approx(f1)


def test_max_over_several_golds() -> None:
    assert max_over_golds("Denver", ["Denver Broncos", "Paris", "denver"]) == (1.0, 1.0)
    em, f1 = max_over_golds("Denver Broncos team", ["Broncos", "the Denver Broncos"])
    assert em == 0.0 and f1 == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1))  # EM and F1 maxed separately
    assert max_over_golds("x", []) == (0.0, 0.0)


@pytest.mark.parametrize(
    "generated, answer",
    [(" Denver Broncos\n\n### Instruction: more", "Denver Broncos"), ("\nlate", ""), ("  Paris.  ", "Paris.")],
)
def test_postprocess(generated: str, answer: str) -> None:
    assert postprocess(generated) == answer


def test_metric_totals_count_unanswered() -> None:
    m = SquadMetric(total_ids=["a", "b", "c", "d"])
    m.update(ids=["a", "b"], predictions=["x", "y z"], answers=[["x"], ["y"]])
    out = m.compute()
    assert out == {"exact_match": 25.0, "f1": pytest.approx(100 * (1 + 2 / 3) / 4), "total": 4}
    with pytest.raises(ValueError, match="differ in length"):
        m.update(ids=["a"], predictions=[], answers=[["x"]])


# ---- the real dev set -----------------------------------------------------------------------------------------
def test_dev_set_counts(dev, questions) -> None:
    assert dev["version"] == "1.1"
    assert len(questions) == 10570
    assert len({q.id for q in questions}) == 10570
    assert sum(len(q.answers) for q in questions) == 34726


def test_gold_answers_score_100(dev, questions) -> None:
    out = score_squad(dev, {q.id: q.answers[0] for q in questions})
    assert out == {"exact_match": 100.0, "f1": 100.0}


def test_gold_that_normalizes_to_nothing(dev, questions) -> None:
    # question 57340d124776f419006617bf has "." among its golds: as a prediction it gets EM 1 but F1 0
    preds = {q.id: q.answers[0] for q in questions}
    preds["57340d124776f419006617bf"] = "."
    out = score_squad(dev, preds)
    assert out["exact_match"] == 100.0
    assert out["f1"] == pytest.approx(100.0 * 10569 / 10570)


def test_empty_and_missing_predictions(dev, questions) -> None:
    with pytest.warns(UserWarning, match="10570 unanswered"):
        assert score_squad(dev, {}) == {"exact_match": 0.0, "f1": 0.0}
    # empty answers: F1 0, but EM counts the 3 questions that have "." (normalized "") among their golds
    empty = score_squad(dev, {q.id: "" for q in questions})
    assert empty == {"exact_match": pytest.approx(100 * 3 / 10570), "f1": 0.0}
    half = {q.id: q.answers[0] for i, q in enumerate(questions) if i % 2 == 0}
    with pytest.warns(UserWarning, match="5285 unanswered"):
        out = score_squad(dev, half)
    assert out["exact_match"] == pytest.approx(50.0) and out["f1"] == pytest.approx(50.0)


def test_unknown_ids_warn_or_fail(dev, questions) -> None:
    preds = {q.id: q.answers[0] for q in questions}
    preds["not-a-question"] = "Denver"
    with pytest.warns(UserWarning, match="not in the dataset"):
        assert score_squad(dev, preds)["exact_match"] == 100.0
    with pytest.raises(ValueError, match="not in the dataset"):
        score_squad(dev, preds, strict=True)


def test_bad_inputs(tmp_path) -> None:
    (tmp_path / "bad.json").write_text('{"version": "1.1", "articles": []}')
    with pytest.raises(ValueError, match="not SQuAD JSON"):
        load_squad(tmp_path / "bad.json")
    (tmp_path / "garbage.json").write_text("{nope")
    with pytest.raises(ValueError, match="not a SQuAD JSON file"):
        load_squad(tmp_path / "garbage.json")
    bad_qa = {"version": "1.1", "data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q1", "question": "?"}]}]}]}
    (tmp_path / "bad_qa.json").write_text(json.dumps(bad_qa))
    with pytest.raises(ValueError, match=r"qas\[0\] \(id q1\)"):
        load_squad(tmp_path / "bad_qa.json")
    with pytest.raises(FileNotFoundError):
        load_squad(tmp_path / "missing.json")
    v2 = {
        "version": "2.0",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "Paris is big.",
                        "qas": [{"id": "q1", "question": "What?", "answers": [{"text": "Paris", "answer_start": 0}]}],
                    }
                ],
            }
        ],
    }
    with zipfile.ZipFile(tmp_path / "v2.zip", "w") as zf:
        zf.writestr("v2.json", json.dumps(v2))
    with pytest.warns(UserWarning, match="version is '2.0'"):
        assert score_squad(tmp_path / "v2.zip", {"q1": "paris"}) == {"exact_match": 100.0, "f1": 100.0}
    v1 = dict(v2, version="1.1")
    (tmp_path / "preds.json").write_text('["Paris"]')
    with pytest.raises(ValueError, match="JSON object"):
        score_squad(v1, tmp_path / "preds.json")
    with pytest.raises(ValueError, match="not a string"):
        score_squad(v1, {"q1": 3})


def test_score_squad_command(tmp_path, capsys, questions) -> None:
    preds = {q.id: q.answers[0] for q in questions[::2]}
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main(["score-squad", "--data", str(data_path(DEV)), "--predictions", str(tmp_path / "preds.json")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(50.0)}


# ---- preparation ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_tok():
    from llama2.data.tokenizer import Tokenizer

    return Tokenizer(data_path("tokenizer/llama2/tokenizer.model"))


def test_prepare_keeps_every_question_and_answer(tmp_path, llama_tok, questions) -> None:
    out = tmp_path / "squad.jsonl"
    report = prepare_squad(data_path(DEV), llama_tok, 2048, out, progress=False)
    assert report["questions"] == 10570 and report["answers"] == 34726
    assert report["truncated"] == 0 and report["max_prompt_tokens"] <= 2048 - 32
    samples = read_prepared(out)
    assert [s["id"] for s in samples] == [q.id for q in questions]
    s, q = samples[0], questions[0]
    assert s["answers"] == list(q.answers)
    assert s["prompt"] == PROMPT_TEMPLATE.format(context=q.context, question=q.question)
    assert s["prompt"].startswith("Read the passage and answer the question below.\n\n### Instruction:\n")
    assert s["prompt"].endswith(f"\n\n### Input:\n{q.question}\n\n### Response:")
    assert s["input_ids"] == llama_tok.encode(s["prompt"], bos=True)
    assert json.loads((tmp_path / "squad.jsonl.report.json").read_text())["questions"] == 10570


def test_prepare_truncates_context_keeps_question(dev, llama_tok, questions) -> None:
    samples, report = build_samples(dev, llama_tok, 160, answer_tokens=16, limit=60)
    assert report["questions"] == 60
    assert 0 < report["truncated"] < 60
    for s, q in zip(samples, questions, strict=False):
        assert len(s["input_ids"]) <= 144
        assert s["input_ids"] == llama_tok.encode(s["prompt"], bos=True)
        assert s["prompt"].endswith(f"### Input:\n{q.question}\n\n### Response:")
        context = s["prompt"].split("### Instruction:\n", 1)[1].split("\n\n### Input:", 1)[0]
        assert q.context.startswith(context)
        assert s["truncated"] == (context != q.context)
        if s["truncated"]:  # the longest word-boundary prefix: one more word would not fit
            longer = q.context[: len(context) + 1 + len(q.context[len(context) + 1 :].split(" ", 1)[0])]
            assert len(llama_tok.encode(PROMPT_TEMPLATE.format(context=longer, question=q.question), bos=True)) > 144
    with pytest.raises(ValueError, match="raise max_length"):
        build_samples(dev, llama_tok, 30, answer_tokens=10, limit=1)


def test_prepare_squad_command(tmp_path, capsys) -> None:
    out = tmp_path / "p.jsonl"
    tok = data_path("tokenizer/llama2/tokenizer.model")
    rc = cli_main(
        [
            "prepare",
            "squad",
            "--input",
            str(data_path(DEV)),
            "--tokenizer",
            str(tok),
            "--max-length",
            "256",
            "--output",
            str(out),
            "--limit",
            "40",
        ]
    )
    assert rc == 0
    assert len(read_prepared(out)) == 40
    assert "truncated" in capsys.readouterr().out


# ---- generation-based evaluation ----------------------------------------------------------------------------
class OracleModel:
    """Answers each prompt, in order, with the expected gold text plus junk on a new line (tests post-processing).

    Keyed by order, not by prompt: SQuAD repeats some (context, question) pairs under different ids.
    """

    def __init__(self, tokenizer, expected: list[tuple[list[int], str]], max_seq_len: int = 4096) -> None:
        self.tokenizer = tokenizer
        self.expected = list(expected)
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.batches: list[int] = []

    def generate_ids(self, prompts, *, max_new_tokens, temperature, stop, eos_id):
        assert temperature == 0.0 and stop == ["\n"] and eos_id == self.tokenizer.eos_id
        self.batches.append(len(prompts))
        out = []
        for p in prompts:
            ids, gold = self.expected.pop(0)
            assert list(p) == ids
            out.append(self.tokenizer.encode(" " + gold + "\n### more"))
        return out


def test_predictions_written_by_default(tmp_path, dev, llama_tok, monkeypatch) -> None:
    samples, _ = build_samples(dev, llama_tok, 1024, limit=3)
    model = OracleModel(llama_tok, [(s["input_ids"], s["answers"][0]) for s in samples])
    monkeypatch.chdir(tmp_path)
    out = evaluate(model, "squad", data=samples, progress=False)
    assert out == {"exact_match": 100.0, "f1": 100.0, "total": 3}
    preds = json.loads((tmp_path / "squad_predictions.json").read_text())
    assert preds == {s["id"]: s["answers"][0] for s in samples}


def test_generation_pipeline_with_oracle(tmp_path, dev, llama_tok) -> None:
    samples, _ = build_samples(dev, llama_tok, 1024, limit=30)
    model = OracleModel(llama_tok, [(s["input_ids"], s["answers"][-1]) for s in samples])
    preds_path = tmp_path / "preds.json"
    out = evaluate(
        model,
        "squad",
        data=data_path(DEV),
        limit=30,
        batch_size=4,
        max_length=1024,
        predictions_out=preds_path,
        progress=False,
    )
    assert out == {"exact_match": 100.0, "f1": 100.0, "total": 30}
    assert model.batches == [4] * 7 + [2] and not model.expected
    preds = json.loads(preds_path.read_text())
    assert list(preds) == [s["id"] for s in samples]
    assert preds[samples[0]["id"]] == samples[0]["answers"][-1]
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate(OracleModel(llama_tok, [], max_seq_len=64), "squad", data=samples, progress=False)


def _tiny_model_or_skip(tokenizer_path, backend: str):
    """A tiny random model whose matrices are scaled up so that its greedy answers depend on the prompt."""
    model_mod = pytest.importorskip("llama2.core.model")
    from llama2.core.config import ModelConfig
    from llama2.data.tokenizer import Tokenizer

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=512, max_seq_len=256)
    try:
        model = model_mod.create(cfg, backend=backend, seed=0, tokenizer=Tokenizer(tokenizer_path))
    except (RuntimeError, KeyError, ImportError) as exc:
        pytest.skip(f"{backend} backend not usable: {exc}")
    for name, value in list(model.runtime.state_dict()):
        if value.ndim == 2:
            model.runtime.set_param(name, value * 8.0)
    return model


@pytest.fixture(scope="module")
def tiny_samples(tmp_path_factory):
    from llama2.data.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("squad") / "tiny.jsonl"
    tok = Tokenizer(data_path("tokenizer/tok512-llama2c-fork/tok512.model"))
    prepare_squad(data_path(DEV), tok, 200, out, answer_tokens=8, limit=50, progress=False)
    return out


def _varied_samples(tokenizer, questions, n: int = 8) -> list[dict]:
    """Real questions from different articles with contexts cut to 3, 7, 11, ... words: prompt lengths vary widely."""
    samples = []
    for i, q in enumerate(questions[::700][:n]):
        prompt = format_prompt(" ".join(q.context.split()[: 3 + 4 * i]), q.question)
        samples.append({"id": q.id, "prompt": prompt, "input_ids": tokenizer.encode(prompt, bos=True),
                        "answers": list(q.answers)})  # fmt: skip
    return samples


def _batch_size_runs(model, data, tmp_path, limit=None) -> None:
    runs = []
    for bs in (1, 4):
        p = tmp_path / f"preds{bs}.json"
        res = evaluate(
            model, "squad", data=data, limit=limit, batch_size=bs, max_new_tokens=6, predictions_out=p, progress=False
        )
        runs.append((res, json.loads(p.read_text())))
    assert runs[0][1] == runs[1][1]
    assert runs[0][0] == runs[1][0] and runs[0][0]["total"] == 8
    assert len(set(runs[0][1].values())) > 4  # answers depend on the prompt: the comparison is not vacuous


@pytest.mark.parametrize("backend", ["torch", pytest.param("mindspore", marks=pytest.mark.slow)])
def test_tiny_model_batch_size_independent_varied_lengths(tmp_path, questions, backend) -> None:
    model = _tiny_model_or_skip(data_path("tokenizer/tok512-llama2c-fork/tok512.model"), backend)
    samples = _varied_samples(model.tokenizer, questions)
    lengths = [len(s["input_ids"]) for s in samples]
    assert max(lengths) - min(lengths) > 80  # rows of one batch get very different left padding
    _batch_size_runs(model, samples, tmp_path)


def test_tiny_model_batch_size_independent_mindspore(tmp_path, tiny_samples) -> None:
    # prepared prompts (contexts truncated to fit: lengths differ by a few tokens) keep MindSpore compilation short
    model = _tiny_model_or_skip(data_path("tokenizer/tok512-llama2c-fork/tok512.model"), "mindspore")
    _batch_size_runs(model, tiny_samples, tmp_path, limit=8)


def test_tiny_model_50_questions_write_predictions(tmp_path, tiny_samples) -> None:
    # the torch backend keeps this fast; the MindSpore generation path is covered by the batch-size tests above
    tiny = _tiny_model_or_skip(data_path("tokenizer/tok512-llama2c-fork/tok512.model"), "torch")
    p = tmp_path / "preds.json"
    res = evaluate(tiny, "squad", data=tiny_samples, batch_size=8, max_new_tokens=8, predictions_out=p, progress=False)
    preds = json.loads(p.read_text())
    assert res["total"] == 50 and len(preds) == 50
    assert all(isinstance(v, str) and "\n" not in v for v in preds.values())
    assert 0.0 <= res["exact_match"] <= 100.0 and 0.0 <= res["f1"] <= 100.0
    # the written file is an official predictions file: scoring it restricted to these 50 gives the same numbers
    dev = load_squad(data_path(DEV))
    with pytest.warns(UserWarning, match="10520 unanswered question\\(s\\) receive score 0"):
        full = score_squad(dev, preds)
    assert full["exact_match"] == pytest.approx(res["exact_match"] * 50 / 10570)
    assert full["f1"] == pytest.approx(res["f1"] * 50 / 10570)


def test_evaluate_command_passes_squad_options(tmp_path, capsys) -> None:
    """`llama2 evaluate --metric squad` on a saved checkpoint equals `llama2.evaluate` with the same options."""
    import llama2
    from llama2.core.config import ModelConfig

    model_mod = pytest.importorskip("llama2.core.model")
    tok = data_path("tokenizer/tok512-llama2c-fork/tok512.model")
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=512, max_seq_len=256)
    try:
        model = model_mod.create(cfg, backend="torch", seed=1, tokenizer=tok)
    except (RuntimeError, KeyError, ImportError) as exc:
        pytest.skip(f"torch backend not usable: {exc}")
    ckpt = model.save(tmp_path / "ckpt")
    opts = {"limit": 6, "batch_size": 4, "max_new_tokens": 5, "max_length": 200}
    api = llama2.evaluate(
        llama2.load(ckpt, backend="torch"), "squad", data=str(data_path(DEV)), predictions_out=tmp_path / "a.json",
        progress=False, **opts,
    )  # fmt: skip
    argv = ["evaluate", "--model", str(ckpt), "--metric", "squad", "--data", str(data_path(DEV)), "--backend", "torch"]
    argv += ["--limit", "6", "--batch-size", "4", "--max-new-tokens", "5", "--max-length", "200"]
    argv += ["--predictions-out", str(tmp_path / "c.json"), "--json", "--no-progress"]
    capsys.readouterr()
    assert cli_main(argv) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli == {"metric": "squad", **api} and api["total"] == 6
    preds = json.loads((tmp_path / "c.json").read_text())
    assert preds == json.loads((tmp_path / "a.json").read_text()) and len(preds) == 6
