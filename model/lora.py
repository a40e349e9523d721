"""LoRA for our Transformer: low-rank adapters beside frozen projections, laid out exactly as PEFT lays them out.

Each targeted projection gets `W x + scale * B (A dropout(x))` with A [r, in] and B [out, r], B zero-initialised so a
fresh adapter leaves the model's outputs unchanged. Our attention and MLP stack q/k/v and gate/up into one matrix
(wqkv, w13); their adapters are still one per PEFT projection (q_proj, k_proj, ...), each adding to its own rows of
the stacked output, so a PEFT adapter maps onto ours tensor for tensor (model/lora_peft.py does the renaming).

The training loop needs three calls:

    model = prepare_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["all"]))  # finetune/lora.py
    ...                                                                               # train as usual
    state = gather_lora_state_dict(engine)       # on every rank (collective under ZeRO-3); full tensors
    save_adapter(state, cfg, out_dir, base_path) # on rank 0 (model/lora_peft.py)

Adapter parameters are created by module constructors (LoRAAdapter), so under deepspeed.zero.Init they are
partitioned like every other parameter; DeepSpeed then trains only them because the base has requires_grad=False.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError

from .model import Linear, Transformer

# PEFT's projection name -> our module inside a block; projections stacked in one module are listed in the order
# of their rows (q, k, v in wqkv; gate, up in w13).
TARGETS: dict[str, str] = {
    "q_proj": "attention.wqkv", "k_proj": "attention.wqkv", "v_proj": "attention.wqkv", "o_proj": "attention.wo",
    "gate_proj": "feed_forward.w13", "up_proj": "feed_forward.w13", "down_proj": "feed_forward.w2",
}
ALL = ("all", "all-linear")  # PEFT spells it all-linear; both mean every projection above (never the lm_head)

# Our name of an adapter tensor: layers.{i}.{module}.lora.{peft name}.{A|B}
LORA_NAME = re.compile(r"layers\.(\d+)\.(attention\.wqkv|attention\.wo|feed_forward\.w13|feed_forward\.w2)"
                       r"\.lora\.(\w+)\.(A|B)")


@dataclass
class LoRAConfig:
    """Which projections get adapters and how big and strong they are (PEFT's LoraConfig, same meaning)."""

    r: int = 8
    """Rank of every adapter (PEFT's r): the update B @ A has at most this rank. Must be >= 1."""
    alpha: float | None = 16.0
    """Scale numerator (PEFT's lora_alpha): the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).
    Required: there is no sensible implicit value, so None is an error."""
    dropout: float = 0.0
    """Dropout on each adapter's input while training (PEFT's lora_dropout); the base path never drops."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Projections that get adapters, by PEFT's names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj, or `all` for all seven (PEFT's default for LLaMA is q_proj v_proj)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora)."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise UserError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.alpha is None:
            raise UserError("LoRA alpha (lora_alpha) is missing; set it explicitly (2 * r is common)")
        if not float(self.alpha) > 0:
            raise UserError(f"LoRA alpha (lora_alpha) must be > 0, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.target_modules = resolve_targets(self.target_modules)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def resolve_targets(names: str | Iterable[str]) -> list[str]:
    """PEFT projection names in canonical order; `all` expands; a comma-separated string is accepted."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UserError(f"LoRA target_modules is empty; choose from {', '.join(TARGETS)} or all")
    if any(n in ALL for n in names):
        return list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise UserError(f"LoRA target module(s) {', '.join(unknown)} do not exist in this model; choose from "
                        f"{', '.join(TARGETS)} or all")
    return [n for n in TARGETS if n in names]


class LoRAAdapter(nn.Module):
    """One projection's adapter: scale * B @ A. Parameters are made and initialised here (see model.Linear)."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float):
        super().__init__()
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.empty(out_features, r))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default for A
        nn.init.zeros_(self.B)  # a fresh adapter is the identity: the model's outputs are unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32: what merging adds to the base rows."""
        return (self.B.float() @ self.A.float()) * self.scale


class LoRALinear(nn.Module):
    """A frozen base projection plus adapters on slices of its output rows (q/k/v of wqkv, gate/up of w13).

    It holds the base's own Parameter as `weight`, so the base keeps its name in the state dict (and its ZeRO
    partition); adapters live under `lora.<peft name>`. `parts` names every projection stacked in the base, in
    order, with its rows; adapters go on the `targets` among them.
    """

    def __init__(self, base: Linear, parts: dict[str, tuple[int, int]], targets: list[str], cfg: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features, self.std = base.in_features, base.out_features, base.std
        self.weight = base.weight
        self.parts = parts
        self.sizes = [end - start for start, end in parts.values()]
        self.lora = nn.ModuleDict({name: LoRAAdapter(self.in_features, end - start, cfg.r, cfg.scale, cfg.dropout)
                                   for name, (start, end) in parts.items() if name in targets})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if len(self.parts) == 1:
            return y + next(iter(self.lora.values()))(x)
        # One concatenation, rather than an in-place add per slice: autograd would copy the whole output's gradient
        # for each of those, while a concatenation's backward only takes views.
        pieces = y.split(self.sizes, dim=-1)
        return torch.cat([p + self.lora[name](x) if name in self.lora else p for name, p in zip(self.parts, pieces)],
                         dim=-1)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with every adapter added, computed in fp32 and returned in the base's dtype."""
        w = self.weight.detach().float().clone()
        for name, adapter in self.lora.items():
            start, end = self.parts[name]
            w[start:end] += adapter.delta_weight().to(w.device)
        return w.to(self.weight.dtype)


def stacked_parts(model: Transformer, module: str) -> dict[str, tuple[int, int]]:
    """PEFT projection -> its row range in our `module` (one entry when the module is not stacked)."""
    c = model.config
    sizes = {"attention.wqkv": [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim],
             "feed_forward.w13": [c.hidden_dim, c.hidden_dim]}.get(module, [c.dim])  # wo and w2 write the stream
    names = [name for name, m in TARGETS.items() if m == module]
    parts, start = {}, 0
    for name, size in zip(names, sizes):
        parts[name] = (start, start + size)
        start += size
    return parts


def inject_lora(model: Transformer, cfg: LoRAConfig, layers: Iterable[int] | None = None) -> Transformer:
    """Put adapters for cfg.target_modules into `layers` (default: every block). In place; returns the model.

    Call it inside deepspeed.zero.Init (with the model's construction) to have the adapters partitioned at birth;
    called outside, deepspeed.initialize partitions them under ZeRO-3 like any other unpartitioned parameter.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    layers = range(model.config.n_layers) if layers is None else sorted(set(layers))
    modules = dict.fromkeys(TARGETS[name] for name in cfg.target_modules)
    for i in layers:
        block = model.layers[i]
        for module in modules:
            parent_name, child_name = module.split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, child_name)
            wrapped = LoRALinear(base, stacked_parts(model, module), cfg.target_modules, cfg)
            if not hasattr(base.weight, "ds_id"):  # a ZeRO-3 shard has no meaningful dtype/device to follow
                wrapped.lora.to(device=base.weight.device, dtype=base.weight.dtype)
            setattr(parent, child_name, wrapped)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def is_lora_name(name: str) -> bool:
    return ".lora." in name


def mark_only_lora_trainable(model: nn.Module) -> tuple[int, int]:
    """requires_grad on adapter tensors only; returns (trainable, total) parameter counts."""
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_name(name))
        n = getattr(p, "ds_numel", p.numel())  # a ZeRO-3 shard's numel is local
        total += n
        trainable += n if p.requires_grad else 0
    if trainable == 0:
        raise ValueError("the model has no LoRA adapters to train; call inject_lora (or finetune.lora.prepare_lora) first")
    return trainable, total


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (our names), as the module holds them (ZeRO-3 shards stay shards: see
    gather_lora_state_dict)."""
    model = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return {k: v for k, v in model.state_dict().items() if is_lora_name(k)}


def gather_lora_state_dict(model_or_engine: nn.Module) -> dict[str, torch.Tensor]:
    """Full adapter tensors on the CPU, whatever the ZeRO stage. Under ZeRO-3 it is a collective: every rank must
    call it (each gets the full tensors; rank 0 then writes them)."""
    module = getattr(model_or_engine, "module", model_or_engine)
    named = [(n, p) for n, p in module.named_parameters() if is_lora_name(n)]
    if not named:
        raise ValueError("the model has no LoRA adapters to save")
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed  # only ZeRO-3 models have ds_id; importing DeepSpeed is slow, so not at module level

        with deepspeed.zero.GatheredParameters([p for _, p in named]):  # modifier_rank None: read only
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors (our names) into a model with the same adapters; a mismatch is one clear error.
    Under ZeRO-3 every rank must call it (rank 0's tensors are scattered to the shards)."""
    model = getattr(model, "module", model)
    own = {n: p for n, p in model.named_parameters() if is_lora_name(n)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{source}: adapter tensors do not match the model's adapters "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        shape = tuple(getattr(own[k], "ds_shape", own[k].shape))  # a ZeRO-3 shard's own shape is empty
        if tuple(v.shape) != shape:
            raise UserError(f"{source}: adapter tensor {k} has shape {tuple(v.shape)}, the model expects "
                            f"{shape} (a different base model or rank?)")
    params = list(own.values())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gathered, torch.no_grad():
        for k, v in state.items():
            own[k].data.copy_(v)


def _plain_linear(wrapped: LoRALinear, weight: torch.Tensor) -> Linear:
    with torch.device("meta"):  # no throw-away allocation or initialisation of a full weight
        linear = Linear(wrapped.in_features, wrapped.out_features, wrapped.std)
    linear.weight = nn.Parameter(weight, requires_grad=wrapped.weight.requires_grad)
    return linear


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (fp32 arithmetic) and drop the adapters. In place; returns the model,
    now a plain Transformer whose state dict has the base's names only."""
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    if hasattr(child.weight, "ds_id"):
                        raise ValueError("merge_lora needs whole tensors; under ZeRO-3 save the adapter "
                                         "(gather_lora_state_dict) and merge it into the base offline")
                    setattr(parent, child_name, _plain_linear(child, child.merged_weight()))
    return model
