"""The shared layer (common/: atomic writes, the overwrite rule, CLI conventions), the launch preflight, and what
the unit tests may import."""
from __future__ import annotations

import dataclasses
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from common import cli, reflect
from common.errors import MissingFileError, UserError
from common.io import atomic_dir, atomic_write, check_output_dir, write_json
from fixtures_time import limit
from pretrain import preflight
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def run_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# ---------------------------------------------------------------------------------------------------------------
# common.io


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.json"
    write_json(path, {"a": "中文"})
    assert path.read_text(encoding="utf-8") == '{\n  "a": "中文"\n}\n'
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half")
            raise RuntimeError("crash while writing")
    assert path.read_text(encoding="utf-8").startswith('{\n  "a"')  # the old content, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary left behind


def test_atomic_dir_gives_normal_permissions_and_obeys_the_overwrite_rule(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "hf"
        with atomic_dir(out) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)  # what a temporary file would have
        assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "sub").stat().st_mode) == 0o755
        assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
        with pytest.raises(ValueError, match="pass --overwrite"):
            with atomic_dir(out):
                pass
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new").write_text("n")
        assert sorted(p.name for p in out.iterdir()) == ["new"]
        with pytest.raises(RuntimeError):
            with atomic_dir(out, overwrite=True) as tmp:
                (tmp / "half").write_text("h")
                raise RuntimeError("crash")
        assert sorted(p.name for p in out.iterdir()) == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    finally:
        os.umask(old)


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "new", False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="full already exists and is not empty; pass --overwrite"):
        check_output_dir(tmp_path / "full", False)
    check_output_dir(tmp_path / "full", True)
    with pytest.raises(ValueError, match="is not a folder"):
        check_output_dir(tmp_path / "full" / "x", True)


# ---------------------------------------------------------------------------------------------------------------
# common.cli


@dataclasses.dataclass
class Example:
    inputs: list[str]
    """Files to read."""
    name: str = "x"
    """A name."""
    flag: bool = True
    """On by default."""
    mode: Literal["a", "b"] = "a"
    """One of two."""
    limit: int | None = None
    """No limit when unset."""


def test_flags_generated_from_a_dataclass():
    p = cli.parser("prog", "test")
    reflect.add_dataclass_args(p, Example, required=("inputs",), rename={"inputs": "input"})
    args = p.parse_args(["--input", "a", "b", "--no_flag", "--mode", "b", "--limit", "3"])
    assert reflect.dataclass_from_args(Example, args) == Example(["a", "b"], "x", False, "b", 3)
    assert reflect.dataclass_from_args(Example, p.parse_args(["--input", "a"])) == Example(["a"])
    help_text = p.format_help()
    assert "Files to read." in help_text and "On by default. (default: True)" in help_text
    assert "(default: x)" in help_text and "--flag, --no_flag" in help_text
    with pytest.raises(SystemExit):
        p.parse_args(["--input", "a", "--mode", "c"])


def test_expected_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    # Only the user-error type is "expected" (issue 20): the same file-not-found is one line when raised as the
    # user's mistake, and keeps its traceback when raised by Python itself (it may be a bug or a transient failure).
    @cli.entry_point
    def bad_input() -> None:
        raise MissingFileError("data/x: no such file; pass --data_dir")

    with pytest.raises(SystemExit) as e:
        bad_input()
    # The line goes to stderr once, the status is 1, and the exception's text is the line (for callers that catch it).
    assert e.value.code == 1 and str(e.value) == "error: data/x: no such file; pass --data_dir"
    assert capsys.readouterr().err == "error: data/x: no such file; pass --data_dir\n"
    code = ("from common import cli\nfrom common.errors import MissingFileError\n"
            "def user(): raise MissingFileError('missing/file: No such file or directory')\ncli.run_main(user)")
    result = subprocess.run([sys.executable, "-c", code],
                            capture_output=True, text=True, cwd=REPO, env=run_env(), timeout=limit(60))
    assert result.returncode == 1 and result.stderr == "error: missing/file: No such file or directory\n"
    result = subprocess.run([sys.executable, "-c", "from common import cli\ncli.run_main(open, 'missing/file')"],
                            capture_output=True, text=True, cwd=REPO, env=run_env(), timeout=limit(60))
    assert result.returncode == 1 and "Traceback" in result.stderr and "FileNotFoundError" in result.stderr

    @cli.entry_point
    def bug() -> None:
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        bug()
    for error in (KeyError("a bug"), ValueError("a bug"), OSError(28, "No space left on device")):
        @cli.entry_point
        def failing() -> None:
            raise error

        with pytest.raises(type(error)):
            failing()
    with pytest.raises(SystemExit) as e:
        cli.fail("stop", 2)
    assert e.value.code == 2 and str(e.value) == "error: stop" and capsys.readouterr().err == "error: stop\n"


