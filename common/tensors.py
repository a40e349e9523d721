"""Names shared by every stage that touches tensors: dtype names and the loss ignore index."""
from __future__ import annotations

import torch

from .errors import UserError

IGNORE_INDEX = -100
"""Target id that the loss skips (prompt tokens, padding, document tails): PyTorch's and transformers' value."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names every `--dtype` flag and config field accepts."""


def dtype_from_name(name: str, key: str = "--dtype") -> torch.dtype:
    """The torch dtype called `name`; a clear error naming `key` for an unknown one."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"{key} {name!r} is not a dtype; choose one of {', '.join(DTYPES)}") from None
