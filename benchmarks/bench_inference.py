"""Inference speed: decode tokens/s of the continuous-batching engine against transformers' generate, and the
OpenAI-compatible server's aggregate tokens/s and time to first token with 1 and with N concurrent streams.

    python benchmarks/bench_inference.py decode --batches 1 8      # engine vs Transformer.generate vs transformers
    python benchmarks/bench_inference.py server --streams 1 8      # a real `python -m inference.server` process
    python benchmarks/bench_inference.py prefix --max_seq_len 2048 # time to first token, shared 1000-token prefix
    python benchmarks/bench_inference.py chunk --streams 4 --max_seq_len 2048   # running streams' gaps, long prompt
    python benchmarks/bench_inference.py all
    python benchmarks/bench_inference.py agree --model runs/sample/train/hf   # a trained model: engine vs transformers

The model is random-weight (speed does not depend on the weights) with a real tokenizer: by default
../shared/data/weights/llama2c_tokenizer.model (the LLaMA vocabulary, 32000) and dim 256, 6 layers, 8 heads (4 KV
heads), fp32, CPU. Every request decodes exactly --new_tokens tokens (EOS ignored: transformers gets
min_new_tokens, the engine ignore_eos) after a --prompt_len-token prompt, greedily. All systems run in one
process with the same thread count (--threads, also given to the server process), in an order that rotates
every repetition, median of --reps.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.engine import Engine, SamplingParams  # noqa: E402
from common.tensors import DTYPES  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "weights" / "llama2c_tokenizer.model"


def build_model(args: argparse.Namespace, tok: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                         n_kv_heads=args.n_kv_heads, max_seq_len=args.max_seq_len, attn_impl="sdpa")
    return Transformer(config).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts(tok: Tokenizer, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, tok.vocab_size, (batch, length - 1), generator=g)
    return [[tok.bos_id] + row.tolist() for row in ids]


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bench_decode(args: argparse.Namespace, tok: Tokenizer, model: Transformer, folder: Path) -> None:
    import transformers

    dtype = DTYPES[args.dtype]
    model = model.to(args.device, dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                           attn_implementation="sdpa").eval().to(args.device)
    total = args.prompt_len + args.new_tokens
    for batch in args.batches:
        ids = prompts(tok, batch, args.prompt_len)
        x = torch.tensor(ids, device=args.device)
        # The engine packs its copy's large CPU fp32 weights for `batch` rows (inference/packing.py); the copy keeps
        # Transformer.generate on the plain weights. "engine, unpacked" shows what the packing is worth.
        engines = {"engine": Engine(copy.deepcopy(model), tok, slots=batch, max_len=total + 1),
                   "engine, unpacked": Engine(model, tok, slots=batch, max_len=total + 1, pack_weights=False)}
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)

        def run_engine(engine: Engine) -> None:
            reqs = [engine.submit(p, params, lambda e: None) for p in ids]
            while not all(r.done for r in reqs):
                engine.step()
            engine.step()  # give the slots back
            assert all(len(r.output_ids) == args.new_tokens for r in reqs)

        def run_generate():
            out = model.generate(x, args.new_tokens)
            assert out.shape[1] == total

        def run_hf():
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            assert out.shape[1] == total

        systems = {name: functools.partial(run_engine, e) for name, e in engines.items()}
        systems.update({"Transformer.generate": run_generate, "transformers generate": run_hf})
        if not engines["engine"].packed:
            del systems["engine, unpacked"]  # nothing was packed (GPU, bf16, batch 1): the same system twice
        times = {name: [] for name in systems}
        for name, fn in systems.items():  # warm-up
            fn()
        names = list(systems)
        for rep in range(args.reps):  # the order rotates, so no system always runs right after another
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                times[name].append(timed(systems[name]))
        print(f"batch {batch}: {batch} x ({args.prompt_len} prompt + {args.new_tokens} new tokens), greedy")
        rates = {}
        for name, ts in times.items():
            rates[name] = batch * args.new_tokens / statistics.median(ts)
            print(f"  {name:>22}: {rates[name]:8.1f} new tokens/s  (median of {args.reps}: "
                  f"{statistics.median(ts) * 1000:.0f} ms)")
        print(f"  engine / transformers: {rates['engine'] / rates['transformers generate']:.2f}x")


def stream_once(client, url: str, body: dict, out: dict) -> None:
    """One streamed request: out gets ttft (to the first chunk with text), tokens, text, the times of the chunks
    with text (`chunks`) and end."""
    start = time.perf_counter()
    out.update(ttft=None, text="", chunks=[])
    with client.stream("POST", url, json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                out["chunks"].append(now)
                out["text"] += chunk["choices"][0]["text"]
                if out["ttft"] is None:
                    out["ttft"] = now - start
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
    out["end"] = time.perf_counter()


@contextlib.contextmanager
def serving(args: argparse.Namespace, folder: Path, port: int, slots: int, max_len: int,
            flags: Sequence[str] = ()) -> Iterator[str]:
    """A real `python -m inference.server` process (args.threads threads); yields its completions URL."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "inference.server", "--model", str(folder), "--port", str(port),
                               "--slots", str(slots), "--max_len", str(max_len), *flags],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1/completions"
    finally:
        server.terminate()
        server.wait(timeout=30)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def bench_server(args: argparse.Namespace, tok: Tokenizer, folder: Path) -> None:
    import httpx

    slots = max(args.streams)
    load_before = load_average()
    with serving(args, folder, args.port, slots, args.prompt_len * 4 + args.new_tokens + 8,
                 args.server_args.split()) as url:
        text = tok.decode(prompts(tok, 1, args.prompt_len)[0][1:])
        body = {"prompt": text, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        # One client for all streams: creating one per request costs each thread an SSL context (~0.1 s of CPU),
        # which would be counted as time to first token.
        client = httpx.Client(limits=httpx.Limits(max_connections=64))
        stream_once(client, url, {**body, "max_tokens": 4}, {})  # warm-up
        rates: dict[int, list[float]] = {}
        ttfts: dict[int, list[float]] = {}
        for _ in range(args.reps):  # 1 stream, then N streams, then 1 again...: the load's swings hit both
            for n in args.streams:
                outs = [{} for _ in range(n)]
                threads = [threading.Thread(target=stream_once, args=(client, url, body, o)) for o in outs]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = max(o["end"] for o in outs) - start
                rates.setdefault(n, []).append(sum(o["tokens"] for o in outs) / wall)
                ttfts.setdefault(n, []).extend(o["ttft"] for o in outs)
    flags = "".join(" " + a for a in args.server_args.split())
    print(f"server{flags}: {args.new_tokens} new tokens per stream, {slots} slots, streaming /v1/completions; "
          f"load average (1/5/15 min) {load_before} before, {load_average()} after")
    base = None
    for n in args.streams:
        rate = statistics.median(rates[n])
        base = base or rate
        t = ttfts[n]
        print(f"  {n} stream(s): {rate:8.1f} tokens/s aggregate (median of {args.reps}), {rate / base:.2f}x one "
              f"stream; time to first token p50 {percentile(t, 50) * 1000:.0f} ms, p99 "
              f"{percentile(t, 99) * 1000:.0f} ms ({len(t)} requests)")


def bench_prefix(args: argparse.Namespace, tok: Tokenizer, folder: Path) -> None:
    """Time to first token of a request whose --prefix_len-token prefix an earlier request already sent, against
    that earlier request's, on a server with prefix caching and one without (both running, used alternately)."""
    import httpx

    max_len = args.prefix_len + 2 * args.prompt_len + args.new_tokens + 8
    ids = prompts(tok, 2 * args.reps + 1, args.prefix_len + args.prompt_len)
    flags = {"caching": [], "no caching": ["--no_prefix_caching"]}
    results: dict[str, dict[str, list]] = {name: {"first": [], "second": [], "texts": []} for name in flags}
    load_before = load_average()
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(serving(args, folder, args.port + i, 1, max_len, f))
                for i, (name, f) in enumerate(flags.items())}
        client = httpx.Client()
        for rep in range(args.reps):
            # A fresh prefix per repetition (nothing cached from the one before); the second request's own part
            # comes from another row of random tokens.
            prefix = ids[2 * rep][:args.prefix_len]
            first = prefix + ids[2 * rep][args.prefix_len:]
            second = prefix + ids[2 * rep + 1][args.prefix_len:]
            for name in (list(flags) if rep % 2 == 0 else list(flags)[::-1]):
                outs = {}
                for which, prompt in (("first", first), ("second", second)):
                    out: dict = {}
                    stream_once(client, urls[name], {"prompt": prompt, "max_tokens": args.new_tokens,
                                                     "temperature": 0, "ignore_eos": True, "stream": True}, out)
                    results[name][which].append(out["ttft"])
                    outs[which] = out["text"]
                results[name]["texts"].append(outs["second"])
    print(f"prefix caching: a {args.prefix_len}-token prefix + {args.prompt_len} own tokens, then another request "
          f"with the same prefix and {args.prompt_len} other tokens; {args.new_tokens} greedy tokens each, 1 slot, "
          f"median of {args.reps}; load average {load_before} before, {load_average()} after")
    for name, r in results.items():
        a, b = statistics.median(r["first"]), statistics.median(r["second"])
        print(f"  {name:>10}: time to first token, first request {a * 1000:.0f} ms, second {b * 1000:.0f} ms "
              f"({b / a:.2f} of the first)")
    same = results["caching"]["texts"] == results["no caching"]["texts"]
    print(f"  second requests' replies identical with and without caching: {same}")


