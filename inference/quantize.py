"""Weight-only INT8 / INT4 quantization of our Transformer for inference (gpt-fast's quantize.py, for this model).

    python -m inference.quantize --model runs/sample/train/hf --scheme int8 --output_dir out/int8
    python -m inference.quantize --model runs/sample/train/hf --scheme int4 --group_size 128 --output_dir out/int4
    python -m inference.quantize --model M --scheme int4 --method gptq --calibration PATHS \
        --format compressed-tensors --group_size 128 --output_dir out/int4-ct   # GPTQ; transformers/vLLM folder

Schemes (weights only; activations stay in the model's float dtype):
- int8: per output channel, symmetric. w ~= q * scale, q in [-127, 127], scale = max|w_row| / 127.
- int4: per group of `group_size` input columns, asymmetric (min/max), the layout of torch's int4 kernels:
  w ~= (q - 8) * scale + zero, q in [0, 15], scale = (max - min) / 15, zero = min + 8 * scale.
Every linear layer is quantized except the embedding and, unless quantize_head, the output head.

Kernels, chosen per layer on its first forward pass:
- CPU: torch.ops.aten._weight_int8pack_mm (int8) and _convert_weight_to_int4pack_for_cpu +
  _weight_int4pack_mm_for_cpu (int4: group size 32/64/128/256, out_features a multiple of 16). These kernels are
  fast only with bf16 activations (with fp32 ones torch 2.13 runs them 5-100x slower than an fp32 matmul), so an
  fp32 model's quantized matmuls take bf16 activations and give fp32 back; everything else stays fp32.
- CUDA: _weight_int8pack_mm when the build has it, else int8 -> activation dtype then matmul (gpt-fast's path);
  _convert_weight_to_int4pack + _weight_int4pack_mm for int4 (bf16 activations, group size 32-256).
- Anything else (a kernel missing from this torch build, a shape the kernel does not take) runs the reference
  path, dequantize-then-matmul, after one warning line that says why.

Group size (int4): an explicit group size must divide every quantized layer's in_features (else an error names the
layer). The default (group_size=None) is 128 where it divides in_features, as for every real LLaMA width; a smaller
layer gets the largest of 64 and 32 that divides its in_features (still kernel sizes), else the largest power of
two below 128 that does (reference path). The size each layer got is recorded in quantization_config.json.

A quantized folder (written by save_quantized) holds config.json (the Hugging Face LLaMA config of the original),
quantization_config.json (scheme, group sizes, layers), model.safetensors (int codes, scales, zeros, and the
unquantized tensors under our own parameter names) and the tokenizer files. For other commands:

    from inference.quantize import add_quantize_args, load_for_inference
    add_quantize_args(parser)                       # --quantize int8|int4, --group_size, --quantize_head
    model = load_for_inference(args.model, device, dtype, quantize=args.quantize, group_size=args.group_size,
                               quantize_head=args.quantize_head)

`load_for_inference` opens a quantized folder as it is, and quantizes a float model (HF folder or run directory)
on load when `quantize` is given.
"""
from __future__ import annotations

import argparse
import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from artifacts.open import check_device, default_device, default_dtype, load_model, load_tokenizer
from artifacts.quant_formats import (FORMATS, check_known_quantization, is_compressed_tensors_dir,
                                     load_compressed_tensors, native_marker, save_compressed_tensors)
from common.cli import entry_point, parser as make_parser
from common.errors import UserError
from common.io import atomic_dir, check_output_dir, write_json
from common.tensors import DTYPES, IGNORE_INDEX
from model import Transformer
from model.config import ModelConfig
from model.hf import config_from_hf, config_to_hf
from tokenizer import Tokenizer

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's int4 weight-pack kernels accept (CPU and CUDA)."""
CPU_KERNEL_DTYPE = torch.bfloat16
"""Activation dtype of the quantized matmuls on CPU (see _QuantizedLinear.forward)."""
QUANT_CONFIG = "quantization_config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json")

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

