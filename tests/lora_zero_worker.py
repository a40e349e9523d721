"""One rank of test_lora_zero.py; RANK, WORLD_SIZE, MASTER_* come from the environment.

Builds the debug model with LoRA adapters (under deepspeed.zero.Init for ZeRO-3), trains only the adapters for a
few steps on this rank's share of a fixed global batch of 4 sequences, gathers the adapter and (rank 0) saves it in
PEFT's format, then starts a new model from that adapter (init_adapter). Prints JSON: the losses, how much of each
adapter tensor this rank held, whether the frozen base moved, the parameter counts the optimizer saw, and whether the
hot-started model holds the saved adapter.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from common.distributed import init_deepspeed_distributed
from model import ModelConfig, Transformer
from finetune.lora import prepare_lora
from model.lora import LoRAConfig, gather_lora_state_dict
from model.lora_peft import save_adapter
from pretrain.train import AdamW, param_groups

GLOBAL_BATCH = 4


def full(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        return [p.detach().clone() for p in params]


def main() -> None:
    stage, out = int(sys.argv[1]), Path(sys.argv[2])
    init_deepspeed_distributed(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = GLOBAL_BATCH // world
    ds = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
          "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["all"])
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
        model = Transformer(ModelConfig.from_preset("debug", attn_impl="eager"))
        prepare_lora(model, cfg)
    lora = {n: p for n, p in model.named_parameters() if ".lora." in n}
    held = {n: (p.ds_tensor.numel() / p.ds_numel if hasattr(p, "ds_id") else 1.0) for n, p in lora.items()}
    frozen = [p for n, p in model.named_parameters() if ".lora." not in n]
    frozen_before = full(frozen)
    optimizer = AdamW(param_groups(model, 0.0), lr=1e-2)
    optimized = sum(getattr(p, "ds_numel", p.numel()) for g in optimizer.param_groups for p in g["params"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    tokens = torch.randint(0, 512, (GLOBAL_BATCH, 16), generator=torch.Generator().manual_seed(1))
    mine = tokens[rank * micro:(rank + 1) * micro]
    losses = []
    for _ in range(3):
        loss = engine(mine, targets=mine)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    state = gather_lora_state_dict(engine)
    base_moved = any(not torch.equal(a, b) for a, b in zip(frozen_before, full(frozen)))
    if rank == 0:
        save_adapter(state, cfg, out / "adapter", None)
    dist.barrier()
    # Hot start: a new model (partitioned at birth under ZeRO-3) starting from the saved adapter holds its tensors.
    torch.manual_seed(1)
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
        again = prepare_lora(Transformer(ModelConfig.from_preset("debug", attn_impl="eager")), cfg,
                             init_adapter=out / "adapter")
    again_state = gather_lora_state_dict(again)
    print(json.dumps({"losses": losses, "held": held, "base_moved": base_moved, "optimized": optimized,
                      "adapter_numel": sum(v.numel() for v in state.values()),
                      "hot_start_equal": all(torch.equal(again_state[k], v) for k, v in state.items())}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
