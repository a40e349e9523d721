"""GPU check of inference.quantize (run where a CUDA GPU is available): which kernel each scheme uses, the
error against the bf16 model, weight bytes, peak memory and batch-1 decode speed (eager, no torch.compile), for
int8, int4 round-to-nearest and int4 GPTQ (inference/calibration.py on the GPU; random-token calibration, so the
row checks the calibrated path's kernels, time and memory, not its quality: benchmarks/quantization.md has that).

    python benchmarks/quantization/gpu_check.py [--layers 8]

A random LLaMA-7B-width model (dim 4096, hidden 11008, vocab 32000) with fewer layers; bf16 activations.
*peak GiB includes the bf16 model kept on the GPU for the comparison.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from inference.calibration import quantize_model_gptq  # noqa: E402
from model.quant import QuantizedLinear, linear_weight_bytes, pack_for_kernels, quantize_model  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def decode_rate(model, ids, n):
    model.generate(ids, 8)  # warm-up (kernel packing, allocator)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, n)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    cfg = ModelConfig(vocab_size=32000, dim=4096, n_layers=args.layers, n_heads=32, hidden_dim=11008,
                      max_seq_len=512)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = Transformer(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda")
    with torch.no_grad():
        ref = base(ids)
    fp_bytes = linear_weight_bytes(base)
    print(f"{'scheme':8} {'paths':28} {'linear MiB':>10} {'ratio':>6} {'max rel err':>11} {'peak GiB*':>9} "
          f"{'tok/s b=1':>9} {'greedy same':>11}")
    greedy_ref = base.generate(ids, 32)[0, 32:]
    torch.cuda.reset_peak_memory_stats()
    rate = decode_rate(base, ids, args.tokens)
    print(f"{'bf16':8} {'-':28} {fp_bytes / 2**20:10.1f} {1:6.3f} {0:11.4f} "
          f"{torch.cuda.max_memory_allocated() / 2**30:9.2f} {rate:9.1f} {'-':>11}")
    calibration = torch.randint(0, cfg.vocab_size, (32, 128), device="cuda", generator=None)
    for scheme in ("int8", "int4", "int4-gptq"):
        if scheme == "int4-gptq":
            t = time.perf_counter()
            m = quantize_model_gptq(copy.deepcopy(base), "int4", None, False, calibration)
            pack_for_kernels(m, torch.bfloat16)
            torch.cuda.synchronize()
            print(f"(GPTQ over 32 x 128 calibration tokens: {time.perf_counter() - t:.1f} s)")
        else:
            m = quantize_model(copy.deepcopy(base), scheme)
        with torch.no_grad():
            out = m(ids)
        paths = Counter(l.path for l in m.modules() if isinstance(l, QuantizedLinear))
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        nbytes = linear_weight_bytes(m)
        torch.cuda.reset_peak_memory_stats()
        rate = decode_rate(m, ids, args.tokens)
        same = int((m.generate(ids, 32)[0, 32:] == greedy_ref).cumprod(0).sum())
        print(f"{scheme:8} {str(dict(paths)):28} {nbytes / 2**20:10.1f} {nbytes / fp_bytes:6.3f} {rel:11.4f} "
              f"{torch.cuda.max_memory_allocated() / 2**30:9.2f} {rate:9.1f} {same:>8}/32")
        del m
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
