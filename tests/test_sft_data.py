"""SFT data: Alpaca -> conversations (the seed's converter), fastchat rendering, loss masks, records, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama2.core.backend import IGNORE_INDEX
from llama2.core.trainer import TrainData
from llama2.data.alpaca import PROMPT_INPUT, PROMPT_NO_INPUT, alpaca_to_conversations, convert_alpaca
from llama2.data.sft import (
    build_sft_samples,
    load_conversations,
    parse_conversation,
    prepare_sft,
    read_sft,
    render_segments,
    tokenize_conversation,
)
from tests.conftest import data_path

LONG_SYSTEM = " ".join(["You are a careful assistant who answers briefly and never invents facts."] * 12)


@pytest.fixture(scope="module")
def tok():
    from llama2.data.tokenizer import Tokenizer

    return Tokenizer(data_path("tokenizer/llama2/tokenizer.model"))


def supervised_spans(labels: list[int] | np.ndarray) -> list[list[int]]:
    """Maximal runs of supervised labels."""
    spans: list[list[int]] = []
    prev = False
    for x in labels:
        on = int(x) != IGNORE_INDEX
        if on and not prev:
            spans.append([])
        if on:
            spans[-1].append(int(x))
        prev = on
    return spans


def fastchat_prompt(texts: list[str | None], system: str | None) -> str:
    """FastChat's own rendering (a final None leaves the assistant turn open: "... ASSISTANT:")."""
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    if system is not None:
        conv.set_system_message(system)
    for j, t in enumerate(texts):
        conv.append_message(conv.roles[j % 2], t)
    return conv.get_prompt()


