"""One rank of test_train.py's ZeRO-3 construction check; RANK, WORLD_SIZE, MASTER_* come from the environment.

Builds the debug model twice from the same seed, whole and under deepspeed.zero.Init, and prints (as JSON) how
much of each tensor this rank holds, whether the gathered tensors equal the whole model's, and the AdamW groups.
"""
from __future__ import annotations

import json
import sys

import deepspeed
import torch

from common.distributed import init_deepspeed_distributed
from model import ModelConfig, Transformer
from pretrain.train import param_groups


def group_names(model: torch.nn.Module) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in param_groups(model, 0.1)]


def main() -> None:
    tie = sys.argv[1] == "tie"
    init_deepspeed_distributed(backend="gloo")
    mc = ModelConfig.from_preset("debug", tie_embeddings=tie)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    torch.manual_seed(0)
    whole = Transformer(mc)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        sharded = Transformer(mc)
    held = {n: p.ds_tensor.numel() / p.ds_numel for n, p in sharded.named_parameters()}
    local = {n: p.numel() for n, p in sharded.named_parameters()}
    equal = {}
    for (name, p), ref in zip(sharded.named_parameters(), whole.parameters()):
        with deepspeed.zero.GatheredParameters([p]):
            equal[name] = bool(torch.equal(p.data, ref.data))
    print(json.dumps({"held": held, "local": local, "equal": equal, "groups": group_names(sharded),
                      "whole_groups": group_names(whole)}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
