"""Instruction data: files in the layouts people have -> conversations -> token ids with loss masks.

Files are .json (a list of records) or .jsonl (one record per line), optionally gzipped. A record is one of:

- alpaca / BELLE: {"instruction", "input"?, "output", "system"?, "history"?: [[instruction, reply], ...]}; the
  key names are configurable (e.g. BELLE's eval set: instruction_field=question, output_field=std_answer); the
  input, when present, follows the instruction after a blank line;
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?};
- OpenAI: {"messages": [{"role": "system"|"user"|"assistant", "content"}]}.

Every record becomes a list of {"role", "content"} messages (optional system, then user/assistant alternating,
ending with an assistant reply), then a sample: token ids and labels (the id where the token is trained, else
IGNORE_INDEX). Invalid JSON stops with an error naming the file and line; a record that is well-formed JSON but not
a usable conversation is skipped and counted (or stops the run with bad_records=error).
"""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common.errors import MissingFileError, UserError
from common.tensors import IGNORE_INDEX
from finetune.templates import EncodeStats, encode_turns
from finetune.tool_data import has_tools, tool_messages
from tokenizer import Tokenizer
from tokenizer.chat_template import ChatFormat

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
REPORTED_SKIPS = 5
"""Skipped records named one by one in the data report; the rest are only counted."""


@dataclass
class Fields:
    """Alpaca-layout key names (see FinetuneConfig)."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    history: str = "history"


class BadRecord(UserError):
    """A record that is valid JSON but not a usable conversation; the message says why."""


# --------------------------------------------------------------------------------------------------------------
# Files


def _byte_lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes, streamed (a .jsonl may be larger than memory), gunzipped for .gz."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            yield from f
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e}); is it a complete gzip file?") from None


def _decode(path: Path, data: bytes, first_line: int = 1) -> str:
    """`data` as UTF-8 text; a byte that is not gives the line and column where it is (counted in `data`, whose
    first line is `first_line`), not a position inside the decoder's buffer."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte column {column}); save "
                        "the file as UTF-8 (e.g. iconv -f GB18030 -t UTF-8)") from None


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location "file:line" or "file: record N", 1-based, record) for every record of a .json/.jsonl file
    (gzipped or not)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: instruction file not found")
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        for lineno, raw in enumerate(_byte_lines(path), 1):
            line = _decode(path, raw, lineno)
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); fix or "
                                "remove that line") from None
    elif name.endswith(".json"):
        text = _decode(path, b"".join(_byte_lines(path)))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: a .json instruction file must hold a list of records, not "
                            f"{type(data).__name__} (use .jsonl for one record per line)")
        for i, record in enumerate(data, 1):
            yield f"{path}: record {i}", record
    else:
        raise UserError(f"{path}: unknown instruction file type; use .json (a list) or .jsonl, optionally .gz")


# --------------------------------------------------------------------------------------------------------------
# Records -> messages


