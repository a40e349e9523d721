"""Quantized models against their float original, on CPU: the figures of benchmarks/quantization.md.

    python benchmarks/quantization/bench_quant.py --model runs/sample/train/hf --data_dir runs/sample/data \
        --out runs/quantbench/sample

For each variant (fp32, bf16, int8, int4, int8+head / int4+head with the output head quantized too, and
int4-gptq / int8-gptq: GPTQ calibrated on --calibration, inference/calibration.py):
- linear weight bytes (the quantized layers: every linear but the embedding and the head; with the head as well
  for the +head variants) and the bytes of the whole model;
- peak resident memory (ru_maxrss) of a fresh process that loads the variant (a saved quantized folder, loaded
  without any float copy) and decodes; and the same process's RSS right after `import torch` for reference;
- decode tokens/s at batch 1 (greedy, KV cache, after a warm-up; prefill not counted), in that process;
- held-out perplexity on the training run's validation split (the tokens the trainer never trained on) and,
  with --text, on a text file;
- MMLU / C-Eval accuracy on a few subjects with evaluation/'s own prompts and scoring (answer-letter logits after
  the k-shot prompt), and how often the quantized model picks the same letter as fp32;
- greedy decoding: for each of --prompts prompts (held-out windows), how many of the first --new_tokens greedy
  tokens equal fp32's before the first difference.
Every variant runs in this one script on the same machine and threads (OMP_NUM_THREADS as set by the caller).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from artifacts import load_tokenizer, open_model  # noqa: E402
from artifacts.quantized import save_quantized  # noqa: E402
from model.quant import linear_weight_bytes, quantize_model  # noqa: E402


def variant_args(name: str) -> tuple[str | None, bool, str]:
    """(scheme, quantize_head, method) of a variant name: fp32, bf16 (the float model in bf16), int8, int4,
    int8+head, int4-gptq, int4-gptq+head..."""
    if name in ("fp32", "bf16"):
        return None, False, "rtn"
    scheme, _, head = name.partition("+")
    scheme, _, method = scheme.partition("-")
    return scheme, head == "head", method or "rtn"


# --- the per-variant worker process: memory and speed ----------------------------------------------------------

def peak_rss_mib(key: str = "VmHWM") -> float:
    """This process's peak resident set (VmHWM; VmRSS: the current one). Not ru_maxrss: Linux carries that over
    from the parent across fork and exec, so a child would report the benchmark's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(path: str, new_tokens: int, prompt_len: int, dtype: str) -> None:
    base_rss = peak_rss_mib()
    model = open_model(path, "cpu", dtype)
    torch.manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len))
    with torch.inference_mode():
        for rep in range(2):  # the first pass is the warm-up (kernel packing, allocations)
            cache = model.new_cache(1, prompt_len + new_tokens + 1)
            logits = model(prompt, cache=cache)[:, -1]
            start = time.perf_counter()
            for _ in range(new_tokens):
                logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
            elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": new_tokens / elapsed, "peak_rss_mib": peak_rss_mib(),
                      "rss_after_mib": peak_rss_mib("VmRSS"), "torch_rss_mib": base_rss}))


def run_worker(path: Path, new_tokens: int, prompt_len: int, dtype: str = "float32") -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(path), "--new_tokens", str(new_tokens),
                          "--prompt_len", str(prompt_len), "--dtype", dtype], capture_output=True, text=True,
                         check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- quality ---------------------------------------------------------------------------------------------------

def heldout_tokens(data_dir: Path, limit: int) -> np.ndarray:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    parts = [np.fromfile(data_dir / s["bin"], dtype=dtype) for s in manifest["splits"]["val"]["shards"]]
    return np.concatenate(parts)[:limit].astype(np.int64)