def test_help_shows_every_default_once():
    p = cli.parser("prog", "test")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--name", help="a name")
    text = " ".join(p.format_help().split())
    assert "--top_k TOP_K (default: None)" in text and "--port PORT (default: 8000)" in text
    assert "checkpoint tag (default: latest)" in text and "(default: latest) (default" not in text
    assert "a name (default: None)" in text and text.count("(default:") == 4


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 3
    """Steps."""
    rate: float = 0.1
    """Rate."""
    mode: Literal["fast", "exact"] = "fast"
    """Mode."""
    names: list[str] = dataclasses.field(default_factory=list)
    """Names."""
    tag: str | None = None
    """Tag."""


@dataclasses.dataclass(frozen=True)
@reflect.with_defaults(steps=10, names=["a"])
class MoreSettings(Settings):
    extra: bool = False
    """Extra."""


def test_one_reflection_layer_for_config_values_and_flags():
    for value, annotation, expected in [("1e3", int, 1000), (5.0, int, 5), ("3e-4", float, 3e-4), ("on", bool, True),
                                        ("a, b", list[str], ["a", "b"]), ("null", str | None, None), (7, str, "7"),
                                        ("exact", Literal["fast", "exact"], "exact")]:
        assert reflect.coerce("key", value, annotation) == expected
    for value, annotation, message in [("two", int, "key: expected int, got 'two'"), (True, int, "key: expected int, got True"),
                                       (1.5, int, "expected int"), (True, str, "expected str"),
                                       ("slow", Literal["fast", "exact"], "key must be one of fast, exact, got 'slow'")]:
        with pytest.raises(UserError, match=message):
            reflect.coerce("key", value, annotation)
    # Flags go through the same checks, and a subclass changes defaults without declaring the fields again.
    p = cli.parser("prog", "test")
    reflect.add_dataclass_args(p, MoreSettings)
    assert reflect.dataclass_from_args(MoreSettings, p.parse_args([])) == MoreSettings(10, 0.1, "fast", ["a"])
    args = p.parse_args(["--steps", "2e3", "--mode", "exact", "--names", "x", "y", "--tag", "t", "--extra"])
    assert reflect.dataclass_from_args(MoreSettings, args) == MoreSettings(2000, 0.1, "exact", ["x", "y"], "t", True)
    assert "Steps. (default: 10)" in " ".join(p.format_help().split())
    assert reflect.field_types(MoreSettings)["steps"] is int and reflect.field_help(MoreSettings)["steps"] == "Steps."
    for bad in (["--steps", "x"], ["--mode", "slow"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MoreSettings().steps = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------
# The launch preflight (scripts/train.sh runs it before DeepSpeed's launcher)


def test_hostfile_errors_name_file_line_and_fix(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nnode-1 slots=8\n\nlocalhost slots=abc\n")
    with pytest.raises(ValueError, match=r"hosts, line 4: 'localhost slots=abc' is not '<host> slots=<n>'"):
        preflight.read_hostfile(hostfile)
    hostfile.write_text("node-1 slots=8\nnode-1 slots=8\n")
    with pytest.raises(ValueError, match="line 2: host 'node-1' is listed twice"):
        preflight.read_hostfile(hostfile)
    hostfile.write_text("node-1 slots=8\nnode-2 slots=4\n")
    hosts = preflight.read_hostfile(hostfile)
    assert preflight.world_size(hosts) == (2, 12)
    assert preflight.world_size(hosts, num_nodes=1) == (1, 8)
    assert preflight.world_size(hosts, num_gpus=2) == (2, 4)
    with pytest.raises(ValueError, match="--num_nodes 3 but the hostfile lists only 2"):
        preflight.world_size(hosts, num_nodes=3)


def run_preflight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.preflight", *args], capture_output=True, text=True,
                          cwd=REPO, env=run_env(), timeout=limit(120))


@pytest.mark.slow  # ~10 s: three preflight processes (scripts/test.sh --fast skips it)
def test_preflight_batch_arithmetic_port_and_data(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n")
    ok = run_preflight("--config", "config/debug.yaml", "--hostfile", str(hostfile), f"data_dir={tmp_path}/none")
    assert ok.returncode == 0, ok.stderr
    values = dict(line.split("=", 1) for line in ok.stdout.split())
    assert values["WORLD_SIZE"] == "1" and int(values["MASTER_PORT"]) > 0  # a free port chosen: none was named

    bad = run_preflight("--config", "config/debug.yaml", "--hostfile", str(hostfile), "--num_gpus", "3")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: global_batch_size (8) must be divisible by micro_batch_size (4) x world size (3) = 12; change one "
        f"of them (world size 3: 1 node(s) of {hostfile} x --num_gpus 3)"]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_preflight("--config", "config/debug.yaml", "--hostfile", str(hostfile), "--master_port", str(port))
    assert busy.returncode == 1 and busy.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use (another job?); pass a free one with --master_port PORT"]


def test_preflight_finds_data_of_another_tokenizer(tmp_path):
    """A manifest made with another tokenizer is refused before launching (the loader's own check)."""
    import numpy as np
    from fixtures_data import train_tiny_tokenizer, write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, {"train": [np.arange(5, 40)] * 4}, vocab_size=512)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n")
    tok = train_tiny_tokenizer(tmp_path / "tok")
    result = run_preflight("--config", "config/debug.yaml", "--hostfile", str(hostfile), f"data_dir={data}",
                           f"tokenizer={tok}")
    assert result.returncode == 1 and "the data was tokenized with a different tokenizer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_preflight_finds_a_truncated_shard_of_any_split(tmp_path):
    """Shard sizes are compared with the manifest before launching: a truncated val shard is one line naming it."""
    import numpy as np
    from fixtures_data import train_tiny_tokenizer, write_synthetic

    from pretrain.config import TrainConfig

    tok = train_tiny_tokenizer(tmp_path / "tok")
    data = write_synthetic(tmp_path / "data", {"train": [np.arange(5, 40)] * 4, "val": [np.arange(5, 40)] * 4},
                           vocab_size=512, tokenizer_sha256=Tokenizer(tok).sha256)
    cfg = TrainConfig(data_dir=str(data), tokenizer=str(tok), model={"vocab_size": 512})
    preflight.check_data(cfg)
    shard = data / "val_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(UserError, match=r"val_00000\.bin is truncated or corrupt \(\d+ bytes, expected \d+\); rerun "
                                        "the prepare_data command"):
        preflight.check_data(cfg)


