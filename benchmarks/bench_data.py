"""Corpus pipeline throughput and memory: prepare_data tokens/s, loader tokens/s and peak resident memory.

    python benchmarks/bench_data.py prepare --corpus ../shared/data/corpus \\
        --tokenizer ../shared/data/weights/llama2c_tokenizer.model --workers 1 2
    python benchmarks/bench_data.py loader --tokens 300000000 --scale 10

`prepare` runs the real CLI (python -m pretrain.prepare_data) once per worker count into a temporary directory,
reports tokens/s and the peak RSS of its largest process, and checks that the outputs are byte-identical.

`loader` writes synthetic prepared datasets (random tokens in documents of random length, with the real
ShardWriter) of --tokens and --scale x --tokens tokens, then, in a fresh process per dataset, reads batches with
the real DataLoader (shuffled) and reports tokens/s and peak RSS: the same number of batches for both sizes, and
also one whole epoch of the small one. It compares against the forward+backward throughput of the debug model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def bench_prepare(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_", dir=args.workdir))
    outputs = []
    try:
        for workers in args.workers:
            out = work / f"w{workers}"
            argv = ["--tokenizer", args.tokenizer, "--input", *args.corpus, "--output_dir", str(out),
                    "--num_workers", str(workers), "--no_progress", "--val_fraction", "0.01"]
            # The real CLI entry point in a fresh interpreter, which then reports its own CPU time and that of its
            # tokenizer workers (its children), and the largest peak RSS among them.
            probe = ("import resource, sys\nfrom pretrain.prepare_data import main\nmain(sys.argv[1:])\n"
                     "s, c = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
                     "print(s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime, max(s.ru_maxrss, c.ru_maxrss))")
            t0 = time.perf_counter()
            result = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True)
            elapsed = time.perf_counter() - t0
            if result.returncode:
                sys.exit(f"prepare_data failed: {result.stderr.strip()}")
            main_cpu, worker_cpu, peak_kb = map(float, result.stdout.strip().splitlines()[-1].split())
            manifest = json.loads((out / "manifest.json").read_text())
            stats = manifest["corpus_stats"]
            n = manifest["num_tokens"]
            print(f"prepare_data workers={workers}: {n:,} tokens ({manifest['splits']['val']['num_tokens']:,} val), "
                  f"{stats['documents']:,} documents, {stats['characters']:,} characters, {elapsed:.1f} s wall "
                  f"-> {n / elapsed:,.0f} tokens/s, {stats['bytes'] / elapsed / 2**20:.2f} MiB text/s; "
                  f"CPU s: {main_cpu:.1f} main + {worker_cpu:.1f} workers; peak RSS of the largest process "
                  f"{peak_kb / 1024:.0f} MiB", flush=True)
            if workers > 1:
                # On a busy machine the wall time says little; this bounds it on idle cores from the CPU times.
                cores = min(workers + 1, os.cpu_count() or 1)
                bound = max(main_cpu, worker_cpu / workers, (main_cpu + worker_cpu) / cores)
                print(f"  wall time on {cores} idle cores >= max(main, workers / {workers}, total / {cores}) = "
                      f"{bound:.1f} s -> at most {n / bound:,.0f} tokens/s", flush=True)
            outputs.append(out)
        if len(outputs) > 1:
            same = all(_same_tree(outputs[0], o) for o in outputs[1:])
            print(f"outputs byte-identical across worker counts: {same}")
    finally:
        shutil.rmtree(work)


def _same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def make_synthetic(out: Path, num_tokens: int, vocab_size: int, shard_tokens: int, seed: int = 0) -> None:
    """A prepared directory of random tokens in documents of log-normal length (median ~400 tokens)."""
    from pretrain.shards import Position, ShardWriter, build_manifest, choose_dtype, write_manifest

    rng = np.random.default_rng(seed)
    writer = ShardWriter(out, "train", choose_dtype(vocab_size), shard_tokens)
    written, doc = 0, 0
    block = 1 << 24
    while written < num_tokens:
        tokens = rng.integers(3, vocab_size, size=min(block, num_tokens - written), dtype=np.uint32)
        lengths = np.maximum(1, rng.lognormal(6.0, 1.0, size=len(tokens) // 100 + 2).astype(np.int64))
        bounds = np.cumsum(lengths)
        bounds = np.concatenate(([0], bounds[bounds < len(tokens)], [len(tokens)]))
        for a, b in zip(bounds[:-1], bounds[1:]):
            piece = tokens[a:b]
            piece[-1] = 2  # EOS
            writer.add(piece, 0, doc)
            doc += 1
        written += len(tokens)
    writer.close(Position(1, 0, 0))
    write_manifest(out, build_manifest(
        tokenizer_sha256="synthetic", vocab_size=vocab_size, bos_id=1, eos_id=2, bos=False,
        shard_tokens=shard_tokens, val_fraction=0.0, splits={"train": writer.shards},
    ))


def read_batches(data: str, seq_len: int, batch: int, batches: int) -> dict[str, float]:
    """Run in a fresh process: read `batches` micro-batches (0: one epoch) and report speed and memory."""
    import psutil

    from pretrain.data import DataLoader

    proc = psutil.Process()
    loader = DataLoader(data, "train", seq_len, batch, rank=0, world_size=1, seed=0, shuffle=True)
    loader.next_batch()
    base = proc.memory_full_info()
    n = batches or loader.windows_per_epoch // batch
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    for _ in range(n):
        tokens += loader.next_batch().tokens.numel()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    end = proc.memory_full_info()
    return {
        "corpus_tokens": loader.data.num_tokens, "batches": n, "tokens": tokens, "seconds": elapsed,
        "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu,
        "rss_start_mb": base.rss / 2**20, "rss_end_mb": end.rss / 2**20,
        "uss_end_mb": end.uss / 2**20, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def training_tokens_per_s(seq_len: int = 256, batch: int = 8, steps: int = 20) -> float:
    """Forward+backward+AdamW tokens/s of the debug preset on this machine (its fastest step, so that other load
    on the machine does not flatter the loader): an upper bound on what training consumes."""
    import torch

    from model import ModelConfig, Transformer

    cfg = ModelConfig.from_preset("debug", max_seq_len=seq_len)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(x, targets=x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return batch * seq_len / min(times)


def bench_loader(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_loader_", dir=args.workdir))
    try:
        sizes = [args.tokens, args.tokens * args.scale]
        runs = []
        for size in sizes:
            data = work / f"data_{size}"
            t0 = time.perf_counter()
            make_synthetic(data, size, args.vocab_size, args.shard_tokens)
            print(f"wrote synthetic dataset: {size:,} tokens in {time.perf_counter() - t0:.0f} s "
                  f"({len(list(data.glob('*.bin')))} shards, ShardWriter)", flush=True)
            runs.append((size, data, args.batches))
        runs.insert(1, (args.tokens, work / f"data_{args.tokens}", 0))  # one whole epoch of the small one
        speeds = []
        for _, data, batches in runs:
            cmd = [sys.executable, __file__, "_read", str(data), str(args.seq_len), str(args.batch), str(batches)]
            r = json.loads(subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout)
            speeds.append(r["tokens_per_s"])
            print(f"loader on {r['corpus_tokens']:,} tokens, seq_len {args.seq_len} x batch {args.batch}, shuffled, "
                  f"{r['batches']:,} batches = {r['tokens']:,} tokens in {r['seconds']:.1f} s -> "
                  f"{r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_cpu_s']:,.0f} per CPU second); "
                  f"RSS {r['rss_start_mb']:.0f} -> {r['rss_end_mb']:.0f} MiB "
                  f"(USS {r['uss_end_mb']:.0f} MiB), peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
        train = training_tokens_per_s()
        print(f"debug model forward+backward+AdamW on this CPU: {train:,.0f} tokens/s (seq 256, batch 8); "
              f"the slowest loader run is {min(speeds) / train:,.0f}x faster")
    finally:
        shutil.rmtree(work)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="prepare_data tokens/s per worker count")
    pp.add_argument("--corpus", nargs="+", default=[str(ROOT.parent / "shared/data/corpus")])
    pp.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/weights/llama2c_tokenizer.model"))
    pp.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    pp.add_argument("--workdir", default=None, help="where temporary outputs go (default: system temp)")
    pl = sub.add_parser("loader", help="loader tokens/s and peak memory at two corpus sizes")
    pl.add_argument("--tokens", type=int, default=300_000_000, help="tokens of the smaller synthetic corpus")
    pl.add_argument("--scale", type=int, default=10, help="the larger corpus is this many times bigger")
    pl.add_argument("--vocab_size", type=int, default=64000)
    pl.add_argument("--shard_tokens", type=int, default=100_000_000)
    pl.add_argument("--seq_len", type=int, default=2048)
    pl.add_argument("--batch", type=int, default=8)
    pl.add_argument("--batches", type=int, default=10_000, help="batches read from each corpus")
    pl.add_argument("--workdir", default=None)
    if len(sys.argv) > 1 and sys.argv[1] == "_read":  # internal: the measuring child process
        data, seq_len, batch, batches = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(read_batches(data, seq_len, batch, batches)))
        return
    args = p.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    bench_prepare(args) if args.cmd == "prepare" else bench_loader(args)


if __name__ == "__main__":
    main()