def sentencepiece_ids(prompt: str, model_file) -> list[int]:
    """The oracle: BOS, then each piece of the rendered text between `</s>` markers encoded by SentencePiece
    itself (dummy prefix and all, as Meta's reference tokenizer encodes text around special tokens), joined by 2."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ids = [1]
    for k, chunk in enumerate(prompt.split("</s>")):
        ids += ([2] if k else []) + (sp.encode(chunk) if chunk else [])
    return ids


# ---- alpaca conversion ------------------------------------------------------------------------------------------
def test_alpaca_prompts_join_instruction_and_input_as_the_seed():
    convs, problems = alpaca_to_conversations(
        [
            {"instruction": "Add {x}.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi", "input": "", "output": "Hello there"},
            {"instruction": "No input key", "output": "ok"},
        ]
    )
    assert problems == []
    assert [c["id"] for c in convs] == ["1", "2", "3"]
    human = [c["conversations"][0] for c in convs]
    assert all(h["from"] == "human" for h in human)
    assert human[0]["value"] == PROMPT_INPUT.format_map({"instruction": "Add {x}.", "input": "2 and 3"})
    assert human[1]["value"] == PROMPT_NO_INPUT.format_map({"instruction": "Say hi"})
    assert "### Input:" not in human[2]["value"]
    assert convs[1]["conversations"][1] == {"from": "gpt", "value": "Hello there"}


# The seed's templates (MindFormers tools/dataset_preprocess/llama/alpaca_converter.py, from Stanford Alpaca's
# train.py), written out here as the oracle, and its rule: format_map(record) with the "input" template when
# record.get("input", "") != "".
SEED_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
SEED_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def seed_convert(records: list[dict]) -> list[dict]:
    out = []
    for cnt, ex in enumerate(records, 1):
        prompt = (SEED_PROMPT_INPUT if ex.get("input", "") != "" else SEED_PROMPT_NO_INPUT).format_map(ex)
        out.append(
            {
                "id": str(cnt),
                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ex["output"]}],
            }
        )
    return out


def test_real_alpaca_converts_exactly_as_the_seed(tmp_path):
    src = data_path("alpaca/alpaca_data_200.json")
    records = json.loads(src.read_text(encoding="utf-8"))
    report = convert_alpaca(src, tmp_path / "conv.json")
    got = json.loads((tmp_path / "conv.json").read_text(encoding="utf-8"))
    assert got == seed_convert(records)
    assert report["conversations"] == 200 and report["with_input"] == 118 and report["skipped"] == []
    # braces in the data stay literal, even a placeholder name
    rec = {"instruction": "Fill {input} in {x}", "input": "a {instruction}", "output": "ok"}
    (conv,), _ = alpaca_to_conversations([rec])
    assert conv == seed_convert([rec])[0]
    assert "Fill {input} in {x}\n\n### Input:\na {instruction}\n" in conv["conversations"][0]["value"]


def test_malformed_alpaca_records_are_reported_with_their_index(tmp_path):
    records = [
        {"instruction": "ok", "input": "", "output": "fine"},
        {"input": "", "output": "no instruction"},
        {"instruction": "no output", "input": ""},
        {"instruction": 3, "input": "", "output": "x"},
        {"instruction": "bad input", "input": ["a"], "output": "x"},
        "not an object",
        {"instruction": "ok too", "output": "fine"},
    ]
    convs, problems = alpaca_to_conversations(records)
    assert [c["id"] for c in convs] == ["1", "7"]
    by_index = {p["index"]: p["reason"] for p in problems}
    assert sorted(by_index) == [1, 2, 3, 4, 5]
    assert "instruction" in by_index[1] and "output" in by_index[2]
    assert "'instruction' must be a string" in by_index[3] and "'input'" in by_index[4]
    with pytest.raises(ValueError, match=r"bad\.json: record 1: missing key 'instruction'"):
        alpaca_to_conversations(records, errors="raise", source="bad.json")

    src = tmp_path / "bad.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    report = convert_alpaca(src, tmp_path / "conv.json")
    assert report["conversations"] == 2 and [p["index"] for p in report["skipped"]] == [1, 2, 3, 4, 5]
    # the same records go through `prepare sft` directly, reported there too
    from llama2.cli import main

    assert main(["prepare", "alpaca", "--input", str(src), "--output", str(tmp_path / "c.json"), "--strict"]) == 2
    assert not (tmp_path / "c.json").exists()
    assert main(["prepare", "alpaca", "--input", str(src), "--output", str(tmp_path / "c.json")]) == 0
    saved = json.loads((tmp_path / "c.json.report.json").read_text(encoding="utf-8"))
    assert [p["index"] for p in saved["skipped"]] == [1, 2, 3, 4, 5] and saved["conversations"] == 2


def test_not_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[{'instruction': 1}]", encoding="utf-8")
    with pytest.raises(ValueError, match="x.json: not valid JSON"):
        convert_alpaca(bad, tmp_path / "out.json")


# ---- masks ------------------------------------------------------------------------------------------------------
def test_say_hi_supervises_the_reply_and_one_terminator(tok):
    convs, _ = alpaca_to_conversations([{"instruction": "Say hi", "input": "", "output": "Hello there"}])
    cols, report = build_sft_samples(convs, tok, 160)
    assert report.samples == 1 and report.truncated == 0
    ids, labels = cols["input_ids"][0], cols["labels"][0]
    sup = labels[labels != IGNORE_INDEX]
    assert tok.decode(sup) == "Hello there"
    assert sup[-1] == 2 and int((sup == 2).sum()) == 1
    assert supervised_spans(labels) == [sup.tolist()]  # one contiguous span
    assert np.array_equal(ids[labels != IGNORE_INDEX], sup)  # labels aligned with the ids
    assert ids[0] == tok.bos_id and labels[0] == IGNORE_INDEX
    # the ids are the rendered fastchat prompt as SentencePiece tokenizes it, then padding
    want = sentencepiece_ids(fastchat_prompt([convs[0]["conversations"][0]["value"], "Hello there"], None), tok.path)
    assert ids[: len(want)].tolist() == want and (ids[len(want) :] == 0).all()
    assert int((ids == 2).sum()) == 1  # padding is 0, never the terminator


@pytest.mark.parametrize("system", ["", LONG_SYSTEM, None])
def test_two_turns_supervise_exactly_both_replies(tok, system):
    texts = ["What is 2+2?", "It is 4.", "And 3+3?", "6, of course."]
    ids, labels = tokenize_conversation(tok, texts, system)
    spans = supervised_spans(labels)
    assert [tok.decode(s) for s in spans] == ["It is 4.", "6, of course."]
    assert all(s[-1] == 2 and s.count(2) == 1 for s in spans)
    # everything unsupervised decodes to the rendered prompt minus the replies
    prompt = fastchat_prompt(texts, system)
    masked = [i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX]
    assert "It is 4" not in tok.decode(masked) and "USER: And 3+3?" in tok.decode(masked)
    assert ids == sentencepiece_ids(prompt, tok.path)
    # the supervised positions are exactly the replies' tokens: from the end of the rendering up to "ASSISTANT:"
    # to the end of the rendering up to the reply's "</s>" (lengths from the SentencePiece oracle)
    want = [IGNORE_INDEX] * len(ids)
    for k in (1, 3):
        start = len(sentencepiece_ids(fastchat_prompt(texts[:k] + [None], system), tok.path))
        stop = len(sentencepiece_ids(fastchat_prompt(texts[: k + 1], system), tok.path))
        want[start:stop] = ids[start:stop]
        assert ids[stop - 1] == 2
    assert labels == want
    if system == LONG_SYSTEM:
        assert len(ids) > 150


def test_segments_reassemble_the_fastchat_rendering():
    texts = ["q1", "a1", "q2", "a2"]
    for system in ("", "sys", None):
        segs = render_segments(texts, system)
        assert "".join(s.text for s in segs) == fastchat_prompt(texts, system)
        assert [s.text for s in segs if s.supervised] == [" a1</s>", " a2</s>"]


def test_ids_match_sentencepiece_on_real_conversations(tok):
    records = json.loads(data_path("fastchat/dummy_conversation.json").read_text(encoding="utf-8"))[:60]
    alpaca, _ = load_conversations(data_path("alpaca/alpaca_data_200.json"))
    for rec in records + alpaca:
        system, texts = parse_conversation(rec)
        assert not any("</s>" in t for t in texts)  # else the oracle's split would not apply
        ids, labels = tokenize_conversation(tok, texts, system)
        assert ids == sentencepiece_ids(fastchat_prompt(texts, system), tok.path), rec.get("id")
        spans = supervised_spans(labels)
        assert [tok.decode(s) for s in spans] == [t.strip() for t in texts[1::2]]


def test_ids_match_transformers_llama_tokenizer_on_fastchat_conversations(tok, tmp_path):
    """A second peer. transformers 5's LlamaTokenizer is a `tokenizers` BPE converted from the model and splits
    whitespace runs after a newline differently from SentencePiece ("\n  x": ▁▁ x vs ▁ ▁x; 8 of the 200 Alpaca
    records, code samples), so the authority above is SentencePiece; on FastChat's sample the two agree."""
    transformers = pytest.importorskip("transformers")
    import shutil

    shutil.copyfile(tok.path, tmp_path / "tokenizer.model")
    hf = transformers.LlamaTokenizer.from_pretrained(tmp_path, legacy=True)
    records = json.loads(data_path("fastchat/dummy_conversation.json").read_text(encoding="utf-8"))[:60]
    for rec in records:
        system, texts = parse_conversation(rec)
        ids, _ = tokenize_conversation(tok, texts, system)
        assert ids == [1] + hf(fastchat_prompt(texts, system), add_special_tokens=False).input_ids


