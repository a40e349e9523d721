"""Training pieces without a launcher: optimizer groups, crash-safe checkpoint bookkeeping, metrics sinks, CLI
errors; plus ZeRO-3 model building, the NaN policy and compilation on real runs (marked slow). The config tests,
which need no DeepSpeed, are in tests/test_train_config.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model import ModelConfig, Transformer
from pretrain import checkpoint, metrics
from pretrain.config import TrainConfig
from pretrain.train import AdamW, main, param_groups
from fixtures_train import REPO, TINY_RUN, env, free_port, prepare_sample_data
from fixtures_time import limit


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    """The shipped sample corpus, tokenized with a tokenizer trained on it (a few seconds)."""
    return prepare_sample_data(tmp_path_factory.mktemp("train_unit"))


# ---------------------------------------------------------------------------------------------------------------
# Optimizer


@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_exempt_norms_and_embeddings(tie):
    model = Transformer(ModelConfig.from_preset("debug", tie_embeddings=tie))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & exempt and decayed | exempt == set(names.values())
    params = dict(model.named_parameters())
    matrices = {n for n, p in params.items() if p.ndim >= 2} - {"tok_embeddings.weight"}
    assert "tok_embeddings.weight" in exempt and {n for n, p in params.items() if p.ndim == 1} <= exempt
    assert decayed == matrices and len(matrices) >= 2 * 3  # the attention and MLP matrices of both layers
    assert ("output.weight" in decayed) == (not tie)
    everything = param_groups(model, 0.1, decay_all=True)
    assert len(everything[0]["params"]) == len(names) and not everything[1]["params"]


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_zero3_builds_the_model_already_partitioned(tie):
    """Two ranks build the debug model under deepspeed.zero.Init: each holds half of every tensor, the gathered
    tensors equal the model built whole from the same seed (init happens before partitioning), and the AdamW
    groups see the full shapes."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "zero3_init_worker.py"), "tie" if tie else "untied"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=limit(300))
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for res in results:
        assert res["equal"] and all(res["equal"].values()), res["equal"]
        assert all(n == 0 for n in res["local"].values())  # no rank keeps a whole tensor
        assert res["groups"] == res["whole_groups"]
    for name, part in results[0]["held"].items():  # an even tensor split in two halves: each rank holds 1/2
        assert part + results[1]["held"][name] == pytest.approx(1.0, abs=0.01) and part == pytest.approx(0.5, abs=0.01)
    assert ("output.weight" in results[0]["equal"]) == (not tie)


def test_model_from_scratch_from_hf_and_when_resuming(sample_data, tmp_path):
    from pretrain.train import build_model
    from tokenizer import Tokenizer

    tok = Tokenizer(sample_data / "tokenizer.model")
    scratch = build_model(TrainConfig(run_dir=str(tmp_path / "run")), tok, resuming=False)
    assert scratch.config.vocab_size == tok.vocab_size == 1024  # follows the tokenizer unless given

    # Continued pretraining: the weights (and architecture) of a Hugging Face LLaMA folder.
    torch.manual_seed(1)
    source = Transformer(ModelConfig.from_preset("debug", vocab_size=1024, dim=96, n_heads=6, n_kv_heads=2))
    source.to_hf(tmp_path / "hf")
    model = build_model(TrainConfig(init_from_hf=str(tmp_path / "hf"), activation_checkpointing=True), tok, False)
    assert model.config.dim == 96 and model.config.activation_checkpointing
    assert model.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    Transformer(ModelConfig.from_preset("debug", vocab_size=512)).to_hf(tmp_path / "small")
    with pytest.raises(ValueError, match="has 1024 tokens but the model's vocab_size is 512"):
        build_model(TrainConfig(init_from_hf=str(tmp_path / "small")), tok, resuming=False)

    # Resuming keeps the run's own architecture; asking for another one is an error, not a silent mismatch.
    (tmp_path / "run").mkdir()
    scratch.config.save(tmp_path / "run" / "model_config.json")
    resumed = build_model(TrainConfig(run_dir=str(tmp_path / "run"), activation_checkpointing=True), tok, True)
    assert resumed.config.dim == 64 and resumed.config.activation_checkpointing  # runtime switches may change
    with pytest.raises(ValueError, match=r"holds a run of a different model \(dim 64 -> 128\)"):
        build_model(TrainConfig(run_dir=str(tmp_path / "run"), model={"dim": 128}), tok, resuming=True)


def test_skipped_step_leaves_weights_and_adam_state_alone():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    opt = AdamW(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in layer.parameters()]
    opt.skip_step = True
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters())) and not opt.state
    opt.skip_step = False
    opt.step()
    assert not torch.equal(before[0], layer.weight) and opt.state


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint bookkeeping (a stand-in engine: the real DeepSpeed save/load runs in test_train_launch.py)


