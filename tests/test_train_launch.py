"""Training through the deepspeed launcher on CPU (gloo): ZeRO 1-3 on two ranks, data-parallel equivalence, two
simulated nodes, exact resumption after SIGKILL, SIGTERM saving, and export of the sharded checkpoints."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import weights_only_loading
from pretrain.config import load_config, lr_at
from artifacts.run_dir import load_checkpoint_model
from common.distributed import SHM_DIR
from pretrain.metrics import read_metrics
from fixtures_train import (TINY_RUN, free_port, launch, prepare_sample_data, run,
                                  slow_train_script, train_losses, wait, wait_until, write_hostfile)

pytestmark = pytest.mark.slow  # DeepSpeed engines and launches

STEPS = 12


def shm_buffers() -> set[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (common/distributed.py removes each run's own)."""
    return {p.name for p in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_sample_data(tmp_path_factory.mktemp("train_launch"))


def overrides(data_dir: Path, run_dir: Path, *more: str) -> list[str]:
    return [*TINY_RUN, f"data_dir={data_dir}", f"run_dir={run_dir}", f"max_steps={STEPS}", "eval_interval=6",
            "save_interval=6", *more]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    """One rank, ZeRO-0, 2 micro batches of 2 accumulated per step; TensorBoard on."""
    root = tmp_path_factory.mktemp("reference")
    hostfile = write_hostfile(root / "hostfile", ["localhost slots=1"])
    run(hostfile, overrides(data_dir, root / "run", "tensorboard=true"), root / "log.txt")
    return root / "run"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, data_dir) -> Path:
    """ZeRO-3 on two "nodes" of one rank each: two launchers with --no_ssh, node ranks 0 and 1, one master port."""
    root = tmp_path_factory.mktemp("two_nodes")
    hostfile = write_hostfile(root / "hostfile", ["node-a slots=1", "node-b slots=1"])
    port = free_port()
    args = overrides(data_dir, root / "run", "zero_stage=3")
    extra = ["--num_nodes", "2", "--num_gpus", "1"]
    procs = [launch(hostfile, args, root / f"log{i}.txt", port, node_rank=i, extra=extra) for i in (0, 1)]
    for i, proc in enumerate(procs):
        text = wait(proc, root / f"log{i}.txt")
        assert proc.returncode == 0, f"node {i} failed:\n{text[-3000:]}"
    return root / "run"


def assert_same_training(run_dir: Path, reference: Path, rel: float) -> None:
    ours, ref = train_losses(run_dir), train_losses(reference)
    assert sorted(ours) == list(range(1, STEPS + 1)) == sorted(ref)
    assert ref[STEPS] < ref[1] - 0.3, "the reference run did not learn"
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], rel=rel), f"step {step}: {ours[step]} vs {ref[step]}"
    # The consolidated final weights agree too (export merges this run's ZeRO shards).
    a, b = load_checkpoint_model(run_dir).state_dict(), load_checkpoint_model(reference).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-4, msg=name)


def test_reference_run_writes_the_run_directory(reference):
    for name in ("run_config.yaml", "model_config.json", "deepspeed_config.json", "tokenizer.model", "metrics.jsonl",
                 "loss_curve.png", "latest"):
        assert (reference / name).is_file(), name
    assert (reference / "latest").read_text() == f"step_{STEPS:06d}"
    assert sorted(p.name for p in reference.glob("step_*")) == ["step_000006", "step_000012"]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_metrics(reference)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    last = [r for r in rows if "loss" in r][-1]
    assert last["tokens"] == STEPS * 4 * 32 and last["tokens_per_sec"] > 0 and last["grad_norm"] > 0
    cfg = load_config(reference / "run_config.yaml")  # the resolved config the run saved
    assert (cfg.max_steps, cfg.zero_stage) == (STEPS, 0)
    assert last["lr"] == pytest.approx(lr_at(STEPS - 1, cfg)) and lr_at(STEPS, cfg) == cfg.min_lr


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_on_two_ranks_matches_one_rank_with_accumulation(stage, reference, data_dir, tmp_path):
    """Data parallelism: 2 ranks x micro batch 2 == 1 rank x 2 accumulated micro batches of 2."""
    hostfile = write_hostfile(tmp_path / "hostfile", ["localhost slots=2"])
    before = shm_buffers()
    log = run(hostfile, overrides(data_dir, tmp_path / "run", f"zero_stage={stage}"), tmp_path / "log.txt")
    assert shm_buffers() <= before, "the run left DeepSpeed's shared-memory buffers in /dev/shm"
    assert f"ZeRO-{stage} fp32 | 2 sequences x 1 accumulation x 2 ranks" in log
    assert len(list((tmp_path / "run" / "step_000012").glob("*optim_states.pt"))) == 2  # one shard per rank
    assert_same_training(tmp_path / "run", reference, rel=1e-4)


