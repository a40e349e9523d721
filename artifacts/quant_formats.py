"""Quantized folders other tools read: compressed-tensors `pack-quantized` (what llm-compressor writes, what
transformers' compressed-tensors integration and vLLM load), and the marker that makes transformers refuse our own
native quantized folder instead of loading it as random weights.

A compressed-tensors folder is a Hugging Face LLaMA folder (transformers' tensor names, q/k/v and gate/up
separate) whose config.json carries `quantization_config` {quant_method: compressed-tensors, format:
pack-quantized, config_groups: {group_0: {targets: [Linear], weights: {...}}}, ignore: [lm_head]}; each quantized
linear `X` is stored as
- `X.weight_packed` int32 [out, in * bits / 32]: codes c = q + 2^(bits-1) (unsigned), 32 / bits per word, the
  first element in the lowest bits;
- `X.weight_scale` [out, groups] (int4, strategy group) or [out, 1] (int8, strategy channel), in the model dtype;
- `X.weight_shape` int64 [2];
and dequantizes as w = q * scale, q in [-8, 7] (int4) or [-128, 127] (int8): symmetric, no zero point (the W4A16
and W8A16 schemes of llm-compressor). In our Int4Linear layout (w = (c - 8) * scale + zero) that is zero = 0, so
the same codes and scales load into our kernels unchanged; `--format compressed-tensors` quantizes on that
symmetric grid (inference.calibration.int4_symmetric_grid). Asymmetric pack-quantized folders (a packed
`weight_zero_point`) are refused: transformers 5.25 with compressed-tensors 0.20.1 cannot load them either (it
expects the zero points unpacked and stops on a size mismatch; tried).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from common.errors import MissingFileError, UserError
from common.io import atomic_dir, write_json
from model import Transformer
from model.config import ModelConfig
from common.tensors import DTYPES
from model.hf import config_from_hf, config_to_hf, read_hf_state_dict, to_hf_state_dict
from model.quant import Int4Linear, Int8Linear, QuantizationConfig, pack_for_kernels, pack_int4, unpack_int4
from tokenizer import Tokenizer

from .devices import check_device, default_dtype

CT_METHOD = "compressed-tensors"
CT_FORMAT = "pack-quantized"
NATIVE_FORMAT = "llama-native"
"""`quantization_config.format` in the config.json of our native folders (artifacts.quantized.save_quantized)."""
SAVE_FORMATS = ("native", CT_METHOD)
"""The folder layouts python -m inference.quantize writes (--format)."""


def native_marker(scheme: str) -> dict[str, Any]:
    """The `quantization_config` written into a native quantized folder's config.json.

    It has no `quant_method` on purpose: transformers (5.x) raises "The model's quantization config ... has no
    `quant_method` attribute" for it, where an unknown quant_method only logs a warning and then loads the folder
    with every tensor missing (random weights). Our own readers use quantization_config.json."""
    return {"format": NATIVE_FORMAT, "scheme": scheme,
            "note": "written by python -m inference.quantize in this project's own layout (quantization_config.json);"
                    " transformers cannot read it: write --format compressed-tensors for transformers and vLLM"}


def folder_quantization(path: str | Path) -> dict[str, Any] | None:
    """config.json's quantization_config of a model folder, or None (no config.json, or not quantized)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text()).get("quantization_config")
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, dict) else None


def is_compressed_tensors_dir(path: str | Path) -> bool:
    qc = folder_quantization(path)
    return qc is not None and qc.get("quant_method") == CT_METHOD


def check_known_quantization(path: str | Path) -> None:
    """A folder quantized by a tool we cannot read (GPTQ/AWQ/bitsandbytes/... checkpoints) -> UserError naming it."""
    qc = folder_quantization(path)
    if qc is None or qc.get("format") == NATIVE_FORMAT or qc.get("quant_method") == CT_METHOD:
        return
    tool = qc.get("quant_method") or qc.get("format") or "an unknown tool"
    raise UserError(f"{Path(path) / 'config.json'}: the model was quantized by {tool!r}, which this project cannot "
                    f"read (it reads compressed-tensors pack-quantized and its own inference.quantize folders); use "
                    "the float model, or quantize it with python -m inference.quantize")


# --- dense bit packing (compressed-tensors' pack_to_int32 for bits dividing 32) -----------------------------------

