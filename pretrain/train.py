"""Pretrain a LLaMA-style model with DeepSpeed, on one CPU box or many GPU nodes.

    deepspeed --hostfile config/hostfile --no_ssh --node_rank 0 --master_addr 127.0.0.1 \\
        pretrain/train.py --config config/debug.yaml [key=value ...]

(scripts/train.sh wraps this.) Everything comes from one config (pretrain/config.py, config/*.yaml); the DeepSpeed
JSON is derived from it. Re-running the same command resumes from the run directory's latest checkpoint; SIGTERM
or Ctrl-C saves a checkpoint and exits.

This module is also the training core of every later stage: `train(cfg, task)` runs the loop, engine set-up,
checkpoints, metrics and NaN policy for any `Task`, which supplies the tokenizer, the model (and a preparation
step, e.g. freezing it for adapters) and the data sources. Pretraining is the base `Task`; instruction fine-tuning
(finetune/train.py) is another. The loss of a step is the mean over all its target tokens, on all ranks and micro
batches together, so gradient accumulation 4x1 equals 1x4 whatever the number of targets per sequence.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.ops.adam import DeepSpeedCPUAdam

from common import cli
from common.errors import MissingFileError, UserError
from common.io import replace_file, tmp_path_for
from common.distributed import init_deepspeed_distributed
from common.tensors import IGNORE_INDEX
from model import ModelConfig, Transformer
from model.config import RUNTIME_MODEL_FIELDS
from pretrain import checkpoint
from pretrain.config import (TrainConfig, deepspeed_config, grad_accum_steps, load_config, lr_at,
                             resolve_precision, save_config)
from pretrain.data import Batch, DataLoader, load_manifest
from pretrain.metrics import MetricsLogger, memory_gib, peak_flops
from tokenizer import Tokenizer

class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss with nan_policy=stop, diverged); the message says why."""


# --------------------------------------------------------------------------------------------------------------
# Optimizer


class _SkippableStep:
    """optimizer.step() does nothing while `skip_step` is set: how a step with a non-finite loss is dropped.

    The flag is set by the loop on every rank (the decision is all-reduced), and checked wherever DeepSpeed ends up
    calling the base optimizer (directly, or inside a ZeRO/bf16 wrapper), so no stage needs special handling.
    """

    skip_step = False

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if self.skip_step:
            return None
        return super().step(*args, **kwargs)


class AdamW(_SkippableStep, torch.optim.AdamW):
    pass