class _QuantizedLinear(nn.Module):
    """Shared by Int8Linear and Int4Linear: the LM-head behaviour (float32 logits, optional loss)."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, is_head: bool):
        super().__init__()
        self.in_features, self.out_features, self.is_head = in_features, out_features, is_head
        self.path: str | None = None  # "kernel" or "reference", decided on the first forward pass

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.path != "reference":
            # torch's CPU weight-pack kernels are vectorized for bf16 activations only: with fp32 ones they ran
            # 5-100x slower than an fp32 matmul here (benchmarks/quantization.md), so the quantized matmul
            # takes bf16 activations and returns fp32; the rest of the model stays fp32.
            y = self.matmul(x2.to(CPU_KERNEL_DTYPE))
            y = y.float() if self.path == "kernel" else self.matmul(x2)  # the reference path is decided now
        else:
            y = self.matmul(x2)
        y = y.reshape(*shape[:-1], self.out_features)
        if not self.is_head:
            return y
        y = y.float()  # the model's LMHead returns float32 logits
        if targets is None:
            return y
        return F.cross_entropy(y.reshape(-1, y.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


class Int8Linear(_QuantizedLinear):
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


class Int4Linear(_QuantizedLinear):
    """Group-wise int4: codes packed two per byte, per-group fp32 scales and zeros.

    The state dict holds the portable layout (uint8 [out, in/2], high nibble = even column). On the first forward
    pass with a usable kernel, `weight` is converted in place to that device's kernel layout (torch offers no way
    back), so save a model before running it; `save_quantized` refuses a converted one.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, is_head: bool = False, device=None):
        super().__init__(in_features, out_features, is_head)
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
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

    def _kernel_problem(self, x: torch.Tensor) -> str | None:
        """Why the int4 kernel cannot run this layer on x, or None."""
        cpu = x.device.type == "cpu"
        convert, mm = (("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu") if cpu
                       else ("_convert_weight_to_int4pack", "_weight_int4pack_mm"))
        if not (_has_op(convert) and _has_op(mm)):
            return f"torch {torch.__version__} has no {mm} for {x.device.type}"
        if x.device.type not in ("cpu", "cuda"):
            return f"no int4 kernel for {x.device.type}"
        if self.group_size not in KERNEL_GROUP_SIZES:
            return f"group size {self.group_size} (the kernel takes {'/'.join(map(str, KERNEL_GROUP_SIZES))})"
        if cpu and self.out_features % 16:
            return f"out_features {self.out_features} is not a multiple of 16"
        if not cpu:
            if x.dtype != torch.bfloat16:
                return f"activations are {x.dtype} (the CUDA kernel takes bfloat16)"
            if self.out_features % 8 or self.in_features % 32:
                return f"shape {self.out_features}x{self.in_features} (the CUDA kernel needs N % 8, K % 32 == 0)"
        return None

    def _convert(self, x: torch.Tensor) -> None:
        problem = self._kernel_problem(x)
        if problem is not None:
            _warn_once(f"INT4 kernel not used for a {self.out_features}x{self.in_features} layer with group size "
                       f"{self.group_size}: {problem}; it runs the dequantize-then-matmul reference path (slower)")
            self.path = "reference"
            return
        if x.device.type == "cpu":
            codes = unpack_int4(self.weight).to(torch.int32)
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        else:
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), inner_k_tiles)
        self.layout, self.path = f"{x.device.type}_kernel", "kernel"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.path is None:
            self._convert(x)
        if self.path == "reference":
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
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    return scheme


