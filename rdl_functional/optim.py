"""Optimizers: pure maps from (params, grads) to new params."""

from __future__ import annotations

import math

import torch

from .tree import Tree, _map, tree_difference

__all__ = ["sgd_step"]


def _check_lr(lr: float) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"sgd_step: lr must be a float, got {type(lr).__name__}")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"sgd_step: lr must be finite and ≥ 0, got {lr}")
    return float(lr)


def sgd_step(params: Tree, grads: Tree, lr: float) -> Tree:
    """One step of gradient descent: ``p − lr · g`` for every leaf, into new tensors.

    Neither ``params`` nor ``grads`` is changed. The update is the kernel that
    ``torch.optim.SGD`` runs (``add`` with ``alpha=-lr``), so both give the
    same bits.

    >>> import torch
    >>> sgd_step({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, lr=0.25)
    {'w': tensor([0.5000])}

    Raises:
        ValueError: ``grads`` differs from ``params`` in structure, shape or
            dtype (the message names the first differing path), or ``lr`` is
            negative, NaN or infinite.
        TypeError: ``lr`` is not a number.
    """
    lr = _check_lr(lr)
    found = tree_difference(params, grads, names=("params", "grads"), leaves=True)
    if found:
        raise ValueError(f"sgd_step: {found}")
    return _map(lambda p, g: torch.add(p, g, alpha=-lr), params, (grads,))
