"""Training configuration: one typed dataclass, loaded from YAML or TOML with key=value overrides.

Precedence: dataclass defaults < config file < command line. Every key is checked: an unknown key or a value of
the wrong type is a one-line error naming the key (common/reflect.py checks and converts every value, the same way
as for command-line flags). A config is immutable once built: derive another with `dataclasses.replace`. The
DeepSpeed JSON is derived from this config (see
`deepspeed_config`), so batch size, precision and clipping are written in one place.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import yaml

from common import cli, reflect
from common.errors import MissingFileError, UserError
from model.config import ModelConfig

Precision = Literal["auto", "bf16", "fp16", "fp32"]
NanPolicy = Literal["skip", "stop"]
WandbMode = Literal["offline", "online", "disabled"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a pretraining run needs. The defaults are the debug run on the shipped sample corpus
    (config/debug.yaml spells them out)."""

    # --- run ---
    run_dir: str = "runs/sample/train"
    """Output directory: checkpoints, run_config.yaml, model_config.json, tokenizer.model, metrics, loss curve.
    Re-running the same command with the same run_dir resumes from its latest checkpoint."""
    seed: int = 0
    """Seed for weight initialisation and data order."""

    # --- model ---
    model_preset: str = "debug"
    """ModelConfig preset (debug, 125m, 1b, baichuan-7b, xverse-13b, 13b); ignored when init_from_hf is set."""
    model: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields overriding the preset, e.g. {dim: 128, n_layers: 4}. vocab_size defaults to the
    tokenizer's vocabulary size when not given."""
    init_from_hf: str | None = None
    """Hugging Face LLaMA folder to start from (continued pretraining) instead of random weights."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward: less memory, ~30% more compute."""
    compile: bool = False
    """torch.compile the model inside the engine (fused elementwise kernels on CPU and GPU); the first steps
    pay the compilation time."""
    train_only_embeddings: bool = False
    """Train only the token embeddings and the output head, every other weight frozen: the first stage after a
    vocabulary extension (model.resize), so the new rows learn before the rest of the model moves. Run the
    second stage from this run's export with it off (docs/long_context.md)."""

    # --- data ---
    data_dir: str = "runs/sample/data"
    """Directory written by `python -m pretrain.prepare_data` (token shards + manifest.json)."""
    tokenizer: str | None = None
    """tokenizer.model the data was prepared with (copied into run_dir; its sha256 is checked against the data
    manifest). None: take data_dir/tokenizer.model."""
    seq_len: int = 128
    """Tokens per training sequence."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on each rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks; gradient accumulation = global / (micro * world size)."""

    # --- optimizer and schedule ---
    max_steps: int = 300
    """Optimizer steps to train for."""
    lr: float = 3e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay (and after it)."""
    warmup_steps: int = 30
    """Steps of linear warmup from 0 to lr."""
    lr_decay_steps: int | None = None
    """Step at which the cosine decay reaches min_lr; None means max_steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (see decay_norms_and_embeddings)."""
    decay_norms_and_embeddings: bool = False
    """Also apply weight decay to norm weights, biases and embeddings (LLaMA does not)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    # --- engine ---
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    precision: Precision = "auto"
    """'auto' (bf16 on a GPU that supports it, else fp32), 'bf16', 'fp16' (GPU only, loss scaling) or 'fp32'."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer states in CPU memory and step with DeepSpeedCPUAdam (needs zero_stage >= 1)."""
    offload_params: bool = False
    """ZeRO-Infinity style parameter offload to CPU memory (needs zero_stage 3)."""
    deepspeed_config: str | None = None
    """Your own DeepSpeed JSON, merged over the derived one. It may add keys (bucket sizes, comms logging...) but
    not contradict batch size, precision, clipping or ZeRO stage set here, nor define an optimizer/scheduler."""
    dist_timeout_minutes: int = 30
    """Timeout for collective operations before a hung rank aborts the job."""

    # --- evaluation, logging, checkpoints ---
    log_interval: int = 10
    """Log metrics every N steps."""
    eval_interval: int = 50
    """Compute the validation loss every N steps (and at the end); 0 disables it."""
    eval_batches: int = 8
    """Micro batches per rank used for each validation loss."""
    save_interval: int = 100
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    save_final: bool = True
    """Save a checkpoint at max_steps. Throughput runs turn it off: a 1B model's ZeRO checkpoint is ~17 GB."""
    keep_last: int = 2
    """Checkpoints to keep; older ones are deleted after a successful save."""
    nan_policy: NanPolicy = "skip"
    """What to do with a NaN/inf loss: 'skip' the step (no update, counted in metrics) or 'stop' the run."""
    max_skipped_steps: int = 10
    """With nan_policy=skip, stop after this many consecutive skipped steps (training has diverged)."""
    tensorboard: bool = True
    """Write TensorBoard events to run_dir/tensorboard."""
    wandb_mode: WandbMode = "offline"
    """Weights & Biases: 'offline' (logs in run_dir/wandb, sync later), 'online' or 'disabled'. Skipped quietly
    when wandb is not installed."""
    wandb_project: str = "llama-pretrain"
    """Weights & Biases project name."""

    stage: ClassVar[str] = "pretraining"
    """The stage's name in messages."""
    not_applicable: ClassVar[dict[str, str]] = {}
    """Inherited fields a subclass's stage does not use -> what to set instead; setting one is an error."""

    def __post_init__(self) -> None:
        positive = ("seq_len", "micro_batch_size", "global_batch_size", "max_steps", "log_interval", "keep_last",
                    "eval_batches", "dist_timeout_minutes", "max_skipped_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "save_interval", "weight_decay", "grad_clip", "min_lr"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise UserError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.warmup_steps:
            raise UserError(f"lr_decay_steps ({self.lr_decay_steps}) must be > warmup_steps ({self.warmup_steps})")
        for name, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= value < 1:
                raise UserError(f"{name} must be in [0, 1), got {value}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise UserError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise UserError("offload_params needs zero_stage 3")
        for name, annotation in reflect.field_types(type(self)).items():  # direct construction: Literal fields
            if typing.get_origin(annotation) is Literal:
                reflect.coerce(name, getattr(self, name), annotation)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for name, instead in self.not_applicable.items():
            if getattr(self, name) != defaults[name]:
                raise UserError(not_applicable_message(type(self), name))
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model) - model_fields)
        if unknown:
            raise UserError(f"unknown model field(s) {', '.join(unknown)}; valid: {', '.join(sorted(model_fields))}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig of a from-scratch run: preset + `model` overrides, vocab_size from the tokenizer unless
        given, activation_checkpointing from this config."""
        overrides = dict(self.model)
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        overrides["activation_checkpointing"] = self.activation_checkpointing
        return ModelConfig.from_preset(self.model_preset, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Loading: file + overrides, each value checked against its field's type by common/reflect.py.


def not_applicable_message(cls: type[TrainConfig], name: str) -> str:
    return f"{name} does not apply to {cls.stage}: {cls.not_applicable[name]}"


def _parse_scalar(text: str) -> Any:
    """A command-line value: YAML scalar syntax (numbers, true/false, null, quoted strings)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a .yaml/.yml/.toml file (TOML tables or YAML mappings; nesting is kept for `model`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: config file not found")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text()) or {}
        else:
            raise UserError(f"{path}: config must be .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        detail = str(e).replace("\n", " ")
        raise UserError(f"{path}: cannot parse config: {detail}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: config must be a mapping of key: value, got {type(data).__name__}")
    return data


def _apply(values: dict[str, Any], raw: dict[str, Any], where: str, cls: type[TrainConfig]) -> None:
    """Check and convert `raw` (key -> value, from a file or the command line) into `values`."""
    train_types = reflect.field_types(cls)
    model_types = reflect.field_types(ModelConfig)
    sections = _sections(cls)
    for key, value in raw.items():
        head, dot, sub = key.partition(".")
        if head in sections and (dot or isinstance(value, dict)):
            # A nested config section (e.g. fine-tuning's `lora:`): a mapping, or dotted keys on the command line.
            section_types = reflect.field_types(sections[head])
            for sub, subvalue in ({sub: value} if dot else value).items():
                if sub not in section_types:
                    raise UserError(f"{where}: unknown field '{head}.{sub}'; valid: {', '.join(section_types)}")
                values.setdefault(head, {})[sub] = reflect.coerce(f"{where}: {head}.{sub}", subvalue,
                                                                  section_types[sub])
        elif head == "model" and (dot or isinstance(value, dict)):
            for sub, subvalue in ({sub: value} if dot else value).items():
                if sub not in model_types:
                    raise UserError(f"{where}: unknown model field 'model.{sub}'; valid: {', '.join(model_types)}")
                values.setdefault("model", {})[sub] = reflect.coerce(f"{where}: model.{sub}", subvalue,
                                                                     model_types[sub])
        elif key in cls.not_applicable:
            raise UserError(f"{where}: {not_applicable_message(cls, key)}")
        elif key in train_types:
            values[key] = reflect.coerce(f"{where}: {key}", value, train_types[key])
        else:
            source = sys.modules[cls.__module__].__file__ or "pretrain/config.py"
            raise UserError(f"{where}: unknown config key '{key}'; see {Path(source).parent.name}/"
                            f"{Path(source).name} for the valid keys")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                cls: type[TrainConfig] | None = None) -> TrainConfig:
    """`cls` (default TrainConfig, or a subclass such as finetune's) from defaults < `path` (YAML/TOML) <
    `overrides` ("key=value", "model.dim=128")."""
    cls = cls or TrainConfig
    values: dict[str, Any] = {}
    if path is not None:
        _apply(values, read_config_file(path), str(path), cls)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} must look like key=value")
        _apply(values, {key.strip(): _parse_scalar(text)}, "command line", cls)
    values["model"] = {**values.get("model", {})}
    for name, section in _sections(cls).items():
        if name in values:
            try:
                values[name] = section(**values[name])
            except ValueError as e:
                raise UserError(f"{name}: {e}") from None
    return cls(**values)


def _sections(cls: type[TrainConfig]) -> dict[str, type]:
    """Fields of `cls` that are config dataclasses of their own, set as a mapping (`lora: {r: 8}`) or dotted keys
    (`lora.r=8`); `model` is a plain mapping checked against ModelConfig instead (the preset fills the rest)."""
    return {k: t for k, t in reflect.field_types(cls).items() if dataclasses.is_dataclass(t)}


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


# ---------------------------------------------------------------------------------------------------------------
# Derived quantities.


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """Gradient accumulation steps so that micro * accumulation * world_size == global batch."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise UserError(
            f"global_batch_size ({cfg.global_batch_size}) must be divisible by micro_batch_size "
            f"({cfg.micro_batch_size}) x world size ({world_size}) = {per_step}; change one of them"
        )
    return cfg.global_batch_size // per_step


def resolve_precision(precision: str, cuda: bool, bf16_supported: bool) -> str:
    """'auto' -> bf16 on a bf16-capable GPU, fp32 otherwise; fp16 is rejected off-GPU."""
    if precision == "auto":
        return "bf16" if cuda and bf16_supported else "fp32"
    if precision == "fp16" and not cuda:
        raise UserError("precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return precision


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursively; "auto" values (Hugging Face style) keep the base value."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        elif value != "auto":
            merged[key] = value
    return merged


def _lookup(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


# DeepSpeed keys owned by TrainConfig: a user JSON may repeat them only with the same value.
_OWNED = {
    ("train_batch_size",): "global_batch_size",
    ("train_micro_batch_size_per_gpu",): "micro_batch_size",
    ("gradient_accumulation_steps",): "global_batch_size / (micro_batch_size x world size)",
    ("gradient_clipping",): "grad_clip",
    ("zero_optimization", "stage"): "zero_stage",
    ("bf16", "enabled"): "precision",
    ("fp16", "enabled"): "precision",
}


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON for this run (precision already resolved), merged with cfg.deepspeed_config if given."""
    gas = grad_accum_steps(cfg, world_size)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds: dict[str, Any] = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # The optimizer is torch's AdamW (or DeepSpeedCPUAdam with offload), created by us.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config is None:
        return ds
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise MissingFileError(f"{path}: DeepSpeed config not found (deepspeed_config)")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(user, dict):
        raise UserError(f"{path}: DeepSpeed config must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise UserError(f"{path}: remove '{key}': the optimizer and LR schedule come from the training config")
    for keys, owner in _OWNED.items():
        mine, theirs = _lookup(ds, keys), _lookup(user, keys)
        if theirs is not None and theirs != "auto" and theirs != mine:
            raise UserError(
                f"{path}: '{'.'.join(keys)}' is {theirs!r} but the training config gives {mine!r}; "
                f"set {owner} in the training config instead"
            )
    return _deep_merge(ds, user)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, cosine decay to min_lr, then flat.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@cli.entry_point
def main(argv: Sequence[str] | None = None, cls: type[TrainConfig] | None = None) -> None:
    """Print the resolved config (or one key of it): what a run with these arguments would use."""
    parser = cli.parser("python -m pretrain.config", "Show the training config that --config and overrides "
                        "resolve to.")
    parser.add_argument("--config", help="YAML or TOML training config (default: the built-in debug run)")
    parser.add_argument("--get", metavar="KEY", help="print only this key's value")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=1e-3")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, cls)
    if args.get is not None:
        value: Any = cfg
        for part in args.get.split("."):  # a section's field: lora.r
            if not dataclasses.is_dataclass(value) or part not in {f.name for f in dataclasses.fields(value)}:
                raise UserError(f"unknown config key '{args.get}'")
            value = getattr(value, part)
        print("" if value is None else value)
    else:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")


if __name__ == "__main__":
    main()