def test_special_strings_inside_messages_stay_text(tok):
    ids, labels = tokenize_conversation(tok, ["Print </s> please", "Here: </s> <s> done"])
    assert ids.count(2) == 1 and ids.count(1) == 1
    (span,) = supervised_spans(labels)
    assert tok.decode(span) == "Here: </s> <s> done"


def test_stub_model_that_predicts_every_next_token_gets_loss_zero(tok):
    """Labels are shifted exactly once: by the trainer (ids[:-1] against labels[1:]), never in the data."""
    records, _ = load_conversations(data_path("alpaca/alpaca_data_200.json"))
    cols, _ = build_sft_samples(records[:12], tok, 256)
    data = TrainData.from_any(cols)
    full = {tuple(r[:-1].tolist()): r for r in cols["input_ids"]}
    ids, labels = data.batch(np.arange(data.n_samples))

    def stub_logits(batch_ids: np.ndarray) -> np.ndarray:
        """Probability 1 (up to float rounding) on the true next token of each sample."""
        nxt = np.stack([full[tuple(r.tolist())][1:] for r in batch_ids])
        logits = np.full(batch_ids.shape + (tok.vocab_size,), -1e4, np.float32)
        np.put_along_axis(logits, nxt[..., None].astype(np.int64), 0.0, axis=-1)
        return logits

    def nll(logits: np.ndarray, labels: np.ndarray) -> float:
        mask = labels != IGNORE_INDEX
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = np.take_along_axis(logits, np.where(mask, labels, 0)[..., None].astype(np.int64), -1)[..., 0]
        return float(((lse - picked) * mask).sum() / mask.sum())

    logits = stub_logits(ids)
    assert nll(logits, labels) == pytest.approx(0.0, abs=1e-6)
    # shifting once more (the classic off-by-one) is caught: the loss is huge
    assert nll(logits[:, :-1], labels[:, 1:]) > 100
    # the same through the loss the torch backend trains with (token_nll and the train step share it)
    torch = pytest.importorskip("torch")
    from llama2.backends.torch.runtime import _nll

    per_token = _nll(torch.from_numpy(logits), torch.from_numpy(labels.astype(np.int64))).numpy()
    assert float(per_token.sum()) == pytest.approx(0.0, abs=1e-3) and (labels != IGNORE_INDEX).sum() > 500