def run_train_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/train.sh", *args], capture_output=True, text=True, cwd=REPO,
                          env={**run_env(), "LLAMA_PYTHON": sys.executable}, timeout=limit(120))


@pytest.mark.slow  # ~7 s: two launcher runs (scripts/test.sh --fast skips it)
def test_train_sh_stops_before_launching_on_what_it_can_check(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=abc\n")
    result = run_train_sh("--hostfile", str(hostfile), f"run_dir={tmp_path}/run")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {hostfile}, line 1: 'localhost slots=abc' is not '<host> slots=<n>' with n a positive number of "
        "processes, e.g. 'localhost slots=1'"]
    # Only the embedded default falls back to the sample corpus: a mistyped data_dir is an error.
    result = run_train_sh(f"data_dir={tmp_path}/mistyped", f"run_dir={tmp_path}/run")
    assert result.returncode == 2 and "mistyped holds no prepared data (no manifest.json): is data_dir right?" \
        in result.stderr
    assert "training a" not in result.stdout and not (tmp_path / "tokenizer").exists()
    assert not (tmp_path / "run").exists()


def launch_stage_with(tmp_path: Path, rank_code: str) -> subprocess.CompletedProcess:
    """scripts/launch.sh's launch_stage with a stand-in launcher: `rank_code` is the Python a rank runs, after the
    launcher's own noise on stderr (DeepSpeed's sigkill_handler line)."""
    rank = tmp_path / "rank.py"
    rank.write_text("import os, sys\n" + rank_code)
    launcher = tmp_path / "python"
    launcher.write_text("#!/bin/bash\n"  # "$PYTHON -m deepspeed.launcher.runner ... SCRIPT --config ...": run SCRIPT
                        f'for a in "$@"; do [[ "$a" == *.py ]] && script="$a"; done\n'
                        f'{sys.executable} "$script"; status=$?\n'
                        'echo "[ERROR] [launch.py:325:sigkill_handler] [\'python\', \'-u\'] exits with return code = '
                        '$status" >&2\nexit $status\n')
    launcher.chmod(0o755)
    script = (f'source scripts/launch.sh; PYTHON={launcher}; CONFIG=c.yaml; CHECKED="MASTER_PORT=1"; '
              f'launch_stage pretraining {rank} {tmp_path / "run"}')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, env=run_env(),
                          timeout=limit(60))