def bench_chunk(args: argparse.Namespace, tok: Tokenizer, folder: Path) -> None:
    """The largest gap between two chunks of --streams[-1] running streams while one --long_len-token prompt is
    prefilled, with --prefill_chunk and with whole-prompt prefill (0); both servers run, used alternately."""
    import httpx

    n = max(args.streams)
    max_len = args.long_len + args.new_tokens + 8
    flags = {f"chunk {args.prefill_chunk}": ["--prefill_chunk", str(args.prefill_chunk), "--no_prefix_caching"],
             "whole prompts": ["--prefill_chunk", "0", "--no_prefix_caching"]}
    long_prompts = prompts(tok, args.reps, args.long_len)
    short = {"prompt": prompts(tok, 1, args.prompt_len)[0], "max_tokens": args.new_tokens, "temperature": 0,
             "ignore_eos": True, "stream": True}
    gaps: dict[str, list[float]] = {name: [] for name in flags}
    before: dict[str, list[float]] = {name: [] for name in flags}
    long_ttft: dict[str, list[float]] = {name: [] for name in flags}
    load_before = load_average()
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(serving(args, folder, args.port + i, n + 1, max_len, f))
                for i, (name, f) in enumerate(flags.items())}
        client = httpx.Client(limits=httpx.Limits(max_connections=64))
        for rep in range(args.reps):
            for name in (list(flags) if rep % 2 == 0 else list(flags)[::-1]):
                outs = [{} for _ in range(n)]
                threads = [threading.Thread(target=stream_once, args=(client, urls[name], short, o)) for o in outs]
                for t in threads:
                    t.start()
                while not all(len(o.get("chunks", ())) >= 8 for o in outs):  # all streaming
                    time.sleep(0.01)
                sent = time.perf_counter()
                long_out: dict = {}
                stream_once(client, urls[name], {**short, "prompt": long_prompts[rep], "max_tokens": 1}, long_out)
                done = time.perf_counter()
                long_ttft[name].append(long_out["ttft"] if long_out["ttft"] is not None else done - sent)
                for t in threads:
                    t.join()
                window = done - sent

                def largest(lo: float, hi: float) -> float:
                    """The largest gap between two chunks of a stream that overlaps [lo, hi]."""
                    return max((b - a for o in outs for a, b in zip(o["chunks"], o["chunks"][1:])
                                if b >= lo and a <= hi), default=0.0)

                gaps[name].append(largest(sent, done))
                before[name].append(largest(sent - window, sent))
    print(f"chunked prefill: {n} streams of {args.new_tokens} greedy tokens running, then one {args.long_len}-token "
          f"prompt; largest gap between two chunks of a running stream; median of {args.reps}; load average "
          f"{load_before} before, {load_average()} after")
    for name in flags:
        print(f"  {name:>13}: while the long prompt is prefilled {statistics.median(gaps[name]) * 1000:.0f} ms "
              f"(max {max(gaps[name]) * 1000:.0f}), in as long a window before it "
              f"{statistics.median(before[name]) * 1000:.0f} ms; the long prompt's time to first token "
              f"{statistics.median(long_ttft[name]) * 1000:.0f} ms")


