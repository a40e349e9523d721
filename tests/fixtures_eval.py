"""Fixtures for the evaluation tests: a tiny SentencePiece tokenizer, a tiny random model folder, and small
MMLU / C-Eval data folders in the official layouts (fake questions written here, no real dataset text)."""
from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from model import ModelConfig, Transformer

EN_WORDS = ("the which of following is true about algebra group ring field value answer question number "
            "law body cell energy force mass heat light state market price cost tax rate plan court").split()
ZH_CHARS = "以下是中国关于考试的单项选择题请选出其中正确答案数学物理化学法律会计高等离散概率统计大学中下列说法不属于"


def _corpus_lines(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(1500):
        words = " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(3, 10)))
        zh = "".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(4, 16)))
        # Letters after a space, as in "Answer: A"; never right after "：", so the tokenizer has no "：A" piece.
        lines.append(f"{words.capitalize()}? {rng.choice('ABCD')} {rng.randint(0, 999)}")
        lines.append(f"{zh}。{rng.choice('ABCD')}. {zh[:3]}")
    return lines


def train_tiny_tokenizer(out_dir: Path) -> Path:
    """A LLaMA-style SentencePiece BPE model (byte fallback, identity normalisation) trained in well under 1 s."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(_corpus_lines()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out_dir / "tokenizer"), vocab_size=600, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return out_dir / "tokenizer.model"


def save_tiny_model(out_dir: Path, tokenizer_model: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised debug-preset model as a Hugging Face folder, with tokenizer.model beside it."""
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("debug", **{"vocab_size": 640, "max_seq_len": 1024, "attn_impl": "sdpa",
                                                 **overrides})
    # A larger init spreads the letter logits apart, so predictions do not hinge on rounding-level ties.
    model = Transformer(config)
    with torch.no_grad():
        model.output.weight.normal_(0.0, 0.5)
    model.to_hf(out_dir)
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    return out_dir


