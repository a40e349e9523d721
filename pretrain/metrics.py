"""What a run shows: a progress bar and log lines on rank 0, metrics.jsonl, TensorBoard, wandb and a loss-curve PNG.

Only rank 0 creates a MetricsLogger with enabled=True; the others get a disabled one whose calls do nothing, so
the training loop never branches on the rank.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from common.io import atomic_write, write_text

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"

# Dense bf16/fp16 tensor-core peak FLOP/s per GPU (no sparsity), matched by substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10G": 70e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "MI300X": 1307e12,
    "MI250X": 383e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of the named GPU, None when unknown (MFU is then not reported)."""
    # Longest key first so "GH200" wins over "H200" and "L40S" over "L40".
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_FLOPS[key]
    return None


def memory_gib() -> float:
    """Peak GPU memory allocated by this rank, or the process's resident memory on CPU, in GiB (2**30 bytes)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of run_dir/metrics.jsonl (empty when missing); a torn last line from a crash is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss_curve(run_dir: str | Path) -> Path | None:
    """Draw train (and validation) loss against step into run_dir/loss_curve.png; None when nothing is logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r["loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / LOSS_CURVE_FILE
    # The plot is redrawn every few steps: an atomic rename, but no fsync (cheap to remake).
    with atomic_write(out, "wb", fsync=False) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


class MetricsLogger:
    """Fan one dict of numbers per step out to every sink; a no-op unless enabled (rank 0)."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], enabled: bool, start_step: int, max_steps: int,
                 tensorboard: bool = True, wandb_mode: str = "offline", wandb_project: str = "llama-pretrain"):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self.file = open(self.run_dir / METRICS_FILE, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint we resume from.
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        if wandb_mode != "disabled":
            self.wandb = _init_wandb(self.run_dir, config, wandb_mode, wandb_project)
        # disable=None: a bar on a terminal, none in a log file (the log lines carry the same numbers).
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=None)

    def _truncate_after(self, step: int) -> None:
        """Drop rows newer than the checkpoint we resume from: those steps are about to be trained again."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        rows = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record `values` for `step` in metrics.jsonl, TensorBoard and wandb."""
        if not self.enabled:
            return
        # NaN/inf (a skipped step's gradient norm) become null: strict JSON readers reject NaN.
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        row = {"step": step, **values, "time": round(time.time(), 3)}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def print(self, message: str) -> None:
        """A log line that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def advance(self, step: int, **postfix: Any) -> None:
        """Move the progress bar to `step` and show `postfix` next to it."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def plot(self) -> None:
        if self.enabled:
            plot_loss_curve(self.run_dir)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.plot()


def _init_wandb(run_dir: Path, config: dict[str, Any], mode: str, project: str) -> Any:
    """A wandb run resumed across restarts (id kept in run_dir/wandb_id); None when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        tqdm.write("wandb is not installed: skipping wandb logging (pip install wandb, or set wandb_mode=disabled)")
        return None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=project, dir=str(run_dir), mode=mode, id=run_id, resume="allow", config=config,
                      name=run_dir.name)
