"""Lets `python evaluation/evaluate_X.py` (run as a file, from anywhere) import the project like `python -m` does.

Run as a file, Python puts evaluation/ first on sys.path, where its modules (data.py, report.py, ...) would shadow
top-level packages, and the repository root is not on the path at all. Each evaluator imports this module only
when it runs as a file (`__package__` empty); it drops evaluation/ from sys.path and puts the repository root
first. This is the one place that does so.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _is_here(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == HERE
    except OSError:
        return False


sys.path[:] = [str(ROOT)] + [p for p in sys.path if not _is_here(p) and p != str(ROOT)]


def run_as_module(file: str) -> None:
    """Run the evaluator file `file` as `python -m evaluation.<name>` would, then exit: the same module, package
    and relative imports either way."""
    import runpy

    runpy.run_module(f"evaluation.{Path(file).stem}", run_name="__main__", alter_sys=True)
    sys.exit(0)
