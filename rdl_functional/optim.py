"""Optimizers: pure maps from (params, grads) to new params, and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .tree import Tree, _map, _paired, tree_difference

__all__ = ["Schedule", "constant_schedule", "linear_schedule", "sgd_step"]

Schedule = Callable[[int], float]
"""A learning rate as a function of the step count (0 for the first step), as in optax."""


def _check_lr(lr: float, where: str = "sgd_step") -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{where}: lr must be a float or a schedule, got {type(lr).__name__}")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}: lr must be finite and ≥ 0, got {lr}")
    return float(lr)


def sgd_step(params: Tree, grads: Tree, lr: float) -> Tree:
    """One step of gradient descent: ``p − lr · g`` for every leaf, into new tensors.

    Neither ``params`` nor ``grads`` is changed. The update is the kernel that
    ``torch.optim.SGD`` runs (``add`` with ``alpha=-lr``, a fused multiply-add),
    so both give the same bits; one ``torch._foreach_add`` call updates every
    leaf, and one walk over both trees checks them.

    >>> import torch
    >>> sgd_step({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, lr=0.25)
    {'w': tensor([0.5000])}

    Raises:
        ValueError: ``grads`` differs from ``params`` in structure, shape or
            dtype (the message names the first differing path), or ``lr`` is
            negative, NaN or infinite.
        TypeError: ``lr`` is not a number.
    """
    if type(lr) is not float or not 0 <= lr < math.inf:
        lr = _check_lr(lr)
    paired = _paired(params, grads)
    if paired is not None:
        return paired.fill(torch._foreach_add(paired.mine, paired.theirs, alpha=-lr) if paired.mine else [])
    # Not plain dicts of matching tensors: say where they differ, or take the general walk.
    found = tree_difference(params, grads, names=("params", "grads"), leaves=True)
    if found:
        raise ValueError(f"sgd_step: {found}")
    return _map(lambda p, g: torch.add(p, g, alpha=-lr), params, (grads,))


def _check_real(where: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def constant_schedule(value: float) -> Schedule:
    """The schedule that gives ``value`` at every step.

    >>> constant_schedule(0.1)(1000)
    0.1
    """
    value = _check_real("constant_schedule", "value", value)
    return lambda count: value


def linear_schedule(init_value: float, end_value: float, transition_steps: int) -> Schedule:
    """Go linearly from ``init_value`` at step 0 to ``end_value`` at ``transition_steps``, then stay.

    ``init_value + (end_value − init_value) · min(count, transition_steps) / transition_steps``,
    the formula of ``optax.linear_schedule``. Decaying to 0 over a whole run
    lets SGD take large steps early and settle at the end, instead of
    stopping wherever its gradient noise has carried it.

    >>> schedule = linear_schedule(0.8, 0.0, transition_steps=4)
    >>> [schedule(k) for k in range(6)]
    [0.8, 0.6000000000000001, 0.4, 0.19999999999999996, 0.0, 0.0]
    """
    init_value = _check_real("linear_schedule", "init_value", init_value)
    end_value = _check_real("linear_schedule", "end_value", end_value)
    if isinstance(transition_steps, bool) or not isinstance(transition_steps, int) or transition_steps < 1:
        raise ValueError(f"linear_schedule: transition_steps must be an int ≥ 1, got {transition_steps!r}")

    def schedule(count: int) -> float:
        return init_value + (end_value - init_value) * min(count, transition_steps) / transition_steps

    return schedule
