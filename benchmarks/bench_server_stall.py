"""How long a huge request stalls the streams a server is serving: the largest gap between two chunks of 4 running
streams while a 1 MB request arrives (goal: under 50 ms on 2 cores), against the largest gap in an equally long
window just before it.

    python benchmarks/bench_server_stall.py [--reps 3] [--mb 1] [--root OTHER_CHECKOUT]

A real `python -m inference.server` process (from --root: this checkout by default; another checkout's server to
compare) serves bench_inference.py's random-weight model (dim 256, 6 layers, fp32, CPU, the LLaMA tokenizer) with
4 slots. 4 greedy streams decode --new_tokens tokens each (EOS ignored); once every stream has its first token,
one client posts a chat request whose message is --mb MB of text (then, in further rounds, a completions request
with an MB-long prompt, and one padded with runs of spaces that must be tokenized in full). All are far over the
context and answered 400: the work measured is reading and parsing the body, rendering the template and tokenizing
(in full, or the prefix that shows it cannot fit). Figures go to benchmarks/inference.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_inference import DEFAULT_TOKENIZER, build_model  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

STREAMS = 4
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "quiet", "bright", "七", "月", "光"]


def stream(client, url: str, body: dict, arrivals: list[float]) -> None:
    with client.stream("POST", url, json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    arrivals.append(time.perf_counter())


def largest_gap(arrivals: list[list[float]], lo: float, hi: float, inside: bool = False) -> float:
    """The largest time between consecutive chunks of one stream, over the gaps that overlap [lo, hi] (inside:
    that lie within it)."""
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:])
            if (a >= lo and b <= hi if inside else b >= lo and a <= hi)]
    return max(gaps, default=float("nan"))


def one_round(client, port: int, big: dict, path: str, new_tokens: int) -> tuple[float, float, float, int]:
    """(largest gap before, largest gap while the big request is in, its latency, its status)."""
    base = f"http://127.0.0.1:{port}"
    body = {"prompt": "Once upon a time", "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
    threads = [threading.Thread(target=stream, args=(client, base + "/v1/completions", body, a)) for a in arrivals]
    for t in threads:
        t.start()
    while not all(len(a) >= 5 for a in arrivals):
        time.sleep(0.01)
    payload = json.dumps(big).encode()
    time.sleep(0.5)
    start = time.perf_counter()
    r = client.post(base + path, content=payload, headers={"content-type": "application/json"}, timeout=600)
    end = time.perf_counter()
    time.sleep(0.2)
    stalled = largest_gap(arrivals, start, end)
    before = largest_gap(arrivals, start - max(end - start, 0.4), start, inside=True)
    for t in threads:
        t.join()
    return before, stalled, end - start, r.status_code


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--root", default=str(ROOT), help="checkout whose inference.server runs")
    p.add_argument("--mb", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--new_tokens", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--port", type=int, default=8767)
    args = p.parse_args()
    import httpx

    tok = Tokenizer(args.tokenizer)
    model = build_model(argparse.Namespace(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=1024), tok)
    rng = random.Random(0)
    text = ""
    while len(text.encode()) < args.mb * 1e6:
        text += " ".join(rng.choice(WORDS) for _ in range(1000)) + "\n"
    bigs = {"chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 4}),
            "completions": ("/v1/completions", {"prompt": text, "max_tokens": 4}),
            # Runs of spaces make more than 8 characters a token, so the server's prefix check cannot refuse them
            # early: this request is tokenized in full (in a worker thread), the worst case.
            "completions, tokenized in full": ("/v1/completions", {
                "prompt": (" " * 64).join(text.split(" "))[:len(text)],
                "max_tokens": 4})}
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.to_hf(Path(tmp) / "hf", tokenizer_path=tok.path, dtype=torch.float32)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": args.root}
        # A server without a body limit (an older checkout) takes no --max_body_bytes.
        limit = (["--max_body_bytes", str(64 << 20)]
                 if "max_body_bytes" in (Path(args.root) / "inference" / "server.py").read_text() else [])
        server = subprocess.Popen([sys.executable, "-m", "inference.server", "--model", str(folder), "--port",
                                   str(args.port), "--slots", str(STREAMS), *limit],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=args.root)
        try:
            deadline = time.time() + 180
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=5)
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.time() > deadline:
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.5)
            client = httpx.Client(limits=httpx.Limits(max_connections=16))
            print(f"server from {args.root}: {STREAMS} greedy streams of {args.new_tokens} tokens; one "
                  f"{len(text.encode()) / 1e6:.2f} MB request while they run; {os.cpu_count()} cores, load "
                  f"{os.getloadavg()[0]:.2f}")
            for name, (path, big) in bigs.items():
                rounds = [one_round(client, args.port, big, path, args.new_tokens) for _ in range(args.reps)]
                print(f"  {name}: largest inter-chunk gap while it arrives {max(r[1] for r in rounds) * 1000:.0f} ms "
                      f"(median of {args.reps}: {statistics.median(r[1] for r in rounds) * 1000:.0f} ms), in an "
                      f"equal window before it {statistics.median(r[0] for r in rounds) * 1000:.0f} ms; the request "
                      f"took {statistics.median(r[2] for r in rounds) * 1000:.0f} ms, status "
                      f"{sorted({r[3] for r in rounds})}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
