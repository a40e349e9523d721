"""Rotary position embeddings and their context-extension variants.

The inverse frequencies follow transformers' `modeling_rope_utils` operation for operation (same dtypes, same
order), so a folder exported with a scaling type gives transformers' logits. The variants:

- default: theta ** (-2i/d). Raising rope_theta alone ("adjusted base frequency", ABF) is this type.
- linear: position interpolation (Chen et al. 2023): every frequency divided by `factor`.
- dynamic: NTK-aware scaling whose base grows with the current sequence length once it passes the original context.
- yarn: NTK-by-parts interpolation plus an attention temperature (Peng et al. 2023).
- llama3: Llama 3.1's piecewise rule: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
"""
from __future__ import annotations

import math
import torch

from .config import ROPE_TYPES, ModelConfig


def _base_inv_freq(base: float, dim: int, device: torch.device | None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def yarn_attention_factor(config: ModelConfig) -> float:
    """YaRN's temperature: cos and sin are multiplied by it (so attention logits by its square)."""
    if config.rope_attention_factor is not None:
        return config.rope_attention_factor
    return 1.0 if config.rope_factor <= 1 else 0.1 * math.log(config.rope_factor) + 1.0


def dynamic_length(config: ModelConfig, seq_len: int | None) -> int | None:
    """The sequence length the frequencies depend on: None for every type but dynamic, which uses
    max(seq_len, original context) as transformers does."""
    if config.rope_type != "dynamic":
        return None
    return max(seq_len or 0, config.rope_original_max_seq_len)


def inv_freq(config: ModelConfig, device: torch.device | None = None,
             seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """fp32 inverse frequencies [head_dim / 2] and the factor applied to cos and sin.

    seq_len only matters for 'dynamic': the current sequence length (positions seen so far plus new ones).
    """
    dim, base, kind, factor = config.head_dim, config.rope_theta, config.rope_type, config.rope_factor
    if kind == "default":
        return _base_inv_freq(base, dim, device), 1.0
    if kind == "linear":
        return _base_inv_freq(base, dim, device) / factor, 1.0
    if kind == "dynamic":
        original = config.rope_original_max_seq_len
        seq_len = dynamic_length(config, seq_len)
        base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim, device), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(config, device), yarn_attention_factor(config)
    if kind == "llama3":
        return _llama3_inv_freq(config, device), 1.0
    raise ValueError(f"unknown rope_type {kind!r}; choose one of: {', '.join(ROPE_TYPES)}")


def _yarn_inv_freq(config: ModelConfig, device: torch.device | None) -> torch.Tensor:
    dim, base, factor = config.head_dim, config.rope_theta, config.rope_factor
    original = config.rope_original_max_seq_len

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits num_rotations times into the original context.
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp.to(device=device, dtype=torch.float)  # 1: high frequency, extrapolated unchanged
    return interpolation * (1 - keep) + extrapolation * keep


def _llama3_inv_freq(config: ModelConfig, device: torch.device | None) -> torch.Tensor:
    inv = _base_inv_freq(config.rope_theta, config.head_dim, device)
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_seq_len
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_table(config: ModelConfig, device: torch.device | None,
               seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [max_seq_len, head_dim], each frequency repeated for both halves (rotate-half layout)."""
    freq, scale = inv_freq(config, device, seq_len)
    positions = torch.arange(config.max_seq_len, device=device, dtype=torch.float32)
    emb = torch.outer(positions, freq)
    emb = torch.cat([emb, emb], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin
