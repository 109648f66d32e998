"""The one place that turns a seed into a ``torch.Generator``: no global RNG anywhere."""

from __future__ import annotations

import attrs
import torch


@attrs.frozen
class BatchShard:
    """This process's rows ``[start, stop)`` of a global batch of ``rows`` rows, and the generator every process
    shares: what data-parallel training passes where a generator goes (``generator=BatchShard(...)``).

    With it, the library's stateful layers compute what one process would on the whole global batch:
    :func:`~rdl_functional.dropout` draws the global batch's mask from ``generator`` and keeps this shard's rows,
    and :func:`~rdl_functional.batch_norm` in training normalizes with the global batch's statistics, summed over
    the processes by ``torch.distributed`` (a few collectives per layer and step). Every process must call the
    model with its own shard of the same global batch, and the generators must be in the same state.
    A stateful layer of your own receives the shard as its ``generator``; ``shard.generator`` is the generator.
    """

    generator: torch.Generator
    start: int
    stop: int
    rows: int

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.generator, torch.Generator):
            raise TypeError(f"BatchShard: generator must be a torch.Generator, got {type(self.generator).__name__}")
        for name in ("start", "stop", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"BatchShard: {name} must be an int, got {value!r}")
        if not 0 <= self.start <= self.stop <= self.rows or self.rows < 1:
            raise ValueError(f"BatchShard: expected 0 ≤ start ≤ stop ≤ rows and rows ≥ 1, got start={self.start}, "
                             f"stop={self.stop}, rows={self.rows}")

    def check_rows(self, where: str, x: torch.Tensor) -> None:
        """``x`` must hold this shard's rows (along its first dimension)."""
        if x.dim() == 0 or x.shape[0] != self.stop - self.start:
            raise ValueError(f"{where}: the shard is rows {self.start}..{self.stop} of {self.rows}, "
                             f"{self.stop - self.start} rows, but x has shape {tuple(x.shape)}")


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


def as_source(generator: torch.Generator | int | BatchShard | None, where: str) -> torch.Generator | BatchShard | None:
    """What a combinator passes on to its children: one generator for them all (an int becomes one), or the
    :class:`BatchShard` itself, so that each layer knows its rows."""
    if generator is None or isinstance(generator, BatchShard):
        return generator
    return as_generator(generator, where)
