"""LoRA training glue: what the fine-tuning loop calls to put adapters in and freeze the base (model/lora.py has the
adapters themselves, model/lora_peft.py the PEFT folder format)."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from common.errors import UserError
from model import Transformer
from model.lora import LoRAAdapter, LoRAConfig, inject_lora, mark_only_lora_trainable
from model.lora_peft import apply_adapter


def prepare_lora(model: Transformer, cfg: LoRAConfig, init_adapter: str | Path | None = None) -> Transformer:
    """What the training loop calls before building its optimizer: adapters in, everything else frozen.

    init_adapter: a PEFT adapter folder to start from (a hot start or an incremental round: its weights, a fresh
    optimizer). Its r, alpha, target_modules and use_rslora must equal cfg's (model.lora_peft.read_adapter_config
    gives them); the training dropout is cfg's. Every rank calls this, also under ZeRO-3.
    """
    if init_adapter is None:
        inject_lora(model, cfg)
    else:
        found = apply_adapter(model, init_adapter)
        differ = [f"{k}={getattr(found, k)!r} (config: {getattr(cfg, k)!r})"
                  for k in ("r", "alpha", "target_modules", "use_rslora") if getattr(found, k) != getattr(cfg, k)]
        if differ:
            raise UserError(f"init_adapter {init_adapter} does not match the LoRA config: {', '.join(differ)}; "
                            "set the LoRA fields to the adapter's")
        for m in model.modules():
            if isinstance(m, LoRAAdapter):
                m.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
    mark_only_lora_trainable(model)
    return model
