"""Model configuration: one typed dataclass, validated on construction, plus named presets."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ATTN_IMPLS = ("auto", "eager", "sdpa", "flash", "xformers", "flex")
RUNTIME_MODEL_FIELDS = ("attn_impl", "activation_checkpointing", "fused_kernels")
"""ModelConfig fields that change how the model runs, not its weights: they may differ when resuming or loading."""


@dataclass
class ModelConfig:
    """Architecture of a LLaMA-style decoder, plus a few runtime switches that do not change the weights."""

    vocab_size: int = 32000
    """Rows of the embedding table; must match the tokenizer (pad it up to a multiple of 64 for speed if you like)."""
    dim: int = 4096
    """Width of the residual stream (hidden_size in transformers)."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads; dim must be divisible by it."""
    n_kv_heads: int | None = None
    """Number of key/value heads for grouped-query attention; None means n_heads (plain multi-head attention)."""
    hidden_dim: int | None = None
    """SwiGLU inner width (intermediate_size); None derives LLaMA's 8/3*dim rounded up to multiple_of."""
    multiple_of: int = 256
    """Rounding for the derived hidden_dim; ignored when hidden_dim is given."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies; raising it (with rope_type 'default') is ABF long-context training."""
    max_seq_len: int = 4096
    """Longest sequence the model runs on (the extended context when rope scaling is used); sizes the rotary table
    and the KV cache."""
    rope_type: str = "default"
    """Rotary scaling, transformers' rope_type: 'default' (none), 'linear' (position interpolation), 'dynamic'
    (NTK-aware, the base grows with the sequence), 'yarn' or 'llama3'. See model/rope.py and docs/long_context.md."""
    rope_factor: float = 1.0
    """Context extension factor of the scaling types (rope_scaling.factor); >= 1, and exactly 1 for 'default'."""
    rope_original_max_seq_len: int | None = None
    """Context the rotary embedding was pretrained at (original_max_position_embeddings); required by 'dynamic',
    'yarn' and 'llama3', optional for 'linear' (then it bounds max_seq_len)."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original / low_freq_factor are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original / high_freq_factor are kept; a smooth ramp in between."""
    rope_beta_fast: float = 32.0
    """yarn: dimensions rotating more than this many times over the original context are not interpolated."""
    rope_beta_slow: float = 1.0
    """yarn: dimensions rotating fewer than this many times are fully interpolated (divided by rope_factor)."""
    rope_attention_factor: float | None = None
    """yarn: factor on cos and sin (attention temperature); None means 0.1 * ln(rope_factor) + 1."""
    rope_truncate: bool = True
    """yarn: round the correction range to whole dimensions (transformers' default)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection (tie_word_embeddings)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections are further scaled by 1/sqrt(2*n_layers)."""
    attn_impl: str = "auto"
    """Attention kernel: 'auto' (fastest available), 'flash', 'xformers', 'sdpa', 'eager' or 'flex' (torch's
    FlexAttention: block-sparse document masking without flash-attn; compiled on first use). Runtime only."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory. Runtime only."""
    fused_kernels: bool = True
    """Use flash-attn's fused rotary and RMSNorm kernels when installed and on CUDA (the loss is the chunked
    cross-entropy of model.py either way). Runtime only."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len", "multiple_of")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) "
                "for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")
        self._check_rope()
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"ModelConfig.attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {self.attn_impl!r}")

    def _check_rope(self) -> None:
        from .rope import ROPE_TYPES

        kind = self.rope_type
        if kind not in ROPE_TYPES:
            raise ValueError(f"ModelConfig.rope_type must be one of {', '.join(ROPE_TYPES)}, got {kind!r}")
        if not float(self.rope_factor) >= 1:
            raise ValueError(f"ModelConfig.rope_factor must be >= 1 (a factor below 1 would shrink the context), "
                             f"got {self.rope_factor!r}")
        if kind == "default" and self.rope_factor != 1:
            raise ValueError(f"ModelConfig.rope_factor={self.rope_factor} has no effect with rope_type 'default'; "
                             "choose a scaling rope_type or leave the factor at 1")
        original = self.rope_original_max_seq_len
        if original is None and kind in ("dynamic", "yarn", "llama3"):
            raise ValueError(f"ModelConfig.rope_original_max_seq_len is required for rope_type {kind!r} "
                             "(the context the model was pretrained at)")
        if original is not None and (not isinstance(original, int) or isinstance(original, bool) or original <= 0):
            raise ValueError(f"ModelConfig.rope_original_max_seq_len must be a positive integer, got {original!r}")
        if kind == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"ModelConfig.rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                             f"rope_low_freq_factor ({self.rope_low_freq_factor})")
        if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
            raise ValueError(f"ModelConfig.rope_attention_factor must be > 0 or None, got {self.rope_attention_factor!r}")
        if kind == "yarn" and not self.rope_beta_fast > self.rope_beta_slow:
            raise ValueError(f"ModelConfig.rope_beta_fast ({self.rope_beta_fast}) must exceed "
                             f"rope_beta_slow ({self.rope_beta_slow})")
        # llama3 is exempt: Llama 3.1 ships 128K positions with factor 8 over 8K (high frequencies are not scaled).
        if original is not None and kind in ("linear", "dynamic", "yarn"):
            limit = math.ceil(self.rope_factor * original)
            if self.max_seq_len > limit:
                raise ValueError(
                    f"ModelConfig.max_seq_len={self.max_seq_len} exceeds what the rope settings allow: rope_factor "
                    f"{self.rope_factor} x rope_original_max_seq_len {original} = {limit}; raise rope_factor or "
                    "lower max_seq_len")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (see PRESETS), with fields replaced by keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count, computed from the shapes (no model needed)."""
        kv_dim = self.n_kv_heads * self.head_dim
        per_layer = self.dim * (2 * self.dim + 2 * kv_dim) + 3 * self.dim * self.hidden_dim + 2 * self.dim
        n = self.n_layers * per_layer + self.dim
        if include_embeddings:
            n += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus causal attention scores.

        N counts the output projection but not the embedding lookup (PaLM's accounting, as in nanoGPT).
        Attention is 12 * L * d * T / 2: the causal half of QK^T and AV, times 3 for forward and backward.
        """
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.dim
        return 6 * n + 6 * self.n_layers * self.dim * seq_len


PRESETS: dict[str, dict[str, Any]] = {
    # Tiny model for tests and the CPU quick start: a few hundred thousand parameters.
    "debug": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, max_seq_len=256),
    # About 134M parameters (GPT-2 small sized), tied embeddings.
    "125m": dict(vocab_size=64000, dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=2048,
                 tie_embeddings=True),
    # About 1.2B parameters (TinyLlama shape with a 64000-word vocabulary), grouped-query attention.
    "1b": dict(vocab_size=64000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=4096),
    # Baichuan-7B, as released.
    "baichuan-7b": dict(vocab_size=64000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096,
                        norm_eps=1e-6, rope_theta=10000.0),
    # XVERSE-13B's shape with its 8K context: 40 layers, dim 5120, 40 heads, SwiGLU 13824. Its BPE tokenizer has
    # 100,278 ids (XVERSE-13B README); the table is rounded up to a multiple of 64 (100,288) for GEMM speed, the
    # last 10 rows unused. About 13.7B parameters with untied embeddings.
    "xverse-13b": dict(vocab_size=100288, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=8192,
                       norm_eps=1e-6, rope_theta=10000.0),
    # About 13B parameters (LLaMA-13B shape with a 64000-word vocabulary).
    "13b": dict(vocab_size=64000, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=4096),
}
