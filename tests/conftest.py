"""Shared fixtures: explicit, seeded generators (no test touches the global RNG)."""

import pytest
import torch


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
