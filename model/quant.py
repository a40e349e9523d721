"""Weight-only INT8 / INT4 quantization of the Transformer: the numbers, the layers and whole-model quantization
(gpt-fast's quantize.py, for this model). Saving and loading a quantized folder is artifacts/quantized.py; the
command is inference/quantize.py.

Schemes (weights only; activations stay in the model's float dtype):
- int8: per output channel, symmetric. w ~= q * scale, q in [-127, 127], scale = max|w_row| / 127.
- int4: per group of `group_size` input columns, asymmetric (min/max), the layout of torch's int4 kernels:
  w ~= (q - 8) * scale + zero, q in [0, 15], scale = (max - min) / 15, zero = min + 8 * scale.
Every linear layer is quantized except the embedding and, unless quantize_head, the output head.

Kernels:
- CPU: torch.ops.aten._weight_int8pack_mm (int8) and _convert_weight_to_int4pack_for_cpu +
  _weight_int4pack_mm_for_cpu (int4: group size 32/64/128/256, out_features a multiple of 16). These kernels are
  fast only with bf16 activations (with fp32 ones torch 2.13 runs them 5-100x slower than an fp32 matmul), so an
  fp32 model's quantized matmuls take bf16 activations and give fp32 back; everything else stays fp32.
- CUDA: _weight_int8pack_mm when the build has it, else int8 -> activation dtype then matmul (gpt-fast's path);
  _convert_weight_to_int4pack + _weight_int4pack_mm for int4 (bf16 activations, group size 32-256).
- Anything else (a kernel missing from this torch build, a shape the kernel does not take) runs the reference
  path, dequantize-then-matmul, after one warning line that says why.
INT8 layers pick their path on the first forward pass (a probe; the weights are not changed). INT4 layers hold the
portable layout (what a quantized folder stores) until `pack_for_kernels` converts them, once, to the kernel layout
of the device they are on: the loaders call it right after building the model, never a forward pass.

Group size (int4): an explicit group size must divide every quantized layer's in_features (else an error names the
layer). The default (group_size=None) is 128 where it divides in_features, as for every real LLaMA width; a smaller
layer gets the largest of 64 and 32 that divides its in_features (still kernel sizes), else the largest power of
two below 128 that does (reference path). The size each layer got is recorded in QuantizationConfig.group_sizes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import UserError
from common.tensors import IGNORE_INDEX

from .model import Transformer

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's int4 weight-pack kernels accept (CPU and CUDA)."""
CPU_KERNEL_DTYPE = torch.bfloat16
"""Activation dtype of the quantized matmuls on CPU (see QuantizedLinear.forward)."""
FORMAT_VERSION = 1
"""Version of the stored layout of codes, scales and zeros (QuantizationConfig.format_version)."""

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


# --- quantize / dequantize -------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8: (codes int8 [N, K], scales fp32 [N]); |w - q * s| <= s / 2 elementwise."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise INT4: (codes uint8 in [0, 15] [N, K], scales fp32 [N, K/g], zeros fp32 [N, K/g]).

    w ~= (q - 8) * scale + zero, with |w - that| <= scale / 2 elementwise (scale = (max - min) / 15 of the group).
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8)  # a constant group: any scale works, avoid dividing by 0
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    zeros = lo + 8 * scales
    return q.reshape(n, k), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes [N, K] (unpacked) -> weights [N, K]."""
    n, k = q.shape
    groups = scales.shape[1]
    g = q.float().reshape(n, groups, k // groups)
    return ((g - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(n, k).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in [0, 15] -> uint8 [N, K/2]: even column in the high nibble (torch's CUDA int4pack input)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K]."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)


def auto_group_size(in_features: int, requested: int | None) -> int:
    """The group size a layer gets: `requested` (must divide), else the default rule of the module docstring."""
    if requested is not None:
        return requested
    for g in (DEFAULT_GROUP_SIZE, 64, 32):
        if in_features % g == 0:
            return g
    g = DEFAULT_GROUP_SIZE
    while in_features % g:
        g //= 2
    return g


# --- quantized linear layers -----------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """Shared by Int8Linear and Int4Linear: the LM-head behaviour (float32 logits, optional loss)."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, is_head: bool):
        super().__init__()
        self.in_features, self.out_features, self.is_head = in_features, out_features, is_head
        # "kernel", "cast" or "reference": Int8Linear decides on its first forward pass (a probe that changes no
        # weight); Int4Linear when pack() converts its layout.
        self.path: str | None = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.path in (None, "kernel"):
            # torch's CPU weight-pack kernels are vectorized for bf16 activations only: with fp32 ones they ran
            # 5-100x slower than an fp32 matmul here (benchmarks/quantization.md), so the quantized matmul
            # takes bf16 activations and returns fp32; the rest of the model stays fp32.
            y = self.matmul(x2.to(CPU_KERNEL_DTYPE))
            y = y.float() if self.path == "kernel" else self.matmul(x2)  # no kernel after all: fp32 reference
        else:
            y = self.matmul(x2)
        y = y.reshape(*shape[:-1], self.out_features)
        if not self.is_head:
            return y
        y = y.float()  # the model's LMHead returns float32 logits
        if targets is None:
            return y
        return F.cross_entropy(y.reshape(-1, y.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


class Int8Linear(QuantizedLinear):
    """y = x @ (q * scale).T with int8 codes q [out, in] and fp32 per-row scales."""

    def __init__(self, in_features: int, out_features: int, is_head: bool = False, device=None):
        super().__init__(in_features, out_features, is_head)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, is_head: bool = False) -> "Int8Linear":
        q, s = quantize_int8(linear.weight.detach())
        layer = cls(linear.in_features, linear.out_features, is_head, device="meta")
        layer.weight, layer.scales = q, s
        return layer

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales, dtype)

    def _choose_path(self, x: torch.Tensor) -> str:
        if _has_op("_weight_int8pack_mm") and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            try:  # CUDA builds may lack it; probe once on a tiny input
                torch.ops.aten._weight_int8pack_mm(x[:1].contiguous(), self.weight, self.scales.to(x.dtype))
                return "kernel"
            except (RuntimeError, NotImplementedError):
                pass
        if x.device.type == "cuda":
            return "cast"  # gpt-fast's CUDA int8 path: cast the codes, matmul, scale the output
        _warn_once(f"torch {torch.__version__} has no usable _weight_int8pack_mm for {x.device.type}/{x.dtype}: "
                   "INT8 layers run the dequantize-then-matmul reference path (slower)")
        return "reference"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.path is None:
            self.path = self._choose_path(x)
        if self.path == "kernel":
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, self.scales.to(x.dtype))
        if self.path == "cast":
            return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype))