class CPUAdamW(_SkippableStep, DeepSpeedCPUAdam):
    pass


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only; norms, biases and embeddings get none unless decay_all."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 shard is flat; ds_shape is the full tensor's shape
        exempt = len(shape) < 2 or id(p) in embedding_params
        (no_decay if exempt and not decay_all else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norms_and_embeddings)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    if cfg.offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeed's vectorised Adam
        return CPUAdamW(groups, adamw_mode=True, **kwargs)
    return AdamW(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    # The groups are the ones DeepSpeed's wrappers step, so this reaches every ZeRO stage.
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------------------------------
# Setup


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(cfg: TrainConfig) -> Dist:
    """Join the process group the launcher described (RANK, WORLD_SIZE, MASTER_ADDR... in the environment)."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"environment variable {var} is not set: start training with the deepspeed launcher "
                            "(scripts/train.sh), or set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # ranks on one box share its cores instead of oversubscribing
            local_size = int(os.environ.get("LOCAL_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    init_deepspeed_distributed(timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device)


def resolve_tokenizer(cfg: TrainConfig) -> Tokenizer:
    path = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.data_dir) / "tokenizer.model"
    if not path.exists():
        raise MissingFileError(f"{path}: tokenizer not found; set tokenizer=PATH (the tokenizer.model the data "
                               "was prepared with)")
    return Tokenizer(path)


def saved_model_config(run_dir: str | Path) -> ModelConfig | None:
    path = Path(run_dir) / "model_config.json"
    return ModelConfig.from_dict(json.loads(path.read_text())) if path.is_file() else None


def check_model(cfg: TrainConfig, tokenizer: Tokenizer, config: ModelConfig, resuming: bool,
                what: str = "the model settings") -> None:
    """What every stage checks of the model it is about to train: the tokenizer fits its vocabulary, seq_len its
    context, and a resumed run has the architecture its checkpoints hold (RUNTIME_MODEL_FIELDS may differ).
    `what` names the setting a user would change back to resume."""
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                        f"is {config.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}, or use the "
                        "model's own tokenizer")
    if cfg.seq_len > config.max_seq_len:
        raise UserError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={config.max_seq_len}; raise "
                        "model.max_seq_len (with a larger model.rope_theta or rope scaling, docs/long_context.md)")
    saved = saved_model_config(cfg.run_dir) if resuming else None
    if saved is not None:
        changed = [k for k, v in saved.to_dict().items() if k not in RUNTIME_MODEL_FIELDS and getattr(config, k) != v]
        if changed:
            details = ", ".join(f"{k} {getattr(saved, k)!r} -> {getattr(config, k)!r}" for k in changed)
            raise UserError(f"{cfg.run_dir} holds a run of a different model ({details}); use a new run_dir or "
                            f"{what}")


def build_model(cfg: TrainConfig, tokenizer: Tokenizer, resuming: bool,
                zero3_config: dict[str, Any] | None = None) -> Transformer:
    """Random weights (preset + overrides, or the run dir's own architecture when resuming), or an HF LLaMA.

    Given a ZeRO-3 DeepSpeed config, random weights are built inside deepspeed.zero.Init: each rank keeps only
    its shard of every tensor from the moment the tensor is made, so no rank ever holds the whole model.
    """
    torch.manual_seed(cfg.seed)
    if cfg.init_from_hf and not resuming:
        model = Transformer.from_hf(cfg.init_from_hf, **{**cfg.model, "activation_checkpointing":
                                                         cfg.activation_checkpointing})
    else:
        mc = cfg.model_config(tokenizer.vocab_size)
        # A resumed run continues the architecture its checkpoints hold (an init_from_hf run's came from the HF
        # folder); only its runtime fields come from this config.
        saved = saved_model_config(cfg.run_dir) if resuming else None
        if saved is not None:
            if not cfg.init_from_hf:
                check_model(cfg, tokenizer, mc, resuming, "the original model settings")
            mc = ModelConfig.from_dict({**saved.to_dict(), **{k: getattr(mc, k) for k in RUNTIME_MODEL_FIELDS}})
        partitioned = deepspeed.zero.Init(config_dict_or_path=zero3_config) if zero3_config else nullcontext()
        with partitioned:
            model = Transformer(mc)
    check_model(cfg, tokenizer, model.config, resuming=False)
    if cfg.train_only_embeddings:
        freeze_all_but_embeddings(model)
    return model


def freeze_all_but_embeddings(model: Transformer) -> None:
    """requires_grad only on the token embeddings and the output head (tied or not); the optimizer skips the rest."""
    keep = {id(model.tok_embeddings.weight), id(model.output.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def prepare_run_dir(cfg: TrainConfig, mc: ModelConfig, tokenizer: Tokenizer, ds_config: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> None:
    """run_config.yaml, model_config.json, deepspeed_config.json, tokenizer.model and the task's `extra` files,
    each written atomically."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, write in (("run_config.yaml", lambda p: save_config(cfg, p)), ("model_config.json", mc.save),
                        ("deepspeed_config.json", lambda p: p.write_text(json.dumps(ds_config, indent=2) + "\n")),
                        ("tokenizer.model", lambda p: shutil.copyfile(tokenizer.path, p)),
                        *(extra or {}).items()):
        tmp = tmp_path_for(run_dir / name)
        write(tmp)
        replace_file(tmp, run_dir / name)


def make_loader(cfg: TrainConfig, split: str, d: Dist, tokenizer: Tokenizer, model_vocab: int) -> DataLoader:
    return DataLoader(cfg.data_dir, split, seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size, rank=d.rank,
                      world_size=d.world_size, seed=cfg.seed, shuffle=split == "train",
                      tokenizer_sha256=tokenizer.sha256, vocab_size=model_vocab)


class DataSource(Protocol):
    """What the loop needs from a stage's data: endless, exactly resumable micro batches of this rank's share."""

    def next_batch(self) -> Batch: ...

    def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task:
    """What one training stage supplies to the shared loop; pretraining is the default implementation.

    A stage overrides what differs: where the tokenizer and the starting model come from, `prepare_model` (which
    parameters train: a full fine-tune keeps all, an adapter stage freezes the base and injects its modules),
    the data sources, extra files for the run directory and the closing message.
    """

    name = "pretraining"
    checkpoint_frozen = True
    """Whether checkpoints hold frozen parameters too. An adapter stage sets False: its frozen base is rebuilt from
    the base model on every start, so checkpoints hold only the adapter and its optimizer state."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def tokenizer(self) -> Tokenizer:
        """The tokenizer, with every check of it that can fail before any process group exists."""
        return resolve_tokenizer(self.cfg)

    def prepare_data(self, tokenizer: Tokenizer) -> None:
        """Check (and for a stage that needs it, load) the data before any process group exists, so bad data
        stops every rank before a model is built."""
        load_manifest(self.cfg.data_dir, tokenizer.sha256)

    def build_model(self, tokenizer: Tokenizer, resuming: bool, zero3_config: dict[str, Any] | None) -> Transformer:
        return build_model(self.cfg, tokenizer, resuming, zero3_config)

    def prepare_model(self, model: Transformer) -> nn.Module:
        """Hook before the engine is built: set requires_grad, inject modules. Pretraining trains everything."""
        return model

    def make_source(self, split: str, d: Dist, tokenizer: Tokenizer, model_vocab: int) -> DataSource:
        return make_loader(self.cfg, split, d, tokenizer, model_vocab)

    def run_files(self) -> dict[str, Any]:
        """Extra files for the run directory: name -> function writing that file to the path it is given."""
        return {}

    def done_message(self, run: "Run") -> str:
        return (f"done: {run.step} steps, {run.tokens_seen:,} tokens; run directory {self.cfg.run_dir}\n"
                f"export: python -m pretrain.export --model {self.cfg.run_dir} --output_dir "
                f"{self.cfg.run_dir}/hf")


@dataclass
class Run:
    """Everything the loop works with, built by setup()."""

    cfg: TrainConfig
    d: Dist
    engine: Any
    optimizer: torch.optim.Optimizer
    model: nn.Module
    train_loader: DataSource
    val_loader: DataSource | None
    precision: str
    grad_accum: int
    step: int = 0
    tokens_seen: int = 0
    resumed_from: str | None = None
    exclude_frozen: bool = False
    """Checkpoints leave frozen parameters out (Task.checkpoint_frozen False)."""


def setup(task: Task, d: Dist, tokenizer: Tokenizer) -> Run:
    cfg = task.cfg
    resuming = checkpoint.latest_tag(cfg.run_dir) is not None
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    ds_config = deepspeed_config(cfg, d.world_size, precision)
    model = task.build_model(tokenizer, resuming, ds_config if cfg.zero_stage == 3 else None)
    vocab = model.config.vocab_size
    train_loader = task.make_source("train", d, tokenizer, vocab)
    val_loader = task.make_source("val", d, tokenizer, vocab) if cfg.eval_interval else None
    if d.rank == 0:
        prepare_run_dir(cfg, model.config, tokenizer, ds_config, task.run_files())
    dist.barrier()
    model = task.prepare_model(model)
    optimizer = build_optimizer(cfg, model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.compile:
        engine.compile()  # compiles the wrapped module in place: parameter names and checkpoints are unchanged
    run = Run(cfg, d, engine, optimizer, model, train_loader, val_loader, precision,
              grad_accum_steps(cfg, d.world_size), exclude_frozen=not task.checkpoint_frozen)
    restored = checkpoint.load_checkpoint(engine, cfg.run_dir, frozen_excluded=run.exclude_frozen)
    if restored is not None:
        run.resumed_from, state = restored
        run.step, run.tokens_seen = state["step"], state.get("tokens", 0)
        train_loader.load_state_dict(state["data"])
    return run


# --------------------------------------------------------------------------------------------------------------
# Loop helpers


def forward(engine: Any, batch: Any, device: torch.device) -> torch.Tensor:
    batch = batch.to(device)
    return engine(batch.tokens, targets=batch.targets, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens)


def num_targets(batch: Batch) -> int:
    return int((batch.targets != IGNORE_INDEX).sum())


def all_reduce_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean validation loss per target token over the first eval_batches micro batches per rank: the same batches
    every time."""
    run.engine.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in run.val_loader.eval_batches(run.cfg.eval_batches):
        n = num_targets(b)
        total += forward(run.engine, b, run.d.device).double().cpu() * n  # the batch's mean -> its sum
        count += n
    run.engine.train()
    total, count = all_reduce_sum([total, count], run.d.device)
    return total / max(count, 1)


def manual_grad_norm(model: nn.Module) -> float | None:
    """Global gradient norm when DeepSpeed does not report one (ZeRO-0 fp32); grads are all-reduced by now."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop all-reduces it so every rank stops (and saves) at the same step."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.announce = False

    def install(self, announce: bool = False) -> None:
        """Catch both signals; `announce` (rank 0) prints one line when the first one arrives."""
        self.announce = announce
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        # The first signal names the stop: a Ctrl-C reaches the ranks as SIGINT, and the launcher then sends them
        # SIGTERM as well, which must not relabel it.
        if self.signal is not None:
            return
        self.signal = signal.Signals(signum).name
        if self.announce:
            os.write(2, f"{self.signal} received: saving a checkpoint after this step, then stopping\n".encode())


def format_row(step: int, max_steps: int, row: dict[str, Any]) -> str:
    parts = [f"step {step}/{max_steps}"]
    if row["loss"] is not None:
        parts.append(f"loss {row['loss']:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    if row["grad_norm"] is not None and math.isfinite(row["grad_norm"]):
        parts.append(f"grad norm {row['grad_norm']:.3f}")
    parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
    if "mfu" in row:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    parts.append(f"mem {row['memory_gib']:.2f} GiB")
    return " | ".join(parts)


def save(run: Run) -> str:
    """Checkpoint with what resuming exactly needs: step, data position (rank-independent), config."""
    state = {"step": run.step, "tokens": run.tokens_seen, "data": run.train_loader.state_dict(),
             "world_size": run.d.world_size, "config": run.cfg.to_dict()}
    return checkpoint.save_checkpoint(run.engine, run.cfg.run_dir, run.step, state, run.cfg.keep_last,
                                      exclude_frozen=run.exclude_frozen)


# --------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class StepResult:
    loss: float
    """Mean loss per target token over the step's micro batches on all ranks (non-finite ones left out)."""
    skipped: bool
    """Some rank saw a non-finite loss, so no update was applied (nan_policy=skip)."""
    stop: bool
    """Some rank received SIGTERM/SIGINT: every rank saves after this step and exits."""
    grad_norm: float | None
    tokens: int = 0
    """Input positions of the step on all ranks (padding included): what the compute was spent on."""
    targets: int = 0
    """Target tokens of the step on all ranks: what the loss is averaged over."""


def train_step(run: Run, stop: StopFlag, manual_norm: bool) -> StepResult:
    """One optimizer step: grad_accum micro batches through the engine, with the non-finite-loss policy applied.

    The model returns each micro batch's mean loss; weighting it by the batch's share of the step's target tokens
    (all ranks) makes the step's gradient that of the mean over every target token. DeepSpeed divides each micro
    loss by grad_accum and averages gradients over ranks, so the weight multiplies both back: with equally full
    batches (pretraining) it is exactly 1.
    """
    engine, optimizer, cfg = run.engine, run.optimizer, run.cfg
    set_lr(optimizer, lr_at(run.step, cfg))
    batches = [run.train_loader.next_batch() for _ in range(run.grad_accum)]
    counts = [num_targets(b) for b in batches]
    step_targets, step_tokens = (int(v) for v in all_reduce_sum(
        [sum(counts), sum(b.num_tokens for b in batches)], run.d.device))  # padding is not a token seen
    losses, norm = [], None
    for micro, batch in enumerate(batches):
        loss = forward(engine, batch, run.d.device)
        losses.append(loss.detach().float() * counts[micro])  # this batch's summed loss
        loss = loss * (counts[micro] * run.grad_accum * run.d.world_size / max(step_targets, 1))
        last = micro == run.grad_accum - 1
        if last:
            # One small all-reduce per step: the loss, whether any rank saw a non-finite one, any stop signal.
            local = torch.stack(losses)
            loss_sum, n_bad, n_stop = all_reduce_sum(
                [torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0).sum(), (~local.isfinite()).sum(),
                 float(stop.signal is not None)], run.d.device)
            if n_bad and cfg.nan_policy == "stop":
                raise TrainingStopped(f"non-finite loss at step {run.step + 1} (nan_policy=stop); checkpoints are "
                                      "intact: lower lr or raise warmup_steps and resume, or use nan_policy=skip")
            optimizer.skip_step = n_bad > 0  # every rank skips the update together
        engine.backward(loss)
        if last and manual_norm:
            norm = manual_grad_norm(run.model)
        engine.step()
    optimizer.skip_step = False
    if not manual_norm:
        norm = engine.get_global_grad_norm()
    run.step += 1
    return StepResult(loss_sum / max(step_targets, 1), n_bad > 0, n_stop > 0, None if norm is None else float(norm),
                      step_tokens, step_targets)


