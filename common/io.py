"""Crash-safe writes: readers see the old file (or folder) or the new one, never half of either.

Every file goes to a temporary name in the same directory, is flushed and fsynced, and is renamed over its target
with os.replace (atomic on POSIX); the directory is fsynced after, so the rename survives a power cut. Folders are
built under a temporary name and renamed into place the same way. Temporary names start with a dot and end in
`.tmp`, so a crash leaves only hidden debris that the next write replaces.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import UserError

# Folders made with tempfile.mkdtemp are 0700 and its files 0600; exported folders must be readable by the other
# users of a shared filesystem, so finished outputs get the modes a plain mkdir/open would have given them.
_UMASK = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return _UMASK


def tmp_path_for(path: str | Path) -> Path:
    """The temporary sibling a write of `path` goes through: `.NAME.PID.tmp` in the same directory."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so renames inside it are durable (a no-op where the OS cannot open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under `path` (torch.save and most writers do not)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8", fsync: bool = True
                 ) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on a clean exit it replaces `path`, on an error it is removed.

    `mode` is "w" (text) or "wb" (binary). `fsync=False` skips the flush to disk for files that are cheap to remake
    (plots, reports that are rewritten every few steps); the rename is atomic either way.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = tmp_path_for(path)
    f = open(tmp, mode, encoding=encoding if mode == "w" else None)
    try:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        f.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path, "w", fsync=fsync) as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` atomically."""
    with atomic_write(path, "wb", fsync=fsync) as f:
        f.write(data)


def write_json(path: str | Path, obj: Any, fsync: bool = True, indent: int | None = 2) -> None:
    """Write `obj` as UTF-8 JSON (non-ASCII kept readable) to `path` atomically, ending in a newline."""
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", fsync=fsync)


def replace_file(src: str | Path, dst: str | Path) -> None:
    """Move a finished file written elsewhere onto `dst` atomically (fsync, normal permissions, rename)."""
    src, dst = Path(src), Path(dst)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(src, 0o666 & ~_umask())
    os.replace(src, dst)
    fsync_dir(dst.parent)


def check_output_dir(path: str | Path, overwrite: bool, flag: str = "--output_dir") -> Path:
    """The one overwrite rule for commands that write a folder: a non-empty existing folder needs --overwrite.

    Called before any work starts, so a refused run costs nothing. Returns the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{flag} {path} already exists and is not empty; pass --overwrite to replace what it "
                        "holds, or choose another folder")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary sibling name; on a clean exit it takes the place of `path`.

    An existing `path` is replaced only when `overwrite` (else a clear error before anything is written). On an
    error the temporary folder is removed and `path` is untouched. The finished folder and its files get normal
    permissions (0777/0666 less the umask) and are fsynced before the rename.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        mask = _umask()
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
        fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
