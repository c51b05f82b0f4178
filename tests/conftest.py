"""Shared test setup: the ``gpu`` marker, a small CPU thread count, and a fixed seed per test."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Make ``import layers`` / ``import zoo`` work however pytest is started (``pytest`` or ``python -m pytest``).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GPU_SKIP_REASON = "needs a CUDA GPU (none on this machine)"

# Tests use tiny tensors, for which intra-op threading is pure overhead: on a busy 2-core machine a
# 22x48 @ 48x48 matmul took 0.15 ms with 2 threads against 3 us with 1. Override with EFFZOO_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("EFFZOO_TEST_THREADS", "1")))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"gpu: the test runs on a CUDA device; skipped when none is available ({GPU_SKIP_REASON})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same RNG state, so a failure reproduces exactly.

    The seed is 0; set EFFZOO_TEST_SEED to check that tolerances hold for other random inputs.
    """
    value = int(os.environ.get("EFFZOO_TEST_SEED", "0"))
    torch.manual_seed(value)
    return value
