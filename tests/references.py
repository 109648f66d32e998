"""torch.nn counterparts of our models, the oracles of the equivalence tests."""

from __future__ import annotations

import torch


def torch_seed_model() -> torch.nn.Sequential:
    """rf.seed_model() as torch.nn: the same layers, the same state-dict keys."""
    return torch.nn.Sequential(
        torch.nn.Linear(2, 25), torch.nn.ReLU(),
        torch.nn.Linear(25, 25), torch.nn.ReLU(),
        torch.nn.Linear(25, 25), torch.nn.ReLU(),
        torch.nn.Linear(25, 2), torch.nn.Tanh(),
    )  # fmt: skip
