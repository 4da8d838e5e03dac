"""Alpaca instruction data -> FastChat conversation records (the seed's `alpaca_converter.py`).

Each Alpaca record `{"instruction", "input", "output"}` becomes
``{"id": "<index + 1>", "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": output}]}``
where PROMPT is Stanford Alpaca's prompt, exactly as the seed (MindFormers
`tools/dataset_preprocess/llama/alpaca_converter.py`) builds it: the "with input" template when `input` is a
non-empty string, else the "no input" template. `input` may be absent (treated as ""), as in the seed.

Malformed records (not an object, `instruction`/`output` missing or not strings, `input` not a string) are never
converted silently: with `errors="report"` they are skipped and listed with their index, with `errors="raise"` the
first one raises a ValueError naming the file, the index and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama2.core.atomic import write_json

__all__ = [
    "PROMPT_INPUT",
    "PROMPT_NO_INPUT",
    "alpaca_prompt",
    "check_alpaca_record",
    "alpaca_to_conversations",
    "read_json_records",
    "convert_alpaca",
]

# Stanford Alpaca's prompts, as used by the seed's alpaca_converter.py.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the field's name in the data
    """The human turn for one record: instruction and input joined as the seed does."""
    # format_map, as the seed: the values are inserted once, so braces (even "{input}") in the data stay literal.
    if input != "":
        return PROMPT_INPUT.format_map({"instruction": instruction, "input": input})
    return PROMPT_NO_INPUT.format_map({"instruction": instruction})


def check_alpaca_record(record: Any) -> str | None:
    """Why `record` is not a usable Alpaca record, or None when it is."""
    if not isinstance(record, dict):
        return f"expected an object with 'instruction', 'input', 'output', got {type(record).__name__}"
    for key in ("instruction", "output"):
        if key not in record:
            return f"missing key {key!r} (has {sorted(record)})"
        if not isinstance(record[key], str):
            return f"{key!r} must be a string, got {type(record[key]).__name__}"
    if "input" in record and not isinstance(record["input"], str):
        return f"'input' must be a string, got {type(record['input']).__name__}"
    if not record["instruction"].strip():
        return "'instruction' is empty"
    return None


def alpaca_to_conversations(
    records: Sequence[Any], *, errors: str = "report", source: str = "alpaca data"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(conversation records, problems) for a list of Alpaca records.

    problems: `{"index": i, "reason": ...}` for each skipped record (0-based index in `records`). Conversation ids
    are the 1-based record positions, as in the seed, so they stay traceable when records are skipped.
    """
    if errors not in ("report", "raise"):
        raise ValueError(f"errors must be 'report' or 'raise', got {errors!r}")
    out: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        why = check_alpaca_record(rec)
        if why is not None:
            if errors == "raise":
                raise ValueError(f"{source}: record {i}: {why}")
            problems.append({"index": i, "reason": why})
            continue
        out.append(
            {
                "id": str(i + 1),
                "conversations": [
                    {"from": "human", "value": alpaca_prompt(rec["instruction"], rec.get("input", ""))},
                    {"from": "gpt", "value": rec["output"]},
                ],
            }
        )
    return out, problems


def read_json_records(path: str | os.PathLike[str]) -> list[Any]:
    """The records of a JSON array file, or of a JSON Lines file (one object per line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} not found")
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{p}: line {n} is not valid JSON ({exc}); expected a JSON array of records or JSON Lines"
            ) from None
    if not records:
        raise ValueError(f"{p}: holds no records")
    return records


def convert_alpaca(
    input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], *, errors: str = "report"
) -> dict[str, Any]:
    """Convert an Alpaca JSON file to FastChat conversations at `output_path`; returns a report dict."""
    records = read_json_records(input_path)
    if not isinstance(records, list):
        raise ValueError(f"{input_path}: expected a JSON array of Alpaca records, got {type(records).__name__}")
    convs, problems = alpaca_to_conversations(records, errors=errors, source=str(input_path))
    if not convs:
        raise ValueError(f"{input_path}: no usable Alpaca record among {len(records)} ({problems[:3]} ...)")
    write_json(output_path, convs, indent=2)
    return {
        "input": str(input_path),
        "output": str(output_path),
        "records": len(records),
        "conversations": len(convs),
        "with_input": sum(
            1 for c in convs if c["conversations"][0]["value"].startswith(PROMPT_INPUT.split("{instruction}")[0])
        ),
        "skipped": problems,
    }
