"""The whole evaluation table in one process: the model opened once, each benchmark in turn, one table.

    python -m evaluation.suite --model M --benchmarks ceval,mmlu,cmmlu,gaokao,agieval,gsm8k,humaneval \
        [--data_root D] [--output_dir O] [--adapter A] [--quantize int8] [--limit N]

D holds one folder per benchmark (ceval/, mmlu/, cmmlu/, gaokao/, agieval/, gsm8k/, humaneval/, the layouts each
evaluator reads). Each benchmark's outputs go to O/{benchmark}/ as its own evaluator writes them; O/results.md
and O/results.json hold the table in XVERSE-13B's layout (benchmark, setting, score). A benchmark whose
O/{benchmark}/results.json was written by an earlier run with the same settings (model, adapter, quantization,
data, options, and the model files' sizes and times) is not run again; its scores are read back.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: see evaluation/_bootstrap.py
    import _bootstrap
    _bootstrap.run_as_module(__file__)

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from common import cli
from common.errors import MissingFileError, UserError
from common.io import write_json, write_text
from evaluation.runner import add_model_flags

BENCHMARKS = ("ceval", "mmlu", "cmmlu", "gaokao", "agieval", "gsm8k", "humaneval")
NAMES = {"ceval": "C-Eval", "mmlu": "MMLU", "cmmlu": "CMMLU", "gaokao": "GAOKAO-Bench", "agieval": "AGIEval",
         "gsm8k": "GSM8K", "humaneval": "HumanEval"}
SETTINGS = {"ceval": "5-shot", "mmlu": "5-shot", "cmmlu": "5-shot", "gaokao": "5-shot", "agieval": "5-shot",
            "gsm8k": "4-shot", "humaneval": "0-shot"}
STATE = "suite_run.json"


def _benchmark_argv(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The evaluator's own command line for one benchmark of the suite."""
    argv = ["--model", str(Path(args.model).resolve()), "--data_dir", str((Path(args.data_root) / name).resolve()),
            "--output_dir", str(out), "--overwrite"]
    for flag in ("tokenizer", "tag", "adapter", "dtype", "device", "quantize", "group_size"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag}", str(Path(value).resolve()) if flag in ("tokenizer", "adapter") else str(value)]
    if args.quantize_head:
        argv.append("--quantize_head")
    if args.batch_size:
        argv += ["--batch_size", str(args.batch_size)]
    if name in ("gsm8k", "humaneval"):
        if args.limit:
            argv += ["--limit", str(args.limit)]
        if args.max_new_tokens:
            argv += ["--max_new_tokens", str(args.max_new_tokens)]
    else:
        argv += ["--shots", "5"]
    if name == "gsm8k":
        argv += ["--shots", "4"]
    if name == "humaneval":
        argv += ["--n", "1", "--k", "1"]
    if name == "ceval":
        argv += ["--split", "val"]
    return argv