@torch.inference_mode()
def perplexity(model, tokens: np.ndarray, window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens."""
    nll, count = 0.0, 0
    for s in range(0, len(tokens) - 1, window):
        chunk = torch.from_numpy(tokens[s:s + window + 1])[None]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1])
        nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.inference_mode()
def greedy(model, prompts: list[torch.Tensor], n: int, batch: int = 16) -> list[list[int]]:
    """n greedy tokens after each prompt (all of one length), `batch` prompts decoded together."""
    out = []
    for i in range(0, len(prompts), batch):
        block = torch.stack(prompts[i:i + batch])
        out += model.generate(block, n)[:, block.shape[1]:].tolist()
    return out


def identical_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def benchmark_letters(model, tokenizer, bench_name: str, data_dir: Path, subjects: list[str], split: str,
                      shots: int) -> tuple[float, list[int], int]:
    """Accuracy, predicted letter indices and question count on a few subjects (evaluation/'s scoring)."""
    from evaluation.runner import collect, load_data
    from evaluation.scoring import build_requests, score_cached

    if bench_name == "mmlu":
        from evaluation.evaluate_mmlu import MMLU as bench
    else:
        from evaluation.evaluate_zh import CEVAL as bench
    data = load_data(bench, data_dir, split, subjects, shots)
    requests, questions = [], []
    for subject in subjects:
        dev, items = data[subject]
        requests += build_requests(tokenizer, bench.prompts(subject, dev, items), model.config.max_seq_len,
                                   tokenizer.bos_id >= 0)
        questions += items
    logits = score_cached(model, requests, 16)
    _, scores = collect(subjects, data, requests, questions, logits)
    correct = sum(s.correct for s in scores)
    return correct / len(questions), logits.argmax(-1).tolist(), len(questions)


def speed_rounds(results: dict, paths: dict[str, Path], args: argparse.Namespace) -> None:
    """Speed and memory, the variants taking turns (--rounds times, best speed kept): the machine is shared, so
    turns spread any load from other work evenly over the variants."""
    for _ in range(args.rounds):
        for name, path in paths.items():
            row = results["variants"][name]
            dtype = "bfloat16" if name == "bf16" else "float32"
            r = run_worker(path, args.new_tokens, args.prompt_len, dtype)
            row["tokens_per_s"] = max(row.get("tokens_per_s", 0.0), r["tokens_per_s"])
            row.setdefault("tokens_per_s_rounds", []).append(round(r["tokens_per_s"], 1))
            row["peak_rss_mib"], row["torch_rss_mib"] = r["peak_rss_mib"], r["torch_rss_mib"]
            row["rss_after_mib"] = r.get("rss_after_mib")
            print(name, r, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--model", help="float model (HF folder)")
    p.add_argument("--data_dir", help="the training run's data folder (its val split is held out)")
    p.add_argument("--out", help="folder for the quantized copies and results.json")
    p.add_argument("--group_size", type=int, default=None, help="int4 group size (default: the per-layer rule)")
    p.add_argument("--variants", nargs="+", default=["fp32", "int8", "int4"])
    p.add_argument("--text", help="another held-out text file for perplexity")
    p.add_argument("--heldout_tokens", type=int, default=32768)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--greedy_tokens", type=int, default=64, help="greedy tokens per prompt compared with fp32")
    p.add_argument("--calibration", nargs="+", default=None, help="text for the -gptq variants (default data/sample)")
    p.add_argument("--calibration_sequences", type=int, default=None)
    p.add_argument("--calibration_seq_len", type=int, default=None)
    p.add_argument("--mmlu_dir")
    p.add_argument("--mmlu_subjects", nargs="*", default=[])
    p.add_argument("--ceval_dir")
    p.add_argument("--ceval_subjects", nargs="*", default=[])
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--random_config", help="JSON ModelConfig fields: time a random model of that shape instead")
    p.add_argument("--random_tokenizer", help="tokenizer.model saved with the random model")
    p.add_argument("--speed_only", action="store_true", help="redo only the speed/memory rounds of --out")
    p.add_argument("--rounds", type=int, default=3, help="speed/memory measurements per variant (best kept)")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.new_tokens, args.prompt_len, args.dtype)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.speed_only:  # redo only the speed/memory rounds of an earlier run, in place
        results = json.loads((out / "results.json").read_text())
        paths = {name: (Path(results["model"]) if name in ("fp32", "bf16") else out / name.replace("+", "_"))
                 for name in results["variants"]}
        for row in results["variants"].values():
            row.pop("tokens_per_s", None)
            row.pop("tokens_per_s_rounds", None)
        speed_rounds(results, paths, args)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return
    quality = args.random_config is None
    if not quality:  # speed and memory of a larger random model: no quality figures
        from model import ModelConfig, Transformer

        torch.manual_seed(0)
        random_model = Transformer(ModelConfig.from_dict(json.loads(args.random_config)))
        args.model = str(random_model.to_hf(out / "fp32", tokenizer_path=args.random_tokenizer))
        del random_model
    ref_model = open_model(args.model, "cpu", "float32")
    tokenizer = load_tokenizer(args.model, None, ref_model)
    heldout = heldout_tokens(Path(args.data_dir), args.heldout_tokens) if quality else np.zeros(0, np.int64)
    window = min(ref_model.config.max_seq_len, 256)
    text_tokens = None
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")[:400_000]
        text_tokens = np.asarray(tokenizer.encode(text, bos=False)[:args.heldout_tokens], dtype=np.int64)
    n_prompts = args.prompts if quality else 0
    prompts = [torch.from_numpy(heldout[i * 97:i * 97 + args.prompt_len]) for i in range(n_prompts)]
    ref_greedy = None
    ref_letters: dict[str, list[int]] = {}
    results = {"model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "new_tokens": args.new_tokens, "heldout_tokens": int(len(heldout)),
               "greedy_tokens": args.greedy_tokens, "variants": {}}
    fp32_bytes = linear_weight_bytes(ref_model)
    fp32_bytes_head = linear_weight_bytes(ref_model, include_head=True)
    paths: dict[str, Path] = {}
    calibration = None
    for name in args.variants:
        print(f"== {name}", flush=True)
        scheme, head, method = variant_args(name)
        seconds = None
        if method == "gptq" and calibration is None:
            from inference.calibration import (DEFAULT_CALIBRATION, DEFAULT_SEQ_LEN, DEFAULT_SEQUENCES,
                                               calibration_tokens)

            calibration = calibration_tokens(args.calibration or [DEFAULT_CALIBRATION], tokenizer,
                                             args.calibration_sequences or DEFAULT_SEQUENCES,
                                             min(args.calibration_seq_len or DEFAULT_SEQ_LEN,
                                                 ref_model.config.max_seq_len))
            results["calibration"] = {"paths": [str(c) for c in args.calibration or [DEFAULT_CALIBRATION]],
                                      "sequences": calibration.shape[0], "seq_len": calibration.shape[1]}
        if name == "bf16":
            model, path = open_model(args.model, "cpu", "bfloat16"), Path(args.model)
        elif scheme is None:
            model, path = ref_model, Path(args.model)
        else:
            start = time.perf_counter()
            float_model = open_model(args.model, "cpu", "float32")
            if method == "gptq":
                from inference.calibration import quantize_model_gptq

                model = quantize_model_gptq(float_model, scheme, args.group_size, head, calibration)
            else:
                model = quantize_model(float_model, scheme, args.group_size, head, pack=False)
            seconds = time.perf_counter() - start
            path = out / name.replace("+", "_")
            save_quantized(model, path, args.model, tokenizer.path, overwrite=True)
        row = {"linear_bytes": linear_weight_bytes(model, include_head=head),
               "linear_bytes_fp32": fp32_bytes_head if head else fp32_bytes,
               "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
               "group_sizes": sorted(set(getattr(model, "quantization", None).group_sizes.values()))
               if scheme == "int4" else None}
        row["linear_ratio"] = row["linear_bytes"] / row["linear_bytes_fp32"]
        row["quantize_seconds"] = seconds
        paths[name] = path
        if not quality:
            results["variants"][name] = row
            continue
        row["ppl_heldout"] = perplexity(model, heldout, window)
        if text_tokens is not None:
            row["ppl_text"] = perplexity(model, text_tokens, window)
        outs = greedy(model, prompts, args.greedy_tokens)
        if ref_greedy is None:
            ref_greedy = outs
        row["greedy_identical_prefix"] = [identical_prefix(a, b) for a, b in zip(outs, ref_greedy)]
        for bench, data_dir, subjects, split in (("mmlu", args.mmlu_dir, args.mmlu_subjects, "test"),
                                                 ("ceval", args.ceval_dir, args.ceval_subjects, "val")):
            if subjects:
                acc, letters, n = benchmark_letters(model, tokenizer, bench, Path(data_dir), subjects, split,
                                                    args.shots)
                ref_letters.setdefault(bench, letters)
                row[bench] = {"accuracy": acc, "questions": n,
                              "same_as_fp32": float(np.mean(np.array(letters) == np.array(ref_letters[bench])))}
        results["variants"][name] = row
        print(json.dumps(row), flush=True)
    speed_rounds(results, paths, args)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")


def markdown(results_file: str) -> str:
    """results.json -> the table of benchmarks/quantization.md."""
    r = json.loads(Path(results_file).read_text())
    rows = ["| variant | linear weights MiB (x fp32) | model MiB | peak RSS MiB (torch alone) | decode tok/s b=1 "
            "| held-out ppl | text ppl | MMLU acc (same as fp32) | C-Eval acc (same as fp32) | greedy = fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        def bench(key):
            b = v.get(key)
            return f"{b['accuracy']:.3f} ({b['same_as_fp32']:.0%}, n={b['questions']})" if b else "-"
        greedy_same = v.get("greedy_identical_prefix")
        n = r.get("greedy_tokens", 64)
        g = (f"{np.mean(greedy_same):.1f}/{n} mean, {sum(x == n for x in greedy_same)}/{len(greedy_same)} all {n}"
             if greedy_same else "-")
        gs = f", g={'/'.join(map(str, v['group_sizes']))}" if v.get("group_sizes") else ""
        rows.append(f"| {name}{gs} | {v['linear_bytes'] / 2**20:.2f} ({v['linear_ratio']:.3f}x) "
                    f"| {v['model_bytes'] / 2**20:.2f} | {v['peak_rss_mib']:.0f} ({v['torch_rss_mib']:.0f}) "
                    f"| {v['tokens_per_s']:.1f} | {v.get('ppl_heldout', float('nan')):.3f} "
                    f"| {v.get('ppl_text', float('nan')):.3f} | {bench('mmlu')} | {bench('ceval')} | {g} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--markdown"]:
        print(markdown(sys.argv[2]))
    else:
        main()