def test_labels_do_not_depend_on_the_pad_id(tok):
    convs, _ = alpaca_to_conversations([{"instruction": "Say hi", "output": "Hello there"}] * 2)
    a, _ = build_sft_samples(convs, tok, 200, pad_id=0)
    b, _ = build_sft_samples(convs, tok, 200, pad_id=2)
    assert np.array_equal(a["labels"], b["labels"])
    real = a["input_ids"] != 0
    assert np.array_equal(a["input_ids"][real], b["input_ids"][real])
    assert (b["input_ids"][~real] == 2).all() and (a["labels"][~real] == IGNORE_INDEX).all()
    assert a["input_ids"].min() >= 0 and b["input_ids"].min() >= 0


def test_too_long_samples_are_truncated_or_dropped_and_reported(tok):
    convs, _ = alpaca_to_conversations(
        [
            {"instruction": "Say hi", "output": "Hello there"},
            {"instruction": "Write a lot", "output": "word " * 300},
            {"instruction": "Long question " * 200, "output": "short"},
        ]
    )
    cols, rep = build_sft_samples(convs, tok, 128)
    assert rep.records == 3 and rep.samples == 2 and rep.truncated == 1 and rep.dropped_too_long == 1
    assert {t["index"]: t["action"] for t in rep.too_long} == {1: "truncated", 2: "dropped: no reply left"}
    assert cols["input_ids"].shape == (2, 129)
    assert ((cols["labels"][:, 1:] != IGNORE_INDEX).sum(1) > 0).all()
    cols, rep = build_sft_samples(convs, tok, 128, overflow="drop")
    assert rep.samples == 1 and rep.dropped_too_long == 2 and rep.truncated == 0