def fingerprint(*paths: str | None) -> list[list[Any]]:
    """[name, size, mtime_ns] of the files of each given model/adapter/tokenizer path (a folder's top level), so that
    a model rewritten in place counts as a different setting."""
    out: list[list[Any]] = []
    for given in paths:
        if not given:
            continue
        path = Path(given)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.exists() else []
        out += [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return out


def _runner(name: str) -> tuple[Callable[[list[str]], argparse.Namespace], Callable[..., dict[str, Any]]]:
    """(parse the evaluator's argv, run it with an opened model) for one benchmark."""
    if name in ("gsm8k", "humaneval"):
        from evaluation import evaluate_gsm8k, evaluate_humaneval

        module = evaluate_gsm8k if name == "gsm8k" else evaluate_humaneval
        return module.parser().parse_args, module.run
    from evaluation import evaluate_agieval, evaluate_cmmlu, evaluate_gaokao, evaluate_mmlu, evaluate_zh
    from evaluation.runner import build_parser, run

    bench = {"ceval": evaluate_zh.CEVAL, "mmlu": evaluate_mmlu.MMLU, "cmmlu": evaluate_cmmlu.CMMLU,
             "gaokao": evaluate_gaokao.GAOKAO, "agieval": evaluate_agieval.AGIEVAL}[name]
    p = build_parser(bench, f"evaluation.suite[{name}]", name, [], default_split=bench.splits[0])
    return p.parse_args, lambda a, model=None: run(bench, a, model)


def rows_of(name: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The table rows of one benchmark's results.json (percent scores)."""
    if name == "gsm8k":
        score = results["accuracy"]
    elif name == "humaneval":
        score = results["pass_at_k"].get("pass@1")
    else:
        score = results["overall"]["accuracy"]
    rows = [{"benchmark": NAMES[name], "setting": SETTINGS[name], "score": score,
             "metric": "pass@1" if name == "humaneval" else "accuracy",
             "complete": bool(results.get("complete", True))}]
    if name == "gaokao" and "GAOKAO-English" in results.get("groups", {}):
        rows.append({"benchmark": "GAOKAO-English", "setting": SETTINGS[name],
                     "score": results["groups"]["GAOKAO-English"]["accuracy"], "metric": "accuracy",
                     "complete": bool(results.get("complete", True))})
    return rows


def format_markdown(model: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"# Evaluation of {model}", "", "| Benchmark | Setting | Score |", "|---|---|---|"]
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.2f}"
        lines.append(f"| {r['benchmark']} | {r['setting']} | {score}{'' if r['complete'] else ' (partial data)'} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from evaluation.runner import open_from_args  # the one model-opening site

    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown or not names:
        raise UserError(f"--benchmarks: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{','.join(BENCHMARKS)}")
    names = list(dict.fromkeys(names))
    for flag in ("limit", "batch_size", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    root = Path(args.data_root)
    absent = [str(root / n) for n in names if not (root / n).is_dir()]
    if absent:
        raise MissingFileError(f"{absent[0]}: benchmark data folder not found"
                               + (f" (nor {len(absent) - 1} more)" if len(absent) > 1 else "")
                               + "; --data_root must hold one folder per benchmark")
    out = Path(args.output_dir)
    files = fingerprint(args.model, args.adapter, args.tokenizer)
    plans = []
    for name in names:
        argv = _benchmark_argv(name, args, out / name)
        parse, run_one = _runner(name)
        done = out / name / "results.json"
        state = out / name / STATE
        same = done.is_file() and state.is_file() and json.loads(state.read_text()) == {"argv": argv, "files": files}
        plans.append((name, argv, parse(argv), run_one, same))
    model = None
    table: list[dict[str, Any]] = []
    for name, argv, bench_args, run_one, same in plans:
        if same:
            print(f"{name}: finished earlier with the same settings; reading {out / name / 'results.json'}")
            results = json.loads((out / name / "results.json").read_text())
        else:
            if model is None:
                model = open_from_args(bench_args)  # once, for every benchmark that runs
            (out / name / STATE).unlink(missing_ok=True)
            results = run_one(bench_args, model=model)
            write_json(out / name / STATE, {"argv": argv, "files": files})
        table += rows_of(name, results)
    summary = {"model": str(Path(args.model).resolve()), "rows": table,
               "benchmarks": {n: str(out / n / "results.json") for n in names}}
    write_text(out / "results.md", format_markdown(args.model, table))
    write_json(out / "results.json", summary)
    print(format_markdown(args.model, table))
    return summary


def parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m evaluation.suite", "Several benchmarks in one process, the model opened once, one table.")
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="a Hugging Face causal-LM folder or a training run directory")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help=f"comma-separated, of {','.join(BENCHMARKS)}")
    p.add_argument("--data_root", default="data", help="folder with one data folder per benchmark (default: data)")
    p.add_argument("--output_dir", default="eval_results", help="where the table and each benchmark's outputs go")
    p.add_argument("--limit", type=int, help="GSM8K and HumanEval: only the first N problems")
    p.add_argument("--max_new_tokens", type=int, help="GSM8K and HumanEval: longest reply in tokens")
    p.add_argument("--batch_size", type=int, help="each evaluator's batch size (default: its own)")
    add_model_flags(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cli.run_main(run, args)


if __name__ == "__main__":
    main()
