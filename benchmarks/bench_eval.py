"""Benchmark our evaluators against lm-evaluation-harness in ONE run: MMLU, C-Eval and CMMLU, k-shot, same models.

    python benchmarks/bench_eval.py --mmlu_dir ../shared/data/mmlu --ceval_dir ../shared/data/ceval \
        --cmmlu_dir ../shared/data/cmmlu --tokenizer ../shared/data/weights/llama2c_tokenizer.model \
        --work_dir runs/bench_eval [--mmlu_subjects ...] [--ceval_subjects ...] [--cmmlu_subjects ...]

1. Makes two small randomly initialised models of the same shape (a preset, vocabulary = the tokenizer's) as
   Hugging Face folders: a LLaMA one, which our loader runs with the prefix cache, and a Mistral one (model_type
   "mistral", no sliding window, tokenizer.json only), which our evaluators run through transformers and
   AutoTokenizer (one prompt at a time: the path of any non-LLaMA folder). Mistral rather than Qwen2 or GPT-2
   because transformers 5's AutoTokenizer rebuilds those families' own pre-tokenizers around a tokenizer.json, which
   would not be the LLaMA tokenizer any more; for Mistral folders it reads tokenizer.json as written.
2. For each benchmark, back to back: times our evaluator (`python -m evaluation.evaluate_*`, the whole command:
   loading, tokenizing, scoring, writing) and `lm_eval --model hf` (with --log_samples) on each model, with local
   lm-eval tasks that read the same CSVs and build the same prompts (benchmarks/lm_eval_tasks/).
3. Checks that both systems read the very same prompt text, and compares predictions and letter probabilities.
Prints a table and writes WORK_DIR/bench_eval.json. Needs `pip install -c constraints.txt "lm_eval[hf]"`.

With --gsm8k_dir, GSM8K too (the LLaMA model only): the first --gsm8k_limit test questions with the same 4-shot
prompts (built by evaluation/evaluate_gsm8k.py and handed to lm-eval as ready text), greedy replies cut at the same
stop sequences, through `python evaluation/evaluate_gsm8k.py` and `lm_eval --model hf` (generate_until); compares
the replies and the accuracy of both. --gsm8k_repeats N times each system N times, interleaved, with the wall time,
the CPU time (user + system, less moved by other users' load) and the load average of each run; the row's figures
are the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and not __package__:  # run as a file: make the repository root importable
    sys.path[0] = str(REPO)

from evaluation import evaluate_cmmlu, evaluate_gsm8k, evaluate_mmlu, evaluate_zh  # noqa: E402
from evaluation.runner import Benchmark, load_data  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


@dataclass
class Suite:
    """One benchmark as both systems run it."""

    name: str
    bench: Benchmark
    module: str
    """Our evaluator, for `python -m`."""
    split: str
    utils: str
    """File in benchmarks/lm_eval_tasks/ with the loader."""
    loader: str
    """`!function` target of the loader."""
    text: str
    """lm-eval's doc_to_text (Jinja), the same item format as ours."""
    answer: str
    """The column holding the answer letter."""
    delimiter: str
    """Between the cue and the letter."""


SUITES = {
    "mmlu": Suite("mmlu", evaluate_mmlu.MMLU, "evaluation.evaluate_mmlu", "test", "mmlu_local_utils.py",
                  "mmlu_local_utils.load", "{{question}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\nAnswer:",
                  "answer", " "),
    "ceval": Suite("ceval", evaluate_zh.CEVAL, "evaluation.evaluate_zh", "val", "zh_local_utils.py",
                   "zh_local_utils.load_ceval", "{{question}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\n答案：",
                   "answer", ""),
    "cmmlu": Suite("cmmlu", evaluate_cmmlu.CMMLU, "evaluation.evaluate_cmmlu", "test", "zh_local_utils.py",
                   "zh_local_utils.load_cmmlu",
                   "题目：{{Question}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\n答案是：", "Answer", ""),
}
DEFAULT_SUBJECTS = {  # a small subset: lm-eval's startup alone takes a minute or two on a loaded 2-core machine
    "mmlu": ["abstract_algebra", "anatomy"],
    "ceval": ["law", "accountant", "high_school_chinese"],
    "cmmlu": ["agronomy", "arts"],
}

