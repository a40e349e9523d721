"""Probing optional packages (flash-attn, xformers, FlexAttention) without importing them."""
from __future__ import annotations

import importlib.util


def has_module(name: str) -> bool:
    """Whether `import name` would find a module, without importing it (optional extras: flash-attn, xformers)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