def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned codes [R, C] in [0, 2^bits) -> int32, 32 / bits per word along `dim` (padded with 0), the first
    element in the lowest bits."""
    if 32 % bits:
        raise ValueError(f"bits {bits} does not divide 32")
    v = values.to(torch.int64)
    if dim == 0:
        v = v.t()
    per = 32 // bits
    rows, cols = v.shape
    v = torch.nn.functional.pad(v, (0, math.ceil(cols / per) * per - cols)).reshape(rows, -1, per)
    word = (v << (torch.arange(per, dtype=torch.int64) * bits)).sum(dim=-1)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # two's complement, as int32 words
    return (word.t() if dim == 0 else word).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """pack_int32's inverse: int64 codes with `size` elements along `dim`."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        p = p.t()
    per = 32 // bits
    v = (p[..., None] >> (torch.arange(per, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    v = v.reshape(p.shape[0], -1)[:, :size]
    return (v.t() if dim == 0 else v).contiguous()


# --- writing ---------------------------------------------------------------------------------------------------

def _hf_split(name: str, tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our linear `name`'s row-tensor (codes, scales, zero points: anything with one row per output) split into
    the transformers modules it stacks, keyed by module name (no `.weight`)."""
    parts = to_hf_state_dict({f"{name}.weight": tensor}, config.__class__.from_dict(
        {**config.to_dict(), "tie_embeddings": False}))
    return {k.removesuffix(".weight"): v for k, v in parts.items()}


def compressed_tensors_config(scheme: str, group_size: int | None, quantize_head: bool) -> dict[str, Any]:
    """config.json's quantization_config for a pack-quantized folder (one scheme for all quantized linears)."""
    if scheme == "int4":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
    else:
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None}
    weights.update({"dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
                    "block_structure": None})
    return {
        "quant_method": CT_METHOD, "format": CT_FORMAT, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": CT_FORMAT}},
        "ignore": [] if quantize_head else ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
    }


def save_compressed_tensors(model: Transformer, out_dir: str | Path, tokenizer_path: str | Path,
                            copy_tokenizer_from: Any = None, dtype: torch.dtype = torch.float32,
                            overwrite: bool = False) -> Path:
    """Write a quantized model (model.quant's Int4Linear / Int8Linear layers; int4 on an integer-zero-point
    grid) as a compressed-tensors pack-quantized folder, atomically. `dtype`: the float tensors' and scales' dtype.
    `copy_tokenizer_from(tmp_dir)`: writes the tokenizer files into the folder (inference.quantize's)."""
    qconfig = getattr(model, "quantization", None)
    if qconfig is None:
        raise ValueError("save_compressed_tensors needs a quantized model")
    config = model.config
    sizes = sorted(set(qconfig.group_sizes.values()))
    if qconfig.scheme == "int4" and len(sizes) != 1:
        raise UserError(f"--format {CT_METHOD} stores one group size for all layers, and the per-layer default gave "
                        f"{'/'.join(map(str, sizes))} for this model; pass --group_size N with an N that divides "
                        "every layer's in_features")
    float_state: dict[str, torch.Tensor] = {}
    quantized: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            if module.layout != "portable":
                raise ValueError(f"layer {name} was converted to a kernel layout; save before running the model")
            if bool(module.zeros.any()):
                raise ValueError(f"layer {name} is on the asymmetric min/max grid; quantize with --format {CT_METHOD}"
                                 " to use the symmetric grid that format stores")
            codes = unpack_int4(module.weight).cpu().to(torch.int64)
            scales = _hf_split(name, module.scales.float().cpu(), config)
            for hf, c in _hf_split(name, codes, config).items():
                quantized[f"{hf}.weight_packed"] = pack_int32(c, 4)
                quantized[f"{hf}.weight_scale"] = scales[hf].to(dtype).contiguous()
                quantized[f"{hf}.weight_shape"] = torch.tensor(c.shape, dtype=torch.int64)
        elif isinstance(module, Int8Linear):
            codes = module.weight.cpu().to(torch.int64) + 128
            for hf, c in _hf_split(name, codes, config).items():
                quantized[f"{hf}.weight_packed"] = pack_int32(c, 8)
                quantized[f"{hf}.weight_shape"] = torch.tensor(c.shape, dtype=torch.int64)
            for hf, s in _hf_split(name, module.scales.float().cpu()[:, None], config).items():
                quantized[f"{hf}.weight_scale"] = s.to(dtype).contiguous()
    for name, tensor in model.state_dict().items():
        module_name = name.rpartition(".")[0]
        if module_name in qconfig.layers:
            continue
        float_state[name] = tensor.detach().to("cpu", dtype)
    if config.tie_embeddings and "output" not in qconfig.layers:
        float_state.pop("output.weight", None)
    state = {k: v.contiguous().clone() for k, v in to_hf_state_dict(float_state, config).items()}
    state.update(quantized)
    tok = Tokenizer(tokenizer_path)
    hf_config = config_to_hf(config, dtype, tok.bos_id if tok.bos_id >= 0 else None,
                             tok.eos_id if tok.eos_id >= 0 else None, tok.pad_id if tok.pad_id >= 0 else None)
    hf_config["quantization_config"] = compressed_tensors_config(qconfig.scheme, sizes[0] if sizes else None,
                                                                 "output" in qconfig.layers)
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config)
        if copy_tokenizer_from is not None:
            copy_tokenizer_from(tmp)
    return Path(out_dir)


# --- reading ---------------------------------------------------------------------------------------------------

def _check_ct_scheme(path: Path, qc: dict[str, Any]) -> dict[str, Any]:
    """The one weight scheme of a pack-quantized folder that we have kernels for; UserError otherwise."""
    where = f"{path / 'config.json'}"
    if qc.get("format") != CT_FORMAT:
        raise UserError(f"{where}: compressed-tensors format {qc.get('format')!r}; this project reads only "
                        f"{CT_FORMAT!r} (INT4/INT8 weight-only)")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise UserError(f"{where}: {len(groups)} compressed-tensors config groups; this project reads one")
    group = groups[0]
    w = group.get("weights") or {}
    int4 = (w.get("num_bits") == 4 and w.get("strategy") == "group")
    int8 = (w.get("num_bits") == 8 and w.get("strategy") == "channel")
    if (group.get("input_activations") is not None or w.get("type") != "int" or not (int4 or int8)
            or not w.get("symmetric") or w.get("actorder") == "group"):
        raise UserError(f"{where}: compressed-tensors scheme {json.dumps(w)} (input activations "
                        f"{json.dumps(group.get('input_activations'))}) has no kernel here: this project runs "
                        "symmetric INT4 group-wise and INT8 per-channel weight-only schemes without act-order g_idx")
    return w


def load_compressed_tensors(path: str | Path, device: str = "cpu", dtype: str | None = None,
                            config_overrides: dict | None = None, pack: bool = True) -> Transformer:
    """A compressed-tensors pack-quantized folder -> our Transformer with Int4Linear / Int8Linear layers, INT4 packed
    for the kernels of `device` (artifacts.quantized.QuantizedFormat.load's signature); pack=False keeps the portable
    layout (the dequantize-then-matmul reference path)."""
    path = Path(path)
    dev = check_device(device)
    if not (path / "config.json").is_file():
        raise MissingFileError(f"{path}: no config.json")
    hf = json.loads((path / "config.json").read_text())
    w = _check_ct_scheme(path, hf["quantization_config"])
    config = config_from_hf(hf, **(config_overrides or {}))
    float_dtype = DTYPES[dtype or default_dtype(device)]
    state = read_hf_state_dict(path)
    with torch.device("meta"):
        model = Transformer(config)
    ours: dict[str, torch.Tensor] = {}
    layers, group_sizes = [], {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = list(_hf_split(name, torch.empty(module.out_features, 1, device="meta"), config))
        if f"{parts[0]}.weight_packed" not in state:
            continue
        k = module.in_features
        is_head = name == "output"
        try:
            if w["num_bits"] == 4:
                codes = torch.cat([unpack_int32(state[f"{p}.weight_packed"], 4, k) for p in parts])
                scales = torch.cat([state[f"{p}.weight_scale"].float() for p in parts])
                g = k // scales.shape[1]
                layer = Int4Linear(k, module.out_features, g, is_head, device="meta")
                layer.weight, layer.scales = pack_int4(codes.to(torch.uint8)), scales
                layer.zeros = torch.zeros_like(scales)
                group_sizes[name] = g
            else:
                codes = torch.cat([unpack_int32(state[f"{p}.weight_packed"], 8, k) for p in parts]) - 128
                layer = Int8Linear(k, module.out_features, is_head, device="meta")
                layer.weight = codes.to(torch.int8)
                layer.scales = torch.cat([state[f"{p}.weight_scale"].float().reshape(-1) for p in parts])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"{path}: the tensors of {', '.join(parts)} do not fit config.json ({e})") from None
        for p in parts:
            for suffix in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                state.pop(f"{p}.{suffix}", None)
        layer.to(dev)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        layers.append(name)
    untied = config.__class__.from_dict({**config.to_dict(), "tie_embeddings": False})
    for name, meta in model.state_dict().items():
        module_name = name.rpartition(".")[0]
        if module_name in layers or (name == "output.weight" and config.tie_embeddings):
            continue
        parts = list(to_hf_state_dict({name: meta}, untied))
        try:
            ours[name] = torch.cat([state.pop(p) for p in parts]).to(dev, float_dtype)
        except KeyError as e:
            raise UserError(f"{path}: tensor {e} missing from the checkpoint") from None
    tied = config.tie_embeddings and "output" not in layers
    model.load_state_dict(ours, strict=False, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise UserError(f"{path}: tensors missing from the checkpoint for {', '.join(left[:5])}")
    scheme = "int4" if w["num_bits"] == 4 else "int8"
    model.quantization = QuantizationConfig(scheme, w.get("group_size"), "output" in layers, group_sizes, layers)
    return (pack_for_kernels(model, float_dtype) if pack else model).eval()
