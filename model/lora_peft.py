"""PEFT's adapter folders <-> our LoRA adapters: adapter_config.json + adapter_model.safetensors, PEFT's key names.

PEFT names a LLaMA adapter tensor `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`; ours is
`layers.{i}.attention.wqkv.lora.q_proj.A`. The tensors themselves are identical (A [r, in], B [out, r]), so the
conversion is a renaming, both ways.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.errors import MissingFileError, UserError
from common.io import atomic_dir
from .lora import LORA_NAME, TARGETS, LoRAConfig, gather_lora_state_dict, inject_lora, load_lora_state_dict
from .model import Transformer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"  # PEFT before 0.7 (and safe_serialization=False) wrote this
PEFT_NAME = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)"
                       r"(?:\.default)?\.weight")


def _group(peft_name: str) -> str:
    return "self_attn" if TARGETS[peft_name].startswith("attention") else "mlp"


def to_peft_name(name: str) -> str:
    m = LORA_NAME.fullmatch(name)
    if m is None:
        raise KeyError(f"{name!r} is not a LoRA adapter tensor name")
    layer, _, proj, ab = m.groups()
    return f"base_model.model.model.layers.{layer}.{_group(proj)}.{proj}.lora_{ab}.weight"


def from_peft_name(key: str, source: str) -> tuple[int, str, str]:
    """(layer, projection, 'A' or 'B') of a PEFT tensor name; a clear error for tensors we have no place for."""
    m = PEFT_NAME.fullmatch(key)
    if m is None or m.group(3) not in TARGETS or _group(m.group(3)) != m.group(2):
        raise UserError(f"{source}: adapter tensor {key!r} does not match this model: only LoRA on "
                        f"{', '.join(TARGETS)} of model.layers.N is supported")
    return int(m.group(1)), m.group(3), m.group(4)


def our_name(layer: int, proj: str, ab: str) -> str:
    return f"layers.{layer}.{TARGETS[proj]}.lora.{proj}.{ab}"


def peft_config(cfg: LoRAConfig, base_model_name_or_path: str | Path | None) -> dict[str, Any]:
    """adapter_config.json's content for `cfg` (the fields PEFT 0.7 - 0.21 read; the rest take PEFT's defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_modules),
        "use_rslora": cfg.use_rslora, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def config_from_peft(raw: dict[str, Any], source: str) -> LoRAConfig:
    """Our LoRAConfig from adapter_config.json; anything we cannot reproduce exactly is refused in one line."""
    if raw.get("peft_type") != "LORA":
        raise UserError(f"{source}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if raw.get(key) is None:
            raise UserError(f"{source}: {key} is missing; a LoRA adapter config needs r, lora_alpha and "
                            "target_modules")
    unsupported = {"bias": ("none", None), "use_dora": (False, None), "fan_in_fan_out": (False, None),
                   "modules_to_save": (None, []), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
                   "layer_replication": (None,), "lora_bias": (False, None)}
    for key, fine in unsupported.items():
        if raw.get(key) not in fine:
            raise UserError(f"{source}: {key}={raw[key]!r} is not supported by our LoRA (it needs {fine[0]!r})")
    targets = raw["target_modules"]
    if isinstance(targets, str):
        if targets not in TARGETS and targets not in ("all-linear", "all"):
            raise UserError(f"{source}: target_modules is the pattern {targets!r}; only lists of projection "
                            f"names ({', '.join(TARGETS)}) or all-linear are supported")
        targets = [targets]
    # PEFT may save full module paths (model.layers.0.self_attn.q_proj) when it resolved all-linear itself.
    names = sorted({t.rsplit(".", 1)[-1] for t in targets})
    try:
        return LoRAConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout") or 0.0,
                          target_modules=names, use_rslora=bool(raw.get("use_rslora")))
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


def read_adapter_config(path: str | Path) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter folder (e.g. to continue training it: prepare_lora's init_adapter)."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise MissingFileError(f"{path}: no {CONFIG_FILE}; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                               "(as PEFT's save_pretrained writes them)")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    return config_from_peft(raw, str(config_path))


def read_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, tensors under our names, adapter_config.json as read) of a PEFT adapter folder."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: adapter folder not found")
    cfg = read_adapter_config(path)
    raw = json.loads((path / CONFIG_FILE).read_text())
    if (path / WEIGHTS_FILE).is_file():
        tensors = load_file(str(path / WEIGHTS_FILE))
    elif (path / LEGACY_WEIGHTS_FILE).is_file():
        tensors = torch.load(path / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    else:
        raise MissingFileError(f"{path}: no {WEIGHTS_FILE} (nor {LEGACY_WEIGHTS_FILE}) beside {CONFIG_FILE}")
    state = {}
    for key, tensor in tensors.items():
        layer, proj, ab = from_peft_name(key, str(path))
        state[our_name(layer, proj, ab)] = tensor
    return cfg, state, raw


def apply_adapter(model: Transformer, path: str | Path) -> LoRAConfig:
    """Inject the adapter at `path` into `model` (no adapters yet) and load its tensors; returns its config.

    The adapter must fit the base: every tensor a projection listed in target_modules, of a layer the base has,
    with the base's shapes, and the same projections in every adapted layer.
    """
    cfg, state, _ = read_adapter(path)
    source = str(path)
    sites: dict[int, set[str]] = {}
    for name in state:
        m = LORA_NAME.fullmatch(name)
        sites.setdefault(int(m.group(1)), set()).add(m.group(3))
    if not sites:
        raise UserError(f"{source}: the adapter holds no tensors")
    found = set().union(*sites.values())
    if found != set(cfg.target_modules):
        raise UserError(f"{source}: target_modules {cfg.target_modules} do not match the tensors, which adapt "
                        f"{sorted(found)}")
    n_layers = model.config.n_layers
    if max(sites) >= n_layers:
        raise UserError(f"{source}: the adapter has tensors for layer {max(sites)}, the base model has only "
                        f"{n_layers} layers (0-{n_layers - 1}): it belongs to another base")
    uneven = [i for i, projs in sites.items() if projs != found]
    if uneven:
        raise UserError(f"{source}: layer {uneven[0]} adapts {sorted(sites[uneven[0]])}, others {sorted(found)}; "
                        "per-layer target sets are not supported")
    inject_lora(model, cfg, layers=sites)
    load_lora_state_dict(model, state, source)
    return cfg


def save_adapter(model_or_state: torch.nn.Module | dict[str, torch.Tensor], cfg: LoRAConfig, out_dir: str | Path,
                 base_model_name_or_path: str | Path | None, overwrite: bool = False,
                 dtype: torch.dtype | None = None) -> Path:
    """Write a PEFT adapter folder (atomically). Pass the model, or under ZeRO-3 the dict that
    gather_lora_state_dict returned on every rank (then call this on rank 0 only)."""
    if isinstance(model_or_state, dict):
        state = model_or_state
    else:
        state = gather_lora_state_dict(model_or_state)
    if not state:
        raise ValueError("no adapter tensors to save")
    tensors = {to_peft_name(k): v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in state.items()}
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if empty:
        raise ValueError(f"adapter tensor {empty[0]} is empty: a ZeRO-3 shard; gather with gather_lora_state_dict")
    base = base_model_name_or_path
    if base is not None and Path(base).is_dir():
        base = str(Path(base).resolve())
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(cfg, base), indent=2) + "\n")
    return Path(out_dir)