def test_a_ranks_user_error_is_the_last_line_and_other_failures_are_resumable(tmp_path):
    result = launch_stage_with(tmp_path, "from common import cli\n"
                               "open(os.environ['LLAMA_ERROR_FILE'], 'w').write('error: c.yaml: bad lr\\n')\n"
                               "print('error: c.yaml: bad lr', file=sys.stderr)\nsys.exit(2)\n")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1] == "error: c.yaml: bad lr", result.stderr
    assert "sigkill_handler" in result.stderr and "fix it first" in lines[-2]
    # Any other failure (a full disk, a bug: exit 1 with a traceback) is called resumable.
    result = launch_stage_with(tmp_path, "raise OSError(28, 'No space left on device')\n")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "run the same command again to resume" in result.stderr.strip().splitlines()[-1]


def test_launched_main_exit_status_user_error_or_resumable(tmp_path, monkeypatch, capsys):
    from pretrain.train import USER_ERROR, launched_main

    error_file = tmp_path / "error.txt"
    monkeypatch.setenv("LLAMA_ERROR_FILE", str(error_file))

    def user_error(path, overrides):
        raise UserError("c.yaml: lr: expected float, got 'x'")

    with pytest.raises(SystemExit) as e:
        launched_main([], "prog", None, "lr=1", user_error)
    assert e.value.code == USER_ERROR and error_file.read_text() == "error: c.yaml: lr: expected float, got 'x'\n"
    assert capsys.readouterr().err == "error: c.yaml: lr: expected float, got 'x'\n"
    for transient in (OSError(28, "No space left on device"), ConnectionResetError("peer"), KeyError("bug")):
        def fails(path, overrides, error=transient):
            raise error

        with pytest.raises(type(transient)):  # its traceback, exit status 1: scripts/launch.sh says resume
            launched_main([], "prog", None, "lr=1", fails)


