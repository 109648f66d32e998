"""Data: the seed report's disc data set, and one-hot targets."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._random import as_generator

__all__ = ["DISC_CENTER", "DISC_RADIUS", "disc_dataset", "one_hot"]

DISC_CENTER = (0.5, 0.5)
DISC_RADIUS = 1 / math.sqrt(2 * math.pi)
"""The disc's area is π r² = 1/2, so the two classes are equally likely."""


def disc_dataset(n: int, generator: torch.Generator | int) -> tuple[Tensor, Tensor]:
    """Draw ``n`` points uniformly in [0, 1]², labelled 1 inside the disc, else 0.

    The disc is centred at (0.5, 0.5) with radius 1/√(2π) (the seed report's
    data set, Fig. 3).

    Args:
        n: number of points, ≥ 0.
        generator: a ``torch.Generator`` (advanced) or an ``int`` seed.

    Returns:
        ``x``: float32 ``(n, 2)``; ``labels``: int64 ``(n,)``.

    >>> x, labels = disc_dataset(4, generator=0)
    >>> x.shape, labels.dtype
    (torch.Size([4, 2]), torch.int64)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"disc_dataset: n must be an int ≥ 0, got {n!r}")
    g = as_generator(generator, "disc_dataset")
    x = torch.rand(n, 2, generator=g)
    squared_distance = (x - torch.tensor(DISC_CENTER)).square().sum(dim=1)
    labels = (squared_distance < DISC_RADIUS**2).to(torch.int64)
    return x, labels


def one_hot(labels: Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Return ``(n, num_classes)`` targets with a 1 at each label's column, 0 elsewhere.

    >>> one_hot(torch.tensor([1, 0]), 2)
    tensor([[0., 1.],
            [1., 0.]])

    Raises:
        TypeError: labels are not an integer tensor.
        ValueError: labels are not 1-D or lie outside ``[0, num_classes)``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"one_hot: num_classes must be a positive int, got {num_classes!r}")
    integer = isinstance(labels, Tensor) and not (labels.is_floating_point() or labels.is_complex())
    if not integer or labels.dtype == torch.bool:
        what = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"one_hot: labels must be an integer tensor, got {what}")
    if labels.dim() != 1:
        raise ValueError(f"one_hot: labels must have shape (n,), got {tuple(labels.shape)}")
    if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"one_hot: labels must lie in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    targets = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    return targets.scatter_(1, labels[:, None].to(torch.int64), 1)
