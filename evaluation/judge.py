"""Judged open-question evaluation in the style of BELLE / Toucan: a model answers, a judge model scores 0-1.

    python -m evaluation.judge --model M --eval_set ../shared/data/sft/belle_eval_set.jsonl \\
        --judge_prompts ../shared/data/sft/belle_eval_prompt.jsonl --output_dir O \\
        --judge_base_url http://127.0.0.1:8000/v1 --judge_model NAME [--judge_api_key_env OPENAI_API_KEY]

1. Answers: each question of the eval set ({"question", "std_answer", "class"} per line, or a JSON list of such
   records) goes through the model's chat template (tokenizer_config.json's chat_template, else
   the plain `Human: {question}\\nAssistant:` of tokenizer/chat_template.py) and is answered with batched greedy (or sampled) generation.
   O/answers.jsonl is written before any judging; a re-run with the same model, eval set and generation settings
   reuses it.
2. Judging: each answer goes with its class's grading instruction to the judge behind an OpenAI-compatible
   /chat/completions endpoint (temperature 0), in BELLE's own words (eval/ChatGPT_Score.html):
   `{instruction} {question} 标准回答:{reference}  模型回答：' {answer}'。请针对模型回答给出得分，顺便给出理由：`, and
   for generation, brainstorming and rewrite (no single right answer) without the reference:
   `{instruction} {question}  模型回答： '{answer}'。请针对模型回答给出得分，顺便给出理由：`.
   The score is read from the reply (`得分: 0.5`, `得分：0.5`, `score: 1`, `0.5分`, `8/10`, ...); a reply without one
   is asked again once, then counted as unscored. Every exchange goes to O/judgments.jsonl as it happens; a re-run
   does not ask again what an earlier run settled there (unless --overwrite).
3. O/results.json: the average score per class and over all scored answers (and over classes), as in Toucan's
   table; a table is printed.

An unreachable endpoint, server errors or malformed responses are retried (--judge_retries) and then end the run
with one error line; the answers stay in O/answers.jsonl and the next run starts from them. The judge's key is
read from the environment variable named by --judge_api_key_env, never from the command line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
from tqdm import tqdm

from artifacts.open import check_device, default_device, default_dtype
from common.cli import parser as make_parser
from common.cli import run_main
from common.errors import UserError
from common.io import check_output_dir, write_json, write_text
from common.tensors import DTYPES
from artifacts import add_quantize_args
from model.generate import SamplingParams, add_sampling_args, sampling_from_args

from . import backends
from .generation import generate_answers, question_template

NO_REFERENCE_CLASSES = ("generation", "brainstorming", "rewrite")  # BELLE sends these without the reference answer
ANSWERS = "answers.jsonl"
JUDGMENTS = "judgments.jsonl"
RESULTS = "results.json"


# --- the eval set and the grading instructions -----------------------------------------------------------------

def class_key(name: str) -> str:
    """Class names as the files spell them differ ("open qa" / "open QA", "closed\\xa0qa"): compare them folded."""
    return " ".join(unicodedata.normalize("NFKC", name).split()).casefold()


def read_records(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) of a JSONL file or a JSON list, each record checked for `required` string fields."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    listed = text.lstrip().startswith("[")
    if listed:
        try:
            items = list(enumerate(json.loads(text)))
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    else:
        items = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except ValueError as e:
                    raise UserError(f"{path}, line {n}: not valid JSON ({e})") from None
    for n, record in items:
        where = f"{path}, item {n}" if listed else f"{path}, line {n}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object with {', '.join(required)}")
        missing = [k for k in required if not isinstance(record.get(k), str)]
        if missing:
            raise UserError(f"{where}: missing or non-text field(s) {', '.join(missing)}; each record needs "
                            f"{', '.join(required)}")
    if not items:
        raise UserError(f"{path}: no records")
    return items


def read_eval_set(path: Path, prompts_path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The questions (with their line) and {class key: grading instruction}; every class must have one."""
    prompts = {class_key(r["class"]): r["prompt"] for _, r in read_records(prompts_path, ("class", "prompt"))}
    questions = []
    for line, r in read_records(path, ("question", "std_answer", "class")):
        if class_key(r["class"]) not in prompts:
            raise UserError(f"{path}, line {line}: class {r['class']!r} has no grading instruction in {prompts_path} "
                            f"(it has {', '.join(sorted(prompts))})")
        questions.append({"line": line, "question": r["question"], "std_answer": r["std_answer"],
                          "class": r["class"]})
    return questions, prompts