class FakeEngine:
    """Writes a checkpoint directory like DeepSpeed does; can be told to die half-way."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours to move
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half" if self.crash else b"full")
        if self.crash:
            raise OSError("disk full")
        (Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"full")


def test_crash_during_save_keeps_latest_on_the_previous_checkpoint(tmp_path):
    for step in (10, 20, 30):
        assert checkpoint.save_checkpoint(FakeEngine(), tmp_path, step, {}, keep_last=2) == f"step_{step:06d}"
    assert checkpoint.list_checkpoints(tmp_path) == ["step_000020", "step_000030"]  # keep_last
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(FakeEngine(crash=True), tmp_path, 40, {}, keep_last=2)
    assert checkpoint.latest_tag(tmp_path) == "step_000030"
    assert (tmp_path / "step_000030" / "mp_rank_00_model_states.pt").read_bytes() == b"full"
    assert checkpoint.resolve_tag(tmp_path, None) == "step_000030"
    # After the restart the next save replaces the torn directory and prunes as usual; directories of steps after
    # the one `latest` names (a crashed run's future) go too.
    (tmp_path / "step_000050").mkdir()
    checkpoint.save_checkpoint(FakeEngine(), tmp_path, 40, {}, keep_last=2)
    assert checkpoint.list_checkpoints(tmp_path) == ["step_000030", "step_000040"]
    assert not list(tmp_path.glob(".latest*"))  # no temp files left behind


def test_checkpoint_lookup_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        checkpoint.resolve_tag(tmp_path, None)
    checkpoint.save_checkpoint(FakeEngine(), tmp_path, 5, {}, keep_last=1)
    with pytest.raises(FileNotFoundError, match="no such checkpoint; available: step_000005"):
        checkpoint.resolve_tag(tmp_path, "step_000009")
    (tmp_path / "latest").write_text("step_000777")
    with pytest.raises(FileNotFoundError, match="names checkpoint 'step_000777'"):
        checkpoint.latest_tag(tmp_path)


class Unsafe:
    """Anything but tensors and plain containers: must not unpickle under weights_only loading."""


def test_weights_only_loading_refuses_arbitrary_pickles(tmp_path):
    torch.save({"x": torch.ones(2), "obj": Unsafe()}, tmp_path / "evil.pt")
    torch.save({"x": torch.ones(2), "meta": {"step": 3}}, tmp_path / "fine.pt")
    with checkpoint.weights_only_loading():
        with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
            torch.load(tmp_path / "evil.pt", weights_only=False)  # DeepSpeed passes False; it is overridden
        assert torch.load(tmp_path / "fine.pt", weights_only=False)["meta"] == {"step": 3}
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_logger_sinks_and_resume_truncation(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed: skipped, not a crash
    log = metrics.MetricsLogger(tmp_path, {}, enabled=True, start_step=0, max_steps=10, wandb_mode="offline")
    assert log.wandb is None
    for step in range(1, 7):
        log.log(step, {"loss": 5.0 - step * 0.5, "grad_norm": float("nan") if step == 3 else 1.0})
    log.log(4, {"val_loss": 3.5})
    log.close()
    rows = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 4]
    assert rows[2]["grad_norm"] is None  # NaN is written as null: strict JSON
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # Resuming from step 4 drops what a crashed run logged after it; those steps are trained again.
    log = metrics.MetricsLogger(tmp_path, {}, enabled=True, start_step=4, max_steps=10, wandb_mode="disabled",
                                tensorboard=False)
    log.log(5, {"loss": 9.0})
    log.close()
    assert [(r["step"], r.get("loss")) for r in metrics.read_metrics(tmp_path)] == \
        [(1, 4.5), (2, 4.0), (3, 3.5), (4, 3.0), (4, None), (5, 9.0)]


def test_disabled_logger_does_nothing(tmp_path):
    log = metrics.MetricsLogger(tmp_path, {}, enabled=False, start_step=0, max_steps=10)
    log.log(1, {"loss": 1.0})
    log.print("hidden")
    log.close()
    assert not any(tmp_path.iterdir())


def test_peak_flops_table():
    assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops("NVIDIA A800-SXM4-80GB") == 312e12
    assert metrics.peak_flops("NVIDIA L40S") == 362e12 and metrics.peak_flops("NVIDIA L40") == 181e12
    assert metrics.peak_flops("Some Future GPU") is None


# ---------------------------------------------------------------------------------------------------------------
# Command line: bad input is one line on stderr and a non-zero exit


def test_cli_errors_are_one_line(sample_data, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cases = [
        (["--config", str(tmp_path / "nope.yaml")], "nope.yaml: config file not found"),
        (["bogus=1"], "unknown config key 'bogus'"),
        ([f"data_dir={tmp_path}/missing"], "tokenizer.model: tokenizer not found; set tokenizer=PATH"),
        ([f"data_dir={tmp_path}", f"tokenizer={sample_data / 'tokenizer.model'}"], "manifest.json is missing"),
        ([f"data_dir={sample_data}"], "environment variable RANK is not set"),  # checked before any process group
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert str(exc.value).startswith("error: ") and message in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------------------------
# NaN policy on a real single-rank run (RANK/WORLD_SIZE set by hand: no launcher needed)

NAN_SCRIPT = """
import sys
import torch
import model.model
from pretrain import train

