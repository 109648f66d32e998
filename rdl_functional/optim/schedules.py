"""Learning-rate schedules: functions of the step count (0 for the first step), optax's formulas."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

__all__ = [
    "Schedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "linear_schedule",
    "piecewise_constant_schedule",
    "warmup_cosine_decay_schedule",
]

Schedule = Callable[[int], float]
"""A learning rate as a function of the step count (0 for the first step), as in optax."""


MAX_LR = 3.4028234663852886e38
"""The largest rate: float32's largest number (torch turns the rate into a float32 factor for float32 params)."""


def _check_lr(lr: float, where: str = "sgd_step") -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        if where == "sgd_step":  # the one place that takes no schedule
            hint = ": a schedule goes to rf.sgd(schedule), or to fit's lr=" if callable(lr) else ""
            raise TypeError(f"sgd_step: lr must be a number, got {type(lr).__name__}{hint}")
        raise TypeError(f"{where}: lr must be a number or a schedule, got {type(lr).__name__}")
    value = float(lr)  # a numpy float, a Fraction, ...: any real number
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: lr must be finite and ≥ 0, got {lr}")
    if value > MAX_LR:
        raise ValueError(f"{where}: lr must be at most {MAX_LR:.4g} (float32's largest number), got {lr}")
    return value


def _rate(schedule: Schedule, count: int, where: str) -> float:
    """The schedule's rate for step ``count``, checked; the message is composed only when it is bad."""
    rate = schedule(count)
    if type(rate) is float and 0 <= rate <= MAX_LR:
        return rate
    return _check_lr(rate, f"{where}: the lr schedule at step {count}")


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


def _check_steps(where: str, name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int ≥ {minimum}, got {value!r}")
    return value


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha · init_value`` over ``decay_steps``, then stay (optax's formula).

    ``init_value · ((1 − alpha) · (½ (1 + cos(π · min(count, decay_steps) / decay_steps)))^exponent + alpha)``.

    >>> schedule = cosine_decay_schedule(1.0, decay_steps=4)
    >>> [round(schedule(k), 4) for k in range(6)]
    [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """
    init_value = _check_real("cosine_decay_schedule", "init_value", init_value)
    decay_steps = _check_steps("cosine_decay_schedule", "decay_steps", decay_steps)
    alpha = _check_real("cosine_decay_schedule", "alpha", alpha)
    exponent = _check_real("cosine_decay_schedule", "exponent", exponent)

    def schedule(count: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(count, decay_steps) / decay_steps))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0
) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine decay to
    ``end_value`` at ``decay_steps`` (counted from 0, warm-up included), as ``optax.warmup_cosine_decay_schedule``.

    >>> schedule = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6)
    >>> [round(schedule(k), 4) for k in range(8)]
    [0.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """
    where = "warmup_cosine_decay_schedule"
    init_value, peak_value = _check_real(where, "init_value", init_value), _check_real(where, "peak_value", peak_value)
    end_value = _check_real(where, "end_value", end_value)
    warmup_steps = _check_steps(where, "warmup_steps", warmup_steps, 0)
    decay_steps = _check_steps(where, "decay_steps", decay_steps, warmup_steps + 1)

    def schedule(count: int) -> float:
        if count < warmup_steps:
            return init_value + (peak_value - init_value) * count / warmup_steps
        progress = min(count - warmup_steps, decay_steps - warmup_steps) / (decay_steps - warmup_steps)
        return end_value + (peak_value - end_value) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init_value · decay_rate^((count − transition_begin) / transition_steps)`` (optax's formula).

    Constant at ``init_value`` before ``transition_begin``; with ``staircase`` the
    exponent is rounded down to whole transitions; ``end_value`` bounds the
    rate (from below when it decays, from above when it grows).

    >>> schedule = exponential_decay(1.0, transition_steps=2, decay_rate=0.5)
    >>> [schedule(k) for k in range(5)]
    [1.0, 0.7071067811865476, 0.5, 0.3535533905932738, 0.25]
    """
    where = "exponential_decay"
    init_value = _check_real(where, "init_value", init_value)
    transition_steps = _check_steps(where, "transition_steps", transition_steps)
    decay_rate = _check_real(where, "decay_rate", decay_rate)
    transition_begin = _check_steps(where, "transition_begin", transition_begin, 0)
    end = None if end_value is None else _check_real(where, "end_value", end_value)

    def schedule(count: int) -> float:
        exponent = max(count - transition_begin, 0) / transition_steps
        try:
            value = init_value * decay_rate ** (math.floor(exponent) if staircase else exponent)
        except OverflowError:  # Python raises where floats would give inf; end_value may still cap it
            value = math.inf
        if end is not None:
            value = max(value, end) if decay_rate < 1 else min(value, end)
        return value

    return schedule


def piecewise_constant_schedule(init_value: float, boundaries_and_scales: dict[int, float]) -> Schedule:
    """``init_value``, multiplied by ``scale`` from each boundary step on (optax's formula).

    >>> schedule = piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.1})
    >>> [schedule(k) for k in range(6)]
    [1.0, 1.0, 0.5, 0.5, 0.05, 0.05]
    """
    where = "piecewise_constant_schedule"
    init_value = _check_real(where, "init_value", init_value)
    if not isinstance(boundaries_and_scales, dict):
        raise TypeError(f"{where}: boundaries_and_scales must be a dict {{step: scale}}, "
                        f"got {type(boundaries_and_scales).__name__}")
    steps = sorted((_check_steps(where, "a boundary", k, 0), _check_real(where, f"the scale at {k}", v))
                   for k, v in boundaries_and_scales.items())

    def schedule(count: int) -> float:
        value = init_value
        for boundary, scale in steps:
            if count >= boundary:
                value *= scale
        return value

    return schedule