def judge_prompt(instruction: str, cls: str, question: str, reference: str, answer: str) -> str:
    """BELLE's judge input (module doc), character for character."""
    if class_key(cls) in NO_REFERENCE_CLASSES:
        return f"{instruction} {question}  模型回答： '{answer}'。请针对模型回答给出得分，顺便给出理由："
    return f"{instruction} {question} 标准回答:{reference}  模型回答：' {answer}'。请针对模型回答给出得分，顺便给出理由："


# --- reading the score out of a judge's reply ------------------------------------------------------------------

_NUM = r"(\d+(?:\.\d+)?|\.\d+)"
_LABELLED = re.compile(r"(?:得分|分数|评分|打分|最终得分|总分|score|rating)\s*\**\s*(?:为|是|应为|应该是|可以是|of|is)?\s*"
                       r"[:=]?\s*\**\s*" + _NUM + r"\s*(?:(?:/|／|out of)\s*" + _NUM + r"|(%))?", re.IGNORECASE)
_POINTS = re.compile(r"(?<![\d.])" + _NUM + r"\s*分")
_NOT_A_SCORE = ("满分", "最低分", "最高分", "满分为", "最低分为", "最高分为", "分数在")


def parse_score(reply: str) -> float | None:
    """The 0-1 score a judge wrote, or None when there is none.

    Looks first for a labelled score (得分/分数/评分/score/rating, then an optional 为/是, a colon of either width,
    markdown stars) and takes the first; a score out of ten or a hundred ("8/10", "80%") is scaled down. Else a lone
    "0.5分" counts, unless it restates the scale ("满分为1分", "最低分为0分"). Scores outside [0, 1] are not scores.
    """
    text = unicodedata.normalize("NFKC", reply)  # full-width digits and colons become ASCII
    for m in _LABELLED.finditer(text):
        value = float(m.group(1))
        if m.group(2):
            denominator = float(m.group(2))
            value = value / denominator if denominator > 0 else -1.0
        elif m.group(3):
            value /= 100
        if 0.0 <= value <= 1.0:
            return value
    candidates = []
    for m in _POINTS.finditer(text):
        before = text[max(0, m.start() - 4):m.start()]
        if not any(before.endswith(w) or before.rstrip("为是:").endswith(w) for w in _NOT_A_SCORE):
            candidates.append(float(m.group(1)))
    if candidates and 0.0 <= candidates[0] <= 1.0:
        return candidates[0]
    return None


# --- the judge client --------------------------------------------------------------------------------------------

class JudgeError(UserError):
    """The endpoint as given cannot be used: nothing listens there, it refuses the request (key, model name), or it
    answers something that is not a chat completion. The user's settings: one `error: ...` line."""


class JudgeUnavailable(ConnectionError):
    """The endpoint answered busy or failing (HTTP 429 or 5xx) or timed out on every try: not the user's mistake,
    so it keeps its traceback; running the same command again later resumes."""


@dataclass
class JudgeConfig:
    base_url: str
    model: str
    api_key: str | None = None
    max_tokens: int = 1024
    timeout: float = 120.0
    retries: int = 3
    retry_wait: float = 2.0


