"""Crash-safe DeepSpeed checkpoints: tags `step_000100`, a `latest` file we write ourselves, keep the last K.

DeepSpeed writes a checkpoint as a directory of shard files (one per rank for ZeRO). We save with
save_latest=False and only point `latest` at the new tag (atomically, with os.replace) once every rank has written
and flushed its files, so a crash in the middle of a save leaves `latest` on the previous, complete checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from artifacts.run_dir import (LATEST, latest_tag, list_checkpoints, resolve_tag, tag_for,  # noqa: F401
                               weights_only_loading)
from common.errors import UserError
from common.io import fsync_tree, write_text

def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(engine: Any, run_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int,
                    exclude_frozen: bool = False) -> str:
    """Save a checkpoint of `engine` (all ranks must call this) as tag step_NNNNNN; returns the tag.

    exclude_frozen: leave parameters without requires_grad out (an adapter run: the frozen base is rebuilt from
    the base model on resume, so the checkpoint holds only what trains and its optimizer state)."""
    run_dir = Path(run_dir)
    tag = tag_for(step)
    extra = {"exclude_frozen_parameters": True} if exclude_frozen else {}
    engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state, save_latest=False, **extra)
    # Every rank's shards must be on disk before `latest` moves: flush them, then wait for everyone.
    fsync_tree(run_dir / tag)
    if dist.is_initialized():
        dist.barrier()
    if _is_rank0():
        write_text(run_dir / LATEST, tag)
        _prune(run_dir, keep_last, current=tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _prune(run_dir: Path, keep_last: int, current: str) -> None:
    """Keep `current` (what `latest` names) and the keep_last - 1 checkpoints before it. Directories of later steps
    are leftovers of a crashed run that this one resumed before: torn, or from an abandoned timeline."""
    tags = list_checkpoints(run_dir)
    position = tags.index(current)
    for tag in tags[: max(0, position + 1 - keep_last)] + tags[position + 1:]:
        shutil.rmtree(run_dir / tag, ignore_errors=True)


def load_checkpoint(engine: Any, run_dir: str | Path, tag: str | None = None, frozen_excluded: bool = False
                    ) -> tuple[str, dict[str, Any]] | None:
    """Restore `engine` (weights, optimizer, ZeRO shards) from run_dir's latest checkpoint (or `tag`).

    frozen_excluded: the checkpoint was saved with exclude_frozen, so the module state lacks the frozen
    parameters (they keep the values the model was built with); every trainable one must still be there.
    Returns (tag, client_state), or None when run_dir holds no checkpoint yet.
    """
    if tag is None and latest_tag(run_dir) is None:
        return None
    tag = resolve_tag(run_dir, tag)
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    try:
        with weights_only_loading():
            extra = {"load_module_strict": False} if frozen_excluded else {}
            load_path, client_state = engine.load_checkpoint(str(run_dir), tag=tag, **extra)
            if frozen_excluded:
                _check_trainable_saved(engine, Path(run_dir) / tag)
    except ZeRORuntimeException as e:  # ZeRO shards are per rank: another world size cannot load them
        raise UserError(f"{Path(run_dir) / tag}: {e} Resume with the number of ranks that wrote it.") from None
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{Path(run_dir) / tag} does not fit the model being trained ({detail}); it was written "
                        "by another model or model code: resume with that, or use a new run_dir") from None
    if load_path is None:
        raise RuntimeError(f"{Path(run_dir) / tag}: DeepSpeed could not load this checkpoint")
    return tag, client_state or {}


def _check_trainable_saved(engine: Any, ckpt: Path) -> None:
    """A non-strict load ignores missing keys: make sure only frozen parameters were missing (ZeRO 0-2 keep the
    module's weights in the model-states file; ZeRO-3's trainable weights come from the optimizer shards)."""
    files = sorted(ckpt.glob("*model_states.pt"))
    if not files or getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        return
    import torch

    saved = set(torch.load(files[0], map_location="cpu", weights_only=True)["module"])
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    missing = sorted(trainable - saved)
    if missing:
        raise UserError(f"{ckpt} lacks trained parameters of this run ({', '.join(missing[:3])}): it was written "
                        "by another kind of run; resume with that, or use a new run_dir")
