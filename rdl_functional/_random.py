"""The one place that turns a seed into a ``torch.Generator``: no global RNG anywhere."""

from __future__ import annotations

import torch


def as_generator(generator: torch.Generator | int, where: str) -> torch.Generator:
    """Return ``generator`` itself, or a new CPU generator seeded with an ``int``.

    A passed generator is advanced in place, as every torch sampling function
    advances it; pass an ``int`` for a call that leaves nothing changed.
    """
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(
        f"{where}: expected a torch.Generator or an int seed, got {type(generator).__name__}"
    )
