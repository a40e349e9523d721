"""A LLaMA-style decoder in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Parameter names follow Meta's LLaMA code; model/hf.py maps them to transformers' names. Rotary embeddings
use the rotate-half layout of transformers, so export is a pure renaming with no weight permutation.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.tensors import IGNORE_INDEX

from . import attention, fused
from .cache import KVCache
from .config import ModelConfig
from .generate import generate_ragged
from .rope import dynamic_length, rope_table

LOSS_CHUNK_BYTES = 2**30  # logits alive at once in the chunked loss: 4096 rows at vocab 64000 in fp32


class Linear(nn.Linear):
    """Bias-free, drawn from N(0, std) by its own constructor.

    deepspeed.zero.Init partitions a module's weights as soon as its constructor returns, so initialisation must
    happen here: a later pass over the whole model would only see empty shards.
    """

    def __init__(self, in_features: int, out_features: int, std: float):
        self.std = std
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class Embedding(nn.Embedding):
    """Token embeddings drawn from N(0, std) by their own constructor (see Linear)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float):
        self.std = std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm that keeps only its input and one fp32 scale per row for backward.

    Left to autograd, the fp32 formula saves three full-size tensors (x in fp32, its normalised fp32 copy and the
    normalised copy in the activation dtype): 10 bytes per element for bf16 activations, against 2 here. The
    forward arithmetic is exactly the plain formula's; backward recomputes the normalised input from x and rstd.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed32 = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            prod = grad * normed32.to(x.dtype)  # the same products (and dtype) autograd would form
            grad_weight = prod.reshape(-1, prod.shape[-1]).sum(0, dtype=torch.float32).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()  # d loss / d normalised input (the dtype cast passes gradients through)
            grad_x = (rstd * (g - normed32 * (g * normed32).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, use_fused: bool = True):
        super().__init__()
        self.eps, self.use_fused = eps, use_fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(x, self.use_fused):
            return fused.rms_norm(x, self.weight, self.eps)
        # The variance is taken in fp32 even for bf16 activations, exactly as transformers does.
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        x32 = x.float()  # inference, and torch.compile (which fuses this formula and chooses what to save itself)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def residual_std(config: ModelConfig) -> float:
    """Init std of the projections into the residual stream (GPT-2 / LLaMA practice): it shrinks with depth so
    the stream's variance stays O(1)."""
    return config.init_std / math.sqrt(2 * config.n_layers)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [T, D] or [B, T, D]."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CacheStep:
    """What one forward's attention layers see of a KVCache: batch row i writes its T new keys/values at positions
    starts[i].. of cache row rows[i], and reads that row's first `span` positions (where rows differ in length,
    the attention mask hides each row's positions past its own)."""

    def __init__(self, cache: KVCache, rows: list[int], starts: list[int], n_new: int, device: torch.device):
        self.cache, self.span, self.n_rows = cache, max(starts) + n_new, len(rows)
        # Rows that are one contiguous block of the cache are read as a slice (no copy), else gathered; rows that
        # all start at the same position are written as a slice, else scattered into the flattened cache.
        self.block = rows[0] if rows == list(range(rows[0], rows[0] + len(rows))) else None
        self.start = starts[0] if len(set(starts)) == 1 else None
        self.rows = None if self.block is not None else torch.tensor(rows, device=device)
        self.flat = None
        if self.block is None or self.start is None:
            max_len = cache.max_len
            self.flat = torch.tensor([r * max_len + s + t for r, s in zip(rows, starts) for t in range(n_new)],
                                     device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        if self.flat is None:
            rows, pos = slice(self.block, self.block + self.n_rows), slice(self.start, self.start + k.shape[1])
            ck[rows, pos], cv[rows, pos] = k, v
        else:
            ck.view(-1, *ck.shape[2:]).index_copy_(0, self.flat, k.reshape(-1, *k.shape[2:]))
            cv.view(-1, *cv.shape[2:]).index_copy_(0, self.flat, v.reshape(-1, *v.shape[2:]))
        if self.block is not None:
            end = self.block + self.n_rows
            return ck[self.block:end, :self.span], cv[self.block:end, :self.span]
        return ck[:, :self.span].index_select(0, self.rows), cv[:, :self.span].index_select(0, self.rows)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # q, k and v in one matmul (one larger GEMM is faster than three); hf.py splits it on export.
        self.wqkv = Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * self.head_dim, config.init_std)
        self.wo = Linear(config.n_heads * self.head_dim, config.dim, residual_std(config))
        self.use_fused = config.fused_kernels

    def forward(self, x, rope, meta: attention.AttnMeta, cache: CacheStep | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk, v = qkv.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
        cos, sin, contiguous = rope
        if contiguous and fused.enabled(x, self.use_fused):
            qk = fused.rotary(qk, cos, sin, meta.offset)
        else:
            if contiguous:
                cos, sin = cos[meta.offset:meta.offset + T], sin[meta.offset:meta.offset + T]
            qk = apply_rotary(qk, cos, sin)  # q and k heads rotated together
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.wo(attention.attend(q, k, v, meta).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = Linear(config.dim, 2 * config.hidden_dim, config.init_std)  # gate (w1) and up (w3) stacked
        self.w2 = Linear(config.hidden_dim, config.dim, residual_std(config))  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, config.fused_kernels)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, config.fused_kernels)
        self.feed_forward = FeedForward(config)

    def forward(self, x, rope, meta, cache=None, layer=0):
        x = x + self.attention(self.attention_norm(x), rope, meta, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows of logits per chunk of the loss, so that a chunk's fp32 logits fit in LOSS_CHUNK_BYTES."""
    return max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))


