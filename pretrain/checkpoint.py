"""Crash-safe DeepSpeed checkpoints: tags `step_000100`, a `latest` file we write ourselves, keep the last K.

DeepSpeed writes a checkpoint as a directory of shard files (one per rank for ZeRO). We save with
save_latest=False and only point `latest` at the new tag (atomically, with os.replace) once every rank has written
and flushed its files, so a crash in the middle of a save leaves `latest` on the previous, complete checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write via a temp file + fsync + os.replace, so readers see the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        raise FileNotFoundError(f"{path} names checkpoint {tag!r} but {Path(run_dir) / tag} does not exist")
    return tag


def resolve_tag(run_dir: str | Path, tag: str | None) -> str:
    """`tag` checked to exist, or the latest one; a clear error when the directory holds no checkpoint."""
    run_dir = Path(run_dir)
    if tag is None:
        tag = latest_tag(run_dir)
        if tag is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint found (no '{LATEST}' file); is this a training run dir?")
    elif not (run_dir / tag).is_dir():
        available = ", ".join(list_checkpoints(run_dir)) or "none"
        raise FileNotFoundError(f"{run_dir / tag}: no such checkpoint; available: {available}")
    return tag


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(engine: Any, run_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int) -> str:
    """Save a checkpoint of `engine` (all ranks must call this) as tag step_NNNNNN; returns the tag."""
    run_dir = Path(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state, save_latest=False)
    # Every rank's shards must be on disk before `latest` moves: flush them, then wait for everyone.
    _fsync_tree(run_dir / tag)
    if dist.is_initialized():
        dist.barrier()
    if _is_rank0():
        write_text_atomic(run_dir / LATEST, tag)
        _prune(run_dir, keep_last, current=tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _fsync_tree(path: Path) -> None:
    """fsync every file under path (torch.save does not), so a power cut cannot leave `latest` on torn files."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prune(run_dir: Path, keep_last: int, current: str) -> None:
    """Keep `current` (what `latest` names) and the keep_last - 1 checkpoints before it. Directories of later steps
    are leftovers of a crashed run that this one resumed before: torn, or from an abandoned timeline."""
    tags = list_checkpoints(run_dir)
    position = tags.index(current)
    for tag in tags[: max(0, position + 1 - keep_last)] + tags[position + 1:]:
        shutil.rmtree(run_dir / tag, ignore_errors=True)


# Classes DeepSpeed pickles into its checkpoint files besides tensors and builtins; allow-listed so checkpoints
# are read with torch.load(weights_only=True) even though DeepSpeed itself asks for weights_only=False.
def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


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


def load_checkpoint(engine: Any, run_dir: str | Path, tag: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """Restore `engine` (weights, optimizer, ZeRO shards) from run_dir's latest checkpoint (or `tag`).

    Returns (tag, client_state), or None when run_dir holds no checkpoint yet.
    """
    if tag is None and latest_tag(run_dir) is None:
        return None
    tag = resolve_tag(run_dir, tag)
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    try:
        with weights_only_loading():
            load_path, client_state = engine.load_checkpoint(str(run_dir), tag=tag)
    except ZeRORuntimeException as e:  # ZeRO shards are per rank: another world size cannot load them
        raise ValueError(f"{Path(run_dir) / tag}: {e} Resume with the number of ranks that wrote it.") from None
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"{Path(run_dir) / tag} does not fit the model being trained ({detail}); it was written "
                         "by another model or model code: resume with that, or use a new run_dir") from None
    if load_path is None:
        raise RuntimeError(f"{Path(run_dir) / tag}: DeepSpeed could not load this checkpoint")
    return tag, client_state or {}
