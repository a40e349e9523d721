"""Delta weights, as Toucan-7B ships them: release target - base so users rebuild the target from their own base.

    python -m finetune.delta make  --base LLAMA --target TUNED --output_dir DELTA
    python -m finetune.delta apply --base LLAMA --delta DELTA --output_dir TUNED2

`make` stores target - base in fp32 (safetensors shards) with the base's checksum (sha256 over its weight tensors:
names, dtypes, shapes and bytes, so sharding and file names do not matter) and vocabulary size, plus the target's
config and tokenizer files. `apply` refuses, in one line naming both, a base whose vocabulary or checksum differs
from the recorded one, then writes base + delta (fp32 arithmetic) in the target's dtypes as a Hugging Face folder.
Both work one tensor at a time, so memory holds about one shard, not whole models.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common.cli import entry_point, parser
from common.errors import MissingFileError, UserError
from common.io import atomic_dir, check_output_dir
from common.tensors import DTYPES

DELTA_CONFIG = "delta_config.json"
DELTA_INDEX = "delta.safetensors.index.json"
SHARD_BYTES = 2 * 2**30
EMBEDDING = "model.embed_tokens.weight"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


class TensorFolder:
    """The weight tensors of a Hugging Face folder (or a delta folder), read one at a time."""

    def __init__(self, path: str | Path, index_names: tuple[str, ...] = ("model.safetensors.index.json",),
                 single: str = "model.safetensors"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingFileError(f"{self.path}: folder not found")
        self.file_of: dict[str, Path] = {}
        for index in index_names:
            if (self.path / index).is_file():
                weight_map = json.loads((self.path / index).read_text())["weight_map"]
                self.file_of = {k: self.path / v for k, v in weight_map.items()}
                break
        else:
            if (self.path / single).is_file():
                with safe_open(str(self.path / single), "pt") as f:
                    self.file_of = {k: self.path / single for k in f.keys()}
            else:
                raise MissingFileError(f"{self.path}: no {single} (nor a sharded index); only safetensors "
                                       "folders are read here (convert .bin folders with save_pretrained)")
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), "pt")
        return self._handles[file].get_tensor(name)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape without reading the data."""
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), "pt")
        sl = self._handles[file].get_slice(name)
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(sl.get_dtype())
        return dtype, tuple(sl.get_shape())

    def vocab_size(self) -> int:
        if EMBEDDING in self.file_of:
            return self.meta(EMBEDDING)[1][0]
        return json.loads((self.path / "config.json").read_text())["vocab_size"]


