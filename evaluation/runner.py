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

from artifacts import add_quantize_args, check_device, default_device, default_dtype
from common import cli
from common.errors import MissingFileError, UserError
from common.io import check_output_dir
from common.tensors import DTYPES


from . import backends
from .data import LETTERS, Question, shot_split, split_file
from .report import SubjectScore, format_table, summarize, write_outputs
from .scoring import Request, SubjectPrompts, build_requests


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
    file_name: Callable[[str, str], str] = lambda subject, split: f"{subject}_{split}.csv"
    """(subject, split) -> the subject's file name inside the split folder."""
    layout: str = "dev/, val/ and test/"
    """The split folders --data_dir holds (for error messages)."""
    build_requests: Callable[..., list[Request]] = build_requests
    """(tokenizer, prompts, max_length, bos) -> requests: tokenizing, and what to do with prompts that are too long."""
    load: Callable[[Path, list[str] | None, int, int], "Loaded"] | None = None
    """For benchmarks without a dev split (one file per subject): (data_dir, subjects or None for all present,
    shots, seed) -> the data, shots drawn from each file by a seeded split. None: the split folders' layout."""
    seeded: bool = False
    """Whether --seed applies (the shots are a seeded draw from each file)."""


@dataclass
class Loaded:
    """A benchmark's data read and checked before the model is opened."""

    subjects: list[str]
    missing: list[str]
    """Subjects whose files --data_dir lacks (then results.json says complete: false)."""
    data: dict[str, tuple[list[Question], list[Question]]]
    """subject -> (shot rows, questions to score)."""
    info: dict[str, Any]
    """Extra results.json entries (e.g. excluded items, the shot split)."""


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """How every evaluator opens its model: --dtype, --device, --tokenizer, --tag, --adapter and the quantization
    flags (what open_from_args reads)."""
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--tokenizer", help="tokenizer.model, or a folder with tokenizer.json, to use (default: the "
                   "model folder's tokenizer.model, else its tokenizer.json)")
    p.add_argument("--tag", help="checkpoint tag of a training run directory (default: its latest)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder applied (merged) on top of the model")
    add_quantize_args(p)


def build_parser(bench: Benchmark, prog: str, description: str, shots_flags: list[str],
                 default_split: str) -> argparse.ArgumentParser:
    p = cli.parser(prog, description)
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="a Hugging Face causal-LM folder (LLaMA family: our fast loader; others: transformers) "
                        "or a training run directory")
    p.add_argument("--data_dir", required=True,
                   help=f"folder holding {bench.layout} with {bench.file_name('{subject}', '{split}')}")
    p.add_argument("--output_dir", required=True, help="where results.json and predictions.jsonl go")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --output_dir holds")
    p.add_argument("--split", default=default_split, choices=bench.splits, help="split to evaluate")
    p.add_argument("--shots", *shots_flags, dest="shots", type=int, default=5,
                   help="few-shot examples (first rows of dev); the reference scripts' spellings work too")
    p.add_argument("--subjects", "--tasks", dest="subjects", nargs="+", metavar="SUBJECT",
                   help="evaluate only these subjects (tasks)")
    if bench.seeded:
        p.add_argument("--seed", type=int, default=1234,
                       help="seed of the fixed random choice of each file's shots (written into results.json)")
    p.add_argument("--batch_size", type=int, default=16, help="questions run together over a shared prefix")
    add_model_flags(p)
    p.add_argument("--max_length", type=int,
                   help="longest prompt in tokens; shots are dropped beyond it (default: the model's max_seq_len)")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="score each prompt on its own (the slow reference path) instead of reusing the prefix cache")
    return p


