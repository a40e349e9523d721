"""The evaluation CLIs end to end on a tiny random model: output files and formats, grouping, bad input."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation import evaluate_mmlu, evaluate_zh
from fixtures_time import limit
from model import Transformer

REPO = Path(__file__).resolve().parent.parent
KEYS = {"subject", "index", "prediction", "answer", "probs"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def csv_answers(path: Path, header: bool) -> list[str | None]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if header:
        col = rows[0].index("answer") if "answer" in rows[0] else None
        return [None if col is None else r[col] for r in rows[1:]]
    return [r[5] for r in rows]


def run_mmlu(assets, out, *extra):
    evaluate_mmlu.main(["--model_name_or_path", str(assets["model"]), "--data_dir", str(assets["mmlu"]),
                        "--output_dir", str(out), "--subjects", "abstract_algebra", "anatomy",
                        "high_school_european_history", "--batch_size", "4", *extra])


def test_mmlu_end_to_end(eval_assets, tmp_path, capsys):
    run_mmlu(eval_assets, tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    preds = read_jsonl(tmp_path / "out" / "predictions.jsonl")

    by_subject: dict[str, list[dict]] = {}
    for p in preds:
        assert set(p) == KEYS and p["prediction"] in "ABCD" and len(p["probs"]) == 4
        assert abs(sum(p["probs"]) - 1) < 1e-4
        assert p["prediction"] == "ABCD"[max(range(4), key=lambda i: p["probs"][i])]
        by_subject.setdefault(p["subject"], []).append(p)
    assert list(by_subject) == ["abstract_algebra", "anatomy", "high_school_european_history"]
    for subject, rows in by_subject.items():
        answers = csv_answers(eval_assets["mmlu"] / "test" / f"{subject}_test.csv", header=False)
        assert [p["index"] for p in rows] == list(range(len(answers)))
        assert [p["answer"] for p in rows] == answers
        correct = sum(p["prediction"] == p["answer"] for p in rows)
        assert results["subjects"][subject] == {"accuracy": pytest.approx(100 * correct / len(rows)),
                                                "count": len(rows), "correct": correct, "shots": 5,
                                                "shots_dropped": 0, "truncated": 0}

    subj = results["subjects"]
    total = sum(s["count"] for s in subj.values())
    weighted = 100 * sum(s["correct"] for s in subj.values()) / total
    macro = sum(s["accuracy"] for s in subj.values()) / 3
    assert results["overall"] == {"accuracy": pytest.approx(weighted), "weighted_accuracy": pytest.approx(weighted),
                                  "macro_accuracy": pytest.approx(macro), "count": total, "num_subjects": 3}
    assert results["benchmark"] == "mmlu" and results["headline"] == "weighted" and results["complete"] is False
    assert list(results["categories"]) == ["STEM", "humanities", "other (business, health, misc.)"]
    assert results["categories"]["humanities"]["accuracy"] == subj["high_school_european_history"]["accuracy"]
    assert set(results["subcategories"]) == {"math", "history", "health"}
    assert results["settings"]["answer_tokens"] == ["▁A", "▁B", "▁C", "▁D"] and results["settings"]["bos"]
    out = capsys.readouterr().out
    assert "question-weighted" in out and "high_school_european_history" in out

    # The plain one-prompt-at-a-time path gives the same predictions.
    run_mmlu(eval_assets, tmp_path / "plain", "--no_prefix_cache")
    plain = read_jsonl(tmp_path / "plain" / "predictions.jsonl")
    assert [p["prediction"] for p in plain] == [p["prediction"] for p in preds]
    assert max(abs(a - b) for p, q in zip(plain, preds) for a, b in zip(p["probs"], q["probs"])) < 1e-5


def test_mmlu_shots_dropped_are_counted(eval_assets, tmp_path, capsys):
    run_mmlu(eval_assets, tmp_path / "out", "--max_length", "300")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for r in results["subjects"].values():
        assert r["shots_dropped"] == r["count"] and r["truncated"] == 0
    assert results["settings"]["max_length"] == 300
    # What was used, not what was asked for, and said on the console too.
    assert results["shots_requested"] == 5 and results["shots"] != 5
    used = results["shots"] if isinstance(results["shots"], int) else results["shots"]["max"]
    assert used < 5
    err = capsys.readouterr().err
    assert all(f"warning: {s}: {r['count']} of {r['count']} prompts dropped shots" in err
               for s, r in results["subjects"].items())


def test_existing_output_dir_needs_overwrite(eval_assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    expect_error(["--model", str(eval_assets["model"]), "--data_dir", str(eval_assets["mmlu"]),
                  "--output_dir", str(out), "--subjects", "anatomy"], "pass --overwrite")
    assert (out / "results.json").read_text() == "{}"
    evaluate_mmlu.main(["--model", str(eval_assets["model"]), "--data_dir", str(eval_assets["mmlu"]),
                        "--output_dir", str(out), "--subjects", "anatomy", "--overwrite"])
    assert json.loads((out / "results.json").read_text())["subjects"]["anatomy"]["count"] == 8


def run_ceval(assets, out, split):
    evaluate_zh.main(["--model_name_or_path", str(assets["model"]), "--data_dir", str(assets["ceval"]),
                      "--output_dir", str(out), "--split", split,
                      "--subjects", "advanced_mathematics", "law", "accountant"])


def test_ceval_val_scores_subject_average_and_hard(eval_assets, tmp_path):
    run_ceval(eval_assets, tmp_path / "val", "val")
    results = json.loads((tmp_path / "val" / "results.json").read_text())
    subj = results["subjects"]
    macro = sum(s["accuracy"] for s in subj.values()) / 3
    assert results["headline"] == "macro" and results["overall"]["accuracy"] == pytest.approx(macro)
    assert list(results["categories"]) == ["STEM", "Humanities", "Other"]
    assert results["subsets"]["Hard"]["accuracy"] == subj["advanced_mathematics"]["accuracy"]
    assert results["subsets"]["Hard"]["count"] == 6 and results["subsets"]["Hard"]["num_subjects"] == 1
    assert results["settings"]["answer_tokens"] == ["A", "B", "C", "D"]
    preds = read_jsonl(tmp_path / "val" / "predictions.jsonl")
    answers = csv_answers(eval_assets["ceval"] / "val" / "law_val.csv", header=True)
    assert [p["answer"] for p in preds if p["subject"] == "law"] == answers
    assert not list((tmp_path / "val").glob("submission_*"))


def test_ceval_test_split_writes_the_official_submission(eval_assets, tmp_path):
    run_ceval(eval_assets, tmp_path / "test", "test")
    out = tmp_path / "test"
    submission = json.loads((out / "submission_test.json").read_text())
    preds = read_jsonl(out / "predictions.jsonl")
    assert list(submission) == ["advanced_mathematics", "law", "accountant"]
    for subject, answers in submission.items():
        assert list(answers) == ["100", "101", "102", "103", "104"]  # the id column, as strings
        assert list(answers.values()) == [p["prediction"] for p in preds if p["subject"] == subject]
    assert all(p["answer"] is None for p in preds)
    results = json.loads((out / "results.json").read_text())
    assert results["overall"]["accuracy"] is None and results["overall"]["count"] == 15
    assert results["subjects"]["law"] == {"accuracy": None, "count": 5, "correct": None, "shots": 5,
                                          "shots_dropped": 0, "truncated": 0}


def copy_data(assets, tmp_path) -> Path:
    return Path(shutil.copytree(assets["mmlu"], tmp_path / "data"))


def expect_error(argv, match):
    with pytest.raises(SystemExit) as e:
        evaluate_mmlu.main(argv)
    assert str(e.value).startswith("error: ")
    assert match in str(e.value)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "test" / "anatomy_test.csv").unlink(), "anatomy_test.csv: subject file not found"),
    (lambda d: shutil.rmtree(d / "dev"), "dev: split directory not found"),
    (lambda d: (d / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,A\r\nq,a,b,c,d,F\r\n"),
     "anatomy_test.csv, line 2 (row 1): answer 'F' is not one of A, B, C, D"),
    (lambda d: (d / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d\r\n"),
     "anatomy_dev.csv, line 1 (row 0): expected 6 columns"),
])
def test_bad_data_fails_clearly_and_writes_nothing(eval_assets, tmp_path, breakage, message):
    data = copy_data(eval_assets, tmp_path)
    breakage(data)
    out = tmp_path / "out"
    expect_error(["--model_name_or_path", str(eval_assets["model"]), "--data_dir", str(data),
                        "--output_dir", str(out), "--subjects", "abstract_algebra", "anatomy"], message)
    assert not (out / "results.json").exists() and not (out / "predictions.jsonl").exists()


def test_bad_arguments_fail_clearly(eval_assets, tmp_path):
    base = ["--data_dir", str(eval_assets["mmlu"]), "--output_dir", str(tmp_path / "out")]
    expect_error(["--model_name_or_path", str(eval_assets["model"]), *base, "--subjects", "astrology"],
                 "unknown mmlu subject(s): astrology")
    (tmp_path / "empty").mkdir()
    expect_error(["--model_name_or_path", str(tmp_path / "empty"), *base, "--subjects", "anatomy"],
                 "neither a Hugging Face model folder")
    expect_error(["--model_name_or_path", str(tmp_path / "missing"), *base, "--subjects", "anatomy"],
                 "model directory not found")
    expect_error(["--model_name_or_path", str(eval_assets["model"]), *base, "--subjects", "anatomy",
                        "--max_length", "5000"], "exceeds the model's context of 1024 tokens")
    expect_error(["--model_name_or_path", str(eval_assets["model"]), *base, "--subjects", "anatomy",
                  "--device", "bogus"], "--device 'bogus' is not a torch device")
    no_tok = Path(shutil.copytree(eval_assets["model"], tmp_path / "no_tok"))
    (no_tok / "tokenizer.model").unlink()
    expect_error(["--model_name_or_path", str(no_tok), *base, "--subjects", "anatomy"],
                 "no tokenizer (neither tokenizer.model nor tokenizer.json); pass --tokenizer")
    assert not (tmp_path / "out").exists()


def test_script_error_is_one_line_without_traceback(eval_assets, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation.evaluate_zh", "--model_name_or_path", str(eval_assets["model"]),
         "--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, timeout=limit(120),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere' / 'dev'}: split directory not found; "
                                                "--data_dir must hold dev/, val/ and test/"]


def test_training_run_directory_loads_through_the_run_dir_reader(eval_assets, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "step_000010").mkdir(parents=True)
    (run_dir / "latest").write_text("step_000010")
    shutil.copyfile(eval_assets["tokenizer"], run_dir / "tokenizer.model")
    calls = []

    def load_checkpoint_model(path, tag=None, config_overrides=None):
        calls.append((Path(path), tag))
        return Transformer.from_hf(eval_assets["model"])

    monkeypatch.setattr("artifacts.open.load_checkpoint_model", load_checkpoint_model)
    evaluate_mmlu.main(["--model_name_or_path", str(run_dir), "--data_dir", str(eval_assets["mmlu"]),
                        "--output_dir", str(tmp_path / "out"), "--subjects", "anatomy", "--tag", "step_000010"])
    assert calls == [(run_dir, "step_000010")]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["tag"] == "step_000010" and results["subjects"]["anatomy"]["count"] == 8


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_evaluates_close_to_the_float_one(eval_assets, tmp_path, scheme):
    """--quantize swaps the linears for INT8/INT4 ones on load: the letter probabilities move a little (so the
    quantized kernels really ran) and the predictions stay those of the float model."""
    run_mmlu(eval_assets, tmp_path / "fp32")
    run_mmlu(eval_assets, tmp_path / scheme, "--quantize", scheme, "--group_size", "16")
    results = json.loads((tmp_path / scheme / "results.json").read_text())
    assert results["settings"]["quantize"] == scheme and results["settings"]["group_size"] == 16
    ref, quant = (read_jsonl(tmp_path / d / "predictions.jsonl") for d in ("fp32", scheme))
    assert [(p["subject"], p["index"]) for p in ref] == [(p["subject"], p["index"]) for p in quant]
    diffs = [max(abs(a - b) for a, b in zip(p["probs"], q["probs"])) for p, q in zip(ref, quant)]
    assert 0 < max(diffs) < (0.02 if scheme == "int8" else 0.1)
    agree = sum(p["prediction"] == q["prediction"] for p, q in zip(ref, quant))
    assert agree >= 0.9 * len(ref)
