"""Instruction fine-tuning on the pretraining core: the same loop, DeepSpeed engine (ZeRO 0-3), checkpoints,
auto-resume, SIGTERM save, metrics and NaN policy (pretrain/train.py); only the data, the loss mask and which
parameters train differ.

    deepspeed --hostfile config/hostfile --no_ssh --node_rank 0 --master_addr 127.0.0.1 \\
        finetune/train.py --config config/finetune_debug.yaml [key=value ...]

(scripts/finetune.sh wraps this and exports the result.) The model to tune is `model_path`: a Hugging Face LLaMA
folder or one of our training run directories. Re-running the same command resumes from the latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from artifacts import open_model
from common.io import write_text
from common.errors import MissingFileError, UserError
from finetune.config import FinetuneConfig, load_finetune_config
from finetune.data import DataOptions, DataReport, Sample, load_samples
from finetune.loader import InstructionLoader, fingerprint
from finetune.lora import prepare_lora
from finetune.templates import get_template
from model import Transformer
from model.config import RUNTIME_MODEL_FIELDS
from pretrain.train import Dist, Run, Task, check_model, freeze_all_but_embeddings, launched_main
from pretrain.train import train as train_core
from tokenizer import Tokenizer
from tokenizer.chat_template import CHAT_TEMPLATE_FILE


def prepare_full(model: Transformer, cfg: FinetuneConfig) -> nn.Module:
    """Full-parameter fine-tuning: every parameter trains, or only the embeddings and the output head with
    train_only_embeddings (as in pretraining: the first stage after a vocabulary extension)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.train_only_embeddings:
        freeze_all_but_embeddings(model)
    return model


def prepare_adapter(model: Transformer, cfg: FinetuneConfig) -> nn.Module:
    """LoRA: adapters (cfg.lora) injected into the frozen base, from init_adapter's weights for a hot start; only
    they train (pretrain.train.param_groups skips frozen parameters, so the optimizer holds only them)."""
    torch.manual_seed(cfg.seed)  # the adapters' A init: the same on every rank and in every run of this config
    return prepare_lora(model, cfg.lora, init_adapter=cfg.init_adapter)


# finetuning_type -> the step that decides which parameters train.
PREPARE: dict[str, Callable[[Transformer, FinetuneConfig], nn.Module]] = {"full": prepare_full,
                                                                           "lora": prepare_adapter}


DATA_REPORT_FILE = "data_report.json"
"""In the run directory: records read, samples kept, and records skipped by reason, per split."""


def data_report(train: DataReport, val: DataReport | None, train_samples: int, val_samples: int) -> dict[str, Any]:
    """The data_report.json of a run: the load counts of data_files (and val_files), and the samples each split
    trains or validates on after the val_size hold-out."""
    return {"data_files": train.to_dict(), "val_files": None if val is None else val.to_dict(),
            "train_samples": train_samples, "val_samples": val_samples}


