"""Hugging Face folders <-> Transformer: a renaming of tensors and of config keys, nothing more.

The layouts (LLaMA, Baichuan-7B, XVERSE) are model/hf_layouts.py; reading and writing weights files, sharded or
not, tensor by tensor, is model/hf_shards.py."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, TypeVar

import torch
import torch.nn as nn
from safetensors.torch import load_file

from common.errors import MissingFileError, UserError
from common.io import atomic_dir

from .config import ModelConfig
from .hf_layouts import DEFAULT_LAYOUT, FUSED, layout_config, layout_of, llama_view, supported
from .hf_shards import DEFAULT_MAX_SHARD_SIZE, catalog, close_all, parse_size, write_weights

# This module is below model.py (which calls load_hf/save_hf from Transformer.from_hf/to_hf), so it names the model
# class only through the `cls` it is given: no import back into model.py.
M = TypeVar("M", bound=nn.Module)

# ours -> transformers, for tensors that are a pure renaming; {i} is the layer index.
_LAYER_NAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# ours -> the transformers tensors stacked (along rows) into it.
_LAYER_STACKS = {
    "attention.wqkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "feed_forward.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def _hf_parts(name: str) -> tuple[str, ...]:
    """The transformers tensor(s) that make up our parameter `name`."""
    if name in _TOP_NAMES:
        return (_TOP_NAMES[name],)
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_NAMES:
        return (f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}",)
    if m and m.group(2) in _LAYER_STACKS:
        return tuple(f"model.layers.{m.group(1)}.{part}" for part in _LAYER_STACKS[m.group(2)])
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def _split_sizes(name: str, config: ModelConfig) -> list[int]:
    if name.endswith("wqkv.weight"):
        return [config.n_heads * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2
    return [config.hidden_dim] * 2


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig,
                     layout: str = DEFAULT_LAYOUT) -> dict[str, torch.Tensor]:
    """Our state dict in `layout`'s names (transformers' for llama), stacked projections split into views; tied
    lm_head left out."""
    return {hf_name: state[ours] if stop is None else state[ours][start:stop]
            for hf_name, (ours, start, stop) in hf_targets(config, state, layout).items()}


# rope_scaling keys that a rope_type reads, beyond rope_type/type/factor/rope_theta.
_ROPE_KEYS = {
    "default": set(), "linear": set(), "dynamic": set(),
    "yarn": {"original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate"},
    "llama3": {"original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": (),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig rope fields (and max_seq_len) from transformers 5's rope_parameters or 4.x's rope_scaling +
    rope_theta. transformers 5 gives rope_scaling priority when both are present; so does this."""
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = dict(hf.get(where) or {})
    theta = params.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or hf.get("rope_theta")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise UserError(f"config.json {where}.rope_type={kind!r} is not supported; supported: "
                        f"{', '.join(_ROPE_KEYS)}")
    for key in _ROPE_REQUIRED.get(kind, ()):
        if params.get(key) is None:
            raise UserError(f"config.json {where} of rope_type {kind!r} lacks the required key {key!r}")
    known = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings"} | _ROPE_KEYS[kind]
    unknown = sorted(set(params) - known)
    if unknown:
        raise UserError(f"config.json {where} has key {unknown[0]!r}, which rope_type {kind!r} does not use here")
    max_pos = hf.get("max_position_embeddings", 2048)
    out: dict[str, Any] = dict(rope_theta=float(theta or 10000.0), rope_type=kind, max_seq_len=max_pos)
    if kind == "default":
        return out
    original = params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if kind == "dynamic":
        # transformers scales dynamic NTK from max_position_embeddings: that is the original context here, and
        # the model may run to factor times it.
        original = max_pos
        out["max_seq_len"] = int(factor * max_pos)
    elif kind in ("yarn", "llama3") and original is None:
        original = max_pos  # as transformers' standardize_rope_params
    if kind == "yarn":
        if factor is None:
            factor = max_pos / original  # transformers' implicit factor
        # Qwen-style folders (and ours) keep max_position_embeddings at the original context: yarn runs to
        # factor times it.
        out["max_seq_len"] = max(max_pos, int(factor * original))
    out.update(rope_factor=float(factor), rope_original_max_seq_len=original)
    for ours, theirs in (("rope_low_freq_factor", "low_freq_factor"), ("rope_high_freq_factor", "high_freq_factor"),
                         ("rope_beta_fast", "beta_fast"), ("rope_beta_slow", "beta_slow"),
                         ("rope_attention_factor", "attention_factor"), ("rope_truncate", "truncate")):
        if params.get(theirs) is not None:
            out[ours] = params[theirs]
    return out


def rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """rope_theta, rope_scaling (transformers 4.4x), rope_parameters (5.x) and max_position_embeddings."""
    kind = config.rope_type
    max_pos = config.max_seq_len
    scaling: dict[str, Any] = {"rope_type": kind}
    if kind != "default":
        scaling["factor"] = config.rope_factor
    if kind in ("dynamic", "yarn"):
        # transformers scales dynamic NTK from max_position_embeddings, and 4.4x's yarn takes it as the original
        # context too (later versions read original_max_position_embeddings, defaulting to it): so it is the
        # original context here, and original_max_position_embeddings is left out (4.5x would otherwise recompute
        # yarn's factor as max_position_embeddings / original).
        max_pos = config.rope_original_max_seq_len
    if kind == "llama3":
        scaling["original_max_position_embeddings"] = config.rope_original_max_seq_len
    if kind == "yarn":
        scaling.update(beta_fast=config.rope_beta_fast, beta_slow=config.rope_beta_slow)
        if config.rope_attention_factor is not None:
            scaling["attention_factor"] = float(config.rope_attention_factor)
        if not config.rope_truncate:
            scaling["truncate"] = False
    if kind == "llama3":
        scaling.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor)
    return {"rope_theta": config.rope_theta, "rope_scaling": scaling if kind != "default" else None,
            "rope_parameters": {**scaling, "rope_theta": config.rope_theta}, "max_position_embeddings": max_pos}


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a config.json dict of one of hf_layouts.READ_LAYOUTS (LLaMA's in transformers 4 or 5
    keys, Baichuan-7B's, XVERSE's); other model types and Baichuan variants we cannot represent are refused."""
    hf = llama_view(hf, layout_of(hf, "config.json"), "config.json")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError("config.json has attention_bias/mlp_bias set; this model has no biases")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise UserError(f"config.json head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    values = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02), **rope_from_hf(hf))
    return ModelConfig.from_dict({**values, **overrides})


def config_to_hf(config: ModelConfig, dtype: torch.dtype, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters (rope_scaling first if set), 4.x rope_scaling + rope_theta: write all.
        **rope_to_hf(config),
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }


def read_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, pytorch_model.bin, or their sharded index forms (whole, in
    memory: for tools that rewrite a few tensors; load_hf reads tensor by tensor instead)."""
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        if (path / index_name).exists():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(str(path / shard)))
            return state
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return _load_bin(str(path / "pytorch_model.bin"))
    raise MissingFileError(f"{path}: no model.safetensors or pytorch_model.bin (nor a sharded index) found")


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def hf_targets(config: ModelConfig, names: Iterable[str],
               layout: str = DEFAULT_LAYOUT) -> dict[str, tuple[str, int, int | None]]:
    """Each tensor of a `layout` folder -> (our parameter, first row, end row) it is: a stacked projection's
    rows of our fused wqkv/w13, or (name, 0, None) for a whole parameter; `names` are our parameters (a tied
    output.weight is skipped). The same map reads and writes."""
    out: dict[str, tuple[str, int, int | None]] = {}
    for name in names:
        if name == "output.weight" and config.tie_embeddings:
            continue
        parts = _hf_parts(name)
        if len(parts) == 1:
            out[parts[0]] = (name, 0, None)
            continue
        start = 0
        for part, rows in zip(parts, _split_sizes(name, config)):
            out[part] = (name, start, start + rows)
            start += rows
    for fused, parts in FUSED[layout].items():
        for i in range(config.n_layers):
            spans = [out.pop(f"model.layers.{i}.{part}") for part in parts]
            # The parts are consecutive rows of one parameter (checked here, as a layout table could be wrong).
            assert all(a[0] == b[0] and a[2] == b[1] for a, b in zip(spans, spans[1:])), fused
            out[f"model.layers.{i}.{fused}"] = (spans[0][0], spans[0][1], spans[-1][2])
    return out


def _config_file(path: Path) -> tuple[dict[str, Any], str]:
    file = path / "config.json"
    if not file.is_file():
        raise MissingFileError(f"{path}: no config.json; expected a Hugging Face model folder "
                               f"({supported()})")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    return hf, layout_of(hf, file)


