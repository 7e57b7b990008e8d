"""Shared test fixtures: paths to ../shared/fixtures and the tiny model's golden data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests pass their settings explicitly: a COSY_* variable in the runner's environment (a typo,
# an operator's tuning) must change no test's outcome, so none reaches the tests or the
# processes they start.
for _var in [v for v in os.environ if v.startswith("COSY_")]:
    del os.environ[_var]

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
TINY = FIXTURES / "cosyvoice3-tiny"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"golden fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_dir(fixtures_dir: Path) -> Path:
    return TINY


@pytest.fixture(scope="session")
def golden(tiny_dir: Path) -> dict:
    return torch.load(tiny_dir / "golden.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_config(tiny_dir: Path):
    from worker.config import read_model_config

    return read_model_config(tiny_dir)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference after checking the shapes agree."""
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != golden {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def flow(tiny_dir, tiny_config):
    """The tiny fixture's flow with its fixed noise."""
    from worker.flow import load_flow
    from worker.noise import fixed_noise_for

    return load_flow(tiny_dir / "flow.pt", tiny_config.flow, fixed_noise_for(tiny_config))