class LogWindow:
    """Averages over the steps since the last log line."""

    def __init__(self) -> None:
        self.loss, self.good, self.steps, self.start = 0.0, 0, 0, time.perf_counter()
        self.tokens, self.targets = 0, 0

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.tokens += result.tokens
        self.targets += result.targets
        if not result.skipped:
            self.loss += result.loss
            self.good += 1

    def mean_loss(self) -> float | None:
        return self.loss / self.good if self.good else None

    def per_sec(self, count: float) -> float:
        return count / (time.perf_counter() - self.start)


def train(cfg: TrainConfig, task: Task | None = None) -> None:
    """Run `task` (default: pretraining) to cfg.max_steps, resuming from cfg.run_dir's latest checkpoint."""
    task = task or Task(cfg)
    tokenizer = task.tokenizer()
    task.prepare_data(tokenizer)
    d = init_distributed(cfg)
    stop = StopFlag()
    stop.install(announce=d.rank == 0)  # before the slow setup: an early Ctrl-C still ends cleanly at step one
    run = setup(task, d, tokenizer)
    metrics = MetricsLogger(cfg.run_dir, cfg.to_dict(), enabled=d.rank == 0, start_step=run.step,
                            max_steps=cfg.max_steps, tensorboard=cfg.tensorboard, wandb_mode=cfg.wandb_mode,
                            wandb_project=cfg.wandb_project)
    mc = run.model.config
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in run.model.parameters() if p.requires_grad)
    if trainable != mc.num_params():
        metrics.print(f"{task.name}: {trainable / 1e6:.2f}M of the model's parameters train")
    metrics.print(f"model {mc.num_params() / 1e6:.2f}M parameters | ZeRO-{cfg.zero_stage} {run.precision} | "
                  f"{cfg.micro_batch_size} sequences x {run.grad_accum} accumulation x {d.world_size} ranks = "
                  f"{cfg.global_batch_size} x {cfg.seq_len} tokens per step | run dir {cfg.run_dir}")
    if run.resumed_from:
        metrics.print(f"resumed from {Path(cfg.run_dir) / run.resumed_from} at step {run.step}")

    peak = peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None
    manual_norm = cfg.zero_stage == 0 and run.precision == "fp32"  # the one setup where DeepSpeed reports no norm
    window, skipped_in_a_row, skipped_total = LogWindow(), 0, 0

    while run.step < cfg.max_steps:
        lr = lr_at(run.step, cfg)
        result = train_step(run, stop, manual_norm)
        window.add(result)
        if result.skipped:
            skipped_in_a_row, skipped_total = skipped_in_a_row + 1, skipped_total + 1
            metrics.print(f"step {run.step}: non-finite loss, update skipped ({skipped_total} skipped so far)")
            if skipped_in_a_row >= cfg.max_skipped_steps:
                raise TrainingStopped(f"{skipped_in_a_row} steps in a row had a non-finite loss (last: step "
                                      f"{run.step}): training diverged; lower lr and resume from an earlier checkpoint")
        else:
            skipped_in_a_row = 0
            run.tokens_seen += result.tokens
        metrics.advance(run.step, loss=f"{result.loss:.4f}")
        last_step = run.step == cfg.max_steps

        if run.step % cfg.log_interval == 0 or last_step:
            tokens_per_sec = window.per_sec(window.tokens)
            row = {"loss": window.mean_loss(), "lr": lr, "grad_norm": result.grad_norm,
                   "tokens_per_sec": tokens_per_sec, "target_tokens_per_sec": window.per_sec(window.targets),
                   "tokens": run.tokens_seen, "memory_gib": memory_gib(), "skipped_steps": skipped_total}
            if peak is not None:
                row["mfu"] = tokens_per_sec / d.world_size * mc.flops_per_token(cfg.seq_len) / peak
            metrics.log(run.step, row)
            metrics.print(format_row(run.step, cfg.max_steps, row))
            window = LogWindow()

        if cfg.eval_interval and (run.step % cfg.eval_interval == 0 or last_step):
            val_loss = evaluate(run)
            metrics.log(run.step, {"val_loss": val_loss})
            metrics.print(f"step {run.step}: validation loss {val_loss:.4f}")

        if ((cfg.save_interval and run.step % cfg.save_interval == 0) or (last_step and cfg.save_final)
                or result.stop):
            tag = save(run)
            metrics.print(f"step {run.step}: saved checkpoint {Path(cfg.run_dir) / tag}")
            metrics.plot()
        if result.stop:
            metrics.print(f"stopped by {stop.signal or 'a signal to another rank'} at step {run.step}, checkpoint "
                          "saved; run the same command again to resume")
            break

    metrics.close()
    if d.rank == 0 and run.step == cfg.max_steps:
        print(task.done_message(run), flush=True)
    dist.barrier()
    dist.destroy_process_group()


