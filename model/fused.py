"""flash-attn's fused Triton kernels (RMSNorm, rotary), used on CUDA when the package is installed.

Each function here has an exact PyTorch twin in model.py; the fused one is only a faster route to the same
numbers, so the model falls back silently when flash-attn is missing or the tensors are on the CPU.
"""
from __future__ import annotations

import functools

import torch

from common.imports import has_module


@functools.cache
def flash_attn_installed() -> bool:
    return has_module("flash_attn")


def enabled(x: torch.Tensor, wanted: bool) -> bool:
    return wanted and x.is_cuda and flash_attn_installed()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from flash_attn.ops.triton.layer_norm import rms_norm_fn

    return rms_norm_fn(x, weight, None, eps=eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [max_len, D] in the rotate-half layout (both halves equal)."""
    from flash_attn.layers.rotary import apply_rotary_emb

    half = cos.shape[-1] // 2
    cos, sin = cos[:, :half].to(x.dtype), sin[:, :half].to(x.dtype)
    return apply_rotary_emb(x, cos, sin, interleaved=False, seqlen_offsets=offset)