AGREE_PROMPTS = ["On Monday morning, Olivia", "Early last spring, Leo went", "今天早上，小明去了", "344加874等于",
                 "71 × 32 =", "The weather was", "李老师在那里", "In the end they"]


def agree(args: argparse.Namespace) -> None:
    """Greedy replies of a trained model: the engine (3 slots, requests joining mid-flight) against transformers'
    generate, one prompt at a time."""
    import transformers

    from artifacts import load_tokenizer, open_model

    model = open_model(args.model, "cpu", "float32", runtime={"attn_impl": "sdpa"})
    tok = load_tokenizer(args.model, None, model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    engine = Engine(model, tok, slots=3)
    ids = [tok.encode(p, bos=True) for p in AGREE_PROMPTS]
    reqs = [engine.submit(i, SamplingParams(max_tokens=args.new_tokens), lambda e: None, anchor=i[-1:]) for i in ids]
    while not all(r.done for r in reqs):
        engine.step()
    same_seqs = same_tokens = total = 0
    for prompt, i, req in zip(AGREE_PROMPTS, ids, reqs):
        with torch.no_grad():
            out = hf.generate(torch.tensor([i]), max_new_tokens=args.new_tokens, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(i):].tolist()
        same_seqs += req.output_ids == out
        same_tokens += next((k for k, (a, b) in enumerate(zip(req.output_ids, out)) if a != b),
                            min(len(out), len(req.output_ids)))
        total += len(out)
        print(f"  {prompt!r} -> {req.text[:70]!r}")
    print(f"{args.model}: {same_seqs}/{len(ids)} greedy replies identical to transformers' generate; "
          f"{same_tokens}/{total} tokens before the first difference")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("decode", "server", "prefix", "chunk", "all", "agree"))
    p.add_argument("--model", default=None, help="agree: a trained model folder or run directory")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=6)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=1024)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--server_args", default="", help="server: more flags for the server, e.g. --no_prefix_caching")
    p.add_argument("--prefix_len", type=int, default=1000, help="prefix: tokens both requests share")
    p.add_argument("--long_len", type=int, default=1000, help="chunk: the long prompt's tokens")
    p.add_argument("--prefill_chunk", type=int, default=128, help="chunk: the server's --prefill_chunk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--device", default="cpu", help="decode benchmark device (the server runs on its default)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "agree":
        if not args.model:
            p.error("agree needs --model")
        return agree(args)
    tok = Tokenizer(args.tokenizer)
    model = build_model(args, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M params (dim {args.dim}, {args.n_layers} layers, vocab {tok.vocab_size}), "
          f"{args.dtype}, {args.device}, {args.threads} thread(s), torch {torch.__version__}")
    if args.device.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.to_hf(Path(tmp) / "hf", tokenizer_path=tok.path, dtype=torch.float32)
        if args.what in ("decode", "all"):
            bench_decode(args, tok, model, folder)
        if args.what in ("server", "all"):
            bench_server(args, tok, folder)
        if args.what in ("prefix", "all"):
            bench_prefix(args, tok, folder)
        if args.what in ("chunk", "all"):
            bench_chunk(args, tok, folder)


if __name__ == "__main__":
    main()