def split_validation(samples: list[Sample], val_size: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out val_size samples, chosen by a seeded draw (the same on every rank and every restart)."""
    if val_size == 0:
        return samples, []
    if val_size >= len(samples):
        raise UserError(f"val_size={val_size} would leave no training samples out of {len(samples)}; lower it "
                        "or give val_files")
    import numpy as np

    held = set(np.random.default_rng(seed).choice(len(samples), val_size, replace=False).tolist())
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


class FinetuneTask(Task):
    name = "fine-tuning"

    def __init__(self, cfg: FinetuneConfig) -> None:
        super().__init__(cfg)
        self.cfg: FinetuneConfig = cfg
        self.template = get_template(cfg.template)
        self.samples: dict[str, list[Sample]] = {}
        self.data_report: dict[str, Any] = {}
        # An adapter run's checkpoints hold only the adapter and its optimizer state; the frozen base comes from
        # model_path again on every start (build_model), so resuming restores exactly the same model.
        self.checkpoint_frozen = cfg.finetuning_type == "full"

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, after the checks on run_dir that must come before anything is written."""
        cfg = self.cfg
        if Path(cfg.run_dir).resolve() == Path(cfg.model_path).resolve():
            raise UserError(f"run_dir {cfg.run_dir} is model_path: write the fine-tuning run to another folder")
        self.check_resume()
        path = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.model_path) / "tokenizer.model"
        if not path.is_file():
            raise MissingFileError(f"{path}: tokenizer not found; set tokenizer=PATH (the model's tokenizer.model)")
        tokenizer = Tokenizer(path)
        if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
            raise UserError(f"{path}: the tokenizer needs BOS and EOS tokens for chat templates")
        return tokenizer

    def prepare_data(self, tokenizer: Tokenizer) -> None:
        """Every sample tokenized: bad data stops the run before any process group exists. Rank 0 prints the
        counts and writes them to run_dir/data_report.json."""
        cfg = self.cfg
        options = DataOptions.from_config(cfg)
        train, report = load_samples(cfg.data_files, self.template, tokenizer, options)
        if cfg.val_files:
            val, val_report = load_samples(cfg.val_files, self.template, tokenizer, options)
        else:
            train, val = split_validation(train, cfg.val_size, cfg.seed)
            val_report = None
        if cfg.eval_interval and not val:
            raise UserError("eval_interval is set but there is no validation data: give val_files, val_size > 0, "
                            "or set eval_interval=0")
        self.samples = {"train": train, "val": val}
        if os.environ.get("RANK", "0") == "0":
            print(report.summary("data " + ", ".join(cfg.data_files)), flush=True)
            if val_report is not None:
                print(val_report.summary("validation " + ", ".join(cfg.val_files)), flush=True)
            else:
                print(f"validation: {len(val)} samples held out of data_files (val_size)", flush=True)
            self.data_report = data_report(report, val_report, len(train), len(val))

    def check_resume(self) -> None:
        """A run directory is resumed only with the template, base model and finetuning type it was started with:
        checked before anything in it is rewritten (its chat_template.jinja must stay the one its weights learnt)."""
        path = Path(self.cfg.run_dir) / "finetune.json"
        if not path.is_file():
            return
        saved = json.loads(path.read_text())

        def differs(key: str, old: Any, new: Any) -> bool:  # a path may be spelled relative or absolute
            if key in ("model_path", "init_adapter") and isinstance(old, str) and isinstance(new, str):
                return Path(old).resolve() != Path(new).resolve()
            return old != new

        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in self.run_meta().items() if differs(k, saved.get(k), v)]
        if changed:
            raise UserError(f"{self.cfg.run_dir} holds a fine-tuning run started with other settings "
                            f"({', '.join(changed)}); use a new run_dir, or the original settings to resume")

    def run_meta(self) -> dict[str, Any]:
        """What a resume must not change; for LoRA also the adapter shape and the adapter the run STARTED from
        (init_adapter: a hot start, recorded here; resuming continues from the run's own checkpoint instead)."""
        meta: dict[str, Any] = {"template": self.template.name, "model_path": self.cfg.model_path,
                                "finetuning_type": self.cfg.finetuning_type}
        if self.cfg.finetuning_type == "lora":
            adapter = self.cfg.init_adapter
            meta.update(model_tag=self.cfg.model_tag, lora=dataclasses.asdict(self.cfg.lora),
                        init_adapter=None if adapter is None else str(Path(adapter).resolve()))
        return meta

    def build_model(self, tokenizer: Tokenizer, resuming: bool, zero3_config: dict[str, Any] | None) -> Transformer:
        """The model at model_path (fp32 on CPU; DeepSpeed moves, casts and partitions it), built with this
        config's runtime settings (model.attn_impl, model.fused_kernels, activation_checkpointing)."""
        cfg = self.cfg
        runtime = {key: cfg.model[key] for key in RUNTIME_MODEL_FIELDS if key in cfg.model}
        runtime["activation_checkpointing"] = cfg.activation_checkpointing
        model = open_model(cfg.model_path, "cpu", "float32", tag=cfg.model_tag, runtime=runtime,
                           needs_float="fine-tuning (model_path)").train()
        check_model(cfg, tokenizer, model.config, resuming, f"the original model_path (not {cfg.model_path})")
        return model

    def prepare_model(self, model: Transformer) -> nn.Module:
        return PREPARE[self.cfg.finetuning_type](model, self.cfg)

    def make_source(self, split: str, d: Dist, tokenizer: Tokenizer, model_vocab: int) -> InstructionLoader:
        cfg = self.cfg
        samples = self.samples[split]
        pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
        return InstructionLoader(samples, cfg.seq_len, cfg.micro_batch_size, pad, d.rank, d.world_size, cfg.seed,
                                 shuffle=split == "train", packing=cfg.packing, split=split,
                                 data_hash=fingerprint(samples))

    def run_files(self) -> dict[str, Any]:
        meta = json.dumps(self.run_meta(), indent=2) + "\n"
        report = json.dumps(self.data_report, indent=2) + "\n"
        return {CHAT_TEMPLATE_FILE: lambda p: write_text(p, self.template.jinja() + "\n"),
                "finetune.json": lambda p: write_text(p, meta), DATA_REPORT_FILE: lambda p: write_text(p, report)}

    def done_message(self, run: Run) -> str:
        run_dir = self.cfg.run_dir
        return (f"done: {run.step} steps, {run.tokens_seen:,} tokens; run directory {run_dir}\n"
                f"export: python -m finetune.export --model {run_dir} --output_dir {run_dir}/hf")


def train(cfg: FinetuneConfig) -> None:
    train_core(cfg, FinetuneTask(cfg))


def main(argv: list[str] | None = None) -> None:
    launched_main(argv, "finetune/train.py (launched by deepspeed)", __doc__,
                  "lr=1e-5 template=vicuna data_files=[a.json,b.jsonl]",
                  lambda path, overrides: train(load_finetune_config(path, overrides)))


if __name__ == "__main__":
    main()
