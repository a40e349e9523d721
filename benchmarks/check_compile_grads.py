"""Diagnose: compiled model gradients vs eager on CUDA (bf16 and fp32), loss inside/outside the compiled graph."""
import copy, sys, time
sys.path.insert(0, ".")
import torch
from model import ModelConfig, Transformer
import model.model as mm

dev = "cuda" if torch.cuda.is_available() else "cpu"
def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()

for dtype in (torch.bfloat16, torch.float32):
    for vocab in (1000, 64000):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=vocab, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=704,
                          max_seq_len=512, attn_impl="sdpa", fused_kernels=False)
        ref = Transformer(cfg).to(dev, dtype).train()
        x = torch.randint(0, vocab, (2, 256), device=dev); t = torch.roll(x, -1, 1)
        for variant in ("compiled", "compiled_loss_eager"):
            m = copy.deepcopy(ref)
            if variant == "compiled_loss_eager":
                orig = mm.LMHead.forward
                m.output.forward = torch.compiler.disable(m.output.forward)
            cm = torch.compile(m)
            ref.zero_grad(); l0 = ref(x, targets=t); l0.backward()
            l1 = cm(x, targets=t); l1.backward()
            worst = max((rel(p.grad, q.grad) if p.grad is not None else float("inf"), n)
                        for (n, p), q in zip(m.named_parameters(), ref.parameters()))
            gn = torch.stack([p.grad.float().norm() for p in m.parameters() if p.grad is not None]).norm().item()
            print(f"{str(dtype):15s} vocab {vocab:6d} {variant:20s} loss {l0.item():.4f}/{l1.item():.4f} "
                  f"grad norm {gn:.4f} worst rel err {worst[0]:.2e} ({worst[1]})", flush=True)