def _targets(model: Transformer, quantize_head: bool) -> list[tuple[str, nn.Linear]]:
    """The linear layers to quantize: all but the embedding (not a Linear) and, unless asked, the output head."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (quantize_head or name != "output")]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def plan_group_sizes(model: Transformer, group_size: int | None, quantize_head: bool) -> dict[str, int]:
    """Each target layer's int4 group size; an explicit size that does not divide a layer's in_features is an
    error naming the layer."""
    if group_size is not None and (group_size < 2 or group_size % 2):
        raise ValueError(f"--group_size must be an even number >= 2, got {group_size}")
    sizes = {}
    for name, linear in _targets(model, quantize_head):
        g = auto_group_size(linear.in_features, group_size)
        if linear.in_features % g:
            divisors = [d for d in KERNEL_GROUP_SIZES if linear.in_features % d == 0]
            hint = f"use one that divides it ({', '.join(map(str, divisors))}) or" if divisors else ""
            raise ValueError(f"--group_size {g} does not divide in_features {linear.in_features} of layer {name}; "
                             f"{hint} leave --group_size unset for a per-layer default".replace("  ", " "))
        sizes[name] = g
    return sizes


@torch.no_grad()
def quantize_model(model: Transformer, scheme: str, group_size: int | None = None,
                   quantize_head: bool = False, calibration: torch.Tensor | None = None,
                   symmetric: bool = False) -> Transformer:
    """Swap the model's linear layers for Int8Linear / Int4Linear in place (see the module docstring); returns it.

    The weights are quantized where they are (CPU or GPU) from their current values; the float weights are freed.
    `calibration` (token ids [N, T]): GPTQ over them instead of round-to-nearest; `symmetric`: int4 on the
    symmetric grid of compressed-tensors W4A16 checkpoints (both in inference/calibration.py).
    """
    check_scheme(scheme)
    sizes = plan_group_sizes(model, group_size, quantize_head) if scheme == "int4" else {}
    targets = _targets(model, quantize_head)
    if calibration is not None or symmetric:
        from inference.calibration import quantize_model_calibrated

        quantize_model_calibrated(model, scheme, sizes, [n for n, _ in targets], calibration, symmetric)
    else:
        for name, linear in tqdm(targets, desc=f"quantizing to {scheme}", unit="layer", leave=False,
                                 disable=len(targets) < 50):
            is_head = name == "output"
            q = (Int8Linear.from_linear(linear, is_head) if scheme == "int8"
                 else Int4Linear.from_linear(linear, sizes[name], is_head))
            _set_module(model, name, q)
    model.quantization = QuantizationConfig(scheme, group_size, quantize_head, sizes, [n for n, _ in targets],
                                            method="gptq" if calibration is not None else "rtn")
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
        elif isinstance(m, _QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
    return total


# --- saving and loading ----------------------------------------------------------------------------------------

def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def _copy_tokenizer(source: Path, tokenizer_path: Path, out: Path) -> None:
    """The source folder's tokenizer files (tokenizer_config.json keeps a chat template), else ones made from
    tokenizer.model."""
    copied = False
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            copied = True
    if not (out / "tokenizer.model").exists():
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    if not copied or not (out / "tokenizer.json").exists():
        from tokenizer.hf import save_hf_tokenizer

        try:
            save_hf_tokenizer(tokenizer_path, out)
        except ValueError:
            pass  # a SentencePiece model transformers cannot mirror: tokenizer.model alone still serves us


def save_quantized(model: Transformer, out_dir: str | Path, source: str | Path, tokenizer_path: str | Path,
                   dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write a quantized folder (see the module docstring) atomically. `source` is the original model's folder
    (its tokenizer files are copied); `dtype` is recorded as the original's float dtype."""
    qconfig: QuantizationConfig | None = getattr(model, "quantization", None)
    if qconfig is None:
        raise ValueError("save_quantized needs a model returned by quantize_model")
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor.detach().to("cpu").contiguous()
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear) and m.layout != "portable":
            raise ValueError(f"layer {name} was already converted to a {m.layout} layout by a forward pass; "
                             "save the model right after quantize_model, before running it")
    if model.config.tie_embeddings and "output" not in qconfig.layers:
        del state["output.weight"]  # the same tensor as the embedding: safetensors stores it once
    metadata = {"format": "pt", "quantization": json.dumps(asdict(qconfig))}
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata=metadata)
        tok = Tokenizer(tokenizer_path)
        hf_config = config_to_hf(model.config, dtype, tok.bos_id if tok.bos_id >= 0 else None,
                                 tok.eos_id if tok.eos_id >= 0 else None, tok.pad_id if tok.pad_id >= 0 else None)
        # A quantization_config transformers refuses (it would otherwise load this folder as random weights).
        write_json(tmp / "config.json", {**hf_config, "quantization_config": native_marker(qconfig.scheme)})
        write_json(tmp / QUANT_CONFIG, asdict(qconfig))
        _copy_tokenizer(Path(source), Path(tokenizer_path), tmp)
    return Path(out_dir)


def read_quantization_config(path: str | Path) -> QuantizationConfig:
    file = Path(path) / QUANT_CONFIG
    try:
        values = json.loads(file.read_text())
        qconfig = QuantizationConfig(**values)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{file}: not a valid quantization config ({e})") from None
    check_scheme(qconfig.scheme)
    if qconfig.format_version != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {qconfig.format_version}, this code reads {FORMAT_VERSION}")
    return qconfig


