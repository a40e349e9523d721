"""What scripts/train.sh checks before it starts the DeepSpeed launcher, so that a mistake ends in one line.

    python -m pretrain.preflight --config config/debug.yaml --hostfile config/hostfile [--num_gpus N] [key=value ...]

Checks the hostfile's syntax (DeepSpeed's own parser ends in a traceback), the batch arithmetic with the world size
the hostfile and --num_nodes/--num_gpus give (found otherwise only inside the launched ranks, after the launcher's
start-up), that the prepared data and the tokenizer belong together, and that the rendezvous port is free. Prints
`KEY=value` lines for the shell: WORLD_SIZE, NUM_HOSTS, MASTER_PORT (a free port chosen when none was named on a
single node) and the config's DATA_DIR, RUN_DIR, TOKENIZER (empty: data_dir's) and MAX_STEPS.
"""
from __future__ import annotations

import errno
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common import cli
from common.errors import MissingFileError, UserError
from pretrain.config import TrainConfig, grad_accum_steps, load_config
from pretrain.shards import MANIFEST, check_shards, load_manifest
from tokenizer import Tokenizer

DEFAULT_PORT = 29500
"""torch.distributed's usual rendezvous port: what every node of a multi-node job uses unless told otherwise."""
HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


@dataclass
class Host:
    name: str
    slots: int


def read_hostfile(path: str | Path) -> list[Host]:
    """The hosts of a DeepSpeed hostfile (`<host> slots=<n>` lines, # comments); an error names file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: hostfile not found (--hostfile); write one line per node: "
                               "'<host> slots=<processes>'")
    hosts: list[Host] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = HOST_LINE.match(line)
        if not match or int(match.group(2)) < 1:
            raise UserError(f"{path}, line {number}: {line!r} is not '<host> slots=<n>' with n a positive "
                            "number of processes, e.g. 'localhost slots=1'")
        if any(h.name == match.group(1) for h in hosts):
            raise UserError(f"{path}, line {number}: host {match.group(1)!r} is listed twice; give each node "
                            "one line")
        hosts.append(Host(match.group(1), int(match.group(2))))
    if not hosts:
        raise UserError(f"{path}: no hosts; write one line per node: '<host> slots=<processes>'")
    return hosts


def world_size(hosts: list[Host], num_nodes: int = -1, num_gpus: int = -1) -> tuple[int, int]:
    """(number of nodes, total ranks) that `deepspeed --num_nodes --num_gpus` launches from these hosts."""
    if num_nodes == 0 or num_nodes < -1:
        raise UserError(f"--num_nodes must be positive, got {num_nodes}")
    if num_gpus == 0 or num_gpus < -1:
        raise UserError(f"--num_gpus must be positive, got {num_gpus}")
    if num_nodes > len(hosts):
        raise UserError(f"--num_nodes {num_nodes} but the hostfile lists only {len(hosts)} host(s)")
    used = hosts[:num_nodes] if num_nodes != -1 else hosts
    return len(used), sum(num_gpus if num_gpus != -1 else h.slots for h in used)


def check_data(cfg: TrainConfig) -> None:
    """Prepared data (if there is any yet) must come from the tokenizer the run will use, and fit the model."""
    data_dir = Path(cfg.data_dir)
    if not (data_dir / MANIFEST).is_file():
        return  # scripts/train.sh prepares it (or says why it cannot) before launching
    path = Path(cfg.tokenizer) if cfg.tokenizer else data_dir / "tokenizer.model"
    if not path.exists():
        raise MissingFileError(f"{path}: tokenizer not found; set tokenizer=PATH (the tokenizer.model the data "
                               "was prepared with)")
    vocab = cfg.model.get("vocab_size") if not cfg.init_from_hf else None
    manifest = load_manifest(data_dir, Tokenizer(path).sha256, vocab)
    # Shard sizes against the manifest: a truncated shard found here, not by a rank after DeepSpeed's start-up.
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for info in manifest["splits"].values():
        check_shards(data_dir, info["shards"], itemsize)


def free_port(addr: str) -> int:
    """A port the OS reports free on `addr` now (another job may still take it before the ranks bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def check_port(addr: str, port: int) -> None:
    """An error naming --master_port when `port` is taken on this machine; nothing when `addr` is not local."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except socket.gaierror:
            raise UserError(f"--master_addr {addr}: unknown host") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {addr} is in use (another job?); pass a free one with "
                                "--master_port PORT") from None
            if e.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
                return  # the master is another machine (or a privileged port): that node checks its own
            raise


def preflight(argv: Sequence[str] | None, prog: str, doc: str, load: Callable[..., TrainConfig],
              check: Callable[[TrainConfig], dict[str, str]]) -> None:
    """The checks every stage shares (hostfile, node rank, batch arithmetic, port), then the stage's own `check`
    (which returns the stage's KEY=value lines); prints WORLD_SIZE, NUM_HOSTS, MASTER_PORT, RUN_DIR, MAX_STEPS and
    those. scripts/launch.sh runs a stage's preflight module; pretraining's and fine-tuning's call this."""
    p = cli.parser(prog, doc)
    p.add_argument("--config", help="YAML or TOML config of the stage")
    p.add_argument("--hostfile", required=True, help="DeepSpeed hostfile")
    p.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts (-1: all)")
    p.add_argument("--num_gpus", type=int, default=-1, help="processes per node (-1: the hostfile's slots)")
    p.add_argument("--node_rank", type=int, default=0, help="this node's line in the hostfile")
    p.add_argument("--master_addr", default="127.0.0.1", help="address of node 0")
    p.add_argument("--master_port", type=int, default=None,
                   help="rendezvous port (default: a free one on a single node, else 29500)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    cfg = load(args.config, args.overrides)
    hosts = read_hostfile(args.hostfile)
    nodes, world = world_size(hosts, args.num_nodes, args.num_gpus)
    if not 0 <= args.node_rank < nodes:
        raise UserError(f"--node_rank {args.node_rank} is not one of the {nodes} node(s) of {args.hostfile} "
                        f"(0 to {nodes - 1})")
    try:
        grad_accum_steps(cfg, world)
    except ValueError as e:
        raise UserError(f"{e} (world size {world}: {nodes} node(s) of {args.hostfile}"
                        f"{f' x --num_gpus {args.num_gpus}' if args.num_gpus != -1 else ''})") from None
    extra = check(cfg)
    port = args.master_port
    if port is None and nodes == 1:
        try:
            port = free_port(args.master_addr)
        except OSError:
            port = DEFAULT_PORT
    else:
        port = port or DEFAULT_PORT  # every node of a multi-node job must agree on it: no guessing
        if args.node_rank == 0:
            check_port(args.master_addr, port)
    lines = {"WORLD_SIZE": world, "NUM_HOSTS": nodes, "MASTER_PORT": port, "RUN_DIR": cfg.run_dir,
             "MAX_STEPS": cfg.max_steps, **extra}
    print("\n".join(f"{k}={v}" for k, v in lines.items()))


def check_pretraining(cfg: TrainConfig) -> dict[str, str]:
    check_data(cfg)
    return {"DATA_DIR": cfg.data_dir, "TOKENIZER": cfg.tokenizer or ""}


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> None:
    preflight(argv, "python -m pretrain.preflight", __doc__, load_config, check_pretraining)


if __name__ == "__main__":
    main()
