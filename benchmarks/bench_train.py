"""Training throughput inside the DeepSpeed engine: our Transformer against transformers' LlamaForCausalLM.

    PYTHONPATH=. python benchmarks/bench_train.py --corpus /work/shared/data/corpus/en_wikitext2_valid.txt \\
        --tokenizer /work/shared/data/weights/llama2c_tokenizer.model --work_dir /tmp/bench_train

Both models get the same ModelConfig (transformers' through a LlamaConfig), the same initial weights, the same
derived DeepSpeed config (pretrain.config.deepspeed_config), optimizer (AdamW, our param groups) and batches from
pretrain.data.DataLoader. Timing rounds alternate between the models so a change in machine load hits all of them.
Variants: ours with document masking (cu_seqlens, what pretrain/train.py runs), ours plain causal, transformers
plain causal (sdpa; it has no document masking off flash-attn). On a GPU it also prints MFU; with
--preset 1b --seq_len 4096 that is the 1B figure. Runs on one process, or under the deepspeed launcher.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class HFLoss(nn.Module):
    """transformers' LlamaForCausalLM behind our training signature (targets already shifted)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.hf(input_ids=tokens, position_ids=position_ids, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def build_models(config: Any, seed: int) -> dict[str, nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from model import Transformer
    from model.hf import config_to_hf, to_hf_state_dict

    torch.manual_seed(seed)
    ours = Transformer(config)
    hf_config = LlamaConfig(**{k: v for k, v in config_to_hf(config, torch.float32, None, None, None).items()
                               if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    hf_config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=not config.tie_embeddings)
    ours_plain = Transformer(config)
    ours_plain.load_state_dict(ours.state_dict())
    return {"ours (document-masked)": ours, "ours (plain causal)": ours_plain,
            "transformers (plain causal)": HFLoss(hf)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", required=True, help="raw text to prepare (.txt/.jsonl[.gz])")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    parser.add_argument("--work_dir", required=True, help="prepared data is cached here")
    parser.add_argument("--preset", default="debug", help="ModelConfig preset (default: %(default)s)")
    parser.add_argument("--model", nargs="*", default=["dim=256", "n_layers=4", "n_heads=8", "n_kv_heads=4",
                                                       "hidden_dim=688", "max_seq_len=1024"],
                        metavar="FIELD=VALUE", help="ModelConfig overrides (default: a ~20M model)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--global_batch_size", type=int, default=8)
    parser.add_argument("--zero_stage", type=int, default=0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rounds", type=int, default=4, help="timing rounds per model")
    parser.add_argument("--steps_per_round", type=int, default=3)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher; unused")
    args = parser.parse_args()
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29555")):
        os.environ.setdefault(var, value)

    import deepspeed
    import yaml

    from model import ModelConfig
    from pretrain import prepare_data
    from pretrain.config import TrainConfig, deepspeed_config, grad_accum_steps, resolve_precision
    from pretrain.data import DataLoader
    from pretrain.metrics import peak_flops
    from pretrain.train import AdamW, init_distributed, param_groups
    from tokenizer import Tokenizer

    work = Path(args.work_dir)
    data_dir = work / "data"
    if not (data_dir / "manifest.json").exists():
        prepare_data.main(["--tokenizer", args.tokenizer, "--input", *args.corpus, "--output_dir", str(data_dir),
                           "--val_fraction", "0", "--no_progress"])
    tokenizer = Tokenizer(args.tokenizer)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.model)}
    config = ModelConfig.from_preset(args.preset, **{"vocab_size": tokenizer.vocab_size, **overrides})
    cfg = TrainConfig(seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.global_batch_size, zero_stage=args.zero_stage, precision=args.precision,
                      data_dir=str(data_dir), wandb_mode="disabled")
    d = init_distributed(cfg)
    cuda = d.device.type == "cuda"
    precision = resolve_precision(cfg.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    ds_config = deepspeed_config(cfg, d.world_size, precision)
    gas = grad_accum_steps(cfg, d.world_size)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    peak = peak_flops(torch.cuda.get_device_name(d.device)) if cuda else None
    device_name = torch.cuda.get_device_name(d.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    if d.rank == 0:
        print(f"model: {config.num_params() / 1e6:.1f}M parameters ({args.preset} + {args.model}), seq {cfg.seq_len}, "
              f"{cfg.micro_batch_size} x {gas} accumulation x {d.world_size} ranks, ZeRO-{cfg.zero_stage}, "
              f"{precision}, {device_name}")

    engines = {}
    for name, module in build_models(config, seed=0).items():
        optimizer = AdamW(param_groups(module, cfg.weight_decay), lr=1e-4, betas=(0.9, 0.95))
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        loader = DataLoader(data_dir, "train", cfg.seq_len, cfg.micro_batch_size, d.rank, d.world_size,
                            tokenizer_sha256=tokenizer.sha256, vocab_size=config.vocab_size)
        engines[name] = (engine, loader)

    def train_step(name: str) -> float:
        engine, loader = engines[name]
        loss_sum = 0.0
        for _ in range(gas):
            b = loader.next_batch().to(d.device)
            masked = name.startswith("ours (document")
            loss = engine(b.tokens, targets=b.targets, position_ids=b.position_ids if masked else None,
                          cu_seqlens=b.cu_seqlens if masked else None)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()
        return loss_sum / gas

    first_loss = {name: train_step(name) for name in engines}
    for name in engines:
        for _ in range(args.warmup_steps - 1):
            train_step(name)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name in engines:
            for _ in range(args.steps_per_round):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                train_step(name)
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    if d.rank != 0:
        return
    print(f"\n| model | first-step loss | median step (s) | tokens/s | relative |{' MFU |' if peak else ''}")
    print(f"|---|---|---|---|---|{'---|' if peak else ''}")
    baseline = tokens_per_step / statistics.median(times["transformers (plain causal)"])
    for name, t in times.items():
        step = statistics.median(t)
        tps = tokens_per_step / step
        mfu = f" {100 * tps / d.world_size * config.flops_per_token(cfg.seq_len) / peak:.1f}% |" if peak else ""
        print(f"| {name} | {first_loss[name]:.4f} | {step:.3f} | {tps:,.0f} | {tps / baseline:.2f}x |{mfu}")
    print(f"\n{args.rounds * args.steps_per_round} timed steps per model after {args.warmup_steps} warm-up steps; "
          f"{tokens_per_step} tokens per step. Command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
