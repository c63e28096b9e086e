"""Shared test fixtures.

Parity fixtures live outside the project (`../shared/golden` next to the checkout, which CI has).
Point `CHATREX_GOLDEN` elsewhere to use another copy; tests that need it skip with a reason when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("CHATREX_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


def _golden(sub: str) -> Path:
    path = GOLDEN_DIR / sub
    if not path.is_dir():
        pytest.skip(f"parity fixtures not found at {path} (set CHATREX_GOLDEN to the golden/ folder)")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"parity fixtures not found at {GOLDEN_DIR} (set CHATREX_GOLDEN)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def upn_golden() -> Path:
    return _golden("upn_small")


@pytest.fixture(scope="session")
def mllm_golden() -> Path:
    return _golden("mllm_tiny")