@torch.no_grad()  # gradients are computed here by hand
def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          want_grad: bool, want_grad_w: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean cross-entropy of h @ weight.T, one chunk of rows of logits at a time.

    With want_grad, the gradients for h and weight are made in the same pass (as Liger-Kernel's fused linear
    cross-entropy does), so the full fp32 logits never exist and backward needs no recomputation. Passes over
    a chunk's logits are the cost on CPU, so there are three (GEMM, log-softmax, exp) into two buffers reused
    by every chunk; the per-row loss weights scale the small operands of the two gradient GEMMs instead.
    want_grad_w=False skips the weight's gradient (a frozen output layer, as in LoRA).
    """
    n = h.shape[0]
    valid = targets != IGNORE_INDEX
    row_weight = valid / valid.sum().clamp(min=1)  # d(mean loss) / d(row loss), fp32
    grad_h = torch.empty_like(h) if want_grad else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad and want_grad_w else None  # fp32 sum
    total = torch.zeros((), device=h.device, dtype=torch.float32)
    logits_buf = torch.empty(min(chunk, n), weight.shape[0], device=h.device, dtype=h.dtype)
    logp_buf = torch.empty(logits_buf.shape, device=h.device, dtype=torch.float32)
    rows = torch.arange(min(chunk, n), device=h.device)
    for s in range(0, n, chunk):
        hc, tgt, w32 = h[s:s + chunk], targets[s:s + chunk].clamp(min=0), row_weight[s:s + chunk]
        m, w = hc.shape[0], w32.to(h.dtype)[:, None]
        logits = torch.mm(hc, weight.t(), out=logits_buf[:m])
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp_buf[:m])
        total -= (logp[rows[:m], tgt] * w32).sum()
        if want_grad:
            g = logp.exp_()  # the softmax
            g[rows[:m], tgt] -= 1.0
            g = g.to(h.dtype)
            torch.mm(g, weight, out=grad_h[s:s + m]).mul_(w)
            if grad_w is None:
                continue
            if g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), hc * w)
            else:
                grad_w += g.t() @ (hc * w)
    return total, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        loss, grad_h, grad_w = chunked_cross_entropy(h, weight, targets, chunk, want_grad=True,
                                                     want_grad_w=weight.requires_grad)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_w = None if grad_w is None else (grad_w * grad_out).to(grad_w.dtype)
        return (grad_h * grad_out).to(grad_h.dtype), grad_w, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int) -> torch.Tensor:
    """Mean cross-entropy of h @ weight.T with its gradients made in the forward pass (see chunked_cross_entropy).

    Kept out of torch.compile graphs. On CUDA (torch 2.11, one H200), a compiled graph holding this hand-written
    backward gave all-zero gradients to every parameter, fp32 and bf16 alike, while the same graph on the CPU was
    exact; run eagerly inside an otherwise compiled model it is exact on both (benchmarks/check_compile_grads.py,
    benchmarks/results/gpu_diag_h200_2026-11-26.log). Its cost is GEMMs, which compiling would not speed up.
    torch.compiler.disable is applied here, while torch.compile traces, rather than as a decorator: the decorator
    imports torch._dynamo (2-4 s) when model.model is imported, a cost to every command that never compiles
    (evaluation, inference). Traced, the call is the same as the decorated function's (run eagerly, no graph
    break; tests/test_model.py::test_loss_kept_out_of_compiled_graphs)."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_ChunkedCrossEntropy.apply)(h, weight, targets, chunk)
    return _ChunkedCrossEntropy.apply(h, weight, targets, chunk)


