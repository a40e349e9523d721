"""One matmul y = x @ W.T on CPU: fp32/bf16 dense against torch's int8 and int4 weight-pack kernels, with fp32 and
bf16 activations (best of 30 runs, ms). Shows why inference.quantize feeds the CPU kernels bf16 activations.

    OMP_NUM_THREADS=1 python benchmarks/quantization/bench_kernels.py
"""
import time

import torch


def best_ms(f, n=30):
    f()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {torch.backends.cpu.get_cpu_capability()}")
    print("| M x K x N | activations | dense | int8 kernel | int4 kernel (g=128) |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for m, k, n in [(1, 256, 768), (1, 1024, 1024), (1, 1024, 2816), (1, 4096, 4096), (8, 1024, 1024),
                    (64, 1024, 1024)]:
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            scales, sz = torch.rand(n, dtype=dtype), torch.randn(k // 128, n, 2, dtype=dtype)
            dense = best_ms(lambda: x @ w.t())
            i8 = best_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scales))
            i4 = best_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, 128, sz))
            print(f"| {m} x {k} x {n} | {str(dtype).removeprefix('torch.')} | {dense:.3f} | {i8:.3f} | {i4:.3f} |")


if __name__ == "__main__":
    main()
