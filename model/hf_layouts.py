"""Released checkpoint layouts that are LLaMA underneath, read (and written) exactly by our decoder; no remote code
is ever run: config.json is read as data and the tensors are renamed.

- llama: transformers' LlamaForCausalLM.
- baichuan: Baichuan-7B (model_type baichuan, BaiChuanForCausalLM; loaded elsewhere with trust_remote_code). Its
  q, k and v projections are one tensor, model.layers.N.self_attn.W_pack.weight, stacked along the output
  dimension in that order (exactly our wqkv); the rest has LLaMA's names. Rotary base 10000 with no scaling (its
  modeling code reads neither rope_theta nor rope_scaling), no grouped-query attention; the context is
  max_position_embeddings (model_max_length where that is absent).
- xverse: XVERSE-13B (model_type xverse, XverseForCausalLM): LLaMA's tensor names and config keys (rope_theta,
  num_key_value_heads where present); its extra keys (max_tokenizer_truncation) do not change the network.

Baichuan-13B and Baichuan2 share model_type baichuan but are other networks: Baichuan-13B and Baichuan2-13B add an
ALiBi position bias instead of rotary embeddings, and Baichuan2 normalises each lm_head row before the product
(NormHead). They are refused with the difference named; they are never loaded approximately.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.errors import UserError

from .hf_shards import DEFAULT_MAX_SHARD_SIZE

READ_LAYOUTS = ("llama", "baichuan", "xverse")
WRITE_LAYOUTS = ("llama", "baichuan")
DEFAULT_LAYOUT = "llama"

_ARCHITECTURES = {"llama": ("LlamaForCausalLM",), "baichuan": ("BaiChuanForCausalLM", "BaichuanForCausalLM"),
                  "xverse": ("XverseForCausalLM",)}
BAICHUAN2_VOCAB = 125696  # Baichuan2's vocabulary; its checkpoints carry a NormHead lm_head

# Per layer: a fused tensor of the layout -> the LLaMA tensors stacked (along rows, in this order) into it.
FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {}, "xverse": {},
    "baichuan": {"self_attn.W_pack.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                             "self_attn.v_proj.weight")},
}


def supported() -> str:
    return ", ".join(f"{layout} ({'/'.join(_ARCHITECTURES[layout])})" for layout in READ_LAYOUTS)


def layout_of(hf: dict[str, Any], where: Path | str) -> str:
    """The layout of a config.json dict (`where` names the file in messages); refuses what is not one of
    READ_LAYOUTS, or a Baichuan variant our decoder cannot represent exactly."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type is None:  # old LLaMA folders had no model_type: go by the architecture, LLaMA by default
        model_type = next((k for k, v in _ARCHITECTURES.items() if any(a in v for a in archs)), "llama")
    if model_type not in _ARCHITECTURES:
        raise UserError(f"{where}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not "
                        f"supported; supported layouts: {supported()}")
    experts = sorted(k for k in hf if ("expert" in k or k.startswith("moe_")) and hf[k] not in (None, 0, 1, False))
    if experts:
        # e.g. XVERSE-MoE shares model_type xverse: its MLP is a mixture of experts, not one SwiGLU.
        raise UserError(f"{where}: {experts[0]}={hf[experts[0]]!r} makes this a mixture-of-experts model; this "
                        "decoder has one SwiGLU MLP per layer and cannot represent it")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf['hidden_act']!r}; this decoder's MLP is SwiGLU with SiLU, so it "
                        "cannot represent the model exactly")
    if model_type == "baichuan":
        problems = baichuan_differences(hf)
        if problems:
            raise UserError(f"{where}: {'; '.join(problems)}; this decoder cannot represent it exactly (only "
                            "Baichuan-7B's layout loads)")
    return model_type


