"""LoRA against full fine-tuning on the same model: step time, peak memory, checkpoint size.

    python benchmarks/bench_lora.py                                   # CPU, fp32, ~30M parameters, seq 256
    python benchmarks/bench_lora.py --preset 1b --seq_len 2048 --batch 4 --dtype bfloat16 --device cuda

One training step is forward, backward and an AdamW step in plain PyTorch (one process, no DeepSpeed), identical in
both modes except for what is trainable: every parameter (full) or only the adapters that finetune.lora.prepare_lora adds
(lora). Each mode runs in its own fresh process, so its peak memory (the process's peak RSS on a CPU,
torch.cuda.max_memory_allocated on a GPU) is its own; the processes alternate full, lora, full, lora ... so that load
drifting on a shared machine hits both; on a CPU the process's CPU time per step is reported beside the wall time, as
it hardly depends on other users' load (set OMP_NUM_THREADS=1 so that it is one core's work). "Of which training" is
the peak less the peak before the first step (interpreter, torch and the model's weights). The checkpoint is what
resuming needs: the trained weights (the whole model as safetensors, or the PEFT adapter folder) plus the optimizer
state (torch.save of its state_dict).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import ModelConfig, Transformer  # noqa: E402
from finetune.lora import prepare_lora  # noqa: E402
from model.lora import LoRAConfig  # noqa: E402
from model.lora_peft import save_adapter  # noqa: E402
from pretrain.train import param_groups  # noqa: E402
from common.tensors import DTYPES  # noqa: E402


def bench_config(args: argparse.Namespace) -> ModelConfig:
    if args.preset:
        return ModelConfig.from_preset(args.preset, max_seq_len=args.seq_len)
    return ModelConfig(vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                       hidden_dim=args.hidden_dim, max_seq_len=args.seq_len)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child(args: argparse.Namespace) -> None:
    """One mode, measured in this process; prints one JSON line."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    config = bench_config(args)
    model = Transformer(config).to(device=device, dtype=dtype)
    if args.mode == "lora":
        lora_cfg = LoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules=args.targets)
        prepare_lora(model, lora_cfg)
        with torch.no_grad():  # non-zero B, as after some training (the cost does not depend on it)
            for name, p in model.named_parameters():
                if name.endswith(".B"):
                    p.normal_(0, 0.01)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=device.type == "cuda")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(x, targets=x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.mode == "lora":
            save_adapter(model, lora_cfg, tmp / "weights", None)
        else:
            model.cpu().to_hf(tmp / "weights")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        weights, optim = folder_bytes(tmp / "weights"), (tmp / "optimizer.pt").stat().st_size
    print(json.dumps({"mode": args.mode, "step_s": times, "cpu_s": cpu_times, "peak_bytes": peak,
                      "before_bytes": before,
                      "trainable": trainable, "total": sum(p.numel() for p in model.parameters()),
                      "weights_bytes": weights, "optimizer_bytes": optim}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="a ModelConfig preset instead of the ~30M default")
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--hidden_dim", type=int, default=1408)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="processes per mode, alternating")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    p.add_argument("--targets", nargs="+", default=["all"], help="LoRA target modules")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)  # set for the child processes
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode:
        child(args)
        return
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for _ in range(args.repeats):
        for mode in ("full", "lora"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                                 capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            last = runs[mode][-1]
            print(f"  {mode}: median step {statistics.median(last['step_s']):.3f} s wall, "
                  f"{statistics.median(last['cpu_s']):.3f} s CPU", flush=True)
    print(f"load average at end: {os.getloadavg()}")
    print(f"\nmodel: {bench_config(args)}\nbatch {args.batch} x seq {args.seq_len}, {args.device}, {args.dtype}, "
          f"LoRA r={args.rank} on {' '.join(args.targets)}\n")
    print("| mode | trainable params | median step, wall (s) | median step, CPU (s) | peak memory (MiB) | "
          "of which training (MiB) | weights saved (MiB) | optimizer state (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    mib = 2**20
    for mode, rs in runs.items():
        step = statistics.median(t for r in rs for t in r["step_s"])
        cpu = statistics.median(t for r in rs for t in r["cpu_s"])
        peak = max(r["peak_bytes"] for r in rs)
        training = max(r["peak_bytes"] - r["before_bytes"] for r in rs)
        r0 = rs[0]
        print(f"| {mode} | {r0['trainable']:,} of {r0['total']:,} ({100 * r0['trainable'] / r0['total']:.2f}%) "
              f"| {step:.3f} | {cpu:.3f} | {peak / mib:,.0f} | {training / mib:,.0f} | "
              f"{r0['weights_bytes'] / mib:,.2f} | "
              f"{r0['optimizer_bytes'] / mib:,.2f} |")


if __name__ == "__main__":
    main()
