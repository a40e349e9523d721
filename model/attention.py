"""Attention kernels behind one call, chosen by name: eager, sdpa, flash (flash-attn 2), xformers, flex.

All take q [B, T, H, D] and k, v [B, S, KV, D] (the cache may make S > T; queries are the last T positions)
and return [B, T, H, D]. Document masking for packed sequences comes as `cu_seqlens` over the flattened
B*T tokens (flash-attn's varlen convention); the other kernels turn it into a block-diagonal causal mask (flex:
a block-sparse one, so blocks across documents are skipped, not computed and masked).
flash-attn and xformers are imported only when asked for, so nothing fails on machines without them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.imports import has_module


def available(impl: str, device: torch.device) -> str | None:
    """None when `impl` can run on `device`, else the reason it cannot."""
    if impl in ("eager", "sdpa"):
        return None
    if impl == "flex":
        if device.type != "cuda":  # torch's FlexAttention has no backward on the CPU
            return f"attn_impl='flex' needs a CUDA GPU, but the model is on {device.type}; use 'sdpa' or 'auto'"
        return None if has_module("torch.nn.attention.flex_attention") else \
            "attn_impl='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)"
    package = {"flash": "flash_attn", "xformers": "xformers"}[impl]
    if device.type != "cuda":
        return f"attn_impl={impl!r} needs a CUDA GPU, but the model is on {device.type}; use 'sdpa' or 'auto'"
    if not has_module(package):
        return f"attn_impl={impl!r} needs the {package} package: pip install -e .[gpu] (or use 'sdpa' or 'auto')"
    return None


def resolve(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn 'auto' into the fastest kernel that runs here; raise a clear error for one that cannot."""
    if impl == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        for candidate in ("flash", "xformers"):
            if half and available(candidate, device) is None:
                return candidate
        return "sdpa"
    reason = available(impl, device)
    if reason:
        raise RuntimeError(reason)
    return impl


@dataclass
class AttnMeta:
    """What every layer's attention needs besides q, k, v; built once per forward."""

    impl: str
    offset: int = 0  # tokens already in the KV cache before these queries
    cu_seqlens: torch.Tensor | None = None  # int32 [n_docs + 1] over the flattened batch
    max_seqlen: int = 0
    mask: torch.Tensor | None = None  # bool [B or 1, 1, T, S], True = attend (eager/sdpa only)
    block_mask: object | None = None  # flex_attention's BlockMask (flex only)

    @classmethod
    def build(cls, impl: str, batch: int, q_len: int, offset: int, cu_seqlens: torch.Tensor | None,
              device: torch.device) -> "AttnMeta":
        meta = cls(impl=impl, offset=offset)
        if cu_seqlens is not None:
            if offset:
                raise ValueError("document masking (cu_seqlens) cannot be combined with a KV cache")
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
            # Each .item() is a device sync and, under torch.compile, a graph break that splits the model: the
            # check runs in eager mode only, and max_seqlen is read only by the kernel that needs it.
            if not torch.compiler.is_compiling() and (cu_seqlens[0].item() != 0
                                                       or cu_seqlens[-1].item() != batch * q_len):
                raise ValueError(f"cu_seqlens must run from 0 to batch*seq_len={batch * q_len}, got "
                                 f"{cu_seqlens[0].item()}..{cu_seqlens[-1].item()}")
            meta.cu_seqlens = cu_seqlens
            if impl == "flash":
                meta.max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
        if impl == "flex" and (offset or q_len == 1 or not torch.is_grad_enabled()):
            # Decoding with a KV cache has no block sparsity to gain. Inference (no grad) goes through sdpa too: on
            # the H200 run, inductor could not lower flex's no-grad kernel for a small model (NoValidChoicesError);
            # flex is for training, where it skips the blocks that cross documents.
            meta.impl = impl = "sdpa"
        if impl in ("eager", "sdpa"):
            meta.mask = _dense_mask(batch, q_len, offset, meta.cu_seqlens, device)
        if impl == "flex":
            meta.block_mask = _flex_block_mask(batch, q_len, meta.cu_seqlens, device)
        return meta


def _dense_mask(batch: int, q_len: int, offset: int, cu_seqlens: torch.Tensor | None,
                device: torch.device) -> torch.Tensor | None:
    """Boolean causal (and block-diagonal) mask, or None where the kernel's own causal flag is exact."""
    if cu_seqlens is None:
        if offset == 0 or q_len == 1:
            return None  # plain causal (is_causal) or a single query that sees the whole cache
        q_pos = torch.arange(offset, offset + q_len, device=device)
        k_pos = torch.arange(offset + q_len, device=device)
        return (k_pos[None, :] <= q_pos[:, None])[None, None]
    token = torch.arange(batch * q_len, device=device)
    doc = torch.searchsorted(cu_seqlens[1:], token, right=True).view(batch, q_len)
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def _flex_block_mask(batch: int, q_len: int, cu_seqlens: torch.Tensor | None, device: torch.device):
    """Causal (and same-document) BlockMask; built once per forward and shared by every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    if cu_seqlens is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        return create_block_mask(mask_mod, None, None, q_len, q_len, device=device)
    token = torch.arange(batch * q_len, device=device)
    doc = torch.searchsorted(cu_seqlens[1:], token, right=True).view(batch, q_len)

    def doc_mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])
    return create_block_mask(doc_mask_mod, batch, None, q_len, q_len, device=device)


_compiled_flex = None


def _flex(q, k, v, meta: AttnMeta) -> torch.Tensor:
    """FlexAttention: a Triton kernel generated by torch.compile (without compiling it runs a slow reference)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    out = _compiled_flex(q, k, v, block_mask=meta.block_mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    if meta.impl == "flex":
        return _flex(q, k, v, meta)
    if meta.impl == "flash":
        return _flash(q, k, v, meta)
    if meta.impl == "xformers":
        return _xformers(q, k, v, meta)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if meta.impl == "sdpa":
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=meta.mask, is_causal=meta.mask is None and meta.offset == 0 and q.shape[2] > 1,
            enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = _eager(q, k, v, meta.mask, causal=meta.mask is None and meta.offset == 0)
    return out.transpose(1, 2)


def _eager(q, k, v, mask, causal: bool) -> torch.Tensor:
    """The reference: explicit scores, softmax in fp32."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _flash(q, k, v, meta: AttnMeta) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    # flash-attn aligns the causal mask bottom-right, which is what a KV-cache offset needs; GQA is native.
    if meta.cu_seqlens is None:
        return flash_attn_func(q, k, v, causal=True)
    B, T, H, D = q.shape
    out = flash_attn_varlen_func(
        q.reshape(B * T, H, D), k.reshape(B * T, *k.shape[2:]), v.reshape(B * T, *v.shape[2:]),
        meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen, causal=True)
    return out.view(B, T, H, D)


def _xformers(q, k, v, meta: AttnMeta) -> torch.Tensor:
    import xformers.ops as xops
    from xformers.ops import fmha

    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    B, T = q.shape[:2]
    if meta.cu_seqlens is not None:
        seqlens = (meta.cu_seqlens[1:] - meta.cu_seqlens[:-1]).tolist()
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(seqlens)
        flat = [t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v)]
        return xops.memory_efficient_attention(*flat, attn_bias=bias).view(q.shape)
    bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if meta.offset else fmha.attn_bias.LowerTriangularMask()
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
