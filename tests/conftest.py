"""Shared fixtures: explicit, seeded generators (no test touches the global RNG)."""

import pytest
import torch

# The suite's tensors are tiny: one intra-op thread is fastest, and on a busy
# 2-core machine a second thread that spins waiting for its partner can make a
# run many times slower. Results do not depend on it (both sides of every
# comparison run in this process).
torch.set_num_threads(1)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