def _text(record: dict[str, Any], key: str, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise BadRecord(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field '{key}' must be text, got {type(value).__name__}")
    return value


def detect_format(record: dict[str, Any]) -> str:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    return "alpaca"


def to_messages(record: Any, data_format: str = "auto", fields: Fields = Fields()) -> list[dict[str, str]]:
    """The conversation of one record, or BadRecord saying why it has none."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    fmt = detect_format(record) if data_format == "auto" else data_format
    if fmt in ("openai", "sharegpt") and has_tools(record, fmt):  # finetune/tool_data.py
        return tool_messages(record, fmt, fields.system)
    messages: list[dict[str, str]] = []
    if fmt == "alpaca":
        system = _text(record, fields.system, required=False)
        if system:
            messages.append({"role": "system", "content": system})
        history = record.get(fields.history) or []
        if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2
                                                    and all(isinstance(x, str) for x in h) for h in history):
            raise BadRecord(f"field '{fields.history}' must be a list of [instruction, reply] text pairs")
        for query, reply in history:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
        instruction = _text(record, fields.instruction, required=True)
        extra = _text(record, fields.input, required=False)
        if not instruction.strip() and not extra.strip():
            raise BadRecord(f"field '{fields.instruction}' is empty")
        query = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else (instruction or extra)
        messages += [{"role": "user", "content": query},
                     {"role": "assistant", "content": _text(record, fields.output, required=True)}]
    elif fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise BadRecord("field 'conversations' must be a list of {from, value} messages")
        system = _text(record, fields.system, required=False)
        if system:
            messages.append({"role": "system", "content": system})
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES \
                    or not isinstance(turn.get("value"), str):
                raise BadRecord(f"conversations[{i}] must be {{\"from\": human|gpt|system, \"value\": text}}")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    elif fmt == "openai":
        turns = record.get("messages")
        if not isinstance(turns, list):
            raise BadRecord("field 'messages' must be a list of {role, content} messages")
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(turn.get("content"), str):
                raise BadRecord(f"messages[{i}] must be {{\"role\": system|user|assistant, \"content\": text}}")
            messages.append({"role": turn["role"], "content": turn["content"]})
    else:
        raise UserError(f"unknown data_format {fmt!r}")
    return messages


# --------------------------------------------------------------------------------------------------------------
# Messages -> samples


@dataclass
class DataReport:
    """What became of the records of one split: counts a run prints and can be checked against."""

    records: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Skipped records by reason."""
    examples: list[str] = field(default_factory=list)
    """The first REPORTED_SKIPS skipped records: 'file:line: reason'."""
    truncated: int = 0
    """Samples cut to cutoff_len (truncation=truncate)."""
    tokens: int = 0
    target_tokens: int = 0
    boundary_merges: int = 0

    def skip(self, where: str, reason: str) -> None:
        self.skipped[re.split(r"[;:]| \(", reason, maxsplit=1)[0]] += 1  # the kind, without the details
        if len(self.examples) < REPORTED_SKIPS:
            self.examples.append(f"{where}: {reason}")

    def to_dict(self) -> dict[str, Any]:
        """The counts as data_report.json holds them (skipped: reason -> count, most frequent first)."""
        return {"records": self.records, "samples": self.samples, "tokens": self.tokens,
                "target_tokens": self.target_tokens, "truncated": self.truncated,
                "skipped": dict(self.skipped.most_common()), "skipped_total": sum(self.skipped.values()),
                "skipped_examples": list(self.examples), "boundary_merges": self.boundary_merges}

    def summary(self, split: str) -> str:
        lines = [f"{split}: {self.records} records -> {self.samples} samples, {self.tokens:,} tokens, "
                 f"{self.target_tokens:,} trained ({self.truncated} truncated to cutoff_len, "
                 f"{sum(self.skipped.values())} skipped)"]
        lines += [f"  skipped {n}: {reason}" for reason, n in self.skipped.most_common()]
        lines += [f"  e.g. {e}" for e in self.examples]
        if self.boundary_merges:
            lines.append(f"  {self.boundary_merges} turns have a piece across the prompt/reply boundary")
        return "\n".join(lines)


@dataclass
class Sample:
    ids: np.ndarray
    """int32 token ids, BOS first."""
    labels: np.ndarray
    """int32: the id where the token is trained (a target), IGNORE_INDEX elsewhere."""


def build_sample(turns: list[tuple[list[int], list[int]]], cutoff_len: int, truncation: str, train_on_prompt: bool,
                 mask_history: bool) -> tuple[Sample, bool]:
    """(sample, truncated) from per-turn (prompt ids, reply ids); BadRecord when nothing trainable is left."""
    total = sum(len(p) + len(r) for p, r in turns)
    truncated = total > cutoff_len
    if truncated:
        if truncation == "drop":
            raise BadRecord(f"longer than cutoff_len ({total} > {cutoff_len} tokens; truncation=drop)")
        kept, used = [], 0
        for prompt, reply in turns:  # the leading whole turns that fit
            if used + len(prompt) + len(reply) > cutoff_len:
                break
            kept.append((prompt, reply))
            used += len(prompt) + len(reply)
        if not kept:
            prompt, reply = turns[0]
            room = cutoff_len - len(prompt)
            if room <= 0:
                raise BadRecord(f"all prompt after truncation (the first prompt has {len(prompt)} tokens, "
                                f"cutoff_len {cutoff_len})")
            kept = [(prompt, reply[:room])]  # the cut reply loses its EOS: it does not end there
        turns = kept
    ids: list[int] = []
    labels: list[int] = []
    for k, (prompt, reply) in enumerate(turns):
        trained = not mask_history or k == len(turns) - 1
        ids += prompt + reply
        labels += (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt))
        labels += reply if trained else [IGNORE_INDEX] * len(reply)
    return Sample(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)), truncated


@dataclass
class DataOptions:
    """The FinetuneConfig fields that decide what the samples are."""

    data_format: str = "auto"
    fields: Fields = field(default_factory=Fields)
    cutoff_len: int = 1024
    truncation: str = "truncate"
    train_on_prompt: bool = False
    mask_history: bool = False
    bad_records: str = "skip"

    @classmethod
    def from_config(cls, cfg: Any) -> "DataOptions":
        return cls(cfg.data_format, Fields(cfg.instruction_field, cfg.input_field, cfg.output_field,
                                           cfg.system_field, cfg.history_field),
                   cfg.max_sample_len, cfg.truncation, cfg.train_on_prompt, cfg.mask_history, cfg.bad_records)


def encode_records(records: Iterator[tuple[str, Any]], template: ChatFormat, tokenizer: Tokenizer,
                   options: DataOptions, report: DataReport) -> list[Sample]:
    samples = []
    stats = EncodeStats()
    for where, record in records:
        report.records += 1
        try:
            messages = to_messages(record, options.data_format, options.fields)
            turns = encode_turns(template, tokenizer, messages, stats)
            sample, truncated = build_sample(turns, options.cutoff_len, options.truncation, options.train_on_prompt,
                                             options.mask_history)
        except ValueError as e:  # BadRecord, or a conversation check_conversation refused
            if options.bad_records == "error":
                raise UserError(f"{where}: {e} (bad_records=skip skips such records)") from None
            report.skip(where, str(e))
            continue
        report.truncated += truncated
        report.samples += 1
        report.tokens += len(sample.ids)
        report.target_tokens += int((sample.labels[1:] != IGNORE_INDEX).sum())
        samples.append(sample)
    report.boundary_merges += stats.boundary_merges
    return samples


def load_samples(files: list[str], template: ChatFormat, tokenizer: Tokenizer, options: DataOptions
                 ) -> tuple[list[Sample], DataReport]:
    """Every usable sample of `files`, in file order (shuffling is the loader's), and the report."""
    report = DataReport()
    samples: list[Sample] = []
    for path in files:
        samples += encode_records(read_records(path), template, tokenizer, options, report)
    if not samples:
        detail = f"; e.g. {report.examples[0]}" if report.examples else ""
        raise UserError(f"{', '.join(files)}: no usable instruction records ({report.records} read){detail}")
    return samples, report
