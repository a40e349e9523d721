"""Fine-tuning throughput: target tokens per second with packing against padding, step time and memory.

    python benchmarks/bench_finetune.py --model runs/sample/train \\
        --data ../shared/data/sft/belle_eval_set.jsonl --steps 20 [--zero_stage 0] [--seq_len 256]
    python benchmarks/bench_finetune.py --random_base debug --tokenizer runs/sample/train/tokenizer.model \\
        --seq_len 1024 ...    # a random model of that preset, with max_seq_len = seq_len (speed needs no weights)

Each variant is a real single-rank run of finetune/train.py (the shared training core, DeepSpeed engine, fp32 on
CPU / bf16 on GPU), on BELLE's eval set read as question -> std_answer. Throughput is measured from the metrics
the run logs (every step), leaving out the first `--warmup` steps; step time is the median interval between
steps; memory is the process's peak resident memory on CPU (peak allocated on GPU). All variants run in one
invocation, one after the other, so they see the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(name: str, args: argparse.Namespace, overrides: list[str], work: Path) -> dict:
    run_dir = work / name
    cmd = [sys.executable, "finetune/train.py", f"model_path={args.model}", f"run_dir={run_dir}",
           f"data_files=[{args.data}]", "instruction_field=question", "output_field=std_answer",
           f"template={args.template}", f"seq_len={args.seq_len}", f"max_steps={args.steps}", "log_interval=1",
           "eval_interval=0", f"save_interval={args.steps}", "val_size=0", "wandb_mode=disabled",
           "tensorboard=false", f"zero_stage={args.zero_stage}", "warmup_steps=1", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: variant {name} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    times = [r["time"] for r in rows]
    intervals = [b - a for a, b in zip(times, times[1:])][args.warmup:]
    measured = rows[args.warmup + 1:]
    lines = result.stdout.splitlines()
    first = next((i for i, line in enumerate(lines) if " records -> " in line), len(lines))
    report = "\n".join([*lines[first:first + 1], *(x for x in lines[first + 1:first + 6] if x.startswith("  skip"))])
    return {"variant": name, "step_s": statistics.median(intervals),
            "target_tok_s": statistics.median(r["target_tokens_per_sec"] for r in measured),
            "tok_s": statistics.median(r["tokens_per_sec"] for r in measured),
            "memory_gib": max(r["memory_gib"] for r in rows), "final_loss": rows[-1]["loss"], "data": report}


def padding_fractions(args: argparse.Namespace) -> dict[str, float]:
    """Share of the positions the measured steps compute on that are padding, per variant (no model needed)."""
    sys.path.insert(0, str(REPO))
    from finetune.config import load_finetune_config
    from finetune.data import DataOptions, load_samples
    from finetune.loader import InstructionLoader
    from finetune.templates import get_template
    from tokenizer import Tokenizer

    cfg = load_finetune_config(None, [f"data_files=[{args.data}]", "instruction_field=question",
                                      "output_field=std_answer", f"template={args.template}",
                                      f"seq_len={args.seq_len}"])
    tok = Tokenizer(Path(args.model) / "tokenizer.model")
    samples, _ = load_samples(cfg.data_files, get_template(cfg.template), tok, DataOptions.from_config(cfg))
    out = {}
    for packing in (True, False):
        loader = InstructionLoader(samples, args.seq_len, args.micro_batch_size, tok.eos_id, packing=packing)
        real = total = 0
        for step in range(args.warmup + 1, args.steps):
            rows = [loader.rows[r] for r in loader.row_indices(step)]
            lengths = [sum(len(samples[i].ids) - 1 for i in row) for row in rows]
            real += sum(lengths)
            total += len(rows) * (args.seq_len if packing else max(lengths))
        out["packing" if packing else "padding"] = 1 - real / total
    return out


def random_base(preset: str, tokenizer: str, seq_len: int, out: Path) -> Path:
    """A randomly initialised model of `preset` (max_seq_len = seq_len) saved as an HF folder with `tokenizer`."""
    sys.path.insert(0, str(REPO))
    import torch

    from model import ModelConfig, Transformer
    from tokenizer import Tokenizer

    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, max_seq_len=seq_len)
    config.vocab_size = max(config.vocab_size, Tokenizer(tokenizer).vocab_size)  # the preset's, unless too small
    model = Transformer(config)
    return model.to_hf(out, tokenizer_path=tokenizer)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/sample/train", help="HF folder or run directory to tune")
    p.add_argument("--random_base", default=None, metavar="PRESET",
                   help="tune a random model of this preset instead of --model (its max_seq_len = --seq_len)")
    p.add_argument("--tokenizer", default="runs/sample/train/tokenizer.model", help="for --random_base")
    p.add_argument("--data", default="../shared/data/sft/belle_eval_set.jsonl")
    p.add_argument("--template", default="plain")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the figures")
    p.add_argument("--zero_stage", type=int, default=0)
    args = p.parse_args(argv)
    args.data = str(Path(args.data).resolve())
    args.model = str(Path(args.model).resolve())
    batch = [f"micro_batch_size={args.micro_batch_size}", f"global_batch_size={args.micro_batch_size}"]
    with tempfile.TemporaryDirectory() as work:
        if args.random_base:
            args.model = str(random_base(args.random_base, args.tokenizer, args.seq_len, Path(work) / "base"))
        results = [run_variant("packing", args, ["packing=true", *batch], Path(work)),
                   run_variant("padding", args, ["packing=false", *batch], Path(work))]
        pad = padding_fractions(args)
    name = f"a random {args.random_base} model" if args.random_base else args.model
    print(f"fine-tuning {name} on {args.data}: seq_len {args.seq_len}, {args.micro_batch_size} rows per step, "
          f"ZeRO-{args.zero_stage}, {args.steps} steps ({args.warmup} left out)")
    print(results[0]["data"])
    print("| variant | target tokens/s | tokens/s (incl. padding) | padding | step time (s) | peak memory (GiB) | "
          "loss at end |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['target_tok_s']:,.0f} | {r['tok_s']:,.0f} | {100 * pad[r['variant']]:.1f}% | "
              f"{r['step_s']:.3f} | {r['memory_gib']:.2f} | {r['final_loss']:.3f} |")
    print(f"packing / padding target tokens/s: {results[0]['target_tok_s'] / results[1]['target_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
