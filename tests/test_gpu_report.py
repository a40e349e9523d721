"""benchmarks/gpu_report.py, the helper of benchmarks/gpu_check.sh: curve comparison and the summary table."""
from __future__ import annotations

import argparse
import importlib.util
import json

from fixtures_train import REPO

spec = importlib.util.spec_from_file_location("gpu_report", REPO / "benchmarks" / "gpu_report.py")
gpu_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_report)


def write_run(path, losses, **extra):
    path.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": v, "tokens_per_sec": 1000.0, "memory_gib": 1.0, **extra}
            for i, v in enumerate(losses)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_curves_measure_the_gap_and_judge_the_settled_tail(tmp_path):
    write_run(tmp_path / "fp32", [7.0, 6.0, 5.0, 4.0, 3.0])
    write_run(tmp_path / "bf16", [7.0, 6.1, 5.0, 4.05, 3.05])
    write_run(tmp_path / "off", [7.0, 6.5, 6.0, 5.5, 5.0])
    ok = gpu_report.cmd_curves(argparse.Namespace(run=tmp_path / "bf16", ref=tmp_path / "fp32", data=None))
    assert ok["steps"] == 5 and abs(ok["max_abs_diff"] - 0.1) < 1e-9 and abs(ok["mean_abs_diff"] - 0.04) < 1e-9
    assert ok["follows"]
    bad = gpu_report.cmd_curves(argparse.Namespace(run=tmp_path / "off", ref=tmp_path / "fp32", data=None))
    assert not bad["follows"]


def test_summary_tables_from_a_work_dir(tmp_path):
    write_run(tmp_path / "train_1b_zero1", [3.0, 2.5], mfu=0.42)
    (tmp_path / "steps.tsv").write_text("tests\t0\t12\tpytest tests/test_gpu.py\nbench\t124\t300\tbench_model.py\n")
    (tmp_path / "bench_1b_b1.json").write_text(json.dumps({
        "batch": 1, "seq_len": 4096, "sdpa_backend": "auto",
        "runs": {"ours": {"tokens_per_s": 50000.0, "step_ms": 82.0, "tflops": 385.0, "mfu": 0.389,
                          "max_memory_gib": 30.0, "breakdown_ms": {"gemm": 50.0, "attention": 20.0, "other": 12.5}}}}))
    out = tmp_path / "summary.md"
    gpu_report.cmd_summary(argparse.Namespace(work=tmp_path, out=out))
    text = out.read_text()
    assert "| tests | ok | 12 |" in text and "| bench | **124** (timeout) | 300 |" in text
    assert "| 1b_b1 | ours | 1 x 4096 | auto | 50,000 | 82 | 385 | 38.9% | 30.0 | 50.0 / 20.0 / 12.5 |" in text
    assert "| 1b_zero1 | 2 | 2.5000 | 1,000 | 42.0% | 1.0 |" in text