def load_hf(cls: type[M], path: str | Path, **overrides: Any) -> M:
    """`cls(config)` (our Transformer) with the weights of the Hugging Face folder `path` (any of
    hf_layouts.READ_LAYOUTS, single-file or sharded); `overrides` are ModelConfig fields (runtime ones) the model
    is built with. The model is built on the meta device, allocated empty and filled tensor by tensor from the
    files, so memory peaks near one copy of the weights."""
    path = Path(path)
    hf, layout = _config_file(path)
    try:
        config = config_from_hf(llama_view(hf, layout, path / "config.json"), **overrides)  # messages name the file
    except UserError:
        raise
    except ValueError as e:  # ModelConfig's own checks on the values config.json gave
        raise UserError(f"{path / 'config.json'}: {e}") from None
    except KeyError as e:
        raise UserError(f"{path / 'config.json'}: the key {e.args[0]!r} is missing") from None
    entries = [e for e in catalog(path) if not e.name.endswith("rotary_emb.inv_freq")]  # old transformers saved it
    by_name = {e.name.removeprefix("module."): e for e in entries}
    if config.tie_embeddings:
        by_name.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = cls(config)
    params = dict(model.named_parameters())
    targets = hf_targets(config, params, layout)
    unexpected = sorted(set(by_name) - set(targets))
    if unexpected:
        e = by_name[unexpected[0]]
        raise UserError(f"{e.file}: tensor {unexpected[0]} has no place in a {layout} model of this config.json "
                        f"({len(unexpected)} such tensors); the weights and config.json do not belong together")
    missing = sorted(set(targets) - set(by_name))
    if missing:
        files = {e.file for e in entries}
        where = files.pop() if len(files) == 1 else path  # the weights file, or the folder of the shards
        more = ", ..." if len(missing) > 3 else ""
        raise UserError(f"{where}: tensor {missing[0]} is missing from the weights (missing {missing[:3]}{more}, "
                        f"{len(missing)} in all) but config.json ({layout} layout) implies it; the weights and "
                        "config.json do not belong together")
    for hf_name, (ours, start, stop) in targets.items():
        e, shape = by_name[hf_name], params[ours].shape
        want = ((stop - start) if stop is not None else shape[0], *shape[1:])
        if e.shape != want:
            hint = ""
            if hf_name.endswith("W_pack.weight"):
                hint = f" (q, k and v stacked: 3 x hidden_size {config.dim} rows)"
            raise UserError(f"{e.file}: tensor {hf_name} has shape {e.shape}, config.json implies {want}{hint}")
    model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # to_empty gives the tied pair two tensors
    params = dict(model.named_parameters())  # to_empty put new Parameters in place
    opened: dict[Path, object] = {}
    try:
        with torch.no_grad():
            # File by file, so that a .bin shard is released before the next one is opened.
            for e in sorted(by_name.values(), key=lambda e: (str(e.file), e.offset)):
                if opened and e.file not in opened:
                    close_all(opened)
                ours, start, stop = targets[e.name.removeprefix("module.")]
                dest = params[ours].data if stop is None else params[ours].data[start:stop]
                e.read_into(dest, opened)
    finally:
        close_all(opened)
    return model


def save_hf(model: nn.Module, out_dir: str | Path, tokenizer_path: str | Path | None = None,
            dtype: torch.dtype | None = None, layout: str = DEFAULT_LAYOUT,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a Hugging Face folder in `layout` (hf_layouts.WRITE_LAYOUTS) atomically (a temp dir renamed into
    place, replacing `out_dir`); weights above max_shard_size (bytes, or "5GB"-style) are sharded with an index.
    Tensors are written straight from the model's memory, one at a time."""
    out_dir = Path(out_dir)
    dtype = dtype or next(model.parameters()).dtype
    shard_bytes = parse_size(max_shard_size)
    hf_config = layout_config(config_to_hf(model.config, dtype, None, None, None), layout)  # refuses early
    ids: dict[str, int | None] = {"bos_id": None, "eos_id": None, "pad_id": None}
    if tokenizer_path is not None:
        from tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_path)
        if tok.vocab_size > model.config.vocab_size:
            raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} ids, the model only {model.config.vocab_size}")
        ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id if tok.pad_id >= 0 else None}
    hf_config.update(bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"], pad_token_id=ids["pad_id"])
    tensors = list(to_hf_state_dict(model.state_dict(), model.config, layout).items())
    # The caller decides whether out_dir may be replaced (common.io.check_output_dir); here it always is.
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_weights(tmp, tensors, dtype, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = {k: v for k, v in (("bos_token_id", ids["bos_id"]), ("eos_token_id", ids["eos_id"])) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer_path is not None:
            from tokenizer.hf import save_hf_tokenizer

            save_hf_tokenizer(tok.path, tmp)
            if not (tmp / "tokenizer.model").exists():
                shutil.copyfile(tok.path, tmp / "tokenizer.model")
    return out_dir