def _check_args(bench: Benchmark, args: argparse.Namespace) -> list[str] | None:
    if args.shots < 0:
        raise UserError(f"the number of shots must be >= 0, got {args.shots}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        raise UserError(f"--max_length must be >= 1, got {args.max_length}")
    if not args.subjects:
        return None
    unknown = [s for s in args.subjects if s not in bench.subjects]
    if unknown:
        raise UserError(f"unknown {bench.name} subject(s): {', '.join(unknown)}; valid names are listed in "
                        "evaluation/subjects.py")
    return list(dict.fromkeys(args.subjects))


def subject_file(bench: Benchmark, data_dir: Path, split: str, subject: str) -> Path:
    return split_file(data_dir, split, subject, bench.file_name(subject, split), bench.layout)


def present_subjects(bench: Benchmark, data_dir: Path, split: str, shots: int) -> tuple[list[str], list[str]]:
    """(subjects whose files are in data_dir, the others), as the reference scripts list the folder. With a split
    folder missing, all subjects are returned so that load_data names the folder."""
    splits = [split] + (["dev"] if shots else [])
    if not all((data_dir / s).is_dir() for s in splits):
        return list(bench.subjects), []
    present = [s for s in bench.subjects if all((data_dir / sp / bench.file_name(s, sp)).is_file() for sp in splits)]
    if not present:
        raise MissingFileError(f"{data_dir}: no {bench.name} subject files in {' and '.join(splits)} (expected "
                               f"names such as {bench.file_name(bench.subjects[0], split)})")
    return present, [s for s in bench.subjects if s not in present]


def load_data(bench: Benchmark, data_dir: Path, split: str, subjects: list[str],
              shots: int) -> dict[str, tuple[list[Question], list[Question]]]:
    """subject -> (shot rows: the first `shots` dev rows, questions of `split`), every file checked."""
    data = {}
    for subject in subjects:
        dev = bench.read(subject_file(bench, data_dir, "dev", subject), True)[:shots] if shots else []
        if len(dev) < shots:
            print(f"warning: {subject}: dev split has only {len(dev)} rows, using {len(dev)} shots", file=sys.stderr)
        data[subject] = (dev, bench.read(subject_file(bench, data_dir, split, subject), split != "test"))
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


def read_benchmark(bench: Benchmark, args: argparse.Namespace) -> Loaded:
    """Every input file of the run read and checked (before the model is opened)."""
    subjects = _check_args(bench, args)
    if bench.load is not None:
        loaded = bench.load(Path(args.data_dir), subjects, args.shots, args.seed)
        missing = loaded.missing
    else:
        missing = []
        if subjects is None:
            subjects, missing = present_subjects(bench, Path(args.data_dir), args.split, args.shots)
        loaded = Loaded(subjects, missing, load_data(bench, Path(args.data_dir), args.split, subjects, args.shots),
                        {})
    if missing:
        print(f"warning: {args.data_dir} holds {len(bench.subjects) - len(missing)} of the {len(bench.subjects)} "
              f"{bench.name} subjects; missing, not evaluated: {', '.join(missing)}", file=sys.stderr)
    return loaded


def open_from_args(args: argparse.Namespace) -> tuple[backends.LoadedModel, str, str]:
    """(the model as --model, --adapter, --quantize, ... say, device, dtype): the one place evaluators open it."""
    device = args.device or default_device()
    check_device(device)
    dtype = args.dtype or default_dtype(device)
    loaded = backends.load(args.model, args.tokenizer, device, dtype, args.tag, adapter=args.adapter,
                           quantize=args.quantize, group_size=args.group_size, quantize_head=args.quantize_head)
    if loaded.note:
        print(f"note: {args.model}: {loaded.note}", file=sys.stderr)
    return loaded, device, dtype


def model_settings(args: argparse.Namespace, loaded: backends.LoadedModel, device: str, dtype: str) -> dict[str, Any]:
    """The results.json settings that say which model ran and how (shared by every evaluator)."""
    tokenizer = loaded.tokenizer
    return {"model": str(Path(args.model).resolve()), "tag": args.tag,
            "adapter": str(Path(args.adapter).resolve()) if args.adapter else None,
            "quantize": args.quantize, "group_size": args.group_size, "quantize_head": args.quantize_head,
            "tokenizer": str(tokenizer.path), "tokenizer_sha256": tokenizer.sha256, "bos": loaded.bos,
            "device": device, "dtype": dtype, **loaded.settings, "backend_note": loaded.note or None}


def run(bench: Benchmark, args: argparse.Namespace,
        model: tuple[backends.LoadedModel, str, str] | None = None) -> dict[str, Any]:
    """Evaluate, write the outputs, print the table; returns results.json's content. `model`: an already opened
    model (open_from_args's result, as the suite passes it), else --model is opened here."""
    start = time.perf_counter()
    check_output_dir(args.output_dir, args.overwrite)
    read = read_benchmark(bench, args)
    subjects, missing, data = read.subjects, read.missing, read.data

    loaded, device, dtype = model or open_from_args(args)
    tokenizer = loaded.tokenizer
    max_length = args.max_length or loaded.max_len
    if max_length > loaded.max_len:
        raise UserError(f"--max_length {max_length} exceeds the model's context of {loaded.max_len} tokens")
    bos = loaded.bos  # the reference scripts start every prompt with BOS where the tokenizer adds one

    requests: list[Request] = []
    questions: list[Question] = []
    for subject in tqdm(subjects, desc="tokenizing", unit="subject", leave=False):
        dev, items = data[subject]
        requests += bench.build_requests(tokenizer, bench.prompts(subject, dev, items), max_length, bos)
        questions += items

    score_start = time.perf_counter()
    with tqdm(total=len(requests), desc=f"{bench.name} {args.split}", unit="q") as progress:
        logits = loaded.score(requests, args.batch_size, not args.no_prefix_cache, progress)
    score_time = time.perf_counter() - score_start

    predictions, scores = collect(subjects, data, requests, questions, logits)
    report_shortened(scores, requests, max_length)

    results: dict[str, Any] = {"benchmark": bench.name, "split": args.split, "shots": shots_used(requests),
                               "shots_requested": args.shots, "complete": set(subjects) == set(bench.subjects),
                               "headline": bench.headline}
    if missing:
        results["missing_subjects"] = missing
    results.update(summarize(scores, bench.groups_of, bench.order, bench.headline))
    results.update(read.info)
    results["settings"] = {
        **model_settings(args, loaded, device, dtype),
        "answer_tokens": [tokenizer.id_to_piece(i) for i in requests[0].choice_ids],
        "max_length": max_length, "batch_size": args.batch_size,
        "prefix_cache": loaded.backend == "ours" and not args.no_prefix_cache,
        "scoring_seconds": round(score_time, 3), "total_seconds": round(time.perf_counter() - start, 3),
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


def seeded_files_loader(name: str, all_subjects: list[str], file_name: Callable[[str], str],
                        read: Callable[[Path], tuple[list[Question], dict[str, int]]]
                        ) -> Callable[[Path, list[str] | None, int, int], Loaded]:
    """Benchmark.load for one file per subject in --data_dir (GAOKAO-Bench, AGIEval): each file's shots are a
    seeded random choice of its items (data.shot_split), the rest are scored. Excluded items (several answers,
    open answers, a key outside the options) are counted per subject in results.json's `excluded`; a subject with
    nothing left to score is reported there and not scored."""

    def load(data_dir: Path, subjects: list[str] | None, shots: int, seed: int) -> Loaded:
        if not data_dir.is_dir():
            raise MissingFileError(f"{data_dir}: --data_dir not found; it must hold the {name} files "
                                   f"({file_name(all_subjects[0])}, ...)")
        wanted = subjects or all_subjects
        missing = [s for s in wanted if not (data_dir / file_name(s)).is_file()]
        if subjects is not None and missing:
            raise MissingFileError(f"{data_dir / file_name(missing[0])}: {name} file not found"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if len(missing) == len(wanted):
            raise MissingFileError(f"{data_dir}: no {name} files (expected names such as "
                                   f"{file_name(all_subjects[0])})")
        data: dict[str, tuple[list[Question], list[Question]]] = {}
        excluded: dict[str, dict[str, int]] = {}
        split: dict[str, list[str]] = {}
        for subject in wanted:
            if subject in missing:
                continue
            path = data_dir / file_name(subject)
            items, dropped = read(path)
            if dropped.get("answer_outside_options"):
                print(f"warning: {path}: {dropped['answer_outside_options']} item(s) have an answer key outside "
                      "the options A-D; excluded", file=sys.stderr)
            if dropped:
                excluded[subject] = dropped
            if len(items) <= shots:
                excluded.setdefault(subject, {})["not_scored_too_few_items"] = len(items)
                continue
            dev, rest = shot_split(items, shots, seed, subject)
            data[subject] = (dev, rest)
            split[subject] = [q.id for q in dev]
        if not data:
            raise UserError(f"{data_dir}: no {name} subject has more single-answer items than the {shots} shots")
        info = {"excluded": excluded,
                "excluded_total": {reason: sum(d.get(reason, 0) for d in excluded.values())
                                   for reason in sorted({r for d in excluded.values() for r in d})},
                "shot_split": {"seed": seed, "rule": "random.Random(f'{seed}:{subject}').shuffle(item order); the "
                               "first `shots` items are the shots, the rest are scored in file order",
                               "shot_ids": split}}
        return Loaded(list(data), missing, data, info)

    return load