def baichuan_differences(hf: dict[str, Any]) -> list[str]:
    """What separates a model_type baichuan config from Baichuan-7B's network, in words ([] for Baichuan-7B).

    The remote code decides ALiBi by size, not by a key: BaichuanForCausalLM at hidden_size 4096 is rotary (7B),
    larger ones (13B) use ALiBi and carry model_max_length without max_position_embeddings. Baichuan2 (vocabulary
    125696, z_loss_weight in its config) normalises lm_head."""
    out = []
    archs = hf.get("architectures") or []
    if "BaiChuanForCausalLM" not in archs and (hf.get("hidden_size") != 4096
                                               or "max_position_embeddings" not in hf):
        out.append(f"Baichuan-13B-style config (hidden_size {hf.get('hidden_size')}, "
                   f"{'no max_position_embeddings' if 'max_position_embeddings' not in hf else 'BaichuanForCausalLM'})"
                   " uses an ALiBi position bias, not rotary embeddings")
    if hf.get("vocab_size") == BAICHUAN2_VOCAB or "z_loss_weight" in hf:
        out.append("Baichuan2 (vocab_size 125696 / z_loss_weight) normalises lm_head rows (NormHead)")
    if hf.get("num_key_value_heads") not in (None, hf.get("num_attention_heads")):
        out.append("num_key_value_heads differs from num_attention_heads, but W_pack stacks full q, k and v")
    return out


def llama_view(hf: dict[str, Any], layout: str, where: Path | str) -> dict[str, Any]:
    """The config.json dict of `layout` in LLaMA's keys (what model.hf.config_from_hf reads)."""
    if layout != "baichuan":
        return hf
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or hf.get("rope_theta", 10000) != 10000:
        raise UserError(f"{where}: Baichuan-7B's modeling code uses rotary base 10000 without scaling and ignores "
                        "rope_theta/rope_scaling; this config sets them, so what the weights expect is ambiguous")
    max_pos = hf.get("max_position_embeddings") or hf.get("model_max_length") or 4096
    out = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
    return {**out, "model_type": "llama", "max_position_embeddings": max_pos, "rope_theta": 10000.0,
            "num_key_value_heads": hf["num_attention_heads"]}


def layout_config(llama: dict[str, Any], layout: str) -> dict[str, Any]:
    """Our LLaMA config.json dict (model.hf.config_to_hf) in `layout`'s keys; refuses what the layout cannot hold."""
    if layout not in WRITE_LAYOUTS:
        raise UserError(f"--layout {layout!r} is not one we write; choose one of {', '.join(WRITE_LAYOUTS)}")
    if layout == "llama":
        return llama
    if llama["num_key_value_heads"] != llama["num_attention_heads"]:
        raise UserError(f"--layout baichuan: this model has {llama['num_key_value_heads']} key/value heads for "
                        f"{llama['num_attention_heads']} query heads; Baichuan-7B's W_pack has no grouped-query "
                        "attention: export with --layout llama")
    if llama["rope_scaling"] is not None or llama["rope_theta"] != 10000:
        raise UserError(f"--layout baichuan: this model's rotary settings (rope_theta {llama['rope_theta']}, "
                        f"rope_scaling {llama['rope_scaling']}) are not Baichuan-7B's fixed base 10000 without "
                        "scaling: export with --layout llama")
    drop = ("rope_scaling", "rope_parameters", "rope_theta", "num_key_value_heads", "head_dim", "attention_bias",
            "mlp_bias", "attention_dropout")
    out = {k: v for k, v in llama.items() if k not in drop}
    # The released folder's keys; auto_map names Baichuan's own modeling files, which transformers needs
    # (trust_remote_code) to open this layout: copy them from the Baichuan-7B release beside the weights.
    return {**out, "architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan",
            "auto_map": {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                         "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
            "model_max_length": llama["max_position_embeddings"]}


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """--layout and --max_shard_size, declared once for every command that writes a Hugging Face folder."""
    p.add_argument("--layout", choices=WRITE_LAYOUTS, default=DEFAULT_LAYOUT,
                   help="tensor and config.json layout to write: llama (LlamaForCausalLM) or baichuan "
                        "(Baichuan-7B's W_pack layout)")
    p.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                   help=f"largest weights file (default {DEFAULT_MAX_SHARD_SIZE}); above it the weights are "
                        "sharded with an index (e.g. 500MB, 2GB, or bytes)")
