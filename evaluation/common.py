"""The evaluation run shared by evaluate_mmlu.py and evaluate_zh.py: arguments, data, scoring, outputs.

A `Benchmark` holds what differs between the two (file layout, prompt format, subject groups); `run` does the
rest. All input is read and checked before the model is loaded, and the output files are written only at the
end (results.json last), so a failed run leaves no results.json that looks complete.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from artifacts import check_device, default_device, default_dtype, load_model, load_tokenizer
from common import cli
from common.io import check_output_dir
from common.tensors import DTYPES

from .data import LETTERS, Question, split_file
from .report import SubjectScore, format_table, summarize, write_outputs
from .scoring import Request, SubjectPrompts, build_requests, score_cached, score_plain


@dataclass
class Benchmark:
    """What one benchmark needs beyond the shared machinery."""

    name: str
    """Short name, used in messages and results.json."""
    subjects: list[str]
    """All subjects, in reporting order."""
    splits: tuple[str, ...]
    """Splits that can be evaluated (the dev split always supplies the shots)."""
    read: Callable[[Path, bool], list[Question]]
    """Reads one split file; the flag says the file must have answers."""
    prompts: Callable[[str, list[Question], list[Question]], SubjectPrompts]
    """(subject, shot rows, questions) -> the subject's prompt pieces."""
    groups_of: Callable[[str], dict[str, list[str]]]
    """Subject -> {level: group names}, e.g. {"categories": ["STEM"]}."""
    order: dict[str, list[str]]
    """Level -> its group names in reporting order."""
    headline: str
    """Which average is the benchmark's published score: "weighted" (per question) or "macro" (per subject)."""
    submission: bool = False
    """Write submission_{split}.json ({subject: {id: letter}}) when the split has no answers."""


def build_parser(bench: Benchmark, prog: str, description: str, shots_flags: list[str],
                 default_split: str) -> argparse.ArgumentParser:
    p = cli.parser(prog, description)
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="a Hugging Face LLaMA folder (e.g. from pretrain.export) or a training run directory")
    p.add_argument("--data_dir", required=True, help="folder holding dev/, val/, test/ with {subject}_{split}.csv")
    p.add_argument("--output_dir", required=True, help="where results.json and predictions.jsonl go")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --output_dir holds")
    p.add_argument("--split", default=default_split, choices=bench.splits, help="split to evaluate")
    p.add_argument("--shots", *shots_flags, dest="shots", type=int, default=5,
                   help="few-shot examples (first rows of dev); the reference scripts' spellings work too")
    p.add_argument("--subjects", nargs="+", metavar="SUBJECT", help="evaluate only these subjects")
    p.add_argument("--batch_size", type=int, default=16, help="questions run together over a shared prefix")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--tokenizer", help="tokenizer.model to use (default: the one in --model)")
    p.add_argument("--tag", help="checkpoint tag of a training run directory (default: its latest)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder applied (merged) on top of the model")
    p.add_argument("--max_length", type=int,
                   help="longest prompt in tokens; shots are dropped beyond it (default: the model's max_seq_len)")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="score each prompt on its own (the slow reference path) instead of reusing the prefix cache")
    return p


def _check_args(bench: Benchmark, args: argparse.Namespace) -> list[str]:
    if args.shots < 0:
        raise ValueError(f"the number of shots must be >= 0, got {args.shots}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max_length must be >= 1, got {args.max_length}")
    subjects = args.subjects or bench.subjects
    unknown = [s for s in subjects if s not in bench.subjects]
    if unknown:
        raise ValueError(f"unknown {bench.name} subject(s): {', '.join(unknown)}; valid names are listed in "
                         "evaluation/subjects.py")
    return list(dict.fromkeys(subjects))


def load_data(bench: Benchmark, data_dir: Path, split: str, subjects: list[str],
              shots: int) -> dict[str, tuple[list[Question], list[Question]]]:
    """subject -> (shot rows: the first `shots` dev rows, questions of `split`), every file checked."""
    data = {}
    for subject in subjects:
        dev = bench.read(split_file(data_dir, "dev", subject), True)[:shots] if shots else []
        if len(dev) < shots:
            print(f"warning: {subject}: dev split has only {len(dev)} rows, using {len(dev)} shots", file=sys.stderr)
        data[subject] = (dev, bench.read(split_file(data_dir, split, subject), split != "test"))
    return data


def collect(subjects: list[str], data: dict[str, tuple[list[Question], list[Question]]], requests: list[Request],
            questions: list[Question], logits: torch.Tensor) -> tuple[list[dict[str, Any]], list[SubjectScore]]:
    """predictions.jsonl's records and each subject's score, from the letter logits of every request."""
    probs = torch.softmax(logits, dim=-1)
    picks = probs.argmax(dim=-1).tolist()
    rows_of: dict[str, list[int]] = {subject: [] for subject in subjects}
    for n, req in enumerate(requests):
        rows_of[req.subject].append(n)
    predictions, scores = [], []
    for subject, rows in rows_of.items():
        shots = len(data[subject][0])
        for n in rows:
            q = questions[n]
            predictions.append({"subject": subject, "index": q.index, "prediction": LETTERS[picks[n]],
                                "answer": q.answer, "probs": [round(p, 6) for p in probs[n].tolist()]})
        answered = all(questions[n].answer is not None for n in rows)
        correct = sum(LETTERS[picks[n]] == questions[n].answer for n in rows) if answered else None
        scores.append(SubjectScore(subject, len(rows), correct, shots, sum(requests[n].shots < shots for n in rows),
                                   sum(requests[n].truncated for n in rows)))
    return predictions, scores


