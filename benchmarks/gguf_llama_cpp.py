"""GGUF files in llama.cpp itself: greedy replies of llama-cpp-python against our model's, per outtype.

    pip install -c constraints.txt llama-cpp-python      # builds llama.cpp from source (~8 min on 2 cores)
    python benchmarks/gguf_llama_cpp.py --model runs/sample/train --outtypes f16 q8_0 q4_0 --new_tokens 32

Each outtype is exported with `python -m inference.gguf`, loaded with llama_cpp.Llama and asked for --new_tokens
greedy tokens (top_k=1, temperature 0, no repetition penalty) after each prompt; our reference is the fp32 model's
own greedy decoding (Transformer.generate). Printed per outtype: whether llama.cpp's tokenizer gives our ids, how
many replies are identical and how many tokens agree before the first difference, and the largest logit
difference on the prompt relative to the largest logit.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts import load_tokenizer, open_model  # noqa: E402
from inference.gguf import main as export_gguf  # noqa: E402

PROMPTS = ["On Monday morning, Olivia", "Early last spring, Leo went", "今天早上，小明去了", "344加874等于",
           "71 × 32 =", "The weather was", "李老师在那里", "In the end they"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder or training run directory")
    p.add_argument("--outtypes", nargs="+", default=["f16", "q8_0", "q4_0"])
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    model = open_model(args.model, "cpu", "float32")
    tok = load_tokenizer(args.model, None, model)
    prompts = [tok.encode(text, bos=True) for text in PROMPTS]
    ours = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), args.new_tokens, eos_id=tok.eos_id)[0, len(ids):].tolist()
            ours.append(out[:out.index(tok.eos_id) + 1] if tok.eos_id in out else out)
        prompt_logits = [model(torch.tensor([ids]))[0] for ids in prompts]
    print(f"{args.model}: {sum(x.numel() for x in model.parameters()) / 1e6:.2f}M params, llama-cpp-python "
          f"{llama_cpp.__version__}, {len(PROMPTS)} prompts, {args.new_tokens} greedy tokens each")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes:
            path = Path(tmp) / f"model-{outtype}.gguf"
            export_gguf(["--model", args.model, "--outtype", outtype, "--output", str(path)])
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.max_seq_len, n_threads=args.threads,
                                  logits_all=True, verbose=False)
            same_ids = same = agree = total = 0
            worst = 0.0
            for text, ids, ref, logits in zip(PROMPTS, prompts, ours, prompt_logits):
                same_ids += llm.tokenize(text.encode(), add_bos=True, special=False) == ids
                llm.reset()
                llm.eval(ids)
                theirs_logits = torch.from_numpy(llm.scores[:len(ids)].copy())
                worst = max(worst, float((theirs_logits - logits).abs().max() / logits.abs().max()))
                llm.reset()
                theirs = []
                for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                    theirs.append(int(token))
                    if token == tok.eos_id or len(theirs) == len(ref):
                        break
                same += theirs == ref
                agree += next((k for k, (a, b) in enumerate(zip(theirs, ref)) if a != b), min(len(theirs), len(ref)))
                total += len(ref)
            llm.close()
            print(f"  {outtype:>5}: tokenizer ids equal ours on {same_ids}/{len(PROMPTS)} prompts; "
                  f"{same}/{len(PROMPTS)} greedy replies identical, {agree}/{total} tokens before the first "
                  f"difference; prompt logits within {worst:.4f} of the largest")


if __name__ == "__main__":
    main()
