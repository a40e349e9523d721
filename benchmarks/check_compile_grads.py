"""Gradients of the model under torch.compile against eager mode, with the fused loss outside the compiled graph
(what model/model.py does) and, for comparison, inside it (`--loss_in_graph`, the configuration that gave all-zero
gradients on CUDA in the H200 run of 2026-11-26; see benchmarks/results/gpu_diag_h200_2026-11-26.log).

    python benchmarks/check_compile_grads.py [--device cuda] [--loss_in_graph]

Prints, per dtype and vocabulary size, both losses, the gradient norm and the worst relative gradient error.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.model as model_module  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loss_in_graph", action="store_true",
                   help="let torch.compile trace the hand-written loss backward too (reproduces the CUDA bug)")
    args = p.parse_args()
    if args.loss_in_graph:
        model_module.fused_linear_cross_entropy = model_module._ChunkedCrossEntropy.apply
    for dtype in (torch.bfloat16, torch.float32):
        for vocab in (1000, 64000):
            torch.manual_seed(0)
            cfg = ModelConfig(vocab_size=vocab, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=704,
                              max_seq_len=512, attn_impl="sdpa", fused_kernels=False)
            ref = Transformer(cfg).to(args.device, dtype).train()
            m = copy.deepcopy(ref)
            x = torch.randint(0, vocab, (2, 256), device=args.device)
            t = torch.roll(x, -1, 1)
            l0 = ref(x, targets=t)
            l0.backward()
            l1 = torch.compile(m)(x, targets=t)
            l1.backward()
            worst = max((rel_err(p.grad, q.grad) if p.grad is not None else float("inf"), n)
                        for (n, p), q in zip(m.named_parameters(), ref.parameters()))
            norm = torch.stack([p.grad.float().norm() for p in m.parameters() if p.grad is not None]).norm().item()
            print(f"{str(dtype):15s} vocab {vocab:6d} loss eager {l0.item():.4f} compiled {l1.item():.4f} "
                  f"grad norm {norm:.4f} worst rel err {worst[0]:.2e} ({worst[1]})", flush=True)


if __name__ == "__main__":
    main()