def load_quantized(path: str | Path, device: str = "cpu", dtype: str | None = None) -> Transformer:
    """A quantized folder -> Transformer with Int8Linear/Int4Linear layers, on `device`, eval mode.

    The model is built on the meta device and the saved tensors are assigned into it, so no float copy of the
    quantized weights is ever made. `dtype` is the activation dtype (default: bf16 on GPU, fp32 on CPU).
    """
    path = Path(path)
    dev = check_device(device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    qconfig = read_quantization_config(path)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS}; a quantized folder is written by python -m inference.quantize")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    config: ModelConfig = config_from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(config)
    for name in qconfig.layers:
        linear = model.get_submodule(name)
        is_head = name == "output"
        q = (Int8Linear(linear.in_features, linear.out_features, is_head, device="meta") if qconfig.scheme == "int8"
             else Int4Linear(linear.in_features, linear.out_features, qconfig.group_sizes[name], is_head,
                             device="meta"))
        _set_module(model, name, q)
    float_dtype = DTYPES[dtype or default_dtype(device)]
    state = {}
    with safe_open(str(path / WEIGHTS), framework="pt", device=str(dev)) as f:
        for k in f.keys():
            v = f.get_tensor(k)
            if v.is_floating_point() and not k.endswith((".scales", ".zeros")):
                v = v.to(float_dtype)
            if v.data_ptr() % 64:
                # safetensors hands out views at the file's byte offsets; torch's CPU int8 kernel needs the
                # 64-byte alignment of a fresh allocation (it crashed on an unaligned weight)
                v = v.clone()
            state[k] = v
    tied = config.tie_embeddings and "output" not in qconfig.layers
    try:
        model.load_state_dict(state, strict=not tied, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path / WEIGHTS}: tensors do not fit config.json and {QUANT_CONFIG} ({e})") from None
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model.quantization = qconfig
    return model.eval()


def load_for_inference(path: str | Path, device: str | None = None, dtype: str | None = None,
                       quantize: str | None = None, group_size: int | None = None, quantize_head: bool = False,
                       tag: str | None = None, adapter: str | Path | None = None) -> Transformer:
    """What every inference command calls: a quantized folder as saved, or a float model (HF folder or training
    run directory, with a LoRA `adapter` merged in first) quantized on load when `quantize` is int8/int4, else as
    it is."""
    device = device or default_device()
    check_known_quantization(path)
    if is_compressed_tensors_dir(path):
        if adapter is not None or (quantize is not None):
            raise UserError(f"{path} is already quantized (compressed-tensors): --adapter/--quantize need the "
                            "original float model")
        return load_compressed_tensors(path, device, dtype)
    if is_quantized_dir(path):
        if adapter is not None:
            raise ValueError(f"{path} is already quantized: merge --adapter {adapter} into the float model first "
                             "(python -m finetune.merge), then quantize")
        model = load_quantized(path, device, dtype)
        if quantize is not None and quantize != model.quantization.scheme:
            raise ValueError(f"{path} is already quantized to {model.quantization.scheme}; --quantize {quantize} "
                             "needs the original float model")
        return model
    if quantize is not None:
        check_scheme(quantize)
    model = load_model(path, device, dtype or default_dtype(device), tag=tag, adapter=adapter)
    if quantize is not None:
        quantize_model(model, quantize, group_size, quantize_head)
    return model


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    """The flags every inference command takes for quantize-on-load."""
    p.add_argument("--quantize", choices=SCHEMES, default=None,
                   help="quantize the model's linear layers on load (weight-only; a folder written by "
                        "python -m inference.quantize is used as saved)")
    p.add_argument("--group_size", type=int, default=None,
                   help=f"int4 group size; default {DEFAULT_GROUP_SIZE}, smaller where it does not divide a "
                        "layer's in_features")
    p.add_argument("--quantize_head", action="store_true", help="quantize the output head too")


# --- command line ----------------------------------------------------------------------------------------------

