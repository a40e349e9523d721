"""Joining DeepSpeed's process group without leaking its shared-memory buffers."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def shm_buffer_path(rank: int) -> Path:
    """The file DeepSpeed's CPU all-reduce maps for `rank` (its ops/csrc/cpu/comm/shm.cpp names it so)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def init_deepspeed_distributed(timeout: timedelta | None = None, backend: str | None = None) -> None:
    """`deepspeed.init_distributed`, then remove this rank's shared-memory all-reduce buffer from /dev/shm.

    When every rank runs on one CPU host, DeepSpeed gives each a ~66 MB file in /dev/shm that the others map, and
    never deletes it: each run (and every killed one) would keep that much RAM until reboot. Once every rank has
    passed initialisation all of them have mapped all buffers, so each rank unlinks its own name: the memory
    stays mapped while the job runs and is freed when the last rank exits, however it exits.
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    kwargs = {"verbose": False}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if backend is not None:
        kwargs["dist_backend"] = backend
    deepspeed.init_distributed(**kwargs)
    if torch.cuda.is_available():  # the shared-memory all-reduce is DeepSpeed's CPU accelerator's
        return
    dist.barrier()  # every rank is past shm_initialize, which opens every other rank's buffer
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)
