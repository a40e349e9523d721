"""Synthetic Chinese/English/code/number corpora for the tokenizer tests (generated here, no external text)."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from tokenizer.train import TrainerConfig, train_tokenizer

WORDS = (
    "the of and to in is was for on that with as by at from his her an which are were this be or has had not "
    "but they it its first new one also after who their have been more time two other city year all would "
    "when during there into later most only between over while about under such three through war game "
    "season song film album team school church river music state world people number series village area"
).split()
HANZI = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心"
    "多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分"
    "将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因"
    "重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书"
)
CODE_TEMPLATE = '''def {name}(values, limit={num}):
    """Return the {word} items below limit."""
    result  =  []          # two spaces around =, aligned comment
    for value in values:
        if value  <  limit:
            result.append(value * {num})
\t\telse_branch = None
    return result
'''


def english_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 4)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 15))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)


def chinese_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 4)):
        clauses = ["".join(rng.choice(HANZI) for _ in range(rng.randint(4, 8))) for _ in range(rng.randint(1, 3))]
        lines.append("，".join(clauses) + "。")
    return "\n".join(lines)


def code_doc(rng: random.Random) -> str:
    name = "_".join(rng.choice(WORDS) for _ in range(2))
    return CODE_TEMPLATE.format(name=name, num=rng.randint(0, 99999), word=rng.choice(WORDS)).rstrip("\n")


def number_doc(rng: random.Random) -> str:
    return (
        f"Order {rng.randint(0, 10**9)} shipped on {rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-"
        f"{rng.randint(1, 28):02d} for {rng.randint(0, 9999)}.{rng.randint(0, 99):02d} dollars, "
        f"{rng.randint(1, 999)} items."
    )


def mixed_documents(n: int = 400, seed: int = 0) -> dict[str, list[str]]:
    """n documents of each kind: en, zh, code, numbers."""
    rng = random.Random(seed)
    return {
        "en": [english_doc(rng) for _ in range(n)],
        "zh": [chinese_doc(rng) for _ in range(n)],
        "code": [code_doc(rng) for _ in range(n // 4)],
        "numbers": [number_doc(rng) for _ in range(n // 2)],
    }


def write_corpus(root: Path, n: int = 400, seed: int = 0) -> Path:
    """A corpus directory mixing every supported format: en.txt, zh.jsonl.gz, code.jsonl, numbers.txt.gz."""
    docs = mixed_documents(n, seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "en.txt").write_text("\n\n".join(docs["en"]) + "\n", encoding="utf-8")
    with gzip.open(root / "zh.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs["zh"])
    (root / "code.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs["code"]), encoding="utf-8")
    with gzip.open(root / "numbers.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(docs["numbers"]) + "\n")
    return root


def train_small(corpus: Path, out: Path, vocab_size: int = 1000, **overrides) -> dict:
    """Train a small tokenizer on `corpus` into `out` (no progress bars); returns the card."""
    cfg = TrainerConfig(input=[str(corpus)], output_dir=str(out), vocab_size=vocab_size, **overrides)
    return train_tokenizer(cfg, progress=False)
