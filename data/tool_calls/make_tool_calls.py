"""Generate a small synthetic tool-calling set for fine-tuning (no downloads, no third-party text).

    python data/tool_calls/make_tool_calls.py --out_dir data/tool_calls [--records 200 --seed 0]

Writes, from the same conversations (fixed seed, byte-for-byte reproducible):

- tool_calls.jsonl: OpenAI messages layout, {"tools": [...], "messages": [user, assistant with tool_calls,
  tool, assistant]};
- tool_calls_sharegpt.json: LLaMA-Factory's ShareGPT layout, {"tools": "<JSON>", "conversations": [human,
  function_call, observation, gpt]}.

Each user message asks for one of three tools (weather of a city, the sum of two numbers, a word's English); the
call's arguments follow from the question by fixed rules and the final answer quotes the tool's result, so a
debug model learns the <tool_call> format within a few dozen steps (tests/test_inference_tools.py, slow).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Sum of two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "translate", "description": "English of a Chinese word",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"],
                       "additionalProperties": False}}},
]
CITIES = {"Paris": "晴", "Berlin": "多云", "Tokyo": "小雨", "Rome": "晴", "Oslo": "雪", "Cairo": "晴", "Lima": "阴"}
WORDS = {"苹果": "apple", "书": "book", "猫": "cat", "狗": "dog", "水": "water", "山": "mountain", "花": "flower"}
WEATHER = {"晴": "sunny", "多云": "cloudy", "小雨": "light rain", "雪": "snow", "阴": "overcast"}


def conversation(rng: random.Random) -> tuple[str, str, dict, str, str]:
    """(question, tool name, arguments, tool result, final answer)."""
    kind = rng.choice(["get_weather", "add", "translate"])
    if kind == "get_weather":
        city = rng.choice(sorted(CITIES))
        sky = WEATHER[CITIES[city]]
        q = rng.choice([f"What is the weather in {city}?", f"{city} 今天天气怎么样？"])
        return q, kind, {"city": city}, json.dumps({"city": city, "sky": sky}), f"{city}: {sky}."
    if kind == "add":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        q = rng.choice([f"What is {a} plus {b}?", f"计算 {a} 加 {b}。"])
        return q, kind, {"a": a, "b": b}, str(a + b), f"{a} + {b} = {a + b}."
    word = rng.choice(sorted(WORDS))
    q = rng.choice([f"How do you say {word} in English?", f"“{word}”的英文是什么？"])
    return q, kind, {"word": word}, WORDS[word], f"“{word}” is {WORDS[word]}."


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=str(Path(__file__).parent))
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.records < 1:
        raise SystemExit("error: --records must be positive")
    rng = random.Random(args.seed)
    openai_records, sharegpt_records = [], []
    for i in range(args.records):
        q, name, arguments, result, answer = conversation(rng)
        call_id = f"call_{i}"
        openai_records.append({"tools": TOOLS, "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": answer}]})
        sharegpt_records.append({"tools": json.dumps([t["function"] for t in TOOLS], ensure_ascii=False),
                                 "conversations": [
            {"from": "human", "value": q},
            {"from": "function_call", "value": json.dumps({"name": name, "arguments": arguments},
                                                          ensure_ascii=False)},
            {"from": "observation", "value": result},
            {"from": "gpt", "value": answer}]})
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tool_calls.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in openai_records), encoding="utf-8")
    (out / "tool_calls_sharegpt.json").write_text(json.dumps(sharegpt_records, ensure_ascii=False, indent=1) + "\n",
                                                  encoding="utf-8")
    print(f"{args.records} conversations -> {out / 'tool_calls.jsonl'}, {out / 'tool_calls_sharegpt.json'}")


if __name__ == "__main__":
    main()
