"""Forward+backward throughput of our Transformer against transformers' LlamaForCausalLM, same config.

    python benchmarks/bench_model.py                       # CPU, fp32, ~20M parameters, seq 512
    python benchmarks/bench_model.py --compile             # also our model under torch.compile
    python benchmarks/bench_model.py --breakdown           # where each step goes: GEMMs, attention, the rest
    python benchmarks/bench_model.py --preset 1b --seq_len 4096 --batch 1 --dtype bf16 --device cuda   # GPU, MFU

Both models get identical weights (ours is exported with to_hf and loaded by transformers), the same
batch, dtype and thread count; runs alternate between the two so drift on a shared machine hits both.

--breakdown profiles two steps of each model (CPU: operator time; GPU: kernel time, and the longest kernels) and
splits it into matrix multiplies, sdpa
attention and everything else. Both models call the same GEMMs and the same attention kernel, so transformers' step time
divided by its own GEMM + attention time bounds the speed-up any implementation built on those kernels can reach.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time

import torch

from model import ModelConfig, Transformer

# Dense bf16 peak FLOP/s per GPU, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def bench_config(args: argparse.Namespace) -> ModelConfig:
    if args.preset:
        return ModelConfig.from_preset(args.preset, max_seq_len=max(args.seq_len, 16), attn_impl=args.attn)
    # About 20M parameters by default.
    return ModelConfig(vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_kv_heads=args.n_heads, hidden_dim=args.hidden_dim, tie_embeddings=args.tie_embeddings,
                       max_seq_len=args.seq_len, attn_impl=args.attn)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")
ATTENTION_MARKERS = ("scaled_dot_product",)  # torch's CPU attention kernels and their backward


# GPU kernels by name: cuBLAS/CUTLASS matrix multiplies, and the attention kernels of sdpa (flash, memory-efficient,
# cuDNN) and FlexAttention; everything else (norms, rotary, SwiGLU, loss, optimizer-free elementwise work) is "other".
GEMM_KERNEL_MARKERS = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "splitk")
ATTENTION_KERNEL_MARKERS = ("flash", "fmha", "attention", "attn", "flex", "cudnn")


def breakdown(step, device: torch.device, top: int = 0) -> dict[str, float]:
    """Seconds per step by kind: CPU operator self time on a CPU, kernel time on a GPU (nothing counted twice).

    With top > 0 (GPU) it also prints the `top` kernels that took longest.
    """
    from torch.profiler import ProfilerActivity, profile

    steps = 2
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    split = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    kernels = []
    for event in prof.key_averages():
        if not cuda:
            kind = ("gemm" if event.key in GEMM_OPS
                    else "attention" if any(m in event.key for m in ATTENTION_MARKERS) else "other")
            split[kind] += event.self_cpu_time_total / 1e6 / steps
            continue
        if str(getattr(event, "device_type", "")).split(".")[-1] != "CUDA":
            continue  # a CPU-side op: its kernels are counted as kernel events
        t = getattr(event, "self_device_time_total", None)
        t = (t if t is not None else event.self_cuda_time_total) / 1e6 / steps
        name = event.key.lower()
        kind = ("attention" if any(m in name for m in ATTENTION_KERNEL_MARKERS)
                else "gemm" if any(m in name for m in GEMM_KERNEL_MARKERS) else "other")
        split[kind] += t
        kernels.append((t, kind, event.key))
    for t, kind, key in sorted(kernels, reverse=True)[:top]:
        print(f"    {t * 1000:8.2f} ms  {kind:9}  {key[:110]}")
    return split


def sdpa_context(backend: str):
    """Restrict torch's scaled_dot_product_attention to one kernel ('auto': let torch choose)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend])