def checksum(folder: TensorFolder, desc: str) -> str:
    """sha256 over every weight tensor in name order: name, dtype, shape, then the raw bytes."""
    h = hashlib.sha256()
    for name in tqdm(folder.names(), desc=desc, unit="tensor", leave=False):
        t = folder.get(name).contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_shards(names: list[str], nbytes: Callable[[str], int], compute: Callable[[str], torch.Tensor], out: Path,
                 stem: str, index_name: str, desc: str) -> None:
    """Tensors `compute(name)` into safetensors shards of about SHARD_BYTES, planned from sizes up front."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes(name) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(name)
    files = [f"{stem}.safetensors"] if len(shards) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    with tqdm(total=len(names), desc=desc, unit="tensor") as progress:
        for file, shard in zip(files, shards):
            tensors = {}
            for name in shard:
                tensors[name] = compute(name).contiguous()
                weight_map[name] = file
                progress.update()
            save_file(tensors, str(out / file), metadata={"format": "pt"})
    if len(files) > 1:
        (out / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Config, generation config, tokenizer and chat-template files: everything that is not weights."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in skip and not f.name.startswith("."):
            shutil.copyfile(f, dst / f.name)


def make_delta(base_path: str | Path, target_path: str | Path, output_dir: str | Path,
               overwrite: bool = False) -> Path:
    check_output_dir(output_dir, overwrite)
    base, target = TensorFolder(base_path), TensorFolder(target_path)
    if base.names() != target.names():
        only_b = sorted(set(base.names()) - set(target.names()))[:3]
        only_t = sorted(set(target.names()) - set(base.names()))[:3]
        raise UserError(f"base {base.path} and target {target.path} hold different tensors (only in base: "
                        f"{only_b}, only in target: {only_t}); a delta needs the same architecture")
    for name in base.names():
        if base.meta(name)[1] != target.meta(name)[1]:
            raise UserError(f"tensor {name} has shape {base.meta(name)[1]} in base {base.path} but "
                            f"{target.meta(name)[1]} in target {target.path}; a delta needs the same shapes")
    config = {"format": "delta", "arithmetic": "float32", "base_sha256": checksum(base, "base checksum"),
              "base_vocab_size": base.vocab_size(), "base": str(base.path.resolve()),
              "target_dtypes": {n: str(target.meta(n)[0]).removeprefix("torch.") for n in target.names()}}
    with atomic_dir(output_dir, overwrite) as tmp:
        copy_side_files(target.path, tmp)
        write_shards(base.names(), lambda n: 4 * _numel(base.meta(n)[1]),
                     lambda n: target.get(n).float() - base.get(n).float(), tmp, "delta", DELTA_INDEX, "delta")
        (tmp / DELTA_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(output_dir)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def apply_delta(base_path: str | Path, delta_path: str | Path, output_dir: str | Path,
                overwrite: bool = False) -> Path:
    delta_path = Path(delta_path)
    check_output_dir(output_dir, overwrite)
    config_file = delta_path / DELTA_CONFIG
    if not config_file.is_file():
        raise MissingFileError(f"{delta_path}: no {DELTA_CONFIG}; not a folder written by `finetune.delta make`")
    config = json.loads(config_file.read_text())
    delta = TensorFolder(delta_path, (DELTA_INDEX,), "delta.safetensors")
    base = TensorFolder(base_path)
    vocab = base.vocab_size()
    if vocab != config["base_vocab_size"]:
        raise UserError(f"delta {delta_path} was made for a base with a {config['base_vocab_size']}-token "
                        f"vocabulary, but base {base.path} has {vocab}: apply it to the base it was made from")
    digest = checksum(base, "base checksum")
    if digest != config["base_sha256"]:
        raise UserError(f"delta {delta_path} was made from a base with weights sha256 "
                        f"{config['base_sha256'][:16]}…, but base {base.path} has {digest[:16]}…: apply it to the "
                        "base it was made from")
    if base.names() != delta.names():
        raise UserError(f"delta {delta_path} and base {base.path} hold different tensors")
    dtypes = {n: DTYPES[d] for n, d in config["target_dtypes"].items()}

    def compute(name: str) -> torch.Tensor:
        return (base.get(name).float() + delta.get(name).float()).to(dtypes[name])

    with atomic_dir(output_dir, overwrite) as tmp:
        copy_side_files(delta_path, tmp, skip=(DELTA_CONFIG,))
        write_shards(delta.names(), lambda n: dtypes[n].itemsize * _numel(delta.meta(n)[1]), compute, tmp,
                     "model", "model.safetensors.index.json", "apply")
    return Path(output_dir)


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = parser("python -m finetune.delta", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="target - base -> a delta folder")
    mk.add_argument("--base", required=True, help="Hugging Face folder of the original base model")
    mk.add_argument("--target", required=True, help="Hugging Face folder of the fine-tuned model")
    ap = sub.add_parser("apply", help="base + delta -> the target as a Hugging Face folder")
    ap.add_argument("--base", required=True, help="Hugging Face folder of the original base model")
    ap.add_argument("--delta", required=True, help="folder written by `make`")
    for s in (mk, ap):
        s.add_argument("--output_dir", required=True, help="folder to write")
        s.add_argument("--overwrite", action="store_true", help="replace --output_dir if it is not empty")
    args = p.parse_args(argv)
    if args.command == "make":
        out = make_delta(args.base, args.target, args.output_dir, args.overwrite)
    else:
        out = apply_delta(args.base, args.delta, args.output_dir, args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
