"""Reading MMLU and C-Eval split files (the official CSV layouts) into validated questions.

Both use Python's csv module (quoted fields may hold commas, newlines and CRLF). Field text is kept exactly as
written in the file: unlike the reference scripts' pandas.read_csv, a choice that reads "None" stays "None"
instead of turning into "nan" (12 MMLU test fields), and numbers keep their spelling.
Every problem is reported as a ValueError/FileNotFoundError naming the file, the line and the 0-based row.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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
        raise FileNotFoundError(f"{split_dir}: split directory not found; --data_dir must hold {layout}")
    path = split_dir / (name or f"{subject}_{split}.csv")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: subject file not found (subject {subject!r}, split {split!r})")
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
                    raise ValueError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
                if row:  # csv yields [] for a blank line
                    yield line, row
                line = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _answer(path: Path, line: int, index: int, value: str) -> str:
    letter = value.strip()
    if letter not in LETTERS:
        raise ValueError(f"{path}, line {line} (row {index}): answer {value!r} is not one of A, B, C, D")
    return letter


def read_mmlu_csv(path: Path) -> list[Question]:
    """Rows of an MMLU split file: no header, columns question,A,B,C,D,answer."""
    questions = []
    for line, row in _records(path):
        index = len(questions)
        if len(row) != len(MMLU_COLUMNS):
            raise ValueError(f"{path}, line {line} (row {index}): expected {len(MMLU_COLUMNS)} columns "
                             f"({','.join(MMLU_COLUMNS)}), found {len(row)}")
        answer = _answer(path, line, index, row[5])
        questions.append(Question(index, str(index), row[0], (row[1], row[2], row[3], row[4]), answer))
    if not questions:
        raise ValueError(f"{path}: no questions in file")
    return questions


def read_ceval_csv(path: Path, need_answer: bool) -> list[Question]:
    """Rows of a C-Eval split file: a header naming id,question,A,B,C,D and, where the split has them, answer
    (and explanation). need_answer: fail when the file has no answer column (the few-shot dev split)."""
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise ValueError(f"{path}: empty file; expected a header id,question,A,B,C,D[,answer[,explanation]]")
    header = [name.strip() for name in first[1]]
    missing = [name for name in CEVAL_REQUIRED + (("answer",) if need_answer else ()) if name not in header]
    if missing:
        raise ValueError(f"{path}, line {first[0]}: header {','.join(header)!r} lacks column(s) "
                         f"{', '.join(missing)}; expected id,question,A,B,C,D[,answer[,explanation]]")
    col = {name: header.index(name) for name in header}
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for line, row in records:
        index = len(questions)
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line} (row {index}): expected {len(header)} columns "
                             f"({','.join(header)}), found {len(row)}")
        answer = _answer(path, line, index, row[col["answer"]]) if "answer" in col else None
        qid = row[col["id"]].strip()
        if qid in seen:  # ids key the submission file, so they must be unique
            raise ValueError(f"{path}, line {line} (row {index}): id {qid!r} repeats row {seen[qid]}")
        seen[qid] = index
        choices = (row[col["A"]], row[col["B"]], row[col["C"]], row[col["D"]])
        questions.append(Question(index, qid, row[col["question"]], choices, answer))
    if not questions:
        raise ValueError(f"{path}: no questions in file (only a header)")
    return questions


CMMLU_REQUIRED = ("Question", "A", "B", "C", "D", "Answer")


def read_cmmlu_csv(path: Path) -> list[Question]:
    """Rows of a CMMLU split file: a header `,Question,A,B,C,D,Answer` whose first, unnamed column is the row
    number (the official scripts read it with pandas' index_col=0); every split has answers."""
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise ValueError(f"{path}: empty file; expected a header ,Question,A,B,C,D,Answer")
    header = [name.strip() for name in first[1]]
    missing = [name for name in CMMLU_REQUIRED if name not in header[1:]]
    if missing:
        raise ValueError(f"{path}, line {first[0]}: header {','.join(header)!r} lacks column(s) "
                         f"{', '.join(missing)}; expected ,Question,A,B,C,D,Answer")
    col = {name: i for i, name in enumerate(header)}
    questions: list[Question] = []
    for line, row in records:
        index = len(questions)
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line} (row {index}): expected {len(header)} columns "
                             f"({','.join(header)}), found {len(row)}")
        answer = _answer(path, line, index, row[col["Answer"]])
        choices = (row[col["A"]], row[col["B"]], row[col["C"]], row[col["D"]])
        questions.append(Question(index, row[0].strip(), row[col["Question"]], choices, answer))
    if not questions:
        raise ValueError(f"{path}: no questions in file (only a header)")
    return questions