def time_steps(step, n: int, sync) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="a ModelConfig preset instead of the ~20M default")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n_layers", type=int, default=6)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--hidden_dim", type=int, default=1376)
    p.add_argument("--tie_embeddings", action="store_true")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="auto", help="our attention kernel (transformers uses sdpa)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    p.add_argument("--no_hf", action="store_true", help="skip transformers (e.g. when it would not fit)")
    p.add_argument("--sdpa_backend", default="auto", choices=["auto", "flash", "cudnn", "efficient", "math"],
                   help="restrict torch's scaled_dot_product_attention to one kernel, for both models")
    p.add_argument("--cudnn_variants", action="store_true",
                   help="also time both models (uncompiled) with sdpa restricted to cuDNN attention")
    p.add_argument("--flex_variant", action="store_true",
                   help="also time our model (uncompiled) with attn_impl='flex' (torch's FlexAttention)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--breakdown", action="store_true",
                   help="profile two steps of each model into GEMM / attention / the rest (GPU: kernel time)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = bench_config(args)
    torch.manual_seed(0)
    ours = Transformer(config).to(device=device, dtype=dtype).train()
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step_of(fn, model, backend: str = "auto"):
        def step():
            with sdpa_context(backend):
                model.zero_grad(set_to_none=True)  # as a training step does: no accumulation into old gradients
                loss = fn()
                loss.backward()
        return step

    runs = {"ours": step_of(lambda: ours(x, targets=y), ours)}
    if args.compile:
        compiled = torch.compile(ours)
        runs["ours+compile"] = step_of(lambda: compiled(x, targets=y), ours)
    if args.cudnn_variants:
        runs["ours (cudnn sdpa)"] = step_of(lambda: ours(x, targets=y), ours, "cudnn")
    if args.flex_variant:
        def with_flex():
            saved, ours.config.attn_impl = ours.config.attn_impl, "flex"
            try:
                return ours(x, targets=y)
            finally:
                ours.config.attn_impl = saved
        runs["ours (flex)"] = step_of(with_flex, ours)
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            ours.to_hf(tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).train()
        # The standard transformers training call: labels = inputs, shifted inside (T-1 predictions vs our T).
        runs["transformers"] = step_of(lambda: hf(input_ids=x, labels=x).loss, hf)
        if args.cudnn_variants:
            runs["transformers (cudnn sdpa)"] = step_of(lambda: hf(input_ids=x, labels=x).loss, hf, "cudnn")

    times: dict[str, list[float]] = {}
    with sdpa_context(args.sdpa_backend):
        for name, step in list(runs.items()):  # warm-up (and compile); a variant that cannot run is dropped
            t0 = time.perf_counter()
            try:
                for _ in range(args.warmup):
                    step()
                sync()
            except (RuntimeError, NotImplementedError) as e:
                print(f"{name}: cannot run here, dropped ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                del runs[name]
                continue
            times[name] = []
            print(f"{name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        for _ in range(args.steps):  # interleaved so background noise hits every model alike
            for name, step in runs.items():
                times[name] += time_steps(step, 1, sync)

    tokens = args.batch * args.seq_len
    flops_per_token = config.flops_per_token(args.seq_len)
    peak = peak_flops(device)
    print(f"config: {config.num_params() / 1e6:.1f}M params, dim {config.dim}, layers {config.n_layers}, "
          f"vocab {config.vocab_size}; batch {args.batch} x seq {args.seq_len}, {args.dtype}, {device}, "
          f"threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + (f", sdpa backend {args.sdpa_backend}" if args.sdpa_backend != "auto" else ""))
    print(f"FLOPs per token {flops_per_token / 1e9:.2f} G = 6 * N (non-embedding params + output projection) "
          f"+ 6 * n_layers * dim * seq_len (causal attention, fwd+bwd); peak {peak / 1e12 if peak else 0:.0f} TFLOP/s")
    result = {}
    report = {"config": config.to_dict(), "batch": args.batch, "seq_len": args.seq_len, "dtype": args.dtype,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "sdpa_backend": args.sdpa_backend, "flops_per_token": flops_per_token, "peak_flops": peak, "runs": {}}
    for name, ts in times.items():
        t = statistics.median(ts)
        result[name] = tokens / t
        line = f"{name:>14}: {tokens / t:10.0f} tokens/s  ({t * 1000:.0f} ms/step, median of {len(ts)})"
        entry = {"tokens_per_s": tokens / t, "step_ms": t * 1000, "steps": len(ts)}
        if device.type == "cuda":
            tflops = flops_per_token * tokens / t / 1e12
            line += f"  {tflops:.1f} TFLOP/s" + (f"  MFU {tflops * 1e12 / peak:.1%}" if peak else "")
            entry.update(tflops=tflops, mfu=tflops * 1e12 / peak if peak else None,
                         max_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30)
        report["runs"][name] = entry
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if "transformers" in result:
        for name in result:
            if not name.startswith("transformers"):
                print(f"{name} / transformers: {result[name] / result['transformers']:.2f}x")
    if args.breakdown:
        splits = {}
        for name, step in runs.items():
            if device.type == "cuda":
                print(f"{name}: longest kernels per step")
            try:
                with sdpa_context(args.sdpa_backend):
                    splits[name] = breakdown(step, device, top=8 if device.type == "cuda" else 0)
            except Exception as e:  # noqa: BLE001 - a profiler problem must not lose the figures above
                print(f"{name}: breakdown failed ({type(e).__name__}: {e})")
        for name, split in splits.items():
            total = sum(split.values()) or 1.0
            print(f"{name:>14}: " + ", ".join(f"{k} {v * 1000:.0f} ms ({v / total:.0%})" for k, v in split.items()))
            report["runs"][name]["breakdown_ms"] = {k: v * 1000 for k, v in split.items()}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        if "transformers" in splits and splits["transformers"]["gemm"] + splits["transformers"]["attention"] > 0:
            hf = splits["transformers"]
            print(f"ceiling: a model whose GEMMs and attention take transformers' time and whose other work is free "
                  f"runs {sum(hf.values()) / (hf['gemm'] + hf['attention']):.2f}x transformers")


if __name__ == "__main__":
    main()