def test_unusable_conversations_are_reported(tok):
    records = [
        {
            "conversations": [
                {"from": "gpt", "value": "lead"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"conversations": [{"from": "robot", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
        {"id": "x", "conversations": "nope"},
    ]
    cols, rep = build_sft_samples(records, tok, 64)
    assert rep.samples == 1  # the leading gpt turn is dropped, as in the seed
    assert [s["index"] for s in rep.skipped] == [1, 2, 3, 4, 5]
    assert "alternate" in rep.skipped[0]["reason"] and "robot" in rep.skipped[2]["reason"]
    assert rep.skipped[4]["id"] == "x"


def test_real_alpaca_every_sample_is_supervised_or_reported(tok, tmp_path):
    src = data_path("alpaca/alpaca_data_200.json")
    n_records = len(json.loads(src.read_text(encoding="utf-8")))
    out = tmp_path / "sft.npz"
    rep = prepare_sft(src, tok, 128, out, progress=False)
    cols = read_sft(out)
    assert cols["input_ids"].shape == (rep.samples, 129) and cols["input_ids"].dtype == np.int32
    n_sup = (cols["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert (n_sup > 0).all()
    assert rep.samples + rep.dropped_too_long + len(rep.skipped) == n_records
    assert cols["input_ids"].min() >= 0 and cols["input_ids"].max() < tok.vocab_size  # no -1 (nor any id < 0)
    assert set(np.unique(cols["labels"])) <= set(np.unique(cols["input_ids"])) | {IGNORE_INDEX}
    assert rep.dropped_too_long > 0  # at 128 tokens some prompts do not fit: they are reported, not kept empty
    assert int(n_sup.sum()) == rep.supervised_tokens
    # each kept sample ends its reply with exactly one terminator unless it was truncated
    truncated = {t["index"] for t in rep.too_long if t["action"] == "truncated"}
    assert int(((cols["labels"] == 2).sum(1) == 1).sum()) == rep.samples - len(truncated)
    saved = json.loads((tmp_path / "sft.npz.report.json").read_text(encoding="utf-8"))
    assert saved["samples"] == rep.samples and saved["records"] == n_records
    with pytest.raises(ValueError, match="cannot tell the record format"):
        prepare_sft(src, tok, 128, tmp_path / "sft.bin", progress=False)


def test_cli_alpaca_then_sft_mindrecord(tok, tmp_path):
    from llama2.cli import main

    src = tmp_path / "alpaca.json"
    records = json.loads(data_path("alpaca/alpaca_data_200.json").read_text(encoding="utf-8"))[:16]
    src.write_text(json.dumps(records), encoding="utf-8")
    conv = tmp_path / "conv.json"
    assert main(["prepare", "alpaca", "--input", str(src), "--output", str(conv)]) == 0
    assert len(json.loads(conv.read_text(encoding="utf-8"))) == 16
    out = tmp_path / "sft.mindrecord"
    args = ["prepare", "sft", "--input", str(conv), "--tokenizer", str(tok.path), "--seq-length", "256"]
    assert main(args + ["--output", str(out), "--no-progress"]) == 0
    direct, _ = build_sft_samples(json.loads(conv.read_text(encoding="utf-8")), tok, 256)
    cols = read_sft(out)
    assert np.array_equal(cols["input_ids"], direct["input_ids"]) and np.array_equal(cols["labels"], direct["labels"])
    # the seed's reader sees the same rows (MindSpore's MindDataset), with the int32 columns of its qa mode
    import mindspore.dataset as ds

    rows = list(
        ds.MindDataset(str(out), columns_list=["input_ids", "labels"], shuffle=False).create_tuple_iterator(
            output_numpy=True
        )
    )
    assert len(rows) == 16 and all(r[0].dtype == np.int32 for r in rows)
    assert np.array_equal(np.stack([r[1] for r in rows]), direct["labels"])
    # npy: one structured array, fields input_ids and labels
    npy = tmp_path / "sft.npy"
    assert main(args + ["--output", str(npy), "--no-progress"]) == 0
    table = np.load(npy, allow_pickle=False)
    assert table.dtype.names == ("input_ids", "labels") and table.shape == (16,)
    assert np.array_equal(table["input_ids"], direct["input_ids"]) and np.array_equal(table["labels"], direct["labels"])
    assert all(np.array_equal(read_sft(npy)[c], direct[c]) for c in ("input_ids", "labels"))
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary file


def test_prepare_alpaca_can_tokenize_in_one_step(tok, tmp_path):
    from llama2.cli import main

    src = tmp_path / "alpaca.json"
    records = json.loads(data_path("alpaca/alpaca_data_200.json").read_text(encoding="utf-8"))[:8]
    src.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "sft.npz"
    args = ["prepare", "alpaca", "--input", str(src), "--tokenizer", str(tok.path), "--seq-length", "256"]
    assert main(args + ["--output", str(out), "--no-progress"]) == 0
    convs, _ = alpaca_to_conversations(records)
    direct, _ = build_sft_samples(convs, tok, 256)
    cols = read_sft(out)
    assert np.array_equal(cols["input_ids"], direct["input_ids"]) and np.array_equal(cols["labels"], direct["labels"])


# ---- templates whose turn terminator is more than the EOS (llama-2: " </s><s>") ----------------------------------
def special_aware_sentencepiece_ids(prompt: str, model_file) -> list[int]:
    """The oracle for any template: BOS, then the rendered text cut at `<s>` / `</s>`, each chunk encoded by
    SentencePiece itself and each marker as its id (Meta's rule for text around special tokens)."""
    import re

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ids = [1]
    for chunk in re.split(r"(</s>|<s>)", prompt):
        if chunk in ("<s>", "</s>"):
            ids.append(sp.piece_to_id(chunk))
        elif chunk:
            ids += sp.encode(chunk)
    return ids


@pytest.mark.parametrize("template", ["vicuna_v1.1", "llama-2", "vigogne_chat_v2"])
def test_terminator_with_special_pieces_keeps_every_bos(tok, template):
    """ids == SentencePiece on the rendered prompt (llama-2 keeps the BOS that opens each later turn); each reply
    is supervised up to and including its EOS, and a BOS is never supervised."""
    records = json.loads(data_path("fastchat/dummy_conversation.json").read_text(encoding="utf-8"))[:20]
    convs = [parse_conversation(r) for r in records] + [(None, ["Hi", "Hello there", "How are you?", "Fine"])]
    for system, texts in convs:
        ids, labels = tokenize_conversation(tok, texts, system, template)
        rendered = "".join(s.text for s in render_segments(texts, system, template))
        ref = special_aware_sentencepiece_ids(rendered, tok.path)
        assert ids == ref
        n_replies = len(texts) // 2
        assert ids.count(tok.eos_id) == n_replies
        assert ids.count(tok.bos_id) == 1 + (n_replies if template == "llama-2" else 0)
        assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == tok.bos_id)
        spans = supervised_spans(labels)
        assert len(spans) == n_replies and all(s[-1] == tok.eos_id for s in spans)
        assert [tok.decode(s[:-1]).strip() for s in spans] == [t.strip() for t in texts[1::2]]


def test_template_without_eos_terminator_is_refused(tok):
    with pytest.raises(ValueError, match="falcon.*does not contain the tokenizer's EOS"):
        tokenize_conversation(tok, ["Hi", "Hello"], None, "falcon")
    rec = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    _, report = build_sft_samples([rec], tok, 8, template="falcon")
    assert report.samples == 0 and "EOS" in report.skipped[0]["reason"]
