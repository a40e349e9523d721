"""Loader for the local lm-evaluation-harness GSM8K task that benchmarks/bench_eval.py generates.

It reads a JSONL file of {"prompt", "answer"} that bench_eval.py writes with evaluation/evaluate_gsm8k.py's own
prompt builder (the same seeded 4 shots and item format), so both systems generate from the very same text.
"""
import json
from pathlib import Path

import datasets


def load(data_file: str, **_ignored) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in Path(data_file).read_text(encoding="utf-8").splitlines() if line]
    features = datasets.Features({"prompt": datasets.Value("string"), "answer": datasets.Value("string")})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, features=features)})