TASK_TEMPLATE = """\
task: {task}
custom_dataset: !function {loader}
dataset_kwargs:
  data_dir: {data_dir}
  subject: {subject}
test_split: {split}
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: {description}
doc_to_text: "{text}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index({answer}.strip())}}}}"
target_delimiter: {delimiter}
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def make_models(work: Path, tokenizer_path: Path, preset: str, seed: int, max_seq_len: int) -> dict[str, Path]:
    """A random LLaMA folder (our loader) and a random Mistral folder of the same shape (transformers)."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = Tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    config = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, max_seq_len=max_seq_len)
    llama = Transformer(config).to_hf(work / "model_llama", tokenizer_path=tokenizer_path)
    other_dir = work / "model_mistral"
    other = MistralForCausalLM(MistralConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=max_seq_len, rms_norm_eps=config.norm_eps, tie_word_embeddings=False,
        sliding_window=None, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    if other_dir.exists():
        shutil.rmtree(other_dir)
    other.save_pretrained(other_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # no tokenizer.model
        shutil.copyfile(Path(llama) / name, other_dir / name)
    return {"llama": Path(llama), "mistral": other_dir}


def write_lm_eval_tasks(task_dir: Path, suite: Suite, data_dir: Path, subjects: list[str]) -> str:
    """One lm-eval task per subject plus a group over them; returns the group's name."""
    if task_dir.exists():
        shutil.rmtree(task_dir)
    task_dir.mkdir(parents=True)
    shutil.copyfile(REPO / "benchmarks" / "lm_eval_tasks" / suite.utils, task_dir / suite.utils)
    prompts_module = {"mmlu": evaluate_mmlu, "ceval": evaluate_zh, "cmmlu": evaluate_cmmlu}[suite.name]
    for subject in subjects:
        text = TASK_TEMPLATE.format(task=f"{suite.name}_local_{subject}", loader=suite.loader,
                                    data_dir=json.dumps(str(data_dir.resolve())), subject=subject, split=suite.split,
                                    description=json.dumps(prompts_module.header(subject), ensure_ascii=False),
                                    text=suite.text, answer=suite.answer, delimiter=json.dumps(suite.delimiter))
        (task_dir / f"{suite.name}_local_{subject}.yaml").write_text(text, encoding="utf-8")
    group = {"group": f"{suite.name}_local", "task": [f"{suite.name}_local_{s}" for s in subjects],
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 1}}
    (task_dir / f"{suite.name}_local.yaml").write_text(json.dumps(group, indent=2) + "\n")  # JSON is valid YAML
    return f"{suite.name}_local"


@dataclass
class Timed:
    """One command's wall time and CPU time (user + system of it and every process it waited for): on a machine
    loaded by others the CPU time moves much less than the wall time."""

    wall: float
    cpu: float


def run_timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Timed:
    print("$ " + " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"error: command failed with exit code {proc.returncode}; see {log}")
    return Timed(elapsed, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def _context(sample: dict) -> str:
    args = sample["arguments"]
    first = args[0] if isinstance(args, list) else next(iter(args.values()))
    return first[0] if isinstance(first, list) else first["arg_0"]


def read_lm_eval_samples(out_dir: Path, prefix: str) -> dict[tuple[str, int], dict]:
    """(subject, row) -> lm-eval's prediction, letter probabilities and prompt text, from --log_samples files."""
    found = {}
    for path in sorted(out_dir.rglob(f"samples_{prefix}_*.jsonl")):
        subject = path.name.removeprefix(f"samples_{prefix}_").rsplit("_", 1)[0]
        for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): texts hold U+2028 etc.
            if not line:
                continue
            s = json.loads(line)
            ll = np.array([float(r[0]) for r in s["filtered_resps"]])
            probs = np.exp(ll - ll.max())
            found[(subject, int(s["doc_id"]))] = {"prediction": "ABCD"[int(np.argmax(ll))],
                                                  "probs": probs / probs.sum(), "context": _context(s)}
    return found


def our_prompts(suite: Suite, data_dir: Path, subjects: list[str], shots: int) -> dict[tuple[str, int], str]:
    """(subject, row) -> the k-shot prompt text our evaluator builds (all shots; none are dropped at 4096)."""
    data = load_data(suite.bench, data_dir, suite.split, subjects, shots)
    prompts = {}
    for subject, (dev, items) in data.items():
        p = suite.bench.prompts(subject, dev, items)
        for i in range(len(items)):
            prompts[(subject, i)] = p.prompt(i, len(dev))
    return prompts


def run_ours(suite: Suite, model: Path, data_dir: Path, subjects: list[str], out: Path, args) -> dict[str, Any]:
    wall = run_timed([sys.executable, "-m", suite.module, "--model", str(model), "--data_dir", str(data_dir),
                      "--output_dir", str(out), "--split", suite.split, "--ntrain", str(args.ntrain), "--device",
                      args.device, "--dtype", args.dtype, "--batch_size", str(args.batch_size), "--subjects",
                      *subjects], out.with_suffix(".log")).wall
    results = json.loads((out / "results.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").split("\n") if line]
    return {"wall_s": round(wall, 1), "scoring_s": results["settings"]["scoring_seconds"],
            "backend": results["settings"]["backend"], "prefix_cache": results["settings"]["prefix_cache"],
            "questions": results["overall"]["count"], "accuracy": results["overall"]["weighted_accuracy"],
            "shots_dropped": sum(r["shots_dropped"] for r in results["subjects"].values()), "preds": preds}


def run_lm_eval(suite: Suite, model: Path, task_dir: Path, group: str, out: Path, args) -> float:
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return run_timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                      f"pretrained={model},dtype={args.dtype},add_bos_token=True", "--device", args.device,
                      "--tasks", group, "--include_path", str(task_dir), "--num_fewshot", str(args.ntrain),
                      "--batch_size", args.lm_eval_batch_size, "--output_path", str(out), "--log_samples"],
                     out.with_suffix(".log"), env).wall


def compare(ours: dict[str, Any], theirs: dict[tuple[str, int], dict], prompts: dict[tuple[str, int], str]):
    same_pred = same_prompt = 0
    max_diff = 0.0
    for p in ours["preds"]:
        t = theirs[(p["subject"], p["index"])]
        same_pred += p["prediction"] == t["prediction"]
        same_prompt += prompts[(p["subject"], p["index"])] == t["context"]
        max_diff = max(max_diff, float(np.abs(np.array(p["probs"]) - t["probs"]).max()))
    acc = 100 * np.mean([theirs[(p["subject"], p["index"])]["prediction"] == p["answer"] for p in ours["preds"]])
    return {"identical_prompts": same_prompt, "agreeing_predictions": same_pred,
            "max_prob_abs_diff": round(max_diff, 7), "lm_eval_accuracy": float(acc)}


GSM8K_TASK = """\
task: gsm8k_local
custom_dataset: !function gsm8k_local_utils.load
dataset_kwargs:
  data_file: {data_file}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {until}
  do_sample: false
  max_gen_toks: {max_new}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def bench_gsm8k(args, model: Path, work: Path) -> dict[str, Any]:
    """GSM8K, ours and lm-eval's hf backend, the same prompts and greedy settings; wall time of each command."""
    tok = Tokenizer(model / "tokenizer.model")
    test = evaluate_gsm8k.read_gsm8k(args.gsm8k_dir / "test.jsonl")[:args.gsm8k_limit]
    train = evaluate_gsm8k.read_gsm8k(args.gsm8k_dir / "train.jsonl")
    shots = [evaluate_gsm8k.shot_text(*train[i]) for i in evaluate_gsm8k.pick_shots(train, 4, 1234)]
    prompts = ["".join(shots) + evaluate_gsm8k.item_text(q) for q, _, _ in test]
    room = args.max_seq_len - args.gsm8k_max_new_tokens
    assert all(len(tok.encode(p, bos=True)) <= room for p in prompts), "a prompt would lose shots: raise --max_seq_len"
    task_dir = work / "lm_eval_tasks_gsm8k"
    if task_dir.exists():
        shutil.rmtree(task_dir)
    task_dir.mkdir(parents=True)
    shutil.copyfile(REPO / "benchmarks" / "lm_eval_tasks" / "gsm8k_local_utils.py", task_dir / "gsm8k_local_utils.py")
    data_file = task_dir / "prompts.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n"
                                 for p, (_, _, a) in zip(prompts, test)), encoding="utf-8")
    (task_dir / "gsm8k_local.yaml").write_text(GSM8K_TASK.format(
        data_file=json.dumps(str(data_file)), until=json.dumps(list(evaluate_gsm8k.STOPS)),
        max_new=args.gsm8k_max_new_tokens), encoding="utf-8")

    ours_dir, lm_out = work / "ours_gsm8k", work / "lm_eval_gsm8k"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for _ in range(args.gsm8k_repeats):  # interleaved: ours, lm-eval, ours, lm-eval, ... under the same load
        run: dict[str, Any] = {"load_before": os.getloadavg()[0]}
        t = run_timed([sys.executable, "evaluation/evaluate_gsm8k.py", "--model", str(model), "--data_dir",
                       str(args.gsm8k_dir), "--output_dir", str(ours_dir), "--overwrite", "--limit",
                       str(args.gsm8k_limit), "--max_new_tokens", str(args.gsm8k_max_new_tokens), "--shots", "4",
                       "--device", args.device, "--dtype", args.dtype, "--batch_size",
                       str(args.gsm8k_batch_size)], ours_dir.with_suffix(".log"))
        settings = json.loads((ours_dir / "results.json").read_text())["settings"]
        run.update(wall_s=round(t.wall, 1), cpu_s=round(t.cpu, 1), generation_s=settings["generation_seconds"])
        if not args.skip_lm_eval:
            if lm_out.exists():
                shutil.rmtree(lm_out)
            t = run_timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={model},dtype={args.dtype},add_bos_token=True", "--device", args.device,
                           "--tasks", "gsm8k_local", "--include_path", str(task_dir), "--num_fewshot", "0",
                           "--batch_size", str(args.gsm8k_batch_size), "--output_path", str(lm_out),
                           "--log_samples"], lm_out.with_suffix(".log"), env)
            run.update(lm_eval_wall_s=round(t.wall, 1), lm_eval_cpu_s=round(t.cpu, 1),
                       speedup=round(t.wall / run["wall_s"], 2), cpu_speedup=round(t.cpu / run["cpu_s"], 2))
        run["load_after"] = os.getloadavg()[0]
        runs.append(run)
        print(json.dumps(run), flush=True)
    ours = [json.loads(line) for line in (ours_dir / "predictions.jsonl").read_text(encoding="utf-8").split("\n")
            if line]
    median = {k: float(np.median([r[k] for r in runs])) for k in runs[0] if k.endswith("_s") or "speedup" in k}
    row: dict[str, Any] = {"benchmark": "gsm8k", "questions": len(test), "max_new_tokens": args.gsm8k_max_new_tokens,
                           "batch_size": args.gsm8k_batch_size, "runs": runs, "median": median,
                           "wall_s": median["wall_s"],
                           "accuracy": json.loads((ours_dir / "results.json").read_text())["accuracy"]}
    if not args.skip_lm_eval:
        theirs: dict[int, dict] = {}
        for path in lm_out.rglob("samples_gsm8k_local_*.jsonl"):
            for line in path.read_text(encoding="utf-8").split("\n"):
                if line:
                    s = json.loads(line)
                    theirs[int(s["doc_id"])] = {"reply": s["filtered_resps"][0], "context": _context(s)}
        same_reply = sum(theirs[p["index"]]["reply"] == p["reply"] for p in ours)
        same_prompt = sum(theirs[n]["context"] == prompts[n] for n in range(len(test)))
        lm_correct = sum(evaluate_gsm8k.same_number(evaluate_gsm8k.extract_answer(theirs[n]["reply"]), a)
                         for n, (_, _, a) in enumerate(test))
        row.update({"lm_eval_wall_s": median["lm_eval_wall_s"], "speedup": median["speedup"],
                    "identical_prompts": same_prompt, "identical_replies": same_reply,
                    "lm_eval_accuracy": 100.0 * lm_correct / len(test)})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mmlu_dir", "--data_dir", type=Path, help="MMLU folder with dev/ and test/")
    ap.add_argument("--ceval_dir", type=Path, help="C-Eval folder with dev/ and val/")
    ap.add_argument("--cmmlu_dir", type=Path, help="CMMLU folder with dev/ and test/")
    ap.add_argument("--gsm8k_dir", type=Path, help="GSM8K folder with test.jsonl and train.jsonl")
    ap.add_argument("--gsm8k_limit", type=int, default=50, help="GSM8K: the first N test questions")
    ap.add_argument("--gsm8k_max_new_tokens", type=int, default=128, help="GSM8K: longest reply, both systems")
    ap.add_argument("--gsm8k_batch_size", type=int, default=8, help="GSM8K: prompts generated together, both systems")
    ap.add_argument("--gsm8k_repeats", type=int, default=1,
                    help="GSM8K: timed runs of each system, interleaved (the medians are the row's figures)")
    ap.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece tokenizer.model")
    ap.add_argument("--work_dir", type=Path, default=REPO / "runs" / "bench_eval")
    ap.add_argument("--preset", default="debug", help="model preset of the random models")
    ap.add_argument("--max_seq_len", type=int, default=4096, help="context of the random models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ntrain", type=int, default=5)
    for name, subjects in DEFAULT_SUBJECTS.items():
        ap.add_argument(f"--{name}_subjects", nargs="+", default=subjects)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch_size", type=int, default=16, help="ours")
    ap.add_argument("--lm_eval_batch_size", default="4", help="4: larger batches of the longest prompts "
                    "need over 20 GiB of fp32 logits on CPU")
    ap.add_argument("--skip_lm_eval", action="store_true", help="time ours only")
    ap.add_argument("--skip_transformers", action="store_true", help="leave out the Mistral (transformers path) rows")
    ap.add_argument("--lm_eval_transformers_on", nargs="*", default=list(SUITES), metavar="BENCHMARK",
                    help="benchmarks on which lm-eval also runs the Mistral model (its startup dominates small runs)")
    args = ap.parse_args()

    dirs = {"mmlu": args.mmlu_dir, "ceval": args.ceval_dir, "cmmlu": args.cmmlu_dir}
    if not any(dirs.values()) and not args.gsm8k_dir:
        sys.exit("error: pass at least one of --mmlu_dir, --ceval_dir, --cmmlu_dir, --gsm8k_dir")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = make_models(work, args.tokenizer, args.preset, args.seed, args.max_seq_len)
    if args.skip_transformers:
        models.pop("mistral")
    config = json.loads((models["llama"] / "config.json").read_text())
    summary: dict[str, Any] = {
        "model_config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "vocab_size", "max_position_embeddings")},
        "ntrain": args.ntrain, "device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "lm_eval_batch_size": args.lm_eval_batch_size, "rows": []}
    for name, data_dir in dirs.items():
        if data_dir is None:
            continue
        suite, subjects = SUITES[name], getattr(args, f"{name}_subjects")
        prompts = our_prompts(suite, data_dir, subjects, args.ntrain)
        task_dir = work / f"lm_eval_tasks_{name}"
        group = write_lm_eval_tasks(task_dir, suite, data_dir, subjects)
        for kind, model in models.items():
            ours = run_ours(suite, model, data_dir, subjects, work / f"ours_{name}_{kind}", args)
            row = {"benchmark": name, "split": suite.split, "subjects": subjects, "model": kind,
                   **{k: v for k, v in ours.items() if k != "preds"}}
            if not args.skip_lm_eval and (kind == "llama" or name in args.lm_eval_transformers_on):
                lm_out = work / f"lm_eval_{name}_{kind}"
                lm_s = run_lm_eval(suite, model, task_dir, group, lm_out, args)
                row.update({"lm_eval_wall_s": round(lm_s, 1), "speedup": round(lm_s / ours["wall_s"], 2),
                            **compare(ours, read_lm_eval_samples(lm_out, group), prompts)})
            summary["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.gsm8k_dir:
        summary["gsm8k"] = bench_gsm8k(args, models["llama"], work)
        print(json.dumps(summary["gsm8k"]), flush=True)
    (work / "bench_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["rows"]:
        print(format_rows(summary["rows"]))


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | model (our path) | questions | ours wall s | ours scoring s | lm-eval wall s | speedup | "
             "same prompts | same predictions | max prob diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        path = "LLaMA (our loader, prefix cache)" if r["backend"] == "ours" else "Mistral (transformers, plain)"
        lines.append(f"| {r['benchmark']} {r['split']} | {path} | {r['questions']} | {r['wall_s']} | "
                     f"{r['scoring_s']} | {r.get('lm_eval_wall_s', '-')} | {r.get('speedup', '-')} | "
                     f"{r.get('identical_prompts', '-')} | {r.get('agreeing_predictions', '-')} | "
                     f"{r.get('max_prob_abs_diff', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
