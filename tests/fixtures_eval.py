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