class Int4Linear(QuantizedLinear):
    """Group-wise int4: codes packed two per byte, per-group fp32 scales and zeros.

    Built in the portable layout (uint8 [out, in/2], high nibble = even column), the one a quantized folder stores.
    `pack()` converts `weight`, once, to the int4 kernel layout of the device it is on (or settles on the reference
    path); the loaders call it right after building the model, and a forward pass never changes the layer. torch
    offers no way back from the kernel layout, so save_quantized refuses a packed layer.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, is_head: bool = False, device=None):
        super().__init__(in_features, out_features, is_head)
        if in_features % group_size:
            raise UserError(f"group size {group_size} does not divide in_features {in_features}")
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.layout = "portable"
        self._scales_and_zeros: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, is_head: bool = False) -> "Int4Linear":
        q, s, z = quantize_int4(linear.weight.detach(), group_size)
        layer = cls(linear.in_features, linear.out_features, group_size, is_head, device="meta")
        layer.weight, layer.scales, layer.zeros = pack_int4(q), s, z
        return layer

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.layout != "portable":
            raise RuntimeError("this Int4Linear holds a kernel-specific weight layout; it cannot be dequantized")
        return dequantize_int4(unpack_int4(self.weight), self.scales, self.zeros, dtype)

    def _kernel_problem(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why the int4 kernel cannot run this layer on `device` with `dtype` activations, or None."""
        cpu = device.type == "cpu"
        convert, mm = (("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu") if cpu
                       else ("_convert_weight_to_int4pack", "_weight_int4pack_mm"))
        if not (_has_op(convert) and _has_op(mm)):
            return f"torch {torch.__version__} has no {mm} for {device.type}"
        if device.type not in ("cpu", "cuda"):
            return f"no int4 kernel for {device.type}"
        if self.group_size not in KERNEL_GROUP_SIZES:
            return f"group size {self.group_size} (the kernel takes {'/'.join(map(str, KERNEL_GROUP_SIZES))})"
        if cpu and self.out_features % 16:
            return f"out_features {self.out_features} is not a multiple of 16"
        if not cpu:
            if dtype != torch.bfloat16:
                return f"activations are {dtype} (the CUDA kernel takes bfloat16)"
            if self.out_features % 8 or self.in_features % 32:
                return f"shape {self.out_features}x{self.in_features} (the CUDA kernel needs N % 8, K % 32 == 0)"
        return None

    @torch.no_grad()
    def pack(self, dtype: torch.dtype | None = None) -> "Int4Linear":
        """Convert to the kernel layout of the device the codes are on, for activations of `dtype` (default:
        bf16, what the kernels take; an fp32 model on CPU feeds them bf16). Once; returns the layer."""
        if self.path is not None:
            return self
        device = self.weight.device
        problem = self._kernel_problem(device, dtype or CPU_KERNEL_DTYPE)
        if problem is not None:
            _warn_once(f"INT4 kernel not used for a {self.out_features}x{self.in_features} layer with group size "
                       f"{self.group_size}: {problem}; it runs the dequantize-then-matmul reference path (slower)")
            self.path = "reference"
            return self
        if device.type == "cpu":
            codes = unpack_int4(self.weight).to(torch.int32)
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        else:
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), inner_k_tiles)
        self.layout, self.path = f"{device.type}_kernel", "kernel"
        return self

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.path is None:
            _warn_once("an Int4Linear ran before pack() (model.quant.pack_for_kernels): reference path (slower)")
        if self.path != "kernel":
            return F.linear(x, self.dequantized(x.dtype))
        if x.device != self.weight.device:
            raise RuntimeError(f"this INT4 layer was packed for {self.weight.device}, the input is on {x.device}; "
                               "load the model again on the new device")
        sz = self._scales_and_zeros
        if sz is None or sz.dtype != x.dtype or sz.device != x.device:
            # The kernels take [groups, out, 2] of (scale, zero) in the activation dtype.
            sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(x.dtype).contiguous()
            self._scales_and_zeros = sz
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.weight, self.group_size, sz)
        return torch.ops.aten._weight_int4pack_mm(x.contiguous(), self.weight, self.group_size, sz)


