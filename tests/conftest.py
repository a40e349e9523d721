"""Shared test set-up: the `slow` marker and the fixtures every test module may use.

    scripts/test.sh            # everything
    scripts/test.sh --fast     # without the tests marked slow (pytest -m "not slow")

Slow tests launch DeepSpeed jobs or several processes (tens of seconds each on a small CPU box). Helpers and
fixtures shared by several modules live in tests/fixtures_*.py; the pytest fixtures among them are registered
here, so a test names them as arguments without importing them.
"""
from __future__ import annotations

from fixtures_eval import eval_assets  # noqa: F401  (pytest fixture for every module)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: launches DeepSpeed or several processes (skipped by scripts/test.sh "
                                       "--fast)")
