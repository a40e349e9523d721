"""LLaMA-style decoder: `ModelConfig`, `Transformer`, `KVCache`."""
from .config import PRESETS, ModelConfig
from .model import KVCache, Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "KVCache"]
