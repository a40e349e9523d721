"""Weights files of a Hugging Face folder, read and written one tensor at a time.

Reading: `catalog(path)` lists every tensor of a folder (model.safetensors, pytorch_model.bin, or the sharded forms
named by model.safetensors.index.json / pytorch_model.bin.index.json) with its file and shape, checking the index
against the shards; `Entry.read_into(dest)` then fills a tensor in place. A safetensors tensor is read with
readinto straight into the destination (no copy of the file in memory); a .bin shard is opened with torch.load
(weights_only, mmap) and dropped as soon as its tensors are copied. So a model built empty and filled this way
peaks near one copy of its weights.

Writing: `write_safetensors` streams each tensor's bytes from its own memory (a dtype cast is one tensor's copy at
a time), and `write_weights` splits the tensors into shards of at most `max_shard_size` bytes with an index, as
transformers' save_pretrained does.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from common.errors import MissingFileError, UserError

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
SAFE_FILE, BIN_FILE = "model.safetensors", "pytorch_model.bin"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default

_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
_SAFE_NAMES = {v: k for k, v in _SAFE_DTYPES.items()}


def parse_size(size: int | str, flag: str = "--max_shard_size") -> int:
    """Bytes in `size` as transformers reads it: an int, or "500MB", "5GB" (powers of 1000), "2GiB" (of 1024);
    a lowercase final "b" ("5Gb") means bits."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?[Bb])?\s*", size, flags=re.IGNORECASE)
        if not m:
            raise UserError(f"{flag} {size!r} is not a size: give bytes (1000000) or e.g. 500MB, 5GB, 2GiB")
        value = int(m.group(1))
        unit = m.group(2) or ""
        if unit:
            power = "KMG".index(unit[0].upper()) + 1
            value *= (1024 if unit[1].lower() == "i" else 1000) ** power
            if unit.endswith("b"):
                value //= 8
    if value <= 0:
        raise UserError(f"{flag} {size!r} must be more than 0 bytes")
    return value


@dataclass(frozen=True)
class Entry:
    """One tensor of a weights file: enough to check it and to read it later."""
    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1  # safetensors: absolute byte offset of the data; -1 for .bin

    def read_into(self, dest: torch.Tensor, opened: dict[Path, object]) -> None:
        """Copy this tensor into `dest` (same shape; any float dtype). `opened` caches open files / loaded .bin
        state dicts for the caller, who closes them (`close_all`) once a file is done."""
        if self.offset < 0:
            state = opened.get(self.file)
            if state is None:
                state = opened[self.file] = load_bin(self.file)
            dest.copy_(state[self.name])  # type: ignore[index]
            return
        fh = opened.get(self.file)
        if fh is None:
            fh = opened[self.file] = open(self.file, "rb")
        direct = dest.dtype == self.dtype and dest.is_contiguous()
        buf = dest if direct else torch.empty(self.shape, dtype=self.dtype)
        fh.seek(self.offset)  # type: ignore[attr-defined]
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
        got = fh.readinto(view)  # type: ignore[attr-defined]
        if got != len(view):
            raise UserError(f"{self.file}: tensor {self.name} is cut short ({got} of {len(view)} bytes); the file "
                            "is truncated, download it again")
        if not direct:
            dest.copy_(buf)


def close_all(opened: dict[Path, object]) -> None:
    for value in opened.values():
        if hasattr(value, "close"):
            value.close()  # type: ignore[attr-defined]
    opened.clear()


def load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin state dict: weights_only, memory-mapped where the file allows it (zip format)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre zip) format cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def safetensors_entries(file: Path) -> list[Entry]:
    """The tensors a .safetensors file holds, from its header alone."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise UserError(f"{file}: not a safetensors file (bad header length); download it again")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{file}: not a safetensors file (unreadable header); download it again") from None
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFE_DTYPES:
            raise UserError(f"{file}: tensor {name} has dtype {info.get('dtype')!r}, which is not supported here")
        begin, end = info["data_offsets"]
        if 8 + n + end > size:
            raise UserError(f"{file}: tensor {name} lies past the end of the file; the file is truncated, "
                            "download it again")
        out.append(Entry(file, name, tuple(info["shape"]), _SAFE_DTYPES[info["dtype"]], 8 + n + begin))
    return out


def bin_entries(file: Path) -> list[Entry]:
    state = load_bin(file)
    return [Entry(file, name, tuple(t.shape), t.dtype) for name, t in state.items() if isinstance(t, torch.Tensor)]


def catalog(path: Path) -> list[Entry]:
    """Every tensor of the Hugging Face folder `path`; a sharded folder's index is checked against its shards
    (a missing shard, a tensor in the wrong shard or one the index does not list is refused, naming both)."""
    for index_name, read in ((SAFE_INDEX, safetensors_entries), (BIN_INDEX, bin_entries)):
        index = path / index_name
        if not index.is_file():
            continue
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index}: not a shard index (no weight_map); download it again") from None
        entries: list[Entry] = []
        for shard in sorted(set(weight_map.values())):
            file = path / shard
            if not file.is_file():
                first = next(k for k, v in weight_map.items() if v == shard)
                raise MissingFileError(f"{index} names shard {shard} (for tensor {first}, among others), which is "
                                       f"not in {path}; download it again")
            for entry in read(file):
                listed = weight_map.get(entry.name)
                if listed != shard:
                    where = "does not list it" if listed is None else f"puts it in {listed}"
                    raise UserError(f"{file} holds tensor {entry.name}, but {index_name} {where}; the index and "
                                    "the shards do not belong together")
                entries.append(entry)
        found = {e.name for e in entries}
        absent = [k for k in weight_map if k not in found]
        if absent:
            raise UserError(f"{index} puts tensor {absent[0]} in {weight_map[absent[0]]}, which does not hold it; "
                            "the index and the shards do not belong together")
        return entries
    if (path / SAFE_FILE).is_file():
        return safetensors_entries(path / SAFE_FILE)
    if (path / BIN_FILE).is_file():
        return bin_entries(path / BIN_FILE)
    raise MissingFileError(f"{path}: no {SAFE_FILE} or {BIN_FILE} (nor a sharded {SAFE_INDEX} / {BIN_INDEX}) found")


def write_safetensors(file: Path, tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """A .safetensors file of `tensors` cast to `dtype`, written from each tensor's memory in turn."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * dtype.itemsize
        header[name] = {"dtype": _SAFE_NAMES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for _, t in tensors:
            t = t.detach().to(device="cpu", dtype=dtype).contiguous()
            if t.numel():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def write_weights(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                  max_shard_size: int) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards of at most max_shard_size bytes each (a
    larger tensor alone in its shard) and model.safetensors.index.json. Returns the files written."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = total = 0
    for name, t in tensors:
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        write_safetensors(out / SAFE_FILE, shards[0], dtype)
        return [out / SAFE_FILE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard, dtype)
        weight_map.update({t: name for t, _ in shard})
        files.append(out / name)
    (out / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2) + "\n")
    return files + [out / SAFE_INDEX]

