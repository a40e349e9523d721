"""Peak resident memory of opening and of exporting a Hugging Face folder of a randomly initialised 1B-shape model
(model preset "1b", fp32), against the bytes of its weights.

    python benchmarks/bench_load_memory.py --dir /work/runs_shared/mem1b [--max_shard_size 5GB]

The folder is written once (fp32 safetensors, ~4.9 GB; reused when it is already there). Each measurement runs in
a fresh subprocess: after the imports its resident set is the baseline; then
- open: artifacts.open_model(DIR, "cpu", "float32") (model.hf.load_hf: built on the meta device, filled tensor by
  tensor from the files);
- export: the opened model's peak is reset (/proc/self/clear_refs), then Transformer.to_hf(OUT) writes it
  (sharded above --max_shard_size) to DIR/../NAME_export, removed afterwards; when it wrote several shards,
  opening that sharded folder is measured as well.
Peaks are the kernel's VmHWM. The figures are printed as a Markdown table: peak RSS, peak minus the baseline
(memory the step itself took) and both as a multiple of the weight bytes. RSS does not depend on machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

import torch
from artifacts import open_model
from model.hf_shards import catalog

folder, what, out, shard = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
weight_bytes = sum(e.dtype.itemsize * torch.Size(e.shape).numel() for e in catalog(Path(folder)))
reset_peak()
base = status("VmRSS")
t = time.perf_counter()
model = open_model(folder, "cpu", "float32")
result = {"weight_bytes": weight_bytes, "open_base": base, "open_peak": status("VmHWM"),
          "open_s": time.perf_counter() - t}
if what == "export":
    held = status("VmRSS")
    reset_peak()
    t = time.perf_counter()
    model.to_hf(out, max_shard_size=shard)
    result.update(export_base=held, export_peak=status("VmHWM"), export_s=time.perf_counter() - t)
print("RESULT " + json.dumps(result))
"""


def make_folder(folder: Path) -> None:
    """A random fp32 1B-shape model written as a Hugging Face folder (in a subprocess: its memory is returned)."""
    code = ("import torch, sys\nfrom model import ModelConfig, Transformer\n"
            "torch.manual_seed(0)\n"
            "Transformer(ModelConfig.from_preset('1b')).to_hf(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def measure(folder: Path, what: str, out: Path, shard: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), what, str(out), shard], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"measurement failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder of the random 1B model (written when absent)")
    p.add_argument("--max_shard_size", default="5GB", help="shard size of the export")
    args = p.parse_args()
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        print(f"writing a random 1B-shape fp32 model to {folder}", flush=True)
        make_folder(folder)
    out = folder.with_name(folder.name + "_export")
    shutil.rmtree(out, ignore_errors=True)
    opened = measure(folder, "open", out, args.max_shard_size)
    exported = measure(folder, "export", out, args.max_shard_size)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    gib, w = 2**30, opened["weight_bytes"]
    rows = [("open", opened["open_peak"], opened["open_base"], opened["open_s"]),
            ("export", exported["export_peak"], exported["export_base"], exported["export_s"])]
    if len(shards) > 1:  # the sharded export, opened again
        again = measure(out, "open", out.with_name(out.name + "_unused"), args.max_shard_size)
        rows.append((f"open the {len(shards)} shards", again["open_peak"], again["open_base"], again["open_s"]))
    shutil.rmtree(out, ignore_errors=True)
    print(f"weights: {w / gib:.2f} GiB (fp32); export wrote {len(shards)} file(s) at --max_shard_size "
          f"{args.max_shard_size}")
    print("| step | peak RSS (GiB) | before the step (GiB) | peak / weights | (peak - before) / weights | s |")
    print("|---|---|---|---|---|---|")
    for name, peak, base, secs in rows:
        print(f"| {name} | {peak / gib:.2f} | {base / gib:.2f} | {peak / w:.2f}x | {(peak - base) / w:.2f}x | "
              f"{secs:.1f} |")


if __name__ == "__main__":
    main()
