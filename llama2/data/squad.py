"""SQuAD v1.1 reading and prompt preparation for generative evaluation.

Every question and every gold answer is kept (the seed, MindFormers `squad_data_process.py`, keeps only the first
question of each paragraph and its first answer). The prompt is the seed's template, unchanged:

    Read the passage and answer the question below.

    ### Instruction:
    {context}

    ### Input:
    {question}

    ### Response:

encoded with BOS and without EOS (the seed's eval mode). Where the prompt does not fit `max_length - answer_tokens`
tokens, the *context* is cut at a word boundary (its beginning is kept, never the part holding the answer, which
would leak the gold span) and the question is kept whole; such samples are counted in the report. The seed cut
the token sequence instead, which loses the question.

Output: JSONL, one object per question, in dataset order:
``{"id", "prompt", "input_ids", "answers": [every gold text], "truncated": bool}``.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import attrs

from llama2.core.atomic import atomic_file, write_json

__all__ = [
    "PROMPT_TEMPLATE",
    "SquadQuestion",
    "load_squad",
    "iter_questions",
    "format_prompt",
    "build_samples",
    "prepare_squad",
    "read_prepared",
    "is_prepared",
]

PROMPT_TEMPLATE = (
    "Read the passage and answer the question below.\n\n### Instruction:\n{context}\n\n### Input:\n{question}\n\n"
    "### Response:"
)


class _Encoder(Protocol):
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


@attrs.frozen
class SquadQuestion:
    """One question with its paragraph and all gold answer texts (duplicates kept, as in the file)."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]


def load_squad(path: str | os.PathLike[str], *, expect_version: str = "1.1") -> dict[str, Any]:
    """Read a SQuAD JSON file or a .zip holding one; checks the structure, warns if version != `expect_version`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SQuAD file {path} not found")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                members = [n for n in zf.namelist() if n.endswith(".json") and not n.startswith("__MACOSX")]
                if len(members) != 1:
                    raise ValueError(f"{path}: expected exactly one .json member in the zip, found {members}")
                data = json.loads(zf.read(members[0]).decode("utf-8"))
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a SQuAD JSON file ({exc})") from None
    validate_squad(data, str(path))
    version = data.get("version")
    if expect_version and version != expect_version:
        warnings.warn(
            f"{path}: dataset version is {version!r}, the evaluation rules are for SQuAD v{expect_version}",
            stacklevel=2,
        )
    return data


def validate_squad(data: Any, source: str = "dataset") -> None:
    """Raise ValueError naming the first field that does not follow the SQuAD layout."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{source}: not SQuAD JSON: expected an object with a 'data' list of articles")
    for a, article in enumerate(data["data"]):
        where = f"{source}: data[{a}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise ValueError(f"{where}: expected an article object with a 'paragraphs' list")
        for p, para in enumerate(article["paragraphs"]):
            if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                raise ValueError(f"{where}.paragraphs[{p}]: expected a 'context' string")
            if not isinstance(para.get("qas"), list):
                raise ValueError(f"{where}.paragraphs[{p}]: expected a 'qas' list")
            for q, qa in enumerate(para["qas"]):
                qwhere = f"{where}.paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("id"), str):
                    raise ValueError(f"{qwhere}: expected a question object with an 'id' string")
                if not isinstance(qa.get("question"), str) or not isinstance(qa.get("answers"), list):
                    raise ValueError(f"{qwhere} (id {qa['id']}): expected 'question' string and 'answers' list")
                for ans in qa["answers"]:
                    if not isinstance(ans, dict) or not isinstance(ans.get("text"), str):
                        raise ValueError(f"{qwhere} (id {qa['id']}): each answer needs a 'text' string")


def iter_questions(data: dict[str, Any]) -> Iterator[SquadQuestion]:
    """Every question of a loaded dataset, in file order."""
    for article in data["data"]:
        title = article.get("title", "")
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = tuple(a["text"] for a in qa["answers"])
                yield SquadQuestion(qa["id"], title, para["context"], qa["question"], answers)


