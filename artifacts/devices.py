"""The --device / --dtype defaults and checks every command that runs a model shares."""
from __future__ import annotations

import torch

from common.errors import UserError


def check_device(device: str) -> torch.device:
    """`device` as a torch.device; a clear error for a name torch does not know or a GPU this machine lacks."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    return dev


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    # bf16 halves memory and is the training precision on GPUs; CPUs are faster and exact in fp32.
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"