class Judge:
    """POST {base_url}/chat/completions with retries; returns the reply text."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.client = httpx.Client(timeout=cfg.timeout, headers=headers)

    def request(self, prompt: str) -> dict[str, Any]:
        return {"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
                "max_tokens": self.cfg.max_tokens}

    def ask(self, body: dict[str, Any]) -> str:
        last = ""
        transient = False  # a failure that may pass (busy, timeout), not one of the URL, key or model given
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.retry_wait * 2 ** (attempt - 1))
            try:
                response = self.client.post(self.url, json=body)
            except (httpx.HTTPError, httpx.InvalidURL) as e:
                last = f"{type(e).__name__}: {e}"
                transient |= not isinstance(e, (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.InvalidURL))
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                transient = True
                continue
            if response.status_code >= 400:  # a wrong key, model name or URL does not get better by retrying
                raise JudgeError(f"judge endpoint {self.url} refused the request: HTTP {response.status_code}: "
                                 f"{response.text[:300]} (check --judge_base_url, --judge_model and the API key)")
            try:
                content = response.json()["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError("content is not text")
                return content
            except (ValueError, KeyError, IndexError, TypeError) as e:
                last = f"not a chat completion ({type(e).__name__}: {e}): {response.text[:200]!r}"
        error = JudgeUnavailable if transient else JudgeError
        raise error(f"judge endpoint {self.url} failed after {self.cfg.retries + 1} tries; last: {last}"
                    + ("" if transient else " (check --judge_base_url)"))

    def close(self) -> None:
        self.client.close()


def body_key(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, sort_keys=True)


def settled_judgments(path: Path) -> dict[str, float | None]:
    """Request -> its final score in an earlier run's exchanges (a score, or None after both attempts failed to
    give one), so that a re-run after an interruption asks only what is still open."""
    settled: dict[str, float | None] = {}
    if not path.exists():
        return settled
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            e = json.loads(line)
            key = body_key(e["request"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by an interruption
        if e.get("score") is not None or e.get("attempt") == 2:
            settled[key] = e.get("score")
    return settled


def judge_all(judge: Judge, items: list[dict[str, Any]], prompts: dict[str, str],
              log: Callable[[dict[str, Any]], None], concurrency: int,
              settled: dict[str, float | None] | None = None) -> list[float | None]:
    """Each item's score (None: unscored after one retry); `log` gets every new exchange. Requests already in
    `settled` are not sent again."""
    settled = settled or {}

    def one(item: dict[str, Any]) -> float | None:
        body = judge.request(judge_prompt(prompts[class_key(item["class"])], item["class"], item["question"],
                                          item["std_answer"], item["answer"]))
        if body_key(body) in settled:
            return settled[body_key(body)]
        for attempt in (1, 2):  # an unparsable reply is asked again once
            reply = judge.ask(body)
            score = parse_score(reply)
            log({"index": item["index"], "class": item["class"], "attempt": attempt, "request": body,
                 "reply": reply, "score": score})
            if score is not None:
                return score
        return None

    scores: list[float | None] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=concurrency) as pool, tqdm(total=len(items), desc="judging",
                                                                    unit="answer") as progress:
        futures = {pool.submit(one, item): n for n, item in enumerate(items)}
        try:
            for future in futures:
                scores[futures[future]] = future.result()
                progress.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return scores


def summarize(items: list[dict[str, Any]], scores: list[float | None]) -> dict[str, Any]:
    """Per class (in order of first appearance) and overall: mean score of the scored answers, counts."""
    by_class: dict[str, list[float | None]] = {}
    for item, score in zip(items, scores):
        by_class.setdefault(item["class"], []).append(score)

    def stats(values: list[float | None]) -> dict[str, Any]:
        scored = [v for v in values if v is not None]
        return {"score": sum(scored) / len(scored) if scored else None, "count": len(values),
                "scored": len(scored), "unscored": len(values) - len(scored)}

    classes = {name: stats(values) for name, values in by_class.items()}
    overall = stats(scores)
    class_scores = [c["score"] for c in classes.values() if c["score"] is not None]
    overall["class_average"] = sum(class_scores) / len(class_scores) if class_scores else None
    return {"classes": classes, "overall": overall}


def format_table(summary: dict[str, Any]) -> str:
    def fmt(v: float | None) -> str:
        return "     -" if v is None else f"{v:6.3f}"

    width = max([len(c) for c in summary["classes"]] + [22])
    lines = [f"{'class':<{width}} {'count':>6} {'scored':>6} {'score':>6}"]
    for name, c in summary["classes"].items():
        lines.append(f"{name:<{width}} {c['count']:>6} {c['scored']:>6} {fmt(c['score'])}")
    o = summary["overall"]
    lines.append(f"{'average (per answer)':<{width}} {o['count']:>6} {o['scored']:>6} {fmt(o['score'])}")
    lines.append(f"{'average (per class)':<{width}} {'':>6} {'':>6} {fmt(o['class_average'])}")
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def answers_key(args, eval_sha: str, gen: SamplingParams) -> dict[str, Any]:
    """What the answers depend on: a stored answers file is reused only when this matches (the generation entry
    keeps the flag names answers files have always recorded)."""
    generation = {"max_new_tokens": gen.max_tokens, "temperature": gen.temperature, "top_k": gen.top_k,
                  "top_p": gen.top_p, "seed": gen.seed, "batch_size": args.batch_size}
    return {"model": str(Path(args.model).resolve()), "tag": args.tag, "tokenizer": args.tokenizer,
            "eval_set_sha256": eval_sha, "limit": args.limit, "generation": generation}


def load_answers(path: Path, key: dict[str, Any], n: int) -> list[dict[str, Any]] | None:
    """The stored answers when they were made for `key`; None when there are none."""
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:] if line]
    except (ValueError, IndexError):
        raise UserError(f"{path}: unreadable answers file; pass --overwrite to generate the answers again") from None
    if header.get("key") != key or len(records) != n:
        raise UserError(f"{path} holds answers for other settings (model, eval set or generation); pass --overwrite "
                        "to generate them again, or use another --output_dir")
    return records


def build_parser():
    p = make_parser("python -m evaluation.judge", __doc__.split("\n\n")[0])
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="Hugging Face causal-LM folder or training run directory")
    p.add_argument("--eval_set", type=Path, required=True, help="JSONL (or JSON list) of question/std_answer/class")
    p.add_argument("--judge_prompts", type=Path, required=True, help="JSONL of class/prompt grading instructions")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--judge_base_url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge_model", help="model name to send to the judge endpoint")
    p.add_argument("--judge_api_key_env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (unset: no key is sent)")
    p.add_argument("--judge_max_tokens", type=int, default=1024, help="longest judge reply")
    p.add_argument("--judge_timeout", type=float, default=120.0, help="seconds per judge request")
    p.add_argument("--judge_retries", type=int, default=3, help="retries of a failed judge request")
    p.add_argument("--judge_retry_wait", type=float, default=2.0, help="first wait between retries (doubles)")
    p.add_argument("--judge_concurrency", type=int, default=4, help="judge requests in flight")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder applied (merged) on top of the model")
    add_quantize_args(p)
    p.add_argument("--generate_only", action="store_true", help="write answers.jsonl and stop")
    p.add_argument("--limit", type=int, help="only the first N questions")
    add_sampling_args(p, SamplingParams(max_tokens=512, seed=0))
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together")
    p.add_argument("--tokenizer", help="tokenizer.model or a folder with tokenizer.json; unset: the model's")
    p.add_argument("--tag", help="checkpoint tag of a training run directory; unset: its latest")
    p.add_argument("--device", help="unset: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="unset: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--overwrite", action="store_true", help="generate again even if answers.jsonl exists")
    return p


def check_args(args) -> None:
    for flag in ("max_new_tokens", "batch_size", "judge_concurrency"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.judge_retries < 0:
        raise UserError(f"--judge_retries must be >= 0, got {args.judge_retries}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if not args.generate_only and not (args.judge_base_url and args.judge_model):
        raise UserError("--judge_base_url and --judge_model are needed to judge (or pass --generate_only)")


def run(args) -> dict[str, Any] | None:
    check_args(args)
    questions, prompts = read_eval_set(args.eval_set, args.judge_prompts)
    if args.limit:
        questions = questions[:args.limit]
    gen = sampling_from_args(args)
    key = answers_key(args, file_sha256(args.eval_set), gen)
    out = args.output_dir
    answers_path = out / ANSWERS
    if not answers_path.exists():  # a folder holding answers is resumed; any other non-empty one needs --overwrite
        check_output_dir(out, args.overwrite)
    stored = None if args.overwrite else load_answers(answers_path, key, len(questions))
    if stored is not None:
        print(f"reusing the {len(stored)} answers in {answers_path}", file=sys.stderr)
        items = stored
    else:
        device = args.device or default_device()
        check_device(device)
        loaded = backends.load(args.model, args.tokenizer, device, args.dtype or default_dtype(device), args.tag,
                               adapter=args.adapter, quantize=args.quantize, group_size=args.group_size,
                               quantize_head=args.quantize_head)
        if loaded.note:
            print(f"note: {args.model}: {loaded.note}", file=sys.stderr)
        template = question_template(args.model, loaded.tokenizer)
        print(f"chat template: {template.origin}", file=sys.stderr)
        start = time.perf_counter()
        generated = generate_answers(loaded, template, [q["question"] for q in questions], gen, args.batch_size)
        seconds = time.perf_counter() - start
        items = [{"index": n, **q, **g} for n, (q, g) in enumerate(zip(questions, generated))]
        header = {"key": key, "chat_template": template.origin, "backend": loaded.backend,
                  "generation_seconds": round(seconds, 3)}
        out.mkdir(parents=True, exist_ok=True)
        write_text(answers_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [header, *items]))
        print(f"{len(items)} answers generated in {seconds:.1f}s; wrote {answers_path}", file=sys.stderr)
    if args.generate_only:
        return None

    (out / RESULTS).unlink(missing_ok=True)  # a results.json exists only for a finished judging
    api_key = os.environ.get(args.judge_api_key_env) or None
    judge = Judge(JudgeConfig(args.judge_base_url, args.judge_model, api_key, args.judge_max_tokens,
                              args.judge_timeout, args.judge_retries, args.judge_retry_wait))
    lock = threading.Lock()
    settled = {} if args.overwrite else settled_judgments(out / JUDGMENTS)
    if settled:
        print(f"reusing {len(settled)} judgments from {out / JUDGMENTS}", file=sys.stderr)
    log_path = out / JUDGMENTS
    cut = log_path.exists() and not args.overwrite and not log_path.read_bytes().endswith(b"\n")
    with open(log_path, "w" if args.overwrite else "a", encoding="utf-8") as log_file:
        if cut and log_path.stat().st_size:
            log_file.write("\n")  # an interrupted run's last line stays alone on its line
        def log(exchange: dict[str, Any]) -> None:
            with lock:
                log_file.write(json.dumps(exchange, ensure_ascii=False) + "\n")
                log_file.flush()

        try:
            scores = judge_all(judge, items, prompts, log, args.judge_concurrency, settled)
        except (JudgeError, JudgeUnavailable) as e:
            raise type(e)(f"{e}. The {len(items)} answers are kept in {answers_path}; run the same command again "
                          "to judge them without generating again") from None
        finally:
            judge.close()
    summary = summarize(items, scores)
    results = {"eval_set": str(args.eval_set.resolve()), "judge_prompts": str(args.judge_prompts.resolve()),
               "count": len(items), **summary,
               "settings": {**key, "judge_base_url": args.judge_base_url, "judge_model": args.judge_model,
                            "judge_max_tokens": args.judge_max_tokens}}
    write_json(out / RESULTS, results)
    print(format_table(summary))
    print(f"wrote {out / RESULTS}; every judge exchange is in {out / JUDGMENTS}")
    return results


def main(argv: list[str] | None = None) -> None:
    run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
