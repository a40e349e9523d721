"""Reading MMLU and C-Eval split files (the official CSV layouts) into validated questions.

Both use Python's csv module (quoted fields may hold commas, newlines and CRLF). Field text is kept exactly as
written in the file: unlike the reference scripts' pandas.read_csv, a choice that reads "None" stays "None"
instead of turning into "nan" (12 MMLU test fields), and numbers keep their spelling.
Every problem is reported as a ValueError/FileNotFoundError naming the file, the line and the 0-based row.
"""
from __future__ import annotations

import csv
import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from common.errors import MissingFileError, UserError

LETTERS = ("A", "B", "C", "D")
MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
CEVAL_REQUIRED = ("id", "question", "A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    """One multiple-choice row of a split file."""

    index: int
    """0-based data row in the file (blank lines and the header are not counted)."""
    id: str
    """C-Eval's id column (the key of its submission file); the row index as text for MMLU."""
    question: str
    """The question text, as written in the file."""
    choices: tuple[str, str, str, str]
    """The texts of options A, B, C and D."""
    answer: str | None
    """The correct letter, or None where the split has no answers (C-Eval test)."""


def split_file(data_dir: Path, split: str, subject: str, name: str | None = None,
               layout: str = "dev/, val/ and test/") -> Path:
    """D/{split}/{name} (default {subject}_{split}.csv), with a clear error when the split directory or the file is
    missing; `layout` names the split folders --data_dir must hold."""
    split_dir = Path(data_dir) / split
    if not split_dir.is_dir():
        raise MissingFileError(f"{split_dir}: split directory not found; --data_dir must hold {layout}")
    path = split_dir / (name or f"{subject}_{split}.csv")
    if not path.is_file():
        raise MissingFileError(f"{path}: subject file not found (subject {subject!r}, split {split!r})")
    return path


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each non-blank CSV record."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            line = 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise UserError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
                if row:  # csv yields [] for a blank line
                    yield line, row
                line = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _answer(path: Path, line: int, index: int, value: str) -> str:
    letter = value.strip()
    if letter not in LETTERS:
        raise UserError(f"{path}, line {line} (row {index}): answer {value!r} is not one of A, B, C, D")
    return letter


def read_mmlu_csv(path: Path) -> list[Question]:
    """Rows of an MMLU split file: no header, columns question,A,B,C,D,answer."""
    questions = []
    for line, row in _records(path):
        index = len(questions)
        if len(row) != len(MMLU_COLUMNS):
            raise UserError(f"{path}, line {line} (row {index}): expected {len(MMLU_COLUMNS)} columns "
                            f"({','.join(MMLU_COLUMNS)}), found {len(row)}")
        answer = _answer(path, line, index, row[5])
        questions.append(Question(index, str(index), row[0], (row[1], row[2], row[3], row[4]), answer))
    if not questions:
        raise UserError(f"{path}: no questions in file")
    return questions


def read_ceval_csv(path: Path, need_answer: bool) -> list[Question]:
    """Rows of a C-Eval split file: a header naming id,question,A,B,C,D and, where the split has them, answer
    (and explanation). need_answer: fail when the file has no answer column (the few-shot dev split)."""
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise UserError(f"{path}: empty file; expected a header id,question,A,B,C,D[,answer[,explanation]]")
    header = [name.strip() for name in first[1]]
    missing = [name for name in CEVAL_REQUIRED + (("answer",) if need_answer else ()) if name not in header]
    if missing:
        raise UserError(f"{path}, line {first[0]}: header {','.join(header)!r} lacks column(s) "
                        f"{', '.join(missing)}; expected id,question,A,B,C,D[,answer[,explanation]]")
    col = {name: header.index(name) for name in header}
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for line, row in records:
        index = len(questions)
        if len(row) != len(header):
            raise UserError(f"{path}, line {line} (row {index}): expected {len(header)} columns "
                            f"({','.join(header)}), found {len(row)}")
        answer = _answer(path, line, index, row[col["answer"]]) if "answer" in col else None
        qid = row[col["id"]].strip()
        if qid in seen:  # ids key the submission file, so they must be unique
            raise UserError(f"{path}, line {line} (row {index}): id {qid!r} repeats row {seen[qid]}")
        seen[qid] = index
        choices = (row[col["A"]], row[col["B"]], row[col["C"]], row[col["D"]])
        questions.append(Question(index, qid, row[col["question"]], choices, answer))
    if not questions:
        raise UserError(f"{path}: no questions in file (only a header)")
    return questions


CMMLU_REQUIRED = ("Question", "A", "B", "C", "D", "Answer")


def read_cmmlu_csv(path: Path) -> list[Question]:
    """Rows of a CMMLU split file: a header `,Question,A,B,C,D,Answer` whose first, unnamed column is the row
    number (the official scripts read it with pandas' index_col=0); every split has answers."""
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise UserError(f"{path}: empty file; expected a header ,Question,A,B,C,D,Answer")
    header = [name.strip() for name in first[1]]
    missing = [name for name in CMMLU_REQUIRED if name not in header[1:]]
    if missing:
        raise UserError(f"{path}, line {first[0]}: header {','.join(header)!r} lacks column(s) "
                        f"{', '.join(missing)}; expected ,Question,A,B,C,D,Answer")
    col = {name: i for i, name in enumerate(header)}
    questions: list[Question] = []
    for line, row in records:
        index = len(questions)
        if len(row) != len(header):
            raise UserError(f"{path}, line {line} (row {index}): expected {len(header)} columns "
                            f"({','.join(header)}), found {len(row)}")
        answer = _answer(path, line, index, row[col["Answer"]])
        choices = (row[col["A"]], row[col["B"]], row[col["C"]], row[col["D"]])
        questions.append(Question(index, row[0].strip(), row[col["Question"]], choices, answer))
    if not questions:
        raise UserError(f"{path}: no questions in file (only a header)")
    return questions


# ---- JSON benchmark files (GAOKAO-Bench, AGIEval, GSM8K, HumanEval) ----

def read_json(path: Path) -> Any:
    """A whole JSON file, with the file (and line) named when it does not parse."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON Lines file (a .gz file is decompressed)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {line_no}: malformed JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}, line {line_no}: expected a JSON object, found {type(obj).__name__}")
                rows.append((line_no, obj))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    return rows


def field(path: Path, where: str, obj: dict[str, Any], key: str, kinds: type | tuple[type, ...],
          optional: bool = False) -> Any:
    """obj[key] checked to be of `kinds` (None allowed when optional), else an error naming file, place and key."""
    if key not in obj:
        if optional:
            return None
        raise UserError(f"{path}, {where}: missing field {key!r}")
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise UserError(f"{path}, {where}: field {key!r} must be {names}, found {type(value).__name__}")
    return value


# "A．" / "A." / "A、" option markers inside GAOKAO-Bench question texts.
_GAOKAO_OPTION = re.compile(r"(?<![A-Za-z])([A-D])\s*[．.、]")


def gaokao_options(text: str) -> tuple[str, str, str, str] | None:
    """The texts of options A-D written inside a GAOKAO-Bench question, or None unless all four appear in order."""
    marks: list[re.Match[str]] = []
    for m in _GAOKAO_OPTION.finditer(text):
        if m.group(1) == LETTERS[len(marks)]:
            marks.append(m)
            if len(marks) == 4:
                break
    if len(marks) < 4:
        return None
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return tuple(text[m.end():end].strip() for m, end in zip(marks, ends))  # type: ignore[return-value]


def read_gaokao_json(path: Path) -> tuple[list[Question], dict[str, int]]:
    """Single-answer four-option items of a GAOKAO-Bench objective file {"example": [{"question", "answer": [..]}]},
    and the count of each kind of excluded item (multi_answer: several letters or blanks; no_options: A-D not
    found in the question; answer_outside_options: a letter other than A-D)."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("example"), list):
        raise UserError(f"{path}: expected an object with an 'example' list (GAOKAO-Bench objective file), found "
                        f"{'keys ' + ', '.join(map(str, data)) if isinstance(data, dict) else type(data).__name__}")
    questions: list[Question] = []
    excluded: dict[str, int] = {}
    for n, item in enumerate(data["example"]):
        where = f"example {n}"
        if not isinstance(item, dict):
            raise UserError(f"{path}, {where}: expected an object, found {type(item).__name__}")
        text = field(path, where, item, "question", str)
        answer = field(path, where, item, "answer", list)
        reason = None
        if len(answer) != 1 or not isinstance(answer[0], str) or len(answer[0].strip()) != 1:
            reason = "multi_answer"
        elif answer[0].strip() not in LETTERS:
            reason = "answer_outside_options"
        choices = gaokao_options(text) if reason is None else None
        if reason is None and choices is None:
            reason = "no_options"
        if reason is not None:
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        index = item.get("index", n)
        questions.append(Question(n, str(index), text.strip(), choices, answer[0].strip()))
    return questions, excluded


_AGIEVAL_PREFIX = re.compile(r"^\s*\(?([A-Z])\)\s*")


def read_agieval_jsonl(path: Path) -> tuple[list[Question], dict[str, int]]:
    """Single-answer four-option items of an AGIEval task file (lines {"passage", "question", "options", "label"}),
    the passage joined to the question; and the count of each kind of excluded item (open_answer: no options;
    not_four_options; multi_answer: several correct letters; answer_outside_options)."""
    questions: list[Question] = []
    excluded: dict[str, int] = {}
    for n, (line_no, obj) in enumerate(read_jsonl(path)):
        where = f"line {line_no}"
        question = field(path, where, obj, "question", str)
        passage = field(path, where, obj, "passage", str, optional=True)
        options = field(path, where, obj, "options", list, optional=True)
        label = field(path, where, obj, "label", (str, list), optional=True)
        if isinstance(label, list):
            label = label[0] if len(label) == 1 and isinstance(label[0], str) else (label or None)
        reason = None
        if not options or label is None:
            reason = "open_answer"
        elif len(options) != 4:
            reason = "not_four_options"
        elif not isinstance(label, str) or len(label.strip()) != 1:
            reason = "multi_answer"
        elif label.strip() not in LETTERS:
            reason = "answer_outside_options"
        if reason is not None:
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        choices = []
        for letter, option in zip(LETTERS, options):
            if not isinstance(option, str):
                raise UserError(f"{path}, {where}: field 'options' must hold strings, found "
                                f"{type(option).__name__}")
            m = _AGIEVAL_PREFIX.match(option)
            choices.append(option[m.end():].strip() if m and m.group(1) == letter else option.strip())
        text = (passage.strip() + "\n" if passage and passage.strip() else "") + question.strip()
        questions.append(Question(n, str(n), text, tuple(choices), label.strip()))  # type: ignore[arg-type]
    return questions, excluded


def shot_split(questions: list[Question], shots: int, seed: int, name: str) -> tuple[list[Question], list[Question]]:
    """(shots, questions to score): a fixed random choice of `shots` items of the file, by a generator seeded with
    the seed and the file's name (the same on every run and machine); the rest are scored in file order."""
    order = list(range(len(questions)))
    random.Random(f"{seed}:{name}").shuffle(order)
    picked = set(order[:shots])
    return [questions[i] for i in order[:shots]], [q for i, q in enumerate(questions) if i not in picked]