# --- whole models ----------------------------------------------------------------------------------------------

@dataclass
class QuantizationConfig:
    """What quantization_config.json records about a quantized model."""

    scheme: str
    """int8 or int4."""
    group_size: int | None = None
    """int4: the group size asked for (None: the per-layer default rule)."""
    quantize_head: bool = False
    """Whether the output head was quantized too."""
    group_sizes: dict[str, int] = field(default_factory=dict)
    """int4: the group size of each quantized layer."""
    layers: list[str] = field(default_factory=list)
    """Names of the quantized linear layers."""
    format_version: int = FORMAT_VERSION
    """Layout version of the folder; load_quantized refuses others."""
    method: str = "rtn"
    """How the codes were chosen: rtn (round to nearest) or gptq (calibrated, inference/calibration.py)."""
    int4_layout: str = "uint8 [out, in/2], even column in the high nibble; w = (q - 8) * scale + zero per group"
    """How the int4 tensors are stored (for readers other than this module)."""
    int8_layout: str = "int8 [out, in]; w = q * scale per output row"
    """How the int8 tensors are stored."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    return scheme


def quantization_targets(model: Transformer, quantize_head: bool) -> list[tuple[str, nn.Linear]]:
    """The linear layers to quantize: all but the embedding (not a Linear) and, unless asked, the output head."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (quantize_head or name != "output")]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def plan_group_sizes(model: Transformer, group_size: int | None, quantize_head: bool) -> dict[str, int]:
    """Each target layer's int4 group size; an explicit size that does not divide a layer's in_features is an
    error naming the layer."""
    if group_size is not None and (group_size < 2 or group_size % 2):
        raise UserError(f"--group_size must be an even number >= 2, got {group_size}")
    sizes = {}
    for name, linear in quantization_targets(model, quantize_head):
        g = auto_group_size(linear.in_features, group_size)
        if linear.in_features % g:
            divisors = [d for d in KERNEL_GROUP_SIZES if linear.in_features % d == 0]
            hint = f"use one that divides it ({', '.join(map(str, divisors))}) or" if divisors else ""
            raise UserError(f"--group_size {g} does not divide in_features {linear.in_features} of layer {name}; "
                             f"{hint} leave --group_size unset for a per-layer default".replace("  ", " "))
        sizes[name] = g
    return sizes


@torch.no_grad()
def quantize_model(model: Transformer, scheme: str, group_size: int | None = None, quantize_head: bool = False,
                   pack: bool = True) -> Transformer:
    """Swap the model's linear layers for Int8Linear / Int4Linear in place (see the module docstring); returns it.

    The weights are quantized where they are (CPU or GPU) from their current values; the float weights are freed.
    pack: convert INT4 layers to the kernel layout now (pack_for_kernels), ready to run; pack=False keeps the
    portable layout, the one save_quantized writes.
    """
    check_scheme(scheme)
    sizes = plan_group_sizes(model, group_size, quantize_head) if scheme == "int4" else {}
    targets = quantization_targets(model, quantize_head)
    for name, linear in tqdm(targets, desc=f"quantizing to {scheme}", unit="layer", leave=False,
                             disable=len(targets) < 50):
        is_head = name == "output"
        q = (Int8Linear.from_linear(linear, is_head) if scheme == "int8"
             else Int4Linear.from_linear(linear, sizes[name], is_head))
        set_module(model, name, q)
    model.quantization = QuantizationConfig(scheme, group_size, quantize_head, sizes, [n for n, _ in targets])
    return pack_for_kernels(model, model.tok_embeddings.weight.dtype) if pack else model


def pack_for_kernels(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Convert every INT4 layer to the kernel layout of its device for `dtype` activations (the model's float dtype;
    default bf16); once, before the model runs. Returns the model."""
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.pack(dtype)
    return model


def linear_weight_bytes(model: nn.Module, include_head: bool = False) -> int:
    """Bytes held by the linear layers' weights (codes + scales + zeros for quantized ones); the embedding never,
    the output head only with include_head."""
    total = 0
    for name, m in model.named_modules():
        if name == "output" and not include_head:
            continue
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
    return total
