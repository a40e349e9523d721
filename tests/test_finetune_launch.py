"""Fine-tuning through the deepspeed launcher on CPU (gloo): exact resumption after SIGKILL, and ZeRO-2/ZeRO-3 on
two ranks against one rank with accumulation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from artifacts.run_dir import load_checkpoint_model
from fixtures_finetune import (TINY_SFT, kill_after_step3_and_resume,
                               tiny_hf_model, train_tokenizer, write_sample_files)
from fixtures_train import run, train_losses, write_hostfile

STEPS = 6



@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("finetune_launch")
    base = tiny_hf_model(root, train_tokenizer(root))
    return base, write_sample_files(root)


def overrides(setup, run_dir: Path, *more: str) -> list[str]:
    base, files = setup
    return [*TINY_SFT, f"model_path={base}", f"run_dir={run_dir}", f"data_files=[{', '.join(map(str, files))}]",
            f"max_steps={STEPS}", "eval_interval=3", "save_interval=3", *more]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, setup) -> Path:
    """One rank, ZeRO-0, 2 micro batches of 2 accumulated per step."""
    root = tmp_path_factory.mktemp("sft_reference")
    hostfile = write_hostfile(root / "hostfile", ["localhost slots=1"])
    run(hostfile, overrides(setup, root / "run"), root / "log.txt", script="finetune/train.py")
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_ranks_matches_one_rank(stage, reference, setup, tmp_path):
    hostfile = write_hostfile(tmp_path / "hostfile", ["localhost slots=2"])
    log = run(hostfile, overrides(setup, tmp_path / "run", f"zero_stage={stage}"), tmp_path / "log.txt",
              script="finetune/train.py")
    assert f"ZeRO-{stage} fp32 | 2 sequences x 1 accumulation x 2 ranks" in log
    ours, ref = train_losses(tmp_path / "run"), train_losses(reference)
    assert sorted(ours) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], rel=1e-4), f"step {step}: {ours[step]} vs {ref[step]}"
    a, b = load_checkpoint_model(tmp_path / "run").state_dict(), load_checkpoint_model(reference).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-4, msg=name)


@pytest.mark.slow
def test_sigkill_resumes_exactly(reference, setup, tmp_path):
    """kill -9 after the step-3 checkpoint, restart the same command: every step's loss equals the uninterrupted
    run's, bit for bit (the instruction loader's position is restored with the weights)."""
    hostfile = write_hostfile(tmp_path / "hostfile", ["localhost slots=1"])
    run_dir = tmp_path / "run"
    args = overrides(setup, run_dir)
    log = kill_after_step3_and_resume(hostfile, args, run_dir, tmp_path, STEPS)
    assert f"resumed from {run_dir / 'step_000003'} at step 3" in log
    assert train_losses(run_dir) == train_losses(reference)  # exact equality, every step