def test_two_nodes_without_ssh_zero3(two_nodes, reference):
    assert_same_training(two_nodes, reference, rel=1e-4)
    shards = sorted(p.name for p in (two_nodes / "step_000012").glob("*model_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]


def test_export_of_sharded_zero3_checkpoint_matches_transformers(two_nodes, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.export import main as export_main
    from tokenizer import Tokenizer

    export_main(["--checkpoint_dir", str(two_nodes), "--output_dir", str(tmp_path / "hf")])
    ours = load_checkpoint_model(two_nodes)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    text = "今天早上，小明去了图书馆。On Monday morning, Alice found an old map. 12 + 35 = 47"
    ids = Tokenizer(two_nodes / "tokenizer.model").encode(text, bos=True)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=1e-4)


def test_sigkill_resumes_exactly_and_sigterm_saves(reference, data_dir, tmp_path):
    """Kill -9 mid-run and restart the same command: it resumes from the last checkpoint and every step's loss equals
    the uninterrupted reference run's, bit for bit. Then SIGTERM the restarted job: it saves where it is and exits."""
    hostfile = write_hostfile(tmp_path / "hostfile", ["localhost slots=1"])
    run_dir = tmp_path / "run"
    args = overrides(data_dir, run_dir, "save_interval=3", "tensorboard=true")

    def logged() -> int:
        return max(train_losses(run_dir), default=0)

    def latest() -> str | None:
        return (run_dir / "latest").read_text() if (run_dir / "latest").exists() else None

    script = slow_train_script(tmp_path)  # pretrain/train.py, pausing 0.25 s per micro batch
    before = shm_buffers()
    proc = launch(hostfile, args, tmp_path / "log1.txt", free_port(), script=script)
    wait_until(lambda: latest() == "step_000003" and logged() >= 4, proc, tmp_path / "log1.txt")
    os.killpg(proc.pid, signal.SIGKILL)
    wait(proc, tmp_path / "log1.txt")
    assert logged() < STEPS
    assert shm_buffers() <= before, "the killed run left DeepSpeed's shared-memory buffers in /dev/shm"

    proc = launch(hostfile, args, tmp_path / "log2.txt", free_port(), script=script)
    wait_until(lambda: "resumed from" in (tmp_path / "log2.txt").read_text() and logged() >= 8, proc,
               tmp_path / "log2.txt")
    os.killpg(proc.pid, signal.SIGTERM)  # what Ctrl-C or a scheduler's preemption does to the whole job
    log = wait(proc, tmp_path / "log2.txt")
    # The kill may have landed after the step-6 save: resuming from either checkpoint is right.
    assert any(f"resumed from {run_dir / f'step_{s:06d}'} at step {s}" in log for s in (3, 6)), log[-2000:]
    stopped_at = logged()
    assert 8 <= stopped_at < STEPS, "the job finished before SIGTERM arrived"
    assert f"stopped by SIGTERM at step {stopped_at}, checkpoint saved" in log
    assert latest() == f"step_{stopped_at:06d}"
    ref = train_losses(reference)
    assert train_losses(run_dir) == {s: ref[s] for s in range(1, stopped_at + 1)}  # exact equality, every step
    # The SIGTERM checkpoint is complete: it consolidates, and its client state is where the run stopped.
    weights = load_checkpoint_model(run_dir).state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())
    with weights_only_loading():
        state = torch.load(run_dir / latest() / "mp_rank_00_model_states.pt", weights_only=True)
    assert state["step"] == stopped_at and state["data"]["samples"] == stopped_at * 4  # 4 sequences per step
    assert len(list(run_dir.glob("step_*"))) == 2  # keep_last
