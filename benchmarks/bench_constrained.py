"""Cost of constrained decoding per token: building a request's Constraint, and its mask (llguidance's token
bitmask, unpacked and applied to the logits) at each step, for a JSON schema, on a SentencePiece tokenizer.

    python benchmarks/bench_constrained.py --tokenizer PATH_TO_TOKENIZER_MODEL_OR_FOLDER [--tokens 200]

Logits are random and the argmax of the masked row is taken, so the walk goes through the grammar's states
(keys, a long string, an integer). Figures: benchmarks/constrained.md.
"""
from __future__ import annotations

import argparse
import time

import torch

from inference.constrained import Constraint
from tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--tokens", type=int, default=200)
    args = p.parse_args()
    tok = Tokenizer(args.tokenizer)
    vocab = tok.vocab_size
    start = time.perf_counter()
    first = Constraint.json_schema(tok, vocab, SCHEMA)
    first_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    constraint = Constraint.json_schema(tok, vocab, SCHEMA)
    again_ms = (time.perf_counter() - start) * 1000
    del first
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.tokens):
        logits = torch.randn(1, vocab, generator=generator)
        start = time.perf_counter()
        masked = constraint.mask(logits)
        times.append(time.perf_counter() - start)
        constraint.accept(int(torch.argmax(masked)))
        if constraint.done:
            break
    times.sort()
    print(f"vocab {vocab}: first Constraint {first_ms:.1f} ms (tokenizer table + grammar), next {again_ms:.1f} ms; "
          f"mask per token p50 {times[len(times) // 2] * 1e6:.0f} us, p90 {times[int(len(times) * 0.9)] * 1e6:.0f} us, "
          f"max {times[-1] * 1e6:.0f} us over {len(times)} tokens")


if __name__ == "__main__":
    main()
