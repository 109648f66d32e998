"""Data-parallel training on ``torch.distributed``: the collectives on parameter trees, and each rank's rows.

Every rank holds the whole model and the same params; each global minibatch
is split into one shard per rank; each rank computes the gradient of its
shard's share of the global mean loss, and one all-reduce per dtype sums the
shares, so every rank holds the global batch's gradient and makes the same
update. The result equals training in one process on the same global batches,
to float rounding (the all-reduce adds in another order).

A model with state or randomness gets a :class:`BatchShard` where its generator
goes, which says which rows of the global batch this process holds: dropout
draws the global batch's mask and keeps its rows, and batch norm in training
sums its statistics over the processes (as torch's SyncBatchNorm, on any
device), so the result again equals one process's.

``rf.fit`` runs this way by itself when ``torch.distributed`` has been
initialized with more than one process (``torchrun --nproc-per-node N``, or
``rdl-train --nproc N``, which starts the processes itself on 127.0.0.1 with
gloo). The functions here are the pieces, for a loop of your own.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
from torch import Tensor

from ._random import BatchShard
from .tree import Tree, _rebuild_like, tree_leaves

__all__ = ["BatchShard", "all_reduce_mean", "broadcast_params", "is_data_parallel", "shard", "world"]


def _dist() -> Any:
    import torch.distributed as dist  # only when data-parallel training is asked for

    return dist


def is_data_parallel() -> bool:
    """True when ``torch.distributed`` is initialized with more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` outside data-parallel training."""
    if not is_data_parallel():
        return 0, 1
    dist = _dist()
    return dist.get_rank(), dist.get_world_size()


def _buckets(leaves: list[Tensor]) -> dict[torch.dtype, list[int]]:
    """The indices of the leaves of each dtype: one flat bucket, one collective, per dtype."""
    buckets: dict[torch.dtype, list[int]] = {}
    for i, leaf in enumerate(leaves):
        buckets.setdefault(leaf.dtype, []).append(i)
    return buckets


def _collective(tree: Tree, who: str, run: Any) -> Tree:
    leaves = tree_leaves(tree)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{who}: every leaf must be a torch.Tensor, got {type(leaf).__name__} (leaf {i})")
    out: list[Tensor | None] = [None] * len(leaves)
    for indices in _buckets(leaves).values():
        bucket = torch.cat([leaves[i].detach().reshape(-1) for i in indices])  # a new tensor: the tree is untouched
        try:
            run(bucket)
        except RuntimeError as error:
            rank, size = world()
            raise RuntimeError(f"{who}: rank {rank} of {size} lost a peer during the collective (did another "
                               f"process die?): {error}") from None
        for i, part in zip(indices, bucket.split([leaves[i].numel() for i in indices]), strict=True):
            out[i] = part.view(leaves[i].shape)
    return _rebuild_like(tree, out)


def broadcast_params(tree: Tree, src: int = 0) -> Tree:
    """Rank ``src``'s tree on every rank: a new tree, one broadcast per dtype. Outside data-parallel training,
    a copy of ``tree``."""
    if not is_data_parallel():
        return _rebuild_like(tree, [leaf.clone() for leaf in tree_leaves(tree)])
    dist = _dist()
    return _collective(tree, "broadcast_params", lambda bucket: dist.broadcast(bucket, src))


def all_reduce_mean(tree: Tree, *, weight: float | None = None) -> Tree:
    """The mean of ``tree`` over the ranks (a gradient, say): a new tree, one all-reduce per dtype, not one per
    leaf. With ``weight``, the weighted sum ``Σ_r weight_r · tree_r`` instead (weights that add up to 1 over the
    ranks give a weighted mean, as shards of unequal size need). Outside data-parallel training, a copy."""
    if not is_data_parallel():
        scale = 1.0 if weight is None else weight
        return _rebuild_like(tree, [leaf * scale for leaf in tree_leaves(tree)])
    dist = _dist()
    size = dist.get_world_size()

    def reduce(bucket: Tensor) -> None:
        bucket.mul_(1.0 / size if weight is None else weight)
        dist.all_reduce(bucket, op=dist.ReduceOp.SUM)

    return _collective(tree, "all_reduce_mean", reduce)


def shard(start: int, stop: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s rows ``[a, b)`` of the global minibatch ``[start, stop)``: contiguous, as equal as they
    can be (the first ``(stop - start) % size`` ranks take one row more)."""
    rows = stop - start
    base, extra = divmod(rows, size)
    a = start + rank * base + min(rank, extra)
    return a, a + base + (1 if rank < extra else 0)


def init_from_environment(timeout_s: float = 60.0) -> None:
    """Join the process group that ``torchrun`` (or ``rdl-train --nproc``) describes in the environment, with
    gloo on the CPU and NCCL on a GPU, and a timeout, so that a rank that dies makes the others fail, not hang."""
    dist = _dist()
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