def format_prompt(context: str, question: str) -> str:
    """The seed's reading-comprehension prompt."""
    return PROMPT_TEMPLATE.format(context=context, question=question)


def _fit_prompt(q: SquadQuestion, tokenizer: _Encoder, budget: int) -> tuple[str, list[int], bool]:
    """(prompt, ids with BOS, truncated): the whole context if it fits in `budget` tokens, else its longest
    word-boundary prefix that does."""
    prompt = format_prompt(q.context, q.question)
    ids = tokenizer.encode(prompt, bos=True)
    if len(ids) <= budget:
        return prompt, ids, False
    # candidate cut points: ends of words; binary search the longest prefix that fits
    cuts = [i for i in range(1, len(q.context)) if q.context[i].isspace() and not q.context[i - 1].isspace()]
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        p = format_prompt(q.context[: cuts[mid]], q.question)
        p_ids = tokenizer.encode(p, bos=True)
        if len(p_ids) <= budget:
            best, lo = (p, p_ids), mid + 1
        else:
            hi = mid - 1
    if best is None:
        p = format_prompt("", q.question)
        p_ids = tokenizer.encode(p, bos=True)
        if len(p_ids) > budget:
            raise ValueError(
                f"SQuAD question {q.id}: the template and question alone take {len(p_ids)} tokens, more than the "
                f"prompt budget of {budget} (max_length - answer_tokens); raise max_length"
            )
        best = (p, p_ids)
    return best[0], best[1], True


def build_samples(
    data: dict[str, Any],
    tokenizer: _Encoder,
    max_length: int,
    *,
    answer_tokens: int = 32,
    limit: int | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Prompt samples for every question (or the first `limit`) and a report (counts, truncations)."""
    budget = max_length - answer_tokens
    if budget < 1:
        raise ValueError(f"max_length ({max_length}) must exceed answer_tokens ({answer_tokens})")
    questions = list(iter_questions(data))
    if limit is not None:
        questions = questions[:limit]
    iterator: Any = questions
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(questions, desc="squad prompts", unit="q")
    samples = []
    truncated_ids = []
    for q in iterator:
        prompt, ids, truncated = _fit_prompt(q, tokenizer, budget)
        if truncated:
            truncated_ids.append(q.id)
        samples.append(
            {"id": q.id, "prompt": prompt, "input_ids": ids, "answers": list(q.answers), "truncated": truncated}
        )
    report = {
        "version": data.get("version"),
        "questions": len(samples),
        "answers": sum(len(s["answers"]) for s in samples),
        "truncated": len(truncated_ids),
        "truncated_ids": truncated_ids[:20],
        "max_length": max_length,
        "answer_tokens": answer_tokens,
        "max_prompt_tokens": max((len(s["input_ids"]) for s in samples), default=0),
    }
    return samples, report


def prepare_squad(
    input: str | os.PathLike[str],
    tokenizer: _Encoder | str | os.PathLike[str],
    max_length: int,
    output: str | os.PathLike[str],
    *,
    answer_tokens: int = 32,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the prompt JSONL for `input` (dev-v1.1.json or .zip); returns the report (also in `<output>.report.json`).

    `tokenizer` is a Tokenizer or the path of a SentencePiece model; prompts get `max_length - answer_tokens`
    tokens, leaving `answer_tokens` for the generated answer.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        from llama2.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(tokenizer)
    data = load_squad(input)
    samples, report = build_samples(
        data, tokenizer, max_length, answer_tokens=answer_tokens, limit=limit, progress=progress
    )
    report["input"] = str(input)
    output = Path(output)
    with atomic_file(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    write_json(output.with_name(output.name + ".report.json"), report, indent=2)
    return report


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """True for a prepared JSONL (by suffix .jsonl), False for raw SQuAD JSON / zip."""
    return str(path).endswith(".jsonl")


def read_prepared(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Samples from a prepared JSONL; each needs `id`, `prompt` and `answers` (`input_ids` optional)."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
            missing = [k for k in ("id", "prompt", "answers") if k not in s]
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {missing}; expected id, prompt, answers")
            samples.append(s)
    return samples
