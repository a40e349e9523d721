"""CPU float32 decoding: large linear weights packed once in MKL's GEMM layout for the engine's full batch.

MKL's sgemm copies the weight matrix into its blocked panel layout at every call. With one row (a GEMV) it skips
that; with the 2-16 rows of a batched decode step the copy costs more than the multiply. Measured with torch 2.13 on
the 2-core Xeon (AVX-512) of benchmarks/inference.md, one thread, a [32000, 256] output head takes 1.3 ms for 1 row,
4.1 ms for 8 rows, and 1.7-1.9 ms for 8 rows when the weight was packed ahead of time (cblas_sgemm_pack, which torch
exposes as torch.ops.mkl._mkl_reorder_linear_weight / _mkl_linear, the kernels inductor's freezing pass uses for CPU
linears); a [4096, 4096] layer 8.4 ms against 4.2 ms. In the engine with 8 busy slots, packing the benchmark model's
head (its only matrix this large) took batch-8 decoding from 805 to 1,036 tokens/s.

A packed weight is made for one row count: the engine's slot count, the batch of a full decode step. Other row
counts (prefill, a partly idle engine) use the ordinary weight, which stays the module's parameter (state dicts,
tied embeddings and exports are unchanged). Matrices under MIN_WEIGHTS are left alone: they gain little, and
MKL's packed copy of a small matrix is many times its size (11-17x for 256 x 768; 1.1-1.3x from 4096 x 4096 up,
2.7x for 32000 x 256). The packed copies are extra memory, so packing stops where they would not fit.
Results agree with F.linear to float32 rounding (a different summation order), not bit for bit.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.model import Linear, LMHead

PACKABLE = (nn.Linear, Linear, LMHead)  # plain products (LMHead's without targets); not LoRA or quantized layers
MIN_WEIGHTS = 1 << 20  # see the module docstring
MEMORY_SHARE = 0.5  # packed copies may take at most this share of the memory available when packing starts


def available() -> bool:
    """Whether this torch build has MKL's packed sgemm (for CPU float32 weights)."""
    return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """An nn.Linear whose products with exactly `rows` rows use a weight packed for MKL ahead of time."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, rows
        self.weight, self.bias = linear.weight, linear.bias
        packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), rows)
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None:  # the output head's loss (model.model.LMHead)
            raise RuntimeError("this output head is packed for inference (inference/packing.py); compute losses "
                               "with a model that no Engine has packed")
        if x.shape[:-1].numel() != self.rows or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # the packed kernel has no backward
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for {self.rows} rows"


def pack_linears(model: nn.Module, rows: int, min_weights: int = MIN_WEIGHTS) -> tuple[nn.Module, list[str]]:
    """(a copy of `model` whose float32 CPU nn.Linears of at least `min_weights` weights are PackedLinears for
    `rows` rows, the names swapped). Largest first, while the packed copies fit in MEMORY_SHARE of the available
    memory. `model` itself is left as it was: the copy shares its parameters and every module it does not swap
    (only the modules on the way to a swapped one are new objects), so it costs no weight memory beyond the packed
    copies; with nothing to pack, `model` itself comes back. The weights must not change afterwards (the packed
    copies would be stale)."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) in PACKABLE
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
               and m.weight.numel() >= min_weights]
    if not targets or not available():
        return model, []
    import psutil

    budget = MEMORY_SHARE * psutil.virtual_memory().available
    used, swapped = 0, []
    copies: dict[str, nn.Module] = {"": _shallow_copy(model)}

    def copied(path: str) -> nn.Module:
        """The copy of the module at `path`, made (with its parents) on first use."""
        if path not in copies:
            parent, _, child = path.rpartition(".")
            owner = copied(parent)
            copies[path] = owner._modules[child] = _shallow_copy(owner._modules[child])
        return copies[path]

    for name, linear in sorted(targets, key=lambda t: -t[1].weight.numel()):
        if used + 3 * linear.weight.nbytes > budget:  # from 2^20 weights up, packed copies measured <= 2.7x
            continue
        packed = PackedLinear(linear, rows)
        used += packed.packed.nbytes
        parent, _, child = name.rpartition(".")
        copied(parent)._modules[child] = packed
        swapped.append(name)
    return (copies[""], swapped) if swapped else (model, [])


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same attributes, parameters, buffers and submodules (its own dicts of them, so
    swapping a submodule of the copy leaves the original alone)."""
    clone = copy.copy(module)
    clone._modules, clone._parameters, clone._buffers = \
        dict(module._modules), dict(module._parameters), dict(module._buffers)
    return clone