# Poison one micro batch of step 3 (micro-batch call 5 with 2 accumulation steps): its loss and gradients are NaN.
calls = [0]
forward = model.model.Transformer.forward
def poisoned(self, tokens, targets=None, **kwargs):
    out = forward(self, tokens, targets, **kwargs)
    if targets is not None and self.training:
        calls[0] += 1
        if calls[0] == 5:
            out = out * float("nan")
    return out
model.model.Transformer.forward = poisoned
train.main(sys.argv[1:])
"""


def run_poisoned(tmp_path: Path, data_dir: Path, *more: str) -> subprocess.CompletedProcess:
    script = tmp_path / "poisoned_train.py"
    script.write_text(NAN_SCRIPT)
    e = {**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port())}
    args = [*TINY_RUN, f"data_dir={data_dir}", f"run_dir={tmp_path / 'run'}", "max_steps=4", "save_interval=1",
            "keep_last=10", "eval_interval=0", *more]
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=limit(300))


@pytest.mark.slow
def test_nan_loss_is_skipped(sample_data, tmp_path):
    from artifacts.run_dir import consolidated_state_dict

    result = run_poisoned(tmp_path, sample_data, "nan_policy=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: non-finite loss, update skipped (1 skipped so far)" in result.stdout + result.stderr
    rows = {r["step"]: r for r in metrics.read_metrics(tmp_path / "run") if "loss" in r}
    assert rows[3]["loss"] is None and rows[3]["skipped_steps"] == 1
    assert math.isfinite(rows[4]["loss"]) and rows[4]["tokens"] == 3 * 4 * 32  # the skipped step's tokens don't count
    weights = {s: consolidated_state_dict(tmp_path / "run", f"step_{s:06d}") for s in (2, 3, 4)}
    for name in weights[2]:
        assert torch.equal(weights[2][name], weights[3][name]), f"{name} changed in the skipped step"
        assert torch.isfinite(weights[4][name]).all()
    assert any(not torch.equal(weights[3][n], weights[4][n]) for n in weights[3])  # training went on


@pytest.mark.slow
def test_nan_loss_stops_the_run_when_configured(sample_data, tmp_path):
    result = run_poisoned(tmp_path, sample_data, "nan_policy=stop")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss at step 3 (nan_policy=stop)")
    assert "Traceback" not in result.stderr
    assert checkpoint.latest_tag(tmp_path / "run") == "step_000002"
    config = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert config["nan_policy"] == "stop"


@pytest.mark.slow
def test_compiled_training_gives_the_same_losses(sample_data, tmp_path):
    """The compile switch goes through DeepSpeed's engine.compile and must not change the numbers."""
    losses = {}
    for flag in ("false", "true"):
        e = {**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(free_port())}
        run = tmp_path / f"run_{flag}"
        args = [*TINY_RUN, f"data_dir={sample_data}", f"run_dir={run}", "max_steps=2", "save_interval=2",
                "eval_interval=0", f"compile={flag}"]
        result = subprocess.run([sys.executable, "pretrain/train.py", *args], cwd=REPO, env=e, capture_output=True,
                                text=True, timeout=limit(400))
        assert result.returncode == 0, result.stderr[-3000:]
        losses[flag] = [r["loss"] for r in metrics.read_metrics(run) if "loss" in r]
    assert len(losses["true"]) == 2
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_save_final_false_writes_no_checkpoint(sample_data, tmp_path):
    """Throughput runs (benchmarks/gpu_check.sh) skip the final save: a 1B ZeRO checkpoint is ~17 GB."""
    e = {**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port())}
    run = tmp_path / "run"
    args = [*TINY_RUN, f"data_dir={sample_data}", f"run_dir={run}", "max_steps=2", "save_interval=0",
            "eval_interval=0", "save_final=false"]
    result = subprocess.run([sys.executable, "pretrain/train.py", *args], cwd=REPO, env=e, capture_output=True,
                            text=True, timeout=limit(300))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics.read_metrics(run) if "loss" in r] == [1, 2]
    assert not (run / "latest").exists() and not list(run.glob("step_*"))
