"""Generate the small instruction sample shipped with the project (data/sft_sample/*).

    python data/sft_sample/make_sft.py [--out_dir data/sft_sample] [--records 400]

Synthetic Chinese/English instructions written for this project from templates and word lists (no third-party
text), with a fixed seed, so the files are byte-for-byte reproducible. Two layouts, mixed by the default
fine-tuning config:

- alpaca.jsonl: single-turn {"instruction", "input", "output"} records (arithmetic, sorting, word tasks,
  describing a scene, translating a word), some with a "system" text;
- sharegpt.json: multi-turn {"conversations": [{"from": "human"|"gpt", "value"}]} records (a sum, then a
  follow-up question about it);
- prompts.json: a JSON list of new instructions (DreamerGPT's test_data layout), for finetune.generate.

The answers follow from the questions by fixed rules, so even the debug model's loss falls within a few dozen
steps, which is what scripts/finetune.sh demonstrates.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

EN_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry"]
EN_PLACES = ["the library", "the market", "the train station", "the river bank", "the city museum"]
EN_OBJECTS = ["a red umbrella", "an old map", "a wooden box", "a silver key", "a blue kite"]
ZH_NAMES = ["小明", "小红", "老王", "李老师", "张先生", "王阿姨"]
ZH_PLACES = ["图书馆", "菜市场", "火车站", "公园里", "博物馆"]
ZH_OBJECTS = ["一把雨伞", "一张地图", "一本旧书", "一只小猫", "一个风筝"]
WORDS = {"苹果": "apple", "书": "book", "猫": "cat", "狗": "dog", "水": "water", "山": "mountain", "河": "river",
         "花": "flower", "月亮": "moon", "太阳": "sun", "朋友": "friend", "学校": "school"}
SYSTEMS = ["You are a careful assistant.", "你是一个乐于助人的助手。"]


def arithmetic(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    if rng.random() < 0.5:
        return {"instruction": f"计算 {a} 加 {b}。", "input": "", "output": f"{a}加{b}等于{a + b}。"}
    return {"instruction": "What is the sum of the two numbers?", "input": f"{a} and {b}",
            "output": f"{a} + {b} = {a + b}."}


def sort_numbers(rng: random.Random) -> dict[str, str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    if rng.random() < 0.5:
        return {"instruction": "Sort these numbers from smallest to largest.", "input": ", ".join(map(str, nums)),
                "output": ", ".join(map(str, sorted(nums)))}
    return {"instruction": "把下面的数字从小到大排列。", "input": "，".join(map(str, nums)),
            "output": "，".join(map(str, sorted(nums)))}


def word_task(rng: random.Random) -> dict[str, str]:
    zh, en = rng.choice(sorted(WORDS.items()))
    kind = rng.randrange(3)
    if kind == 0:
        return {"instruction": f"把“{zh}”翻译成英文。", "input": "", "output": f"“{zh}”的英文是 {en}。"}
    if kind == 1:
        return {"instruction": f"Translate the word \"{en}\" into Chinese.", "input": "",
                "output": f"\"{en}\" in Chinese is {zh}."}
    return {"instruction": "Write the word in capital letters.", "input": en, "output": en.upper()}


def describe(rng: random.Random) -> dict[str, str]:
    if rng.random() < 0.5:
        name, place, obj = rng.choice(EN_NAMES), rng.choice(EN_PLACES), rng.choice(EN_OBJECTS)
        return {"instruction": f"Write one sentence about {name} at {place}.", "input": "",
                "output": f"{name} went to {place} and found {obj}."}
    name, place, obj = rng.choice(ZH_NAMES), rng.choice(ZH_PLACES), rng.choice(ZH_OBJECTS)
    return {"instruction": f"用一句话描述{name}在{place}做了什么。", "input": "",
            "output": f"{name}在{place}找到了{obj}。"}


def conversation(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 9)
    if rng.random() < 0.5:
        turns = [(f"{a} 加 {b} 等于多少？", f"{a}加{b}等于{a + b}。"),
                 (f"再乘以 {c} 呢？", f"{a + b}乘以{c}等于{(a + b) * c}。")]
    else:
        turns = [(f"What is {a} plus {b}?", f"{a} + {b} = {a + b}."),
                 (f"And times {c}?", f"{a + b} × {c} = {(a + b) * c}.")]
    return {"conversations": [m for q, r in turns for m in ({"from": "human", "value": q},
                                                            {"from": "gpt", "value": r})]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).parent))
    parser.add_argument("--records", type=int, default=400, help="single-turn records (plus a quarter as many "
                        "conversations)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    makers = [arithmetic, sort_numbers, word_task, describe]
    records = []
    for i in range(args.records):
        record = makers[i % len(makers)](rng)
        if rng.random() < 0.1:
            record = {"system": rng.choice(SYSTEMS), **record}
        records.append(record)
    chats = [conversation(rng) for _ in range(args.records // 4)]
    prompts = [makers[i % len(makers)](rng) for i in range(16)]
    prompts = [f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"] for r in prompts]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alpaca.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (out / "sharegpt.json").write_text(json.dumps(chats, ensure_ascii=False, indent=1) + "\n")
    (out / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(records)} records to {out / 'alpaca.jsonl'}, {len(chats)} to {out / 'sharegpt.json'} and "
          f"{len(prompts)} prompts to {out / 'prompts.json'}")


if __name__ == "__main__":
    main()