def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """--method, --calibration*, --format and --device of python -m inference.quantize."""
    from inference.calibration import DEFAULT_SEQ_LEN, DEFAULT_SEQUENCES, METHODS

    p.add_argument("--method", choices=METHODS, default="rtn",
                   help="rtn: round to nearest (no data); gptq: second-order rounding calibrated on --calibration")
    p.add_argument("--calibration", nargs="+", default=None, metavar="PATH",
                   help="text files/folders/globs (.txt, .jsonl, .gz) for --method gptq (default: data/sample)")
    p.add_argument("--calibration_sequences", type=int, default=DEFAULT_SEQUENCES,
                   help=f"calibration sequences (default {DEFAULT_SEQUENCES})")
    p.add_argument("--calibration_seq_len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"tokens per calibration sequence (default {DEFAULT_SEQ_LEN}, at most the model's context)")
    p.add_argument("--format", choices=FORMATS, default="native",
                   help="native: this project's folder (quantization_config.json); compressed-tensors: the "
                        "pack-quantized folder transformers and vLLM load (one group size for all layers)")
    p.add_argument("--device", default=None, help="where to quantize (default: cuda if present, else cpu)")


def calibration_from_args(args: argparse.Namespace, tokenizer: Tokenizer, max_seq_len: int) -> torch.Tensor | None:
    """The calibration token windows of --method gptq (None for rtn)."""
    from inference.calibration import DEFAULT_CALIBRATION, calibration_tokens

    if args.method != "gptq":
        if args.calibration is not None:
            raise UserError("--calibration is used by --method gptq only; add --method gptq or drop it")
        return None
    return calibration_tokens(args.calibration or [DEFAULT_CALIBRATION], tokenizer, args.calibration_sequences,
                              min(args.calibration_seq_len, max_seq_len))


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = make_parser("python -m inference.quantize", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="Hugging Face LLaMA folder or training run directory")
    p.add_argument("--scheme", required=True, help="int8 or int4")
    p.add_argument("--group_size", type=int, default=None,
                   help=f"int4 group size (default: {DEFAULT_GROUP_SIZE}, smaller per layer where it does not divide)")
    p.add_argument("--quantize_head", action="store_true", help="quantize the output head too")
    p.add_argument("--output_dir", required=True, help="the quantized folder to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in --model)")
    p.add_argument("--tag", default=None, help="checkpoint tag of a training run directory (default: latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    add_calibration_args(p)
    args = p.parse_args(argv)
    try:
        check_scheme(args.scheme)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_output_dir(args.output_dir, args.overwrite)
    check_known_quantization(args.model)
    if is_quantized_dir(args.model) or is_compressed_tensors_dir(args.model):
        raise UserError(f"--model {args.model} is already quantized; quantize the original float model")
    device = args.device or default_device()
    model = load_model(args.model, device, "float32", tag=args.tag)
    tokenizer = load_tokenizer(args.model, args.tokenizer, model)
    compressed = args.format != "native"
    if args.scheme == "int4":
        try:
            sizes = set(plan_group_sizes(model, args.group_size, args.quantize_head).values())
        except ValueError as e:
            raise UserError(str(e)) from None
        if compressed and len(sizes) > 1:
            raise UserError(f"--format {args.format} stores one group size for all layers; the per-layer default "
                            f"gives {'/'.join(map(str, sorted(sizes)))} here: pass --group_size N dividing every "
                            "layer's in_features")
    tokens = calibration_from_args(args, tokenizer, model.config.max_seq_len)
    source_dtype = torch.float32
    if (Path(args.model) / "config.json").is_file():
        name = json.loads((Path(args.model) / "config.json").read_text()).get("dtype") or "float32"
        source_dtype = DTYPES.get(name, torch.float32)
    before = linear_weight_bytes(model, args.quantize_head)
    quantize_model(model, args.scheme, args.group_size, args.quantize_head, tokens, symmetric=compressed)
    after = linear_weight_bytes(model, args.quantize_head)
    if compressed:
        save_compressed_tensors(model, args.output_dir, tokenizer.path,
                                lambda tmp: _copy_tokenizer(Path(args.model), Path(tokenizer.path), tmp),
                                source_dtype, args.overwrite)
    else:
        save_quantized(model, args.output_dir, args.model, tokenizer.path, source_dtype, args.overwrite)
    sizes = sorted(set(model.quantization.group_sizes.values()))
    extra = f", group size {'/'.join(map(str, sizes))}" if sizes else ""
    print(f"{args.scheme}{extra}: {len(model.quantization.layers)} linear layers, {before / 2**20:.2f} MiB (fp32) -> "
          f"{after / 2**20:.2f} MiB ({after / before:.3f}x); wrote {args.output_dir} "
          f"({args.method}, {args.format} format)")


if __name__ == "__main__":
    main()
