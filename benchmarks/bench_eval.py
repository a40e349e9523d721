"""Benchmark evaluation/evaluate_mmlu.py against lm-evaluation-harness: full MMLU test split, k-shot, same model.

    python benchmarks/bench_eval.py --data_dir ../shared/data/mmlu \
        --tokenizer ../shared/data/weights/llama2c_tokenizer.model --work_dir runs/bench_eval

1. Makes a small randomly initialised model (a preset, vocabulary = the tokenizer's) as a Hugging Face folder.
2. Times `python -m evaluation.evaluate_mmlu` on it (the whole command: loading, tokenizing, scoring, writing).
3. Times `lm_eval --model hf` on the same folder with a local task that reads the same CSVs and builds the same
   prompt (benchmarks/lm_eval_tasks/mmlu_local_utils.py), with --log_samples.
4. Checks that both read the very same prompt text, and compares predictions and letter probabilities.
Prints the figures and writes WORK_DIR/bench_eval.json. Needs `pip install -c constraints.txt "lm_eval[hf]"`
(lm_eval 0.4.13 needs its hf extra, accelerate, for `--model hf`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and not __package__:  # run as a file: make the repository root importable
    sys.path[0] = str(REPO)

from evaluation import evaluate_mmlu  # noqa: E402
from evaluation.common import load_data  # noqa: E402
from evaluation.subjects import MMLU_SUBJECTS  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

TASK_TEMPLATE = """\
task: mmlu_local_{subject}
custom_dataset: !function mmlu_local_utils.load
dataset_kwargs:
  data_dir: {data_dir}
  subject: {subject}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: {description}
doc_to_text: "{{{{question}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer.strip())}}}}"
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def make_model(out_dir: Path, tokenizer_path: Path, preset: str, seed: int, max_seq_len: int) -> Path:
    """A randomly initialised `preset` model with the tokenizer's vocabulary, saved as a Hugging Face folder."""
    tok = Tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    config = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, max_seq_len=max_seq_len)
    Transformer(config).to_hf(out_dir, tokenizer_path=tokenizer_path)
    return out_dir


def write_lm_eval_tasks(task_dir: Path, data_dir: Path, subjects: list[str]) -> str:
    """One lm-eval task per subject plus a group `mmlu_local` over them; returns the group's name."""
    if task_dir.exists():
        shutil.rmtree(task_dir)
    task_dir.mkdir(parents=True)
    shutil.copyfile(REPO / "benchmarks" / "lm_eval_tasks" / "mmlu_local_utils.py", task_dir / "mmlu_local_utils.py")
    for subject in subjects:
        text = TASK_TEMPLATE.format(subject=subject, data_dir=json.dumps(str(data_dir.resolve())),
                                    description=json.dumps(evaluate_mmlu.header(subject)))
        (task_dir / f"mmlu_local_{subject}.yaml").write_text(text)
    group = {"group": "mmlu_local", "task": [f"mmlu_local_{s}" for s in subjects],
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 1}}
    (task_dir / "mmlu_local.yaml").write_text(json.dumps(group, indent=2) + "\n")  # JSON is valid YAML
    return "mmlu_local"


def run_timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"error: command failed with exit code {proc.returncode}; see {log}")
    return elapsed


def _context(sample: dict) -> str:
    args = sample["arguments"]
    first = args[0] if isinstance(args, list) else next(iter(args.values()))
    return first[0] if isinstance(first, list) else first["arg_0"]


def read_lm_eval_samples(out_dir: Path) -> dict[tuple[str, int], dict]:
    """(subject, row) -> lm-eval's prediction, letter probabilities and prompt text, from --log_samples files."""
    found = {}
    for path in sorted(out_dir.rglob("samples_mmlu_local_*.jsonl")):
        subject = path.name.removeprefix("samples_mmlu_local_").rsplit("_", 1)[0]
        for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): texts hold U+2028 etc.
            if not line:
                continue
            s = json.loads(line)
            ll = np.array([float(r[0]) for r in s["filtered_resps"]])
            probs = np.exp(ll - ll.max())
            found[(subject, int(s["doc_id"]))] = {"prediction": "ABCD"[int(np.argmax(ll))],
                                                  "probs": probs / probs.sum(), "context": _context(s)}
    return found


