"""Weight initializers: ``(generator, shape, dtype) -> weight``, each ``torch.nn.init``'s formula with its
default arguments, drawing the same numbers from a generator in the same state.

``rf.linear(in_features, out_features, init=NAME_OR_FUNCTION)`` draws its
weight with one of these (or your own function of the same signature), then
its bias as ``torch.nn.Linear`` does. Fans are torch's: for a weight of shape
``(out, in)``, ``fan_in = in`` and ``fan_out = out``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["INITIALIZERS", "Initializer"]

Initializer = Callable[[torch.Generator, tuple[int, ...], torch.dtype], Tensor]


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def torch_default(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``torch.nn.Linear``'s own: ``kaiming_uniform_(a=√5)``, uniform in ``±1/√fan_in``."""
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    bound = math.sqrt(3.0) * (gain / math.sqrt(_fans(shape)[0]))
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator)


def xavier_uniform(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Uniform in ``±√3 · √(2 / (fan_in + fan_out))`` (Glorot)."""
    fan_in, fan_out = _fans(shape)
    a = math.sqrt(3.0) * (1.0 * math.sqrt(2.0 / float(fan_in + fan_out)))
    return torch.empty(shape, dtype=dtype).uniform_(-a, a, generator=generator)


def xavier_normal(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Normal with standard deviation ``√(2 / (fan_in + fan_out))`` (Glorot)."""
    fan_in, fan_out = _fans(shape)
    std = 1.0 * math.sqrt(2.0 / float(fan_in + fan_out))
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def _kaiming_std(shape: tuple[int, ...]) -> float:
    gain = math.sqrt(2.0 / (1 + 0**2))  # torch's defaults: leaky_relu with a = 0, mode fan_in
    return gain / math.sqrt(_fans(shape)[0])


def kaiming_uniform(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Uniform in ``±√3 · √2 / √fan_in`` (He)."""
    bound = math.sqrt(3.0) * _kaiming_std(shape)
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator)


def kaiming_normal(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Normal with standard deviation ``√2 / √fan_in`` (He)."""
    return torch.empty(shape, dtype=dtype).normal_(0, _kaiming_std(shape), generator=generator)


def orthogonal(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A (semi-)orthogonal matrix: the Q of a QR decomposition of a normal draw, its signs fixed by R's diagonal."""
    rows = shape[0]
    cols = math.prod(shape) // rows
    flattened = torch.empty((rows, cols), dtype=dtype).normal_(0, 1, generator=generator)
    if rows < cols:
        flattened.t_()
    q, r = torch.linalg.qr(flattened)
    q *= torch.diag(r, 0).sign()
    if rows < cols:
        q.t_()
    return q.reshape(shape).contiguous()  # gain 1; laid out as torch's copy_ into the weight lays it out


def zeros(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """All zeros; draws nothing."""
    return torch.zeros(shape, dtype=dtype)


INITIALIZERS: dict[str, Initializer] = {
    "torch_default": torch_default,
    "xavier_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
    "kaiming_uniform": kaiming_uniform,
    "kaiming_normal": kaiming_normal,
    "orthogonal": orthogonal,
    "zeros": zeros,
}
"""The names ``rf.linear(..., init=NAME)`` takes."""