def shots_used(requests: list[Request]) -> int | dict[str, float]:
    """results.json's `shots`: the shots every prompt had, or {min, max, mean} when prompts were shortened."""
    used = [r.shots for r in requests]
    if min(used) == max(used):
        return used[0]
    return {"min": min(used), "max": max(used), "mean": round(sum(used) / len(used), 3)}


def report_shortened(scores: list[SubjectScore], requests: list[Request], max_length: int) -> None:
    """Say on the console which subjects' prompts lost shots or were cut to fit --max_length."""
    fewest: dict[str, int] = {}
    for r in requests:
        fewest[r.subject] = min(r.shots, fewest.get(r.subject, r.shots))
    for s in scores:
        if s.shots_dropped or s.truncated:
            cut = f"; {s.truncated} still too long with 0 shots were cut to their last tokens" if s.truncated else ""
            print(f"warning: {s.subject}: {s.shots_dropped} of {s.count} prompts dropped shots to fit {max_length} "
                  f"tokens (as few as {fewest[s.subject]} of {s.shots}){cut}", file=sys.stderr)


def run(bench: Benchmark, args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate, write the outputs, print the table; returns results.json's content."""
    start = time.perf_counter()
    subjects = _check_args(bench, args)
    check_output_dir(args.output_dir, args.overwrite)
    data = load_data(bench, Path(args.data_dir), args.split, subjects, args.shots)

    device = args.device or default_device()
    check_device(device)
    dtype = args.dtype or default_dtype(device)
    model = load_model(args.model, device, dtype, args.tag, adapter=args.adapter)
    tokenizer = load_tokenizer(args.model, args.tokenizer, model)
    max_length = args.max_length or model.config.max_seq_len
    if max_length > model.config.max_seq_len:
        raise ValueError(f"--max_length {max_length} exceeds the model's context of {model.config.max_seq_len} tokens")
    bos = tokenizer.bos_id >= 0  # both reference scripts start every prompt with BOS

    requests: list[Request] = []
    questions: list[Question] = []
    for subject in tqdm(subjects, desc="tokenizing", unit="subject", leave=False):
        dev, items = data[subject]
        requests += build_requests(tokenizer, bench.prompts(subject, dev, items), max_length, bos)
        questions += items

    score_start = time.perf_counter()
    with tqdm(total=len(requests), desc=f"{bench.name} {args.split}", unit="q") as progress:
        if args.no_prefix_cache:
            logits = score_plain(model, requests, progress)
        else:
            logits = score_cached(model, requests, args.batch_size, progress)
    score_time = time.perf_counter() - score_start

    predictions, scores = collect(subjects, data, requests, questions, logits)
    report_shortened(scores, requests, max_length)

    results: dict[str, Any] = {"benchmark": bench.name, "split": args.split, "shots": shots_used(requests),
                               "shots_requested": args.shots, "complete": set(subjects) == set(bench.subjects),
                               "headline": bench.headline}
    results.update(summarize(scores, bench.groups_of, bench.order, bench.headline))
    results["settings"] = {
        "model": str(Path(args.model).resolve()), "tag": args.tag,
        "adapter": str(Path(args.adapter).resolve()) if args.adapter else None,
        "tokenizer": str(tokenizer.path), "tokenizer_sha256": tokenizer.sha256, "bos": bos,
        "answer_tokens": [tokenizer.id_to_piece(i) for i in requests[0].choice_ids],
        "device": device, "dtype": dtype, "max_length": max_length, "batch_size": args.batch_size,
        "prefix_cache": not args.no_prefix_cache, "scoring_seconds": round(score_time, 3),
        "total_seconds": round(time.perf_counter() - start, 3),
    }
    extra = {}
    if bench.submission and any(q.answer is None for q in questions):
        submission: dict[str, dict[str, str]] = {}  # the official form: {subject: {id: letter}}
        for p, q in zip(predictions, questions):
            submission.setdefault(p["subject"], {})[q.id] = p["prediction"]
        extra[f"submission_{args.split}.json"] = submission
    out_dir = Path(args.output_dir)
    write_outputs(out_dir, results, predictions, extra)
    print(format_table(results, list(bench.order)))
    print(f"{len(requests)} questions scored in {score_time:.1f}s; wrote {out_dir / 'results.json'}")
    return results


def main_for(bench: Benchmark, parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """Parse, run, and turn the expected errors into one line and a non-zero exit (common.cli.run_main)."""
    args = parser.parse_args(argv)
    try:
        cli.run_main(run, bench, args)
    except torch.OutOfMemoryError:
        cli.fail(f"out of memory with --batch_size {args.batch_size}; lower it (each batch holds "
                 "batch_size copies of the prefix's KV cache)")