def our_prompts(data_dir: Path, subjects: list[str], shots: int) -> dict[tuple[str, int], str]:
    """(subject, row) -> the k-shot prompt text evaluate_mmlu.py builds (all shots: none are dropped at 4096)."""
    data = load_data(evaluate_mmlu.MMLU, data_dir, "test", subjects, shots)
    prompts = {}
    for subject, (dev, items) in data.items():
        p = evaluate_mmlu.subject_prompts(subject, dev, items)
        for i in range(len(items)):
            prompts[(subject, i)] = p.prompt(i, len(dev))
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", type=Path, required=True, help="MMLU folder with dev/ and test/")
    ap.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece tokenizer.model")
    ap.add_argument("--work_dir", type=Path, default=REPO / "runs" / "bench_eval")
    ap.add_argument("--model", type=Path, help="evaluate this HF folder instead of making a random model")
    ap.add_argument("--preset", default="debug", help="model preset of the random model")
    ap.add_argument("--max_seq_len", type=int, default=4096, help="context of the random model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ntrain", type=int, default=5)
    ap.add_argument("--subjects", nargs="+", default=MMLU_SUBJECTS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch_size", type=int, default=16, help="ours")
    ap.add_argument("--lm_eval_batch_size", default="4", help="4: larger batches of the longest prompts "
                    "need over 20 GiB of fp32 logits on CPU")
    ap.add_argument("--skip_lm_eval", action="store_true", help="time ours only")
    ap.add_argument("--reuse_ours", action="store_true",
                    help="take our run's figures from WORK_DIR/ours_summary.json instead of running it again")
    ap.add_argument("--reuse_lm_eval", action="store_true",
                    help="compare against the lm-eval output and time already in WORK_DIR instead of running it again")
    args = ap.parse_args()

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or work / "model"
    if not args.model and not ((args.reuse_ours or args.reuse_lm_eval) and (model_dir / "config.json").exists()):
        make_model(model_dir, args.tokenizer, args.preset, args.seed, args.max_seq_len)
    config = json.loads((model_dir / "config.json").read_text())
    print(f"model {model_dir}: dim {config['hidden_size']}, {config['num_hidden_layers']} layers, "
          f"vocab {config['vocab_size']}, context {config['max_position_embeddings']}", flush=True)

    ours_out = work / "ours"
    ours_summary = work / "ours_summary.json"
    if args.reuse_ours and ours_summary.exists():
        summary = json.loads(ours_summary.read_text())
    else:
        ours_s = run_timed([sys.executable, "-m", "evaluation.evaluate_mmlu", "--model", str(model_dir),
                            "--data_dir", str(args.data_dir), "--output_dir", str(ours_out), "--ntrain",
                            str(args.ntrain), "--device", args.device, "--dtype", args.dtype, "--batch_size",
                            str(args.batch_size), "--overwrite", "--subjects", *args.subjects], work / "ours.log")
        results = json.loads((ours_out / "results.json").read_text())
        summary = {"questions": results["overall"]["count"], "ntrain": args.ntrain, "model": str(model_dir),
                   "model_config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "vocab_size",
                                                           "max_position_embeddings")},
                   "ours_wall_s": round(ours_s, 1), "ours_scoring_s": results["settings"]["scoring_seconds"],
                   "ours_accuracy": results["overall"]["accuracy"],
                   "ours_shots_dropped": sum(r["shots_dropped"] for r in results["subjects"].values()),
                   "device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count()}
        ours_summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    ours_preds = [json.loads(line) for line in (ours_out / "predictions.jsonl").read_text(encoding="utf-8").split("\n")
                  if line]

    if not args.skip_lm_eval:
        task_dir = work / "lm_eval_tasks"
        group = write_lm_eval_tasks(task_dir, args.data_dir, args.subjects)
        lm_out = work / "lm_eval"
        lm_time = work / "lm_eval_time.json"
        if args.reuse_lm_eval and lm_time.exists():
            lm_s, lm_batch = (json.loads(lm_time.read_text())[k] for k in ("lm_eval_wall_s", "lm_eval_batch_size"))
        else:
            if lm_out.exists():
                shutil.rmtree(lm_out)
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            lm_s = run_timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                              f"pretrained={model_dir},dtype={args.dtype},add_bos_token=True", "--device", args.device,
                              "--tasks", group, "--include_path", str(task_dir), "--num_fewshot", str(args.ntrain),
                              "--batch_size", args.lm_eval_batch_size, "--output_path", str(lm_out), "--log_samples"],
                             work / "lm_eval.log", env)
            lm_batch = args.lm_eval_batch_size
            lm_time.write_text(json.dumps({"lm_eval_wall_s": round(lm_s, 1), "lm_eval_batch_size": lm_batch}) + "\n")
        theirs = read_lm_eval_samples(lm_out)
        prompts = our_prompts(args.data_dir, args.subjects, args.ntrain)
        ours_s = summary["ours_wall_s"]
        same_pred = same_prompt = 0
        max_prob_diff = 0.0
        for p in ours_preds:
            t = theirs[(p["subject"], p["index"])]
            same_pred += p["prediction"] == t["prediction"]
            same_prompt += prompts[(p["subject"], p["index"])] == t["context"]
            max_prob_diff = max(max_prob_diff, float(np.abs(np.array(p["probs"]) - t["probs"]).max()))
        lm_acc = 100 * np.mean([theirs[(p["subject"], p["index"])]["prediction"] == p["answer"] for p in ours_preds])
        summary.update({"lm_eval_wall_s": round(lm_s, 1), "lm_eval_batch_size": lm_batch,
                        "speedup": round(lm_s / ours_s, 2), "lm_eval_questions": len(theirs),
                        "identical_prompts": same_prompt, "agreeing_predictions": same_pred,
                        "agreement": round(same_pred / len(ours_preds), 6), "max_prob_abs_diff": max_prob_diff,
                        "lm_eval_accuracy": lm_acc})
    (work / "bench_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