USER_ERROR = 2
"""Exit status of a run stopped by a mistake in its input (config, data, diverged training): scripts/train.sh then
says to fix it rather than to resume, since the same command would stop the same way. Any other failure (a full
disk, a dropped connection, a bug) keeps its traceback and exits 1, which scripts/launch.sh calls resumable."""

ERROR_FILE_VARIABLE = "LLAMA_ERROR_FILE"
"""Set by scripts/launch.sh: where a rank writes its `error: ...` line, which the script prints again as the last
line of the run, after the launcher's own complaints about the rank's exit status."""


def launched_main(argv: list[str] | None, prog: str, doc: str | None, example: str,
                  run: Callable[[str | None, list[str]], None]) -> None:
    """What a rank that the deepspeed launcher starts does, for pretraining and fine-tuning alike: read --config and
    key=value overrides, call `run(config_path, overrides)`, and turn a user error into one line and USER_ERROR."""
    parser = cli.parser(prog, doc)
    parser.add_argument("--config", help="YAML or TOML config (default: the built-in debug run)")
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher; unused")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    args = parser.parse_args(argv)
    # DeepSpeed still calls these torch.distributed functions on every ZeRO step; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)
    try:
        run(args.config, args.overrides)
    except (*cli.EXPECTED_ERRORS, TrainingStopped) as e:
        message = cli.error_message(e)
        error_file = os.environ.get(ERROR_FILE_VARIABLE)
        if error_file:  # every rank that fails writes the same kind of line; one of them is shown
            try:
                Path(error_file).write_text(f"error: {message}\n")
            except OSError:  # the script then points to the line above instead
                pass
        cli.fail(message, USER_ERROR)  # scripts/launch.sh: fix it rather than resume


def main(argv: list[str] | None = None) -> None:
    launched_main(argv, "pretrain/train.py (launched by deepspeed)", __doc__, "lr=1e-3 model.dim=128",
                  lambda path, overrides: train(load_config(path, overrides)))


if __name__ == "__main__":
    main()
