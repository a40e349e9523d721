"""The layout of a training run directory and reading its weights back (any ZeRO stage, any number of ranks).

A run directory holds DeepSpeed checkpoint folders `step_NNNNNN` and a `latest` file naming the newest complete one
(pretrain/checkpoint.py writes them), plus `model_config.json` and `tokenizer.model`.
"""
from __future__ import annotations

import contextlib
import enum
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from common.errors import MissingFileError, UserError
from model import ModelConfig, Transformer

LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """Tags of the checkpoint directories in run_dir, oldest first (complete or not)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    tags = [p.name for p in run_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag named by run_dir/latest, or None for a fresh run directory."""
    path = Path(run_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (Path(run_dir) / tag).is_dir():
        raise MissingFileError(f"{path} names checkpoint {tag!r} but {Path(run_dir) / tag} does not exist")
    return tag


def resolve_tag(run_dir: str | Path, tag: str | None) -> str:
    """`tag` checked to exist, or the latest one; a clear error when the directory holds no checkpoint."""
    run_dir = Path(run_dir)
    if tag is None:
        tag = latest_tag(run_dir)
        if tag is None:
            raise MissingFileError(f"{run_dir}: no checkpoint found (no '{LATEST}' file); is this a training run dir?")
    elif not (run_dir / tag).is_dir():
        available = ", ".join(list_checkpoints(run_dir)) or "none"
        raise MissingFileError(f"{run_dir / tag}: no such checkpoint; available: {available}")
    return tag


def is_run_dir(path: str | Path) -> bool:
    """A training run directory holds DeepSpeed checkpoints: a `latest` file or step_* tag directories."""
    path = Path(path)
    return path.is_dir() and ((path / LATEST).is_file()
                              or any(p.is_dir() and TAG_RE.match(p.name) for p in path.iterdir()))


# Classes DeepSpeed pickles into its checkpoint files besides tensors and builtins; allow-listed so checkpoints
# are read with torch.load(weights_only=True) even though DeepSpeed itself asks for weights_only=False.
def _deepspeed_safe_classes() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def enum_member_by_name(cls: Any, name: Any) -> enum.Enum:
    """The only `getattr` a checkpoint may call: a member, by name, of one of DeepSpeed's allow-listed enums.

    Python 3.11.0-3.11.3 (Debian 12's python3 is 3.11.2) pickle an enum member as `getattr(EnumClass, "name")`
    rather than `EnumClass(value)`, so a checkpoint saved there holds ZeroStageEnum as a call of builtins.getattr.
    Allowing getattr itself would let a file reach any attribute of any allow-listed class; this stands in for it
    and resolves enum members only."""
    if (isinstance(cls, type) and issubclass(cls, enum.Enum) and cls in _deepspeed_safe_classes()
            and isinstance(name, str) and name in cls.__members__):
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({getattr(cls, '__qualname__', type(cls).__name__)}, {name!r}) in a "
                                 "checkpoint: only members of DeepSpeed's allow-listed enums may be looked up")


def _deepspeed_safe_globals() -> list[Any]:
    # The file's builtins.getattr is served by enum_member_by_name (torch maps the name to this callable).
    return [*_deepspeed_safe_classes(), (enum_member_by_name, "builtins.getattr")]


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Make every torch.load inside (DeepSpeed's included) use weights_only=True with DeepSpeed's few classes
    allow-listed: loading a checkpoint then cannot run arbitrary pickled code."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def consolidated_state_dict(run_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint `tag` (default: latest) merged from all ranks' shards."""
    run_dir = Path(run_dir)
    tag = resolve_tag(run_dir, tag)
    ckpt = run_dir / tag
    with weights_only_loading():
        if any(ckpt.glob("*optim_states.pt")):
            # ZeRO 1-3 (and bf16): the fp32 master weights live, partitioned, in the optimizer shards.
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag)
        else:
            # ZeRO-0 fp32: the module's full weights are in the model-states file.
            files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise MissingFileError(f"{ckpt}: no DeepSpeed model-states file; is the checkpoint complete?")
            state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


def load_checkpoint_model(run_dir: str | Path, tag: str | None = None,
                          config_overrides: dict[str, Any] | None = None) -> Transformer:
    """Our Transformer (fp32, CPU, eval mode) with the weights of checkpoint `tag` (default: latest) of run_dir,
    built with `config_overrides` (runtime fields; activation checkpointing is off unless they turn it on)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "model_config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} is missing; pass the run directory that pretrain/train.py wrote")
    try:
        saved = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: not valid JSON ({e}); is the run directory damaged?") from None
    config = ModelConfig.from_dict({**saved, "activation_checkpointing": False, **(config_overrides or {})})
    model = Transformer(config)
    state = consolidated_state_dict(run_dir, tag)
    if config.tie_embeddings:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{run_dir}: checkpoint does not match model_config.json "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return model.eval()
