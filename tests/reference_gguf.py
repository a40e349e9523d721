"""A second, independent LLaMA forward pass over a GGUF file's tensors, in llama.cpp's conventions: checks an exported
file without llama.cpp. Test and benchmark code only (tests/test_gguf.py, benchmarks/quantization/gguf_greedy.py).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import ModelConfig


def reference_logits(t: dict[str, torch.Tensor], c: ModelConfig, ids: list[int], pairs: bool = True) -> torch.Tensor:
    """Logits [len(ids), vocab] of a LLaMA written in llama.cpp's conventions over a GGUF file's tensors (rotary on
    adjacent pairs (2i, 2i + 1)), independent of model/: checks an exported file without llama.cpp.
    pairs=False applies rotate-half instead (a negative control for tests)."""
    n, d = len(ids), c.head_dim
    ang = torch.outer(torch.arange(n, dtype=torch.float32),
                      1.0 / c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))[:, None]

    def rope(h):
        if pairs:
            a, b = h[..., 0::2], h[..., 1::2]
            return torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)
        a, b = h.chunk(2, -1)  # the negative control: rotate-half on llama.cpp-ordered rows
        return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    x = t["token_embd.weight"][ids]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(c.n_layers):
        b = lambda name: t[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = norm(x, b("attn_norm"))
        q = rope((h @ b("attn_q").T).view(n, c.n_heads, d))
        k = rope((h @ b("attn_k").T).view(n, c.n_kv_heads, d)).repeat_interleave(c.n_heads // c.n_kv_heads, 1)
        v = (h @ b("attn_v").T).view(n, c.n_kv_heads, d).repeat_interleave(c.n_heads // c.n_kv_heads, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask, -1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(n, -1) @ b("attn_output").T
        h = norm(x, b("ffn_norm"))
        x = x + (F.silu(h @ b("ffn_gate").T) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    return norm(x, t["output_norm.weight"]) @ t.get("output.weight", t["token_embd.weight"]).T  # tied: no output


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file, dequantized to fp32 [rows, cols] with gguf's reader."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        out[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape)
    return out
