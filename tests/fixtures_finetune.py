"""Helpers for the fine-tuning tests: a tokenizer and a tiny Hugging Face model folder to tune, small instruction
files in every layout, and running finetune/train.py without a launcher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from fixtures_time import limit
from fixtures_train import REPO, SAMPLE, env, free_port, launch, train_losses, wait, wait_until

# A fine-tuning run small enough for a 2-core CPU.
TINY_SFT = ["seq_len=192", "micro_batch_size=2", "global_batch_size=4", "lr=2e-3", "min_lr=2e-4", "warmup_steps=1",
            "log_interval=1", "eval_batches=2", "wandb_mode=disabled", "tensorboard=false", "keep_last=2",
            "val_size=4"]

CONVERSATIONS = [
    [{"role": "user", "content": "计算 12 加 30。"}, {"role": "assistant", "content": "12加30等于42。"}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "3 + 4 = 7."},
     {"role": "user", "content": "And times 2?"}, {"role": "assistant", "content": "7 × 2 = 14."}],
    [{"role": "user", "content": "把“书”翻译成英文。"}, {"role": "assistant", "content": "“书”的英文是 book。"},
     {"role": "user", "content": "再翻译“猫”。"}, {"role": "assistant", "content": "“猫”的英文是 cat。"},
     {"role": "user", "content": "Write it in capitals."}, {"role": "assistant", "content": "CAT"}],
]


def train_tokenizer(root: Path) -> Path:
    """The 1024-token tokenizer of the shipped sample corpus (what scripts/train.sh trains); returns the model."""
    from tokenizer import train as tokenizer_train

    tokenizer_train.main(["--input", str(SAMPLE), "--output_dir", str(root / "tok"), "--vocab_size", "1024",
                          "--quiet", "--num_threads", "1"])
    return root / "tok" / "tokenizer.model"


def tiny_hf_model(root: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A random debug-preset model (vocab 1024) saved as a Hugging Face folder with the tokenizer: a base to tune."""
    from model import ModelConfig, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("debug", vocab_size=1024, max_seq_len=1024))
    return model.to_hf(root / "base", tokenizer_path=tokenizer)


def write_sample_files(root: Path) -> list[Path]:
    """The shipped sample's two layouts, cut small: 40 alpaca records (.jsonl.gz) and 12 conversations (.json)."""
    import gzip

    lines = (REPO / "data" / "sft_sample" / "alpaca.jsonl").read_text().splitlines()[:40]
    alpaca = root / "alpaca.jsonl.gz"
    with gzip.open(alpaca, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    chats = json.loads((REPO / "data" / "sft_sample" / "sharegpt.json").read_text())[:12]
    sharegpt = root / "sharegpt.json"
    sharegpt.write_text(json.dumps(chats, ensure_ascii=False))
    return [alpaca, sharegpt]


def run_finetune(args: Sequence[str], timeout: float = 400, script: str = "finetune/train.py"
                 ) -> subprocess.CompletedProcess:
    """finetune/train.py on one rank, the process group variables set by hand (no launcher)."""
    e = {**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=limit(timeout))


SLOW_FINETUNE = """
import sys, time
from finetune import train
from finetune.loader import InstructionLoader

# finetune/train.py with a pause before every micro batch, so a test can interrupt it mid-run; losses are unchanged.
next_batch = InstructionLoader.next_batch
def slow_next_batch(self):
    time.sleep(0.3)
    return next_batch(self)
InstructionLoader.next_batch = slow_next_batch
train.main(sys.argv[1:])
"""


def kill_after_step3_and_resume(hostfile: Path, args: list[str], run_dir: Path, tmp_path: Path, steps: int) -> str:
    """Launch a (slowed) fine-tuning run, SIGKILL it once the step-3 checkpoint is written and step 4 is logged,
    check it stopped short of `steps`, launch the same command again and return the second run's log."""
    script = tmp_path / "slow_finetune.py"
    script.write_text(SLOW_FINETUNE)

    def logged() -> int:
        return max(train_losses(run_dir), default=0)

    def latest() -> str | None:
        return (run_dir / "latest").read_text() if (run_dir / "latest").exists() else None

    proc = launch(hostfile, args, tmp_path / "log1.txt", free_port(), script=str(script))
    wait_until(lambda: latest() == "step_000003" and logged() >= 4, proc, tmp_path / "log1.txt")
    os.killpg(proc.pid, signal.SIGKILL)
    wait(proc, tmp_path / "log1.txt")
    assert logged() < steps
    proc = launch(hostfile, args, tmp_path / "log2.txt", free_port(), script=str(script))
    log = wait(proc, tmp_path / "log2.txt")
    assert proc.returncode == 0, log[-3000:]
    return log
