"""Helpers of benchmarks/gpu_check.sh: loss-curve comparison, export parity of a GPU run, the summary table.

    python benchmarks/gpu_report.py curves --run RUN_DIR --ref RUN_DIR_OR_JSON --json OUT.json
    python benchmarks/gpu_report.py export_parity --run RUN_DIR --hf HF_DIR --device cuda --json OUT.json
    python benchmarks/gpu_report.py reference --run RUN_DIR --data DATA_DIR --out benchmarks/gpu_reference_loss.json
    python benchmarks/gpu_report.py summary --work WORK_DIR --out SUMMARY.md
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def loss_curve(source: str | Path) -> dict[int, float]:
    """step -> training loss, from a run directory's metrics.jsonl or a reference JSON written by `reference`."""
    from pretrain.metrics import read_metrics

    path = Path(source)
    if path.is_file():
        return {int(k): v for k, v in json.loads(path.read_text())["loss"].items()}
    return {r["step"]: r["loss"] for r in read_metrics(path) if r.get("loss") is not None}


def data_fingerprint(data_dir: str | Path) -> str | None:
    """Hash of the tokenizer and the token shards (not the manifest: it records absolute source paths)."""
    import hashlib

    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        return None
    h = hashlib.sha256(json.loads(manifest.read_text())["tokenizer_sha256"].encode())
    for shard in sorted(data_dir.glob("*.bin")):
        h.update(shard.read_bytes())
    return h.hexdigest()[:16]


