"""Optimizers, the library's second family after layers: pure ``init`` / ``update`` / ``step`` over trees.

- ``base``: the :class:`Optimizer` record, :func:`apply_updates`, :func:`chain`.
- ``rules``: :func:`sgd`, :func:`adam`, :func:`adamw`, :func:`rmsprop`, :func:`adagrad`, and :func:`sgd_step`.
- ``transforms``: :func:`clip_by_global_norm`, :func:`add_decayed_weights`.
- ``schedules``: learning rates as functions of the step count.
"""

from .base import Optimizer, apply_updates, chain, gradient_transform
from .rules import adagrad, adam, adamw, rmsprop, sgd, sgd_step
from .schedules import (
    Schedule,
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    linear_schedule,
    piecewise_constant_schedule,
    warmup_cosine_decay_schedule,
)
from .transforms import add_decayed_weights, clip_by_global_norm

# Functions that make an optimizer: passed where an optimizer goes, they are told to be called.
_FACTORIES = (adagrad, adam, adamw, rmsprop, sgd, add_decayed_weights, clip_by_global_norm)

__all__ = [
    "Optimizer",
    "Schedule",
    "adagrad",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "gradient_transform",
    "linear_schedule",
    "piecewise_constant_schedule",
    "rmsprop",
    "sgd",
    "sgd_step",
    "warmup_cosine_decay_schedule",
]
