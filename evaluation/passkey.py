"""Passkey retrieval: where does a model's usable context stop?

    python -m evaluation.passkey --model runs/x/hf --lengths 1024 2048 4096 8192 --depths 0 0.25 0.5 0.75 1

A random number (the passkey) is hidden at a chosen depth of repetitive filler text, and the model is asked for it
at the end (the test of Mohtashami & Jaggi 2023, "Landmark Attention", used by LongLoRA, YaRN and others to show
context extension). A trial counts as retrieved when greedy decoding would produce exactly the passkey's tokens:
the answer is teacher-forced through the KV cache and every answer token must be the argmax, which is the same
test as generating and comparing, in one pass. Prints a depth x length table of the share retrieved and writes
every trial with --output_json. Rotary settings can be overridden (--rope_type dynamic --rope_factor 4
--max_seq_len 16384) to see what inference-time scaling buys a model without training.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from tqdm import tqdm

from common.cli import entry_point, parser
from common.errors import UserError
from common.io import write_json
from common.tensors import DTYPES

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


class TextTokenizer(Protocol):
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


@dataclass
class Trial:
    length: int
    """Target prompt length in tokens (the prompt is at most this long; filler fills it)."""
    depth: float
    """Where the needle sits in the filler: 0 = right after the introduction, 1 = right before the question."""
    passkey: str
    prompt: list[int]
    answer: list[int]


def build_trial(tok: TextTokenizer, length: int, depth: float, passkey: str, bos: bool = True) -> Trial:
    """Prompt ids (introduction, filler with the needle at `depth`, question) and the answer ids.

    Pieces are encoded separately and concatenated, so the token count is exact and the filler unit repeats as
    the same ids; each piece starts with SentencePiece's word-boundary prefix, as after a space.
    """
    intro, filler = tok.encode(INTRO, bos=bos), tok.encode(FILLER)
    needle, question = tok.encode(NEEDLE.format(key=passkey)), tok.encode(QUESTION)
    answer = tok.encode(passkey)
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise UserError(f"--lengths {length} is too short for the passkey prompt; it needs at least "
                        f"{length - room} tokens")
    units = room // len(filler)
    before = round(depth * units)
    prompt = intro + filler * before + needle + filler * (units - before) + question
    return Trial(length, depth, passkey, prompt, answer)


@torch.no_grad()
def retrieved(model: Any, trial: Trial, device: torch.device | str = "cpu") -> tuple[bool, list[int]]:
    """Whether greedy decoding after the prompt gives the answer's ids, and the argmax ids it would give.

    The prompt (minus its last token) fills a KV cache; the last prompt token and the answer are then scored in
    one call, so only len(answer) rows of logits exist (not the whole prompt's)."""
    ids = torch.tensor([trial.prompt + trial.answer[:-1]], device=device)
    p = len(trial.prompt)
    cache = model.new_cache(1, ids.shape[1])
    model(ids[:, :p - 1], cache=cache, output_positions=torch.tensor([p - 2], device=device))
    logits = model(ids[:, p - 1:], cache=cache)  # [1, len(answer), V]: predictions of the answer tokens
    predicted = logits[0].argmax(-1).tolist()
    return predicted == trial.answer, predicted


def passkey_table(model: Any, tok: TextTokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                  digits: int = 5, seed: int = 0, device: torch.device | str = "cpu",
                  progress: bool = True) -> dict[str, Any]:
    """Retrieval share per (depth, length) over `trials` random passkeys, plus every trial's record."""
    max_len = model.config.max_seq_len
    too_long = [n for n in lengths if n > max_len]
    if too_long:
        raise UserError(f"--lengths {too_long[0]} exceeds the model's max_seq_len={max_len}; raise it (and the "
                        "rope settings) with --max_seq_len / --rope_* or drop the length")
    rng = random.Random(seed)
    keys = [str(rng.randint(10 ** (digits - 1), 10 ** digits - 1)) for _ in range(trials)]
    records, accuracy = [], [[0.0] * len(lengths) for _ in depths]
    cells = [(i, j, key) for i in range(len(depths)) for j in range(len(lengths)) for key in keys]
    for i, j, key in tqdm(cells, desc="passkey", disable=not progress):
        trial = build_trial(tok, lengths[j], depths[i], key)
        ok, predicted = retrieved(model, trial, device)
        accuracy[i][j] += ok / trials
        records.append({"length": lengths[j], "depth": depths[i], "passkey": key, "prompt_tokens": len(trial.prompt),
                        "retrieved": ok, "answer_ids": trial.answer, "predicted_ids": predicted})
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "digits": digits, "seed": seed,
            "accuracy": accuracy, "records": records}


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per depth, one column per length, the share of passkeys retrieved."""
    head = "| depth \\ length | " + " | ".join(str(n) for n in result["lengths"]) + " |"
    rule = "|---|" + "---|" * len(result["lengths"])
    rows = [f"| {d:.0%} | " + " | ".join(f"{a:.0%}" for a in accs) + " |"
            for d, accs in zip(result["depths"], result["accuracy"])]
    return "\n".join([head, rule, *rows])


def _check(lengths: list[int], depths: list[float], trials: int, digits: int) -> None:
    if any(n < 1 for n in lengths):
        raise UserError(f"--lengths must be positive, got {lengths}")
    if any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"--depths must lie in [0, 1], got {depths}")
    if trials < 1 or digits < 1:
        raise UserError(f"--trials and --digits must be >= 1, got {trials} and {digits}")


@entry_point
def main(argv: list[str] | None = None) -> None:
    from artifacts import add_quantize_args, default_device, load_tokenizer, open_model
    from model.config import ROPE_TYPES

    p = parser("python -m evaluation.passkey", __doc__.splitlines()[0])
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="a Hugging Face LLaMA folder, a training or LoRA run directory, or a quantized folder")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one beside the model)")
    p.add_argument("--tag", help="checkpoint tag of a training run directory (default: its latest)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder applied (merged) on top of the model")
    add_quantize_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                   help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle positions as a fraction of the filler")
    p.add_argument("--trials", type=int, default=5, help="random passkeys per cell")
    p.add_argument("--digits", type=int, default=5, help="digits of each passkey")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    p.add_argument("--max_seq_len", type=int, help="override the model's max_seq_len (with --rope_* to extend it)")
    p.add_argument("--rope_theta", type=float, help="override the rotary base (ABF without training)")
    p.add_argument("--rope_type", choices=ROPE_TYPES,
                   help="override the rotary scaling type")
    p.add_argument("--rope_factor", type=float, help="override the rotary scaling factor")
    p.add_argument("--rope_original_max_seq_len", type=int,
                   help="context the model was trained at (needed by dynamic/yarn/llama3 overrides)")
    p.add_argument("--output_json", help="also write the table and every trial here")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    _check(args.lengths, args.depths, args.trials, args.digits)
    device = args.device or default_device()
    model = open_model(args.model, device, args.dtype, tag=args.tag, adapter=args.adapter, quantize=args.quantize,
                       group_size=args.group_size, quantize_head=args.quantize_head)
    tok = load_tokenizer(args.model, args.tokenizer, model)
    rope = {k: getattr(args, k) for k in ("max_seq_len", "rope_theta", "rope_type", "rope_factor",
                                          "rope_original_max_seq_len") if getattr(args, k) is not None}
    if rope:
        try:
            model.set_rope(**rope)
        except ValueError as e:  # ModelConfig's checks on the values the flags gave
            raise UserError(f"--{' --'.join(rope)}: {e}") from None
    result = passkey_table(model, tok, args.lengths, args.depths, args.trials, args.digits, args.seed, device,
                           progress=not args.quiet)
    result.update(model=str(Path(args.model)), rope={k: v for k, v in model.config.to_dict().items()
                                                    if k.startswith("rope_") or k == "max_seq_len"})
    print(format_table(result))
    if args.output_json:
        write_json(args.output_json, result)


if __name__ == "__main__":
    main()
