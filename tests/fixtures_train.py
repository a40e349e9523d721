"""Helpers for the training/export tests: a prepared dataset from the shipped sample corpus, launching runs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from fixtures_time import limit
from pretrain.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"

# A run small enough for a 2-core CPU: the debug model on 32-token sequences, 4 sequences per optimizer step.
TINY_RUN = ["seq_len=32", "micro_batch_size=2", "global_batch_size=4", "lr=3e-3", "min_lr=3e-4", "warmup_steps=2",
            "log_interval=1", "eval_batches=2", "wandb_mode=disabled", "tensorboard=false", "keep_last=2"]


def prepare_sample_data(root: Path) -> Path:
    """Train a 1024-token tokenizer on the shipped sample corpus and prepare it into root/data (returned)."""
    from pretrain import prepare_data
    from tokenizer import train as tokenizer_train

    tokenizer_train.main(["--input", str(SAMPLE), "--output_dir", str(root / "tok"), "--vocab_size", "1024",
                          "--quiet", "--num_threads", "1"])
    prepare_data.main(["--tokenizer", str(root / "tok" / "tokenizer.model"), "--input", str(SAMPLE),
                       "--output_dir", str(root / "data"), "--val_fraction", "0.05", "--num_workers", "1",
                       "--no_progress"])
    return root / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    # One thread per rank: these models are tiny, and on a busy 2-core box threads mostly wait for each other.
    e["OMP_NUM_THREADS"] = "1"
    return e


def write_hostfile(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def launch(hostfile: Path, overrides: Sequence[str], log: Path, port: int, node_rank: int = 0,
           extra: Sequence[str] = (), script: str = "pretrain/train.py") -> subprocess.Popen:
    """Start `deepspeed ... pretrain/train.py overrides` in its own session (so tests can signal the whole job)."""
    # `python -m deepspeed.launcher.runner` is the `deepspeed` command, pinned to this interpreter.
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
           "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port), *extra, script, *overrides]
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    """Wait for a launched job, every process of it (a signalled `deepspeed` runner exits at once while its ranks
    may still be saving); return its log. Kills the job on timeout (`timeout`: the idle-machine limit, scaled by
    fixtures_time.limit)."""
    timeout = limit(timeout)
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=timeout)
        while _group_alive(proc.pid):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            time.sleep(0.1)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"job timed out; log:\n{log.read_text()[-3000:]}")
    return log.read_text()


def run(hostfile: Path, overrides: Sequence[str], log: Path, **kwargs: Any) -> str:
    proc = launch(hostfile, overrides, log, free_port(), **kwargs)
    text = wait(proc, log)
    assert proc.returncode == 0, f"training failed (exit {proc.returncode}):\n{text[-3000:]}"
    return text


SLOW_TRAIN = """
import sys, time
from pretrain import train
from pretrain.data import DataLoader

# pretrain/train.py with a pause before every micro batch, so a test can interrupt it mid-run; losses are unchanged.
next_batch = DataLoader.next_batch
def slow_next_batch(self):
    time.sleep(0.25)
    return next_batch(self)
DataLoader.next_batch = slow_next_batch
train.main(sys.argv[1:])
"""


def slow_train_script(directory: Path) -> str:
    path = directory / "slow_train.py"
    path.write_text(SLOW_TRAIN)
    return str(path)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + limit(timeout)
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"job ended (exit {proc.returncode}) before the test could interrupt it:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
