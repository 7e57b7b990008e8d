"""Shared test fixtures: paths to ../shared/fixtures and the tiny model's golden data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
