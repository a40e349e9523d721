"""Shared test set-up: the `slow` marker and the fixtures every test module may use.

    scripts/test.sh            # everything
    scripts/test.sh --fast     # without the tests marked slow (pytest -m "not slow")

Slow tests launch DeepSpeed jobs, several processes or torch.compile (from about 7 s to minutes each on 2 CPU
cores); --fast keeps the suite under 3 minutes there (README: the measured times). Helpers and
fixtures shared by several modules live in tests/fixtures_*.py; the pytest fixtures among them are registered
here, so a test names them as arguments without importing them.
"""
from __future__ import annotations

from fixtures_eval import eval_assets  # noqa: F401  (pytest fixture for every module)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: launches DeepSpeed, several processes or torch.compile (skipped by "
                                       "scripts/test.sh --fast)")