class LMHead(Linear):
    """The output projection; given targets it returns the loss instead of logits.

    The loss lives in this module's forward so that ZeRO-3 has gathered the weight when it runs.
    """

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(h).float()
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        chunk = loss_chunk_rows(self.weight.shape[0])
        if torch.is_grad_enabled() and (h.requires_grad or self.weight.requires_grad):
            return fused_linear_cross_entropy(h, self.weight, targets, chunk)
        return chunked_cross_entropy(h, self.weight, targets, chunk, want_grad=False)[0]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = Embedding(config.vocab_size, config.dim, config.init_std)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, config.fused_kernels)
        self.output = LMHead(config.dim, config.vocab_size, config.init_std)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # The rotary table is kept out of the state dict and out of .to(dtype): it must stay fp32.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_len: int | None = None

    def rope(self, device: torch.device, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables; seq_len (positions so far plus new ones) only matters for dynamic NTK scaling."""
        length = dynamic_length(self.config, seq_len)
        if self._rope is None or self._rope[0].device != device or self._rope_len != length:
            self._rope, self._rope_len = rope_table(self.config, device, length), length
        return self._rope

    def set_rope(self, **fields) -> None:
        """Change rotary settings (rope_theta, rope_type, rope_factor, ..., max_seq_len) of a built model, e.g. to
        try NTK scaling on a model at inference; the weights are untouched. Fields are validated as ModelConfig's."""
        allowed = {"max_seq_len", "rope_theta"} | {k for k in self.config.to_dict() if k.startswith("rope_")}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"set_rope takes only {', '.join(sorted(allowed))}; got {', '.join(unknown)}")
        self.config = ModelConfig.from_dict({**self.config.to_dict(), **fields})
        self._rope = self._rope_len = None

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: KVCache | None = None, cache_rows: Sequence[int] | None = None,
                input_lengths: Sequence[int] | None = None,
                output_positions: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Mean loss when targets are given, else float32 logits ([B, T, V], or [B, V] at output_positions).

        With a cache, tokens [B, T] continue the sequences in cache rows `cache_rows` (default: all its rows, in
        order), each from its own length: its rotary angles, the positions its keys and values are written to and
        the keys it attends to are its own. input_lengths: the real tokens of each row when rows are right-padded
        to T (default T); a row's length grows by its own count, and the padding's keys, written past it, are
        hidden by the mask until real tokens overwrite them.
        """
        B, T = tokens.shape
        step, starts, counts = None, [0] * B, [T] * B
        if cache is not None:
            rows = list(range(len(cache.lengths))) if cache_rows is None else list(cache_rows)
            if len(rows) != B:
                raise ValueError(f"{B} rows of tokens for {len(rows)} cache rows")
            starts = [cache.lengths[r] for r in rows]
            if input_lengths is not None:
                counts = list(input_lengths)
                if len(counts) != B or not all(1 <= n <= T for n in counts):
                    raise ValueError(f"input_lengths must be {B} counts in [1, {T}], got {counts}")
            if max(starts) + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions, {max(starts) + T} needed")
        elif input_lengths is not None:
            raise ValueError("input_lengths needs a cache")
        if max(starts) + T > self.config.max_seq_len:  # padding included: the rotary table has max_seq_len rows
            raise ValueError(f"sequence of {max(starts) + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        ends = [s + n for s, n in zip(starts, counts)]
        h = self.tok_embeddings(tokens)
        offset = starts[0] if len(set(starts)) == 1 else None  # None: rows at different positions
        if position_ids is not None:
            seq_len = int(position_ids.max()) + 1  # dynamic rope, as transformers: the furthest position in the batch
            cos, sin = self.rope(h.device, seq_len)
            rope = (cos[position_ids], sin[position_ids], False)
        else:
            rope = self._row_rope(h.device, starts, ends, T, offset)
        impl = attention.resolve(self.config.attn_impl, h.device, h.dtype)
        if offset is not None:
            meta = attention.AttnMeta.build(impl, B, T, offset, cu_seqlens, h.device)
        else:  # each row's own causal mask over its own length, which only these two kernels take
            positions = torch.tensor(starts, device=h.device)[:, None] + torch.arange(T, device=h.device)
            keys = torch.arange(max(starts) + T, device=h.device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, span]
            meta = attention.AttnMeta(impl="eager" if impl == "eager" else "sdpa", offset=min(starts), mask=mask)
        if cache is not None:
            step = CacheStep(cache, rows, starts, T, h.device)
        recompute = self.config.activation_checkpointing and self.training and cache is None
        for i, layer in enumerate(self.layers):
            if recompute:
                h = checkpoint(layer, h, rope, meta, use_reentrant=False)
            else:
                h = layer(h, rope, meta, step, i)
        if cache is not None:
            for r, end in zip(rows, ends):
                cache.lengths[r] = end
        h = self.norm(h)
        if targets is not None:
            return self.output(h, targets)
        if output_positions is not None:
            h = h[torch.arange(B, device=h.device), torch.as_tensor(output_positions, device=h.device)]
        return self.output(h)

    def _row_rope(self, device: torch.device, starts: list[int], ends: list[int], T: int,
                  offset: int | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(cos, sin, contiguous) for rows whose T tokens start at `starts` and whose sequences then end at
        `ends`: the table slice [offset, offset + T) when all rows share it, else per-row angles [B, T, D].

        With rope_type dynamic the table depends on the sequence length: each row gets the table of its own
        length, so a row's angles do not depend on what else is in the batch (a batched or continuously batched
        sequence is rotated exactly as it would be alone)."""
        lengths = [dynamic_length(self.config, end) for end in ends]
        if len(set(lengths)) == 1:
            cos, sin = self.rope(device, ends[0])
            if offset is not None:
                return cos, sin, True
            positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
            return cos[positions], sin[positions], False
        tables = {n: rope_table(self.config, device, n) for n in set(lengths)}
        cos = torch.stack([tables[n][0][s:s + T] for n, s in zip(lengths, starts)])
        sin = torch.stack([tables[n][1][s:s + T] for n, s in zip(lengths, starts)])
        return cos, sin, False

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        p = self.tok_embeddings.weight
        c = self.config
        return KVCache(c.n_layers, batch_size, max_len or c.max_seq_len, c.n_kv_heads, c.head_dim,
                       device or p.device, dtype or p.dtype)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx [B, T]; greedy when temperature is 0. Rows stop (pad with eos) once they emit eos_id.

        The decoding is model.generate.generate_ragged's (the one loop of every batch generation)."""
        new = generate_ragged(self, idx.tolist(), max_new_tokens, eos_id, temperature, top_k, top_p, generator,
                              keep_eos=True, use_cache=use_cache)
        width = max(len(n) for n in new)  # rows shorter than the widest ended with eos_id
        rows = [list(row) + n + [eos_id] * (width - len(n)) for row, n in zip(idx.tolist(), new)]
        return torch.tensor(rows, dtype=idx.dtype, device=idx.device)

    @classmethod
    def from_hf(cls, path: str | Path, **overrides) -> "Transformer":
        from .hf import load_hf

        return load_hf(cls, path, **overrides)

    def to_hf(self, out_dir: str | Path, tokenizer_path: str | Path | None = None,
              dtype: torch.dtype | None = None, layout: str = "llama", max_shard_size: int | str = "5GB") -> Path:
        from .hf import save_hf

        return save_hf(self, out_dir, tokenizer_path, dtype, layout=layout, max_shard_size=max_shard_size)
