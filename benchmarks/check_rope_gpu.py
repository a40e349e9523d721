"""Rope scaling on a GPU: our model (auto attention kernel, fused rotary when flash-attn is installed) against
transformers for every rope type, in fp32 (TF32 off) and bf16, plus the KV-cache path.

    python benchmarks/check_rope_gpu.py [--device cuda]

Prints one line per type. Not yet run on a GPU (the session's device machine ran a copy of the main tree, not
this branch); run once on CPU (--device cpu) to check the script itself.
"""
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Transformer  # noqa: E402
from model import fused  # noqa: E402
from model.attention import resolve  # noqa: E402
from test_rope import SCALINGS, tiny  # noqa: E402


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    dev = torch.device(p.parse_args().device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch", torch.__version__, "transformers", transformers.__version__,
          "flash-attn fused kernels:", fused.flash_attn_installed(), flush=True)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in SCALINGS.items():
            torch.manual_seed(0)
            ours = Transformer(tiny(**{**settings, "attn_impl": "auto"})).eval()
            ours.to_hf(Path(tmp) / name)
            ours = ours.to(dev)
            x = torch.randint(0, ours.config.vocab_size, (2, 200), device=dev)
            row = [f"{name:22s} kernel {resolve('auto', dev, torch.float32)}/{resolve('auto', dev, torch.bfloat16)}"]
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
                theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / name, dtype=dtype).to(dev).eval()
                model = ours.to(dtype)
                with torch.no_grad():
                    ref = theirs(x).logits.float()
                    diff = (model(x) - ref).abs().max().item()
                    cache = model.new_cache(2, 200)
                    model(x[:, :150], cache=cache)
                    step = torch.cat([model(x[:, i:i + 1], cache=cache) for i in range(150, 200)], dim=1)
                    cdiff = (step - ref[:, 150:]).abs().max().item()
                # dynamic's frequencies change with the length, so its cached keys (rotated at shorter lengths)
                # differ from a full pass by design, in transformers too: only its full pass is compared.
                worst = diff if name == "dynamic" else max(diff, cdiff)
                row.append(f"{str(dtype)[6:]}: full {diff:.1e} cache {cdiff:.1e} {'ok' if worst < tol else 'CHECK'}")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
