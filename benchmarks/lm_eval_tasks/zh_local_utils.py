"""Loaders for the local lm-evaluation-harness C-Eval and CMMLU tasks that benchmarks/bench_eval.py generates.

They read the same local CSV files as evaluation/evaluate_zh.py and evaluation/evaluate_cmmlu.py, with Python's csv
module and every field kept as text.
"""
import csv
from pathlib import Path

import datasets


def _read(path: Path, columns: tuple[str, ...]) -> dict:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if row]
    header = [name.strip() for name in rows[0]]
    return {name: [row[header.index(name)] for row in rows[1:]] for name in columns}


def _dataset(files: dict[str, Path], columns: tuple[str, ...]) -> datasets.DatasetDict:
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(_read(path, columns), features=features)
                                 for split, path in files.items()})


def load_ceval(data_dir: str, subject: str, **_ignored) -> datasets.DatasetDict:
    """dev (the few-shot source) and val splits of one C-Eval subject."""
    root = Path(data_dir)
    return _dataset({split: root / split / f"{subject}_{split}.csv" for split in ("dev", "val")},
                    ("question", "A", "B", "C", "D", "answer"))


def load_cmmlu(data_dir: str, subject: str, **_ignored) -> datasets.DatasetDict:
    """dev (the few-shot source) and test splits of one CMMLU subject."""
    root = Path(data_dir)
    return _dataset({split: root / split / f"{subject}.csv" for split in ("dev", "test")},
                    ("Question", "A", "B", "C", "D", "Answer"))
