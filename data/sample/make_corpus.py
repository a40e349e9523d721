"""Generate the small sample corpus shipped with the project (data/sample/*.txt, *.jsonl).

    python -m data.sample.make_corpus [--out_dir data/sample] [--docs 1500]

Everything is produced from templates and word lists written for this project (no third-party text), with a
fixed seed, so the output is byte-for-byte reproducible. It mixes what a Chinese/English base model sees: English
and Chinese prose, arithmetic and Python code. Being templated, it is very learnable: the loss of even the debug
model falls visibly within a few hundred steps, which is what scripts/train.sh demonstrates.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from common import cli
from common.io import write_text

EN_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Karen", "Leo",
            "Mia", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tina"]
EN_PLACES = ["the library", "the market", "the old harbour", "the train station", "the mountain village",
             "the river bank", "the school garden", "the city museum", "the small bakery", "the north forest"]
EN_OBJECTS = ["a red umbrella", "three green apples", "an old map", "a wooden box", "a silver key", "a blue kite",
              "a letter from home", "a basket of bread", "a broken clock", "a book about stars"]
EN_VERBS = ["found", "carried", "painted", "sold", "lost", "repaired", "borrowed", "hid", "opened", "described"]
EN_TIMES = ["On Monday morning", "Late in the evening", "After the rain stopped", "Before sunrise",
            "In the middle of winter", "During the summer festival", "One quiet afternoon", "Early last spring"]
EN_FEELINGS = ["happy", "tired", "curious", "surprised", "calm", "worried", "proud", "hungry"]
EN_WEATHER = ["sunny", "cloudy", "windy", "rainy", "foggy", "cold", "warm", "snowy"]

ZH_NAMES = ["小明", "小红", "老王", "李老师", "张先生", "王阿姨", "小刚", "陈医生", "刘同学", "赵师傅"]
ZH_PLACES = ["图书馆", "菜市场", "火车站", "公园里", "学校门口", "小河边", "山脚下", "博物馆", "书店里", "操场上"]
ZH_OBJECTS = ["一把雨伞", "三个苹果", "一张地图", "一本旧书", "一只小猫", "一封信", "一篮面包", "一个风筝",
              "两杯热茶", "一辆自行车"]
ZH_VERBS = ["找到了", "买了", "画了", "送给朋友", "修好了", "借走了", "带回家", "看见了"]
ZH_TIMES = ["今天早上", "昨天晚上", "下雨以后", "天亮之前", "冬天的时候", "放假那天", "一个安静的下午", "去年春天"]
ZH_FEELINGS = ["很高兴", "有点累", "很好奇", "非常惊讶", "很平静", "有些担心", "很自豪", "饿了"]
ZH_WEATHER = ["晴天", "多云", "刮风", "下雨", "有雾", "很冷", "很暖和", "下雪"]
ZH_SEASONS = ["春天", "夏天", "秋天", "冬天"]
ZH_SCENES = ["花开满山", "绿树成荫", "落叶纷飞", "白雪覆盖大地", "河水静静流淌", "鸟儿在枝头歌唱", "月光照在窗前",
             "远处传来钟声"]

PY_NAMES = ["total", "count", "value", "items", "result", "scores", "names", "prices", "numbers", "words"]
PY_OPS = [("add", "+"), ("subtract", "-"), ("multiply", "*")]


def english(rng: random.Random) -> str:
    name, other = rng.sample(EN_NAMES, 2)
    sentences = [
        f"{rng.choice(EN_TIMES)}, {name} went to {rng.choice(EN_PLACES)}.",
        f"There {name} {rng.choice(EN_VERBS)} {rng.choice(EN_OBJECTS)}.",
        f"The weather was {rng.choice(EN_WEATHER)}, and {name} felt {rng.choice(EN_FEELINGS)}.",
        f"Later, {other} asked {name} about it, and {name} told the whole story.",
        f"{other} {rng.choice(EN_VERBS)} {rng.choice(EN_OBJECTS)} at {rng.choice(EN_PLACES)} too.",
        "In the end they both went home before dark.",
    ]
    return " ".join(sentences[:2] + rng.sample(sentences[2:], rng.randint(1, 4)))


def chinese(rng: random.Random) -> str:
    name, other = rng.sample(ZH_NAMES, 2)
    season = rng.choice(ZH_SEASONS)
    sentences = [
        f"{rng.choice(ZH_TIMES)}，{name}去了{rng.choice(ZH_PLACES)}。",
        f"{name}在那里{rng.choice(ZH_VERBS)}{rng.choice(ZH_OBJECTS)}。",
        f"那天是{rng.choice(ZH_WEATHER)}，{name}觉得{rng.choice(ZH_FEELINGS)}。",
        f"后来{other}问起这件事，{name}把经过讲了一遍。",
        f"{season}到了，{rng.choice(ZH_SCENES)}，{rng.choice(ZH_SCENES)}。",
        f"{other}也在{rng.choice(ZH_PLACES)}{rng.choice(ZH_VERBS)}{rng.choice(ZH_OBJECTS)}。",
        "天黑以前，他们都回家了。",
    ]
    return "".join(sentences[:2] + rng.sample(sentences[2:], rng.randint(1, 4)))


def arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"{a} + {b} = {a + b}")
        elif kind == 1:
            lines.append(f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}")
        elif kind == 2:
            a, b = a % 100, b % 100
            lines.append(f"{a} × {b} = {a * b}")
        else:
            lines.append(f"{a}加{b}等于{a + b}。")
    return "\n".join(lines)


def python_code(rng: random.Random) -> str:
    name = rng.choice(PY_NAMES)
    verb, op = rng.choice(PY_OPS)
    k = rng.randint(1, 9)
    kind = rng.randrange(3)
    if kind == 0:
        return (f"def {verb}_{k}({name}):\n"
                f"    \"\"\"Return every element of {name} with {k} applied by {verb}.\"\"\"\n"
                f"    return [x {op} {k} for x in {name}]\n")
    if kind == 1:
        return (f"def sum_of_{name}({name}):\n"
                f"    {name[:-1] if name.endswith('s') else name}_sum = 0\n"
                f"    for x in {name}:\n"
                f"        if x % {k} == 0:\n"
                f"            {name[:-1] if name.endswith('s') else name}_sum += x\n"
                f"    return {name[:-1] if name.endswith('s') else name}_sum\n")
    return (f"class Counter{k}:\n"
            f"    def __init__(self):\n"
            f"        self.{name} = {{}}\n\n"
            f"    def add(self, key):\n"
            f"        self.{name}[key] = self.{name}.get(key, 0) + {k}\n"
            f"        return self.{name}[key]\n")


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("python -m data.sample.make_corpus", __doc__)
    parser.add_argument("--out_dir", default=str(Path(__file__).parent), help="where to write")
    parser.add_argument("--docs", type=int, default=1500, help="documents per kind")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the templates' choices")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    # .txt files: documents separated by blank lines; .jsonl: one {"text": ...} per line (code keeps its newlines).
    write_text(out / "english.txt", "\n\n".join(english(rng) for _ in range(args.docs)) + "\n")
    write_text(out / "chinese.txt", "\n\n".join(chinese(rng) for _ in range(args.docs)) + "\n")
    write_text(out / "arithmetic.txt", "\n\n".join(arithmetic(rng) for _ in range(args.docs)) + "\n")
    write_text(out / "code.jsonl", "".join(json.dumps({"text": python_code(rng)}) + "\n" for _ in range(args.docs)))
    for path in sorted(out.glob("*.txt")) + sorted(out.glob("*.jsonl")):
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