def fake_question(rng: random.Random, n: int, zh: bool) -> list[str]:
    """question, A, B, C, D, answer of a made-up question; every third one has a multi-line question."""
    if zh:
        q = "".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(6, 30)))
        choices = ["".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(1, 8))) for _ in range(4)]
    else:
        q = " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(4, 40))).capitalize() + "?"
        choices = [" ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(1, 5))) for _ in range(4)]
    if n % 3 == 0:
        q = f"Item {n}:\r\n{q}\nsecond line, with a comma"
    return [q, *choices, rng.choice("ABCD")]


MMLU_FIXTURE_SUBJECTS = ("abstract_algebra", "anatomy", "high_school_european_history")
CEVAL_FIXTURE_SUBJECTS = ("advanced_mathematics", "law", "accountant")


def write_mmlu_dir(root: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """root/{dev,val,test}/{subject}_{split}.csv without a header, CRLF line ends (as the real files)."""
    rng = random.Random(seed)
    sizes = sizes or {"dev": 5, "val": 4, "test": 7}
    for split, n in sizes.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in MMLU_FIXTURE_SUBJECTS:
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\r\n")
                for i in range(n + (subject == "anatomy")):  # subjects of different sizes
                    writer.writerow(fake_question(rng, i, zh=False))
    return root


def write_ceval_dir(root: Path, seed: int = 0) -> Path:
    """root/{dev,val,test}/{subject}_{split}.csv with the official headers (test has no answer column)."""
    rng = random.Random(seed)
    headers = {"dev": ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
               "val": ["id", "question", "A", "B", "C", "D", "answer"],
               "test": ["id", "question", "A", "B", "C", "D"]}
    sizes = {"dev": 5, "val": 6, "test": 5}
    for split, header in headers.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in CEVAL_FIXTURE_SUBJECTS:
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\r\n")
                writer.writerow(header)
                for i in range(sizes[split]):
                    row = [str(100 + i), *fake_question(rng, i, zh=True)]
                    if split == "dev":
                        row.append("1. 因为")
                    writer.writerow(row[:len(header)])
    return root


@pytest.fixture(scope="session")
def eval_assets(tmp_path_factory) -> dict[str, Path]:
    """Paths of the shared read-only assets: tokenizer.model, model folder, MMLU and C-Eval data folders."""
    root = tmp_path_factory.mktemp("eval_assets")
    tok = train_tiny_tokenizer(root / "tok")
    return {"tokenizer": tok, "model": save_tiny_model(root / "model", tok),
            "mmlu": write_mmlu_dir(root / "mmlu"), "ceval": write_ceval_dir(root / "ceval")}


CMMLU_FIXTURE_SUBJECTS = ("agronomy", "chinese_history", "college_mathematics")


def write_cmmlu_dir(root: Path, subjects: tuple[str, ...] = CMMLU_FIXTURE_SUBJECTS, seed: int = 0) -> Path:
    """root/{dev,test}/{subject}.csv with the official header `,Question,A,B,C,D,Answer` (row number first)."""
    rng = random.Random(seed)
    for split, n in (("dev", 5), ("test", 6)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with open(root / split / f"{subject}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i in range(n + (subject == "agronomy")):
                    writer.writerow([str(i), *fake_question(rng, i + 1, zh=True)])
    return root


# ---- GAOKAO-Bench, AGIEval, GSM8K and HumanEval folders (made-up items in the official layouts) ----

GAOKAO_FIXTURE_SUBJECTS = ("2010-2013_English_MCQs", "2010-2022_Physics_MCQs")
AGIEVAL_FIXTURE_TASKS = ("logiqa-zh", "sat-math", "lsat-ar")


def write_gaokao_dir(root: Path, seed: int = 0, n: int = 9) -> Path:
    """root/{file}.json: {"keywords", "example": [...]}, options inside the question text ("A．..."); in Physics
    every fourth item has two answers (multi-answer, excluded) and one has an answer key "E" (outside the options)."""
    import json

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for subject in GAOKAO_FIXTURE_SUBJECTS:
        examples = []
        for i in range(n):
            q, *choices, answer = fake_question(rng, i + 1, zh=subject != GAOKAO_FIXTURE_SUBJECTS[0])
            text = f"{i + 1}．{q}（ ）\n" + "".join(f"{l}．{c}   \n" for l, c in zip("ABCD", choices))
            answers = [answer]
            if subject.endswith("Physics_MCQs") and i % 4 == 3:
                answers = ["B", "D"]
            if subject.endswith("Physics_MCQs") and i == 5:
                answers = ["E"]
            examples.append({"year": "2010", "category": "（新课标）", "question": text, "answer": answers,
                             "analysis": "", "index": i, "score": 5})
        (root / f"{subject}.json").write_text(json.dumps({"keywords": subject, "example": examples},
                                                         ensure_ascii=False), encoding="utf-8")
    return root


def write_agieval_dir(root: Path, seed: int = 0, n: int = 9) -> Path:
    """root/{task}.jsonl: logiqa-zh (passages, one item with two correct letters), sat-math (no passage),
    lsat-ar (five options: excluded whole)."""
    import json

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for task in AGIEVAL_FIXTURE_TASKS:
        lines = []
        for i in range(n):
            q, *choices, answer = fake_question(rng, i + 1, zh=task.endswith("-zh"))
            letters = "ABCDE" if task == "lsat-ar" else "ABCD"
            options = [f"({l}){c}" for l, c in zip(letters, choices + ["extra option"])]
            label: str | list[str] = answer
            if task == "logiqa-zh" and i == 2:
                label = ["A", "C"]
            passage = "".join(rng.choice(ZH_CHARS) for _ in range(20)) if task == "logiqa-zh" else None
            lines.append(json.dumps({"passage": passage, "question": q, "options": options, "label": label,
                                     "answer": None, "other": None}, ensure_ascii=False))
        (root / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_gsm8k_dir(root: Path, seed: int = 0, n_test: int = 6, n_train: int = 8) -> Path:
    """root/{train,test}.jsonl: made-up word problems whose answers end in '#### N' (with <<calc>> notes)."""
    import json

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for _ in range(n):
            a, b = rng.randint(2, 900), rng.randint(2, 90)
            total = a * b
            lines.append(json.dumps({"question": f"A box holds {a} pens. How many pens are in {b} boxes?",
                                     "answer": f"Each box has {a} pens.\n{a}*{b}=<<{a}*{b}={total}>>{total} pens.\n"
                                               f"#### {total:,}"}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# Made-up problems in HumanEval's layout: (task_id, prompt, canonical body, test, entry_point).
HUMANEVAL_FIXTURE = [
    ("Fix/0", 'def add(a, b):\n    """Return a + b."""\n', "    return a + b\n",
     "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n", "add"),
    ("Fix/1", 'def rev(s):\n    """Return s reversed."""\n', "    return s[::-1]\n",
     "def check(candidate):\n    assert candidate('abc') == 'cba'\n", "rev"),
    ("Fix/2", 'def evens(xs):\n    """The even numbers of xs, in order."""\n', "    return [x for x in xs if x % 2 == 0]\n",
     "def check(candidate):\n    assert candidate([1, 2, 3, 4]) == [2, 4]\n    assert candidate([]) == []\n", "evens"),
]


def write_humaneval_dir(root: Path) -> Path:
    """root/HumanEval.jsonl.gz with the made-up problems above."""
    import gzip
    import json

    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
        for task_id, prompt, solution, test, entry in HUMANEVAL_FIXTURE:
            f.write(json.dumps({"task_id": task_id, "prompt": prompt, "canonical_solution": solution,
                                "test": test, "entry_point": entry}) + "\n")
    return root


def write_suite_root(root: Path) -> Path:
    """root/{ceval,mmlu,cmmlu,gaokao,agieval,gsm8k,humaneval}: every benchmark's fixture folder."""
    write_ceval_dir(root / "ceval")
    write_mmlu_dir(root / "mmlu")
    write_cmmlu_dir(root / "cmmlu")
    write_gaokao_dir(root / "gaokao")
    write_agieval_dir(root / "agieval")
    write_gsm8k_dir(root / "gsm8k")
    write_humaneval_dir(root / "humaneval")
    return root
