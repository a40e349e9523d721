"""Time limits for the tests' subprocesses and waits, scaled for a loaded machine.

Each limit in the tests is written as what the step needs on an idle 2-core machine with a margin; `limit()`
multiplies it by LLAMA_TEST_TIMEOUT_SCALE (default 4: the suite ran about 4x slower with another job on the same
2 cores, 38 min against 9). A limit only stops a hung step, so a generous one costs nothing when all is well.

    LLAMA_TEST_TIMEOUT_SCALE=10 scripts/test.sh      # a very slow or very busy machine
"""
from __future__ import annotations

import os

DEFAULT_SCALE = 4.0


def scale() -> float:
    """The factor from LLAMA_TEST_TIMEOUT_SCALE (a positive number), else DEFAULT_SCALE."""
    raw = os.environ.get("LLAMA_TEST_TIMEOUT_SCALE", "").strip()
    if not raw:
        return DEFAULT_SCALE
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"LLAMA_TEST_TIMEOUT_SCALE={raw!r}: expected a positive number such as 4 (or unset it)")
    return value


def limit(seconds: float) -> float:
    """`seconds` (the idle-machine limit) times the scale."""
    return seconds * scale()