def cmd_curves(args: argparse.Namespace) -> dict[str, Any]:
    run, ref = loss_curve(args.run), loss_curve(args.ref)
    steps = sorted(set(run) & set(ref))
    if not steps:
        raise ValueError(f"no common logged steps between {args.run} ({len(run)} steps) and {args.ref} ({len(ref)})")
    diffs = [abs(run[s] - ref[s]) for s in steps]
    tail = steps[-max(1, len(steps) // 5):]  # the last fifth: where the curves have settled
    result = {"run": str(args.run), "ref": str(args.ref), "steps": len(steps), "max_abs_diff": max(diffs),
              "mean_abs_diff": statistics.fmean(diffs), "first_loss": [run[steps[0]], ref[steps[0]]],
              "last_loss": [run[steps[-1]], ref[steps[-1]]],
              "tail_mean_rel_diff": abs(statistics.fmean(run[s] for s in tail) / statistics.fmean(ref[s] for s in tail)
                                        - 1)}
    if Path(args.ref).is_file():
        ref_fp = json.loads(Path(args.ref).read_text()).get("data_fingerprint")
        result["same_data"] = ref_fp is not None and ref_fp == data_fingerprint(args.data) if args.data else None
    # bf16 follows fp32 when the settled losses agree within 5%: bf16 rounding moves single steps, not the trend.
    result["follows"] = result["tail_mean_rel_diff"] < 0.05
    print(f"loss curves over {len(steps)} steps: max |diff| {result['max_abs_diff']:.4f}, mean |diff| "
          f"{result['mean_abs_diff']:.4f}, last {run[steps[-1]]:.4f} vs {ref[steps[-1]]:.4f}, settled means differ by "
          f"{result['tail_mean_rel_diff']:.1%} -> {'follows' if result['follows'] else 'DOES NOT follow'}")
    return result


def cmd_reference(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    curve = loss_curve(args.run)
    result = {"what": "fp32 CPU loss curve of benchmarks/gpu_check.sh's debug run", "torch": torch.__version__,
              "data_fingerprint": data_fingerprint(args.data), "loss": {str(k): v for k, v in sorted(curve.items())}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def cmd_export_parity(args: argparse.Namespace) -> dict[str, Any]:
    """Logits of the exported HF folder under transformers against our model read from the DeepSpeed checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from artifacts.run_dir import load_checkpoint_model

    device = torch.device(args.device)
    ours = load_checkpoint_model(args.run, config_overrides={"attn_impl": "sdpa"})
    ours = ours.to(device=device, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32,
                                                  attn_implementation="sdpa").to(device).eval()
    torch.manual_seed(0)
    x = torch.randint(0, ours.config.vocab_size, (2, 64), device=device)
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    # fp32 on both sides; TF32 matmuls (if enabled) would land near 3e-4, so 1e-3 still separates a bad export.
    result = {"rel_l2": rel, "max_abs": (a - b).abs().max().item(), "ok": rel < 1e-3, "device": str(device)}
    print(f"export parity: relative L2 {rel:.2e}, max |diff| {result['max_abs']:.2e} -> "
          f"{'ok' if result['ok'] else 'MISMATCH'}")
    return result


# --------------------------------------------------------------------------------------------------------------
# Summary


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def last_train_row(run_dir: Path) -> dict[str, Any] | None:
    from pretrain.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if "tokens_per_sec" in r]
    return rows[-1] if rows else None


def cmd_summary(args: argparse.Namespace) -> str:
    work = Path(args.work)
    lines = ["# GPU check (benchmarks/gpu_check.sh)", ""]
    env = work / "env.txt"
    if env.is_file():
        lines += ["```", env.read_text().strip(), "```", ""]
    lines += ["## Steps", "", "| step | exit | seconds | command |", "| --- | --- | --- | --- |"]
    steps = work / "steps.tsv"
    for row in (steps.read_text().splitlines() if steps.is_file() else []):
        name, rc, secs, cmd = (row.split("\t") + ["", "", "", ""])[:4]
        status = ("ok" if rc == "0" else "skipped" if rc == "skip"
                  else f"**{rc}**" + (" (timeout)" if rc in ("124", "137") else ""))
        cmd = cmd.replace(str(work.resolve()), "$WORK").replace(str(work), "$WORK").replace("|", "/")
        lines.append(f"| {name} | {status} | {secs} | `{cmd}` |")
    lines.append("")

    tests = work / "pytest_summary.txt"
    if tests.is_file():
        lines += ["## GPU tests", "", "```", tests.read_text().strip(), "```", ""]

    curves = [(p.stem, read_json(p)) for p in sorted(work.glob("curves_*.json"))]
    if any(c for _, c in curves):
        lines += ["## bf16 (GPU) vs fp32 loss curve, debug model", "",
                  "| reference | steps | max abs diff | mean abs diff | last loss (bf16 / fp32) | settled diff "
                  "| follows |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, c in curves:
            if c:
                lines.append(f"| {name.removeprefix('curves_')} | {c['steps']} | {c['max_abs_diff']:.4f} | "
                             f"{c['mean_abs_diff']:.4f} | {c['last_loss'][0]:.4f} / {c['last_loss'][1]:.4f} | "
                             f"{c['tail_mean_rel_diff']:.1%} | {c['follows']} |")
        lines.append("")
    parity = read_json(work / "export_parity.json")
    if parity:
        lines += [f"Export parity (bf16 DeepSpeed checkpoint -> HF folder, fp32 logits on {parity['device']}): "
                  f"relative L2 {parity['rel_l2']:.2e}, max abs {parity['max_abs']:.2e}, ok={parity['ok']}", ""]

    benches = [(p.stem, read_json(p)) for p in sorted(work.glob("bench_*.json"))]
    if any(b for _, b in benches):
        lines += ["## Model forward+backward (benchmarks/bench_model.py)", "",
                  "FLOPs/token = 6 * (non-embedding parameters + output projection) + 6 * n_layers * dim * seq_len "
                  "(causal attention, forward+backward); MFU = achieved / peak dense bf16 (989 TFLOP/s for H100/H200 "
                  "SXM).", "",
                  "| bench | model | batch x seq | sdpa | tokens/s | ms/step | TFLOP/s | MFU | peak mem GiB "
                  "| kernel ms: gemm / attention / other |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, b in benches:
            if not b:
                continue
            for model, r in b["runs"].items():
                tf = f"{r['tflops']:.0f}" if r.get("tflops") is not None else "-"
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
                mem = f"{r['max_memory_gib']:.1f}" if r.get("max_memory_gib") is not None else "-"
                split = r.get("breakdown_ms")
                split = " / ".join(f"{split[k]:.1f}" for k in ("gemm", "attention", "other")) if split else "-"
                lines.append(f"| {name.removeprefix('bench_')} | {model} | {b['batch']} x {b['seq_len']} | "
                             f"{b['sdpa_backend']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} | {tf} | {mfu} | "
                             f"{mem} | {split} |")
        lines.append("")

    runs = sorted(p for p in work.glob("train_*") if p.is_dir())
    rows = [(p.name, last_train_row(p)) for p in runs]
    if any(r for _, r in rows):
        lines += ["## DeepSpeed training (pretrain/train.py), last log window", "",
                  "| run | step | loss | tokens/s (per GPU) | MFU | memory GiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in rows:
            if r:
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
                loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
                lines.append(f"| {name.removeprefix('train_')} | {r['step']} | {loss} | {r['tokens_per_sec']:,.0f} | "
                             f"{mfu} | {r.get('memory_gib', 0):.1f} |")
        lines.append("")
    text = "\n".join(lines)
    Path(args.out).write_text(text + "\n")
    print(text)
    return {"summary": str(args.out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curves")
    c.add_argument("--run", required=True)
    c.add_argument("--ref", required=True, help="a run directory or a reference JSON")
    c.add_argument("--data", default=None, help="data dir of --run, to check a reference JSON used the same data")
    c.add_argument("--json", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--run", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    e = sub.add_parser("export_parity")
    e.add_argument("--run", required=True)
    e.add_argument("--hf", required=True)
    e.add_argument("--device", default="cuda")
    e.add_argument("--json", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--work", required=True)
    s.add_argument("--out", required=True)
    args = p.parse_args()
    result = {"curves": cmd_curves, "reference": cmd_reference, "export_parity": cmd_export_parity,
              "summary": cmd_summary}[args.cmd](args)
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