def test_run_sh_runs_later_commands_in_the_scripts_environment(tmp_path):
    """scripts/run.sh (the README's way to run `python -m ...` after the quick start): the interpreter scripts/env.sh
    chooses, the repository importable from any folder, the command's exit status passed through."""
    e = {k: v for k, v in run_env().items() if k != "PYTHONPATH"}  # the wrapper itself must make the repo importable
    e["LLAMA_PYTHON"] = sys.executable

    def run_sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "scripts" / "run.sh"), *args], capture_output=True, text=True,
                              cwd=tmp_path, env=e, timeout=limit(120))

    result = run_sh("python", "-c", "import sys, common; print(sys.executable); print(common.__file__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [sys.executable, str(REPO / "common" / "__init__.py")]
    result = run_sh("python", "-m", "inference.generate", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m inference.generate"), result.stderr
    assert run_sh("python3", "-c", "raise SystemExit(3)").returncode == 3
    result = run_sh()
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: no command given; e.g. scripts/run.sh python -m inference.chat --model DIR (see --help)"]


@pytest.mark.slow  # ~15 s: several launcher runs (scripts/test.sh --fast skips it)
def test_finetune_sh_shares_the_launcher_and_its_preflight(tmp_path):
    """scripts/finetune.sh goes through scripts/launch.sh: the same options and help, finetune.preflight's checks
    in one line with exit 2, before anything is launched or pretrained."""
    def finetune_sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/finetune.sh", *args], capture_output=True, text=True, cwd=REPO,
                              env={**run_env(), "LLAMA_PYTHON": sys.executable}, timeout=limit(120))

    help_text = finetune_sh("--help").stdout
    assert "--master_port PORT" in help_text and "Instruction fine-tuning end to end" in help_text
    result = finetune_sh("--bogus")
    assert result.returncode == 2 and result.stderr.strip() == "error: unknown option --bogus (see " \
        "scripts/finetune.sh --help)"
    for args, message in [([f"model_path={tmp_path}/none"], f"model_path {tmp_path}/none: neither a Hugging Face"),
                          (["--num_gpus", "3"], "global_batch_size (8) must be divisible by micro_batch_size (4) x "
                                                "world size (3)"),
                          (["finetuning_type=lora", f"init_adapter={tmp_path}"], "no adapter_config.json"),
                          ([f"data_files=[{tmp_path}/x.json]"], "x.json: instruction file not found")]:
        result = finetune_sh(f"run_dir={tmp_path}/run", *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists() and "pretraining" not in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Imports: model/ depends on nothing above it, and unit tests that do not need DeepSpeed do not import it


def test_modules_without_deepspeed_do_not_import_it():
    modules = ["artifacts", "common.cli", "common.io", "common.reflect", "common.tensors", "evaluation.evaluate_mmlu",
               "evaluation.evaluate_zh", "inference.generate", "model", "pretrain.config", "pretrain.data",
               "pretrain.export", "pretrain.metrics", "pretrain.prepare_data", "pretrain.preflight", "pretrain.shards",
               "finetune.preflight", "tokenizer.stats", "tokenizer.train"]
    code = f"import sys\nimport {', '.join(modules)}\nprint('deepspeed' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=run_env(),
                            timeout=limit(120))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_unit_test_modules_do_not_import_deepspeed():
    """Only the tests of the training engine (test_train, test_export, test_train_launch) need DeepSpeed. A module
    that skips itself on import (an optional package or program missing: pytest.importorskip) is imported as far as
    it goes, as pytest would."""
    modules = sorted(p.stem for p in (REPO / "tests").glob("test_*.py")
                     if p.stem not in ("test_train", "test_export", "test_train_launch"))
    code = (f"import importlib, sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\nimport pytest, conftest\n"
            f"for name in {modules!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except pytest.skip.Exception:\n"
            "        pass\n"
            "print('deepspeed' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=run_env(),
                            timeout=limit(300))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_model_package_imports_nothing_above_it():
    code = ("import sys, model, model.hf\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'artifacts', 'pretrain', 'evaluation', "
            "'inference', 'deepspeed', 'tokenizer'}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=run_env(),
                            timeout=limit(120))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
