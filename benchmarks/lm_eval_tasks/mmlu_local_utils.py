"""Loader for the local lm-evaluation-harness MMLU tasks that benchmarks/bench_eval.py generates.

lm-eval's stock MMLU task reads the Hugging Face copy (cais/mmlu), strips questions and puts one space in
"about abstract algebra"; these tasks read the same local CSV files as evaluation/evaluate_mmlu.py, with
Python's csv module and every field kept as text (pandas would turn the choice "None" into NaN).
"""
import csv
from pathlib import Path

import datasets

COLUMNS = ("question", "A", "B", "C", "D", "answer")


def _read(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if row]
    return {name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)}


def load(data_dir: str, subject: str, **_ignored) -> datasets.DatasetDict:
    """dev (the few-shot source) and test splits of one subject, all columns strings."""
    features = datasets.Features({name: datasets.Value("string") for name in COLUMNS})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(_read(Path(data_dir) / split / f"{subject}_{split}.csv"), features=features)
        for split in ("dev", "test")
    })
