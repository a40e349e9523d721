"""HumanEval, 0-shot code completion: pass@1 (greedy) and pass@k from n samples with the unbiased estimator.

    python evaluation/evaluate_humaneval.py --model M --data_dir D --output_dir O [--n 1] [--k 1,10,100]
    python evaluation/evaluate_humaneval.py --samples samples.jsonl --data_dir D --output_dir O

D holds HumanEval.jsonl.gz (or HumanEval.jsonl): lines {"task_id", "prompt", "canonical_solution", "test",
"entry_point"}. The model continues each prompt (greedy with --n 1; with --n > 1, sampled at --temperature and
--top_p), cut at the standard stop sequences of the Codex paper. Each program `prompt + completion + test +
check(entry_point)` runs in its own process (evaluation/execution.py). --samples scores completions made
elsewhere, in the official samples.jsonl format (lines {"task_id", "completion"}, any number per task), with the
official harness's results: per-sample passed/result, and pass@k for every k that all scored tasks have n >= k.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: see evaluation/_bootstrap.py
    import _bootstrap
    _bootstrap.run_as_module(__file__)

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common import cli
from common.errors import MissingFileError, UserError
from common.io import check_output_dir
from evaluation.data import field, read_jsonl
from evaluation.decoding import generate_until
from evaluation.execution import Limits, pass_at_k, program_text, run_programs
from evaluation.gen_runner import build_parser, check_args
from evaluation.report import write_outputs
from evaluation.runner import model_settings, open_from_args

STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FILES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")


def read_problems(data_dir: Path) -> dict[str, dict[str, str]]:
    """task_id -> problem, in file order, every field checked."""
    path = next((data_dir / name for name in FILES if (data_dir / name).is_file()), None)
    if path is None:
        raise MissingFileError(f"{data_dir}: no {' or '.join(FILES)}; --data_dir must hold the HumanEval problems")
    problems: dict[str, dict[str, str]] = {}
    for line_no, obj in read_jsonl(path):
        where = f"line {line_no}"
        problem = {key: field(path, where, obj, key, str)
                   for key in ("task_id", "prompt", "test", "entry_point")}
        problem["canonical_solution"] = field(path, where, obj, "canonical_solution", str, optional=True) or ""
        if problem["task_id"] in problems:
            raise UserError(f"{path}, {where}: task_id {problem['task_id']!r} repeats an earlier line")
        problems[problem["task_id"]] = problem
    if not problems:
        raise UserError(f"{path}: no problems in file")
    return problems


def read_samples(path: Path, problems: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """(task_id, completion) of each line of an official samples.jsonl file."""
    samples = []
    for line_no, obj in read_jsonl(path):
        where = f"line {line_no}"
        task_id = field(path, where, obj, "task_id", str)
        if task_id not in problems:
            raise UserError(f"{path}, {where}: task_id {task_id!r} is not a problem of the evaluated set")
        samples.append((task_id, field(path, where, obj, "completion", str)))
    if not samples:
        raise UserError(f"{path}: no samples in file")
    return samples


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise UserError(f"--k {text!r}: expected comma-separated whole numbers, e.g. 1,10,100") from None
    if not ks or ks[0] < 1:
        raise UserError(f"--k {text!r}: every k must be >= 1")
    return ks


def score(problems: dict[str, dict[str, str]], samples: list[tuple[str, str]], ks: list[int], limits: Limits,
          workers: int | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results: pass@k, counts; per-sample records) with every program run in its own process."""
    sources = [program_text(problems[t]["prompt"], c, problems[t]["test"], problems[t]["entry_point"])
               for t, c in samples]
    with tqdm(total=len(sources), desc="executing", unit="program") as progress:
        outcomes = run_programs(sources, limits, workers, progress)
    records = [{"task_id": t, "completion": c, "result": r, "passed": r == "passed"}
               for (t, c), r in zip(samples, outcomes)]
    per_task: dict[str, list[int]] = {}
    for rec in records:
        n_c = per_task.setdefault(rec["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += rec["passed"]
    fewest = min(n for n, _ in per_task.values())
    pass_k = {f"pass@{k}": 100.0 * sum(pass_at_k(n, c, k) for n, c in per_task.values()) / len(per_task)
              for k in ks if k <= fewest}
    results = {"pass_at_k": pass_k, "problems": len(per_task), "samples": len(records),
               "samples_per_problem": {"min": fewest, "max": max(n for n, _ in per_task.values())},
               "problems_passed": {t: c for t, (n, c) in per_task.items()},
               "complete": len(per_task) == len(problems)}
    skipped = [k for k in ks if k > fewest]
    if skipped:
        results["k_not_estimable"] = skipped
    return results, records


def run(args: argparse.Namespace, model=None) -> dict[str, Any]:
    start = time.perf_counter()
    check_args(args)
    ks = parse_ks(args.k)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.n > 1 and args.temperature <= 0:
        raise UserError(f"--n {args.n} samples per problem need --temperature > 0 (greedy gives one reply)")
    if args.timeout <= 0 or args.memory_mb < 64:
        raise UserError("--timeout must be > 0 and --memory_mb >= 64")
    check_output_dir(args.output_dir, args.overwrite)
    problems = read_problems(Path(args.data_dir))
    if args.limit:
        problems = dict(list(problems.items())[:args.limit])
    settings: dict[str, Any] = {"timeout": args.timeout, "memory_mb": args.memory_mb}
    if args.samples:
        samples = read_samples(Path(args.samples), problems)
        settings["samples"] = str(Path(args.samples).resolve())
    else:
        loaded, device, dtype = model or open_from_args(args)
        max_new = args.max_new_tokens or 512
        max_length = min(args.max_length or loaded.max_len, loaded.max_len)
        room = max_length - max_new
        if room < 1:
            raise UserError(f"--max_new_tokens {max_new} leaves no room for a prompt in {max_length} tokens")
        tasks = [t for t in problems for _ in range(args.n)]
        prompts = loaded.tokenizer.encode_batch([problems[t]["prompt"] for t in tasks], bos=loaded.bos)
        cut = sum(len(p) > room for p in prompts)
        if cut:
            print(f"warning: humaneval: {cut} prompts are longer than {room} tokens and keep their end",
                  file=sys.stderr)
        prompts = [p[-room:] for p in prompts]
        gen_start = time.perf_counter()
        outs = generate_until(loaded, prompts, max_new, STOPS, args.batch_size, args.temperature,
                              args.top_p if args.temperature > 0 else None, args.seed, desc="humaneval")
        samples = [(t, o["text"]) for t, o in zip(tasks, outs)]
        settings.update(model_settings(args, loaded, device, dtype), n=args.n, temperature=args.temperature,
                        top_p=args.top_p if args.temperature > 0 else None, seed=args.seed, max_new_tokens=max_new,
                        stops=list(STOPS), prompts_cut=cut, generation_seconds=round(time.perf_counter() - gen_start, 3))
    results, records = score(problems, samples, ks, Limits(args.timeout, args.memory_mb), args.workers)
    results = {"benchmark": "humaneval", "shots": 0, **results,
               "settings": {**settings, "total_seconds": round(time.perf_counter() - start, 3)}}
    write_outputs(Path(args.output_dir), results, records)
    shown = ", ".join(f"{k} {v:.2f}%" for k, v in results["pass_at_k"].items())
    print(f"humaneval: {results['problems']} problems, {results['samples']} samples: {shown}; wrote "
          f"{Path(args.output_dir) / 'results.json'}")
    return results


def parser() -> argparse.ArgumentParser:
    p = build_parser("python -m evaluation.evaluate_humaneval", "HumanEval 0-shot code completion, pass@k.",
                     "folder holding HumanEval.jsonl.gz")
    p.add_argument("--n", type=int, default=1, help="samples per problem (1: greedy)")
    p.add_argument("--k", default="1,10,100", help="comma-separated k of pass@k (reported where k <= n)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; use e.g. 0.8 with --n > 1")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling threshold when sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds each program may run")
    p.add_argument("--memory_mb", type=int, default=1024, help="memory limit of each program in MiB")
    p.add_argument("--workers", type=int, help="programs run at once (default: the CPU count)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cli.run_main(run, args)


if __name__ == "__main__":
    main()
