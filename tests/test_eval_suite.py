"""The evaluators run as files, modules and console scripts; the suite runs several benchmarks in one process."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation import runner, suite
from fixtures_eval import write_gsm8k_dir, write_suite_root
from fixtures_time import limit

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["evaluate_zh", "evaluate_mmlu", "evaluate_cmmlu", "evaluate_gaokao", "evaluate_agieval",
            "evaluate_gsm8k", "evaluate_humaneval", "suite"]


def console_scripts() -> dict[str, str]:
    """module -> script name of setup.py's evaluation entry points."""
    text = (REPO / "setup.py").read_text()
    return {m: name for name, m in re.findall(r'"([\w-]+)=evaluation\.(\w+):main"', text)}


def bare_env() -> dict[str, str]:
    """The environment without PYTHONPATH, so that nothing but the command itself puts the repository on the path."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env or bare_env(), capture_output=True, text=True, timeout=limit(120))


def test_every_evaluator_has_a_console_script():
    scripts = console_scripts()
    missing = [m for m in COMMANDS if m not in scripts]
    assert not missing, f"setup.py lacks console scripts for {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("module", COMMANDS)
def test_runs_as_file_module_and_script(module, tmp_path):
    ways = {
        "file from the root": ([sys.executable, f"evaluation/{module}.py", "--help"], REPO, None),
        "file from evaluation/": ([sys.executable, f"{module}.py", "--help"], REPO / "evaluation", None),
        "module": ([sys.executable, "-m", f"evaluation.{module}", "--help"], REPO, None),
        # what the installed console script runs: import the entry point and call it, from elsewhere
        "console script": ([sys.executable, "-c", f"import sys; from evaluation.{module} import main; "
                            "sys.argv[0] = 'script'; sys.exit(main())", "--help"], tmp_path,
                           {**bare_env(), "PYTHONPATH": str(REPO)}),
    }
    for way, (cmd, cwd, env) in ways.items():
        proc = run(cmd, cwd, env)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (way, proc.stderr[-2000:])


@pytest.mark.slow
def test_a_real_run_by_file_path_from_inside_evaluation(tmp_path):
    data = write_gsm8k_dir(tmp_path / "g", n_test=2)
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"reply": "The answer is 1."}\n{"reply": "nothing"}\n')
    proc = run([sys.executable, "evaluate_gsm8k.py", "--samples", str(samples), "--data_dir", str(data),
                "--output_dir", str(tmp_path / "o")], REPO / "evaluation")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["count"] == 2
    bad = run([sys.executable, "evaluate_gsm8k.py", "--samples", str(tmp_path / "none.jsonl"), "--data_dir",
               str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o2")], REPO / "evaluation")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "nowhere" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_suite_runs_once_and_skips_finished(eval_assets, tmp_path, monkeypatch, capsys):
    root = write_suite_root(tmp_path / "data")
    out = tmp_path / "out"
    opened = []
    real_open = runner.open_from_args

    def counting_open(args):
        opened.append(args.model)
        return real_open(args)

    monkeypatch.setattr(runner, "open_from_args", counting_open)
    argv = ["--model", str(eval_assets["model"]), "--data_root", str(root), "--output_dir", str(out),
            "--max_new_tokens", "12", "--benchmarks", ",".join(suite.BENCHMARKS)]
    suite.main(argv)
    assert len(opened) == 1  # the model opened once for all seven
    table = json.loads((out / "results.json").read_text())
    names = [r["benchmark"] for r in table["rows"]]
    assert names == ["C-Eval", "MMLU", "CMMLU", "GAOKAO-Bench", "GAOKAO-English", "AGIEval", "GSM8K", "HumanEval"]
    each = {b: json.loads((out / b / "results.json").read_text()) for b in suite.BENCHMARKS}
    scores = {r["benchmark"]: r["score"] for r in table["rows"]}
    assert scores["C-Eval"] == each["ceval"]["overall"]["accuracy"]
    assert scores["GAOKAO-English"] == each["gaokao"]["groups"]["GAOKAO-English"]["accuracy"]
    assert scores["GSM8K"] == each["gsm8k"]["accuracy"]
    assert scores["HumanEval"] == each["humaneval"]["pass_at_k"]["pass@1"]
    md = (out / "results.md").read_text()
    assert "| Benchmark | Setting | Score |" in md and "| GSM8K | 4-shot |" in md and "| HumanEval | 0-shot |" in md

    # A rerun with the same settings runs nothing (and opens no model).
    capsys.readouterr()
    mtimes = {b: (out / b / "results.json").stat().st_mtime_ns for b in suite.BENCHMARKS}
    suite.main(argv)
    assert len(opened) == 1
    assert {b: (out / b / "results.json").stat().st_mtime_ns for b in suite.BENCHMARKS} == mtimes
    assert capsys.readouterr().out.count("finished earlier with the same settings") == 7
    assert json.loads((out / "results.json").read_text()) == table

    # Changing a setting reruns only the benchmarks it applies to.
    suite.main(argv + ["--limit", "2"])
    assert len(opened) == 2
    assert json.loads((out / "gsm8k" / "results.json").read_text())["count"] == 2
    assert (out / "mmlu" / "results.json").stat().st_mtime_ns == mtimes["mmlu"]

    # A model rewritten in place is a different setting: everything runs again.
    config = eval_assets["model"] / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000))
    suite.main(argv + ["--limit", "2", "--benchmarks", "mmlu"])
    assert len(opened) == 3 and (out / "mmlu" / "results.json").stat().st_mtime_ns != mtimes["mmlu"]


def test_suite_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        suite.main(["--model", "m", "--benchmarks", "mmlu,nope", "--data_root", str(tmp_path)])
    assert "unknown nope" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        suite.main(["--model", "m", "--benchmarks", "mmlu", "--data_root", str(tmp_path)])
    assert f"{tmp_path / 'mmlu'}: benchmark data folder not found" in capsys.readouterr().err.strip().splitlines()[-1]
