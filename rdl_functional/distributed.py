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

:func:`data_parallel` is this as a transform of the training step:
``rf.data_parallel(rf.train_step(model, loss, optimizer))`` is a step with the
same signature. ``rf.fit`` runs this way by itself when ``torch.distributed``
has been initialized with more than one process (``torchrun --nproc-per-node
N``, or ``rdl-train --nproc N``, which starts the processes itself on
127.0.0.1 with gloo). The functions here are the pieces, for a loop of your own.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._random import BatchShard
from .tree import Tree, _first_difference, _rebuild_like, tree_leaves

__all__ = ["BatchShard", "all_reduce_mean", "broadcast_params", "data_parallel", "is_data_parallel", "shard", "world"]


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


class PeerLost(RuntimeError):
    """A collective failed because another process of the group died, stopped, or did not answer in time."""


def _guarded(who: str, run: Callable[..., Any], *args: Any) -> None:
    """``run(*args)``, a collective; a peer that died, or did not answer within the group's timeout, is named."""
    try:
        run(*args)
    except RuntimeError as error:
        rank, size = world()
        raise PeerLost(f"{who}: rank {rank} of {size} lost a peer during the collective (did another "
                           f"process die, or stop?): {error}") from None


def _collective(tree: Tree, who: str, run: Any) -> Tree:
    leaves = tree_leaves(tree)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{who}: every leaf must be a torch.Tensor, got {type(leaf).__name__} (leaf {i})")
    out: list[Tensor | None] = [None] * len(leaves)
    for indices in _buckets(leaves).values():
        bucket = torch.cat([leaves[i].detach().reshape(-1) for i in indices])  # a new tensor: the tree is untouched
        _guarded(who, run, bucket)
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


TIMEOUT_VARIABLE = "RDL_DIST_TIMEOUT"
"""The environment variable that sets the process group's timeout in seconds (60 by default)."""


def group_timeout(timeout_s: float | None = None) -> float:
    """The process group's timeout in seconds: ``timeout_s``, else ``$RDL_DIST_TIMEOUT``, else 60. It bounds how
    long a rank waits to join the group and, in every collective, for a peer (one that died, or is stopped)."""
    where = "init_from_environment: timeout_s" if timeout_s is not None else f"${TIMEOUT_VARIABLE}"
    value: Any = timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_VARIABLE, "60")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{where} must be a number of seconds > 0, got {value!r} (it bounds how long a process "
                         "waits for the others; 60 by default)")
    return seconds


def init_from_environment(timeout_s: float | None = None) -> None:
    """Join the process group that ``torchrun`` (or ``rdl-train --nproc``) describes in the environment, with
    gloo on the CPU and NCCL on a GPU, and a timeout (``timeout_s``, else ``$RDL_DIST_TIMEOUT``, else 60 s), so
    that a rank that dies or stops makes the others fail, not hang.

    Joining is bounded by the timeout too: where ``MASTER_PORT`` is taken by another program, rank 0 fails at
    once and every other rank within the timeout (torch's own store client would wait for ever for an answer
    from that program), each with a ``RuntimeError`` that says so.
    """
    dist = _dist()
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=group_timeout(timeout_s))
    rank, size = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    where = f"init_from_environment: rank {rank} of {size} could not join the process group at {address}"
    store, rank_number, world_size = _rendezvous(dist, timeout, where)
    store.set_timeout(timeout)
    store = dist.PrefixStore("default_pg", store)  # as init_process_group does with the store it makes itself
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    try:
        dist.init_process_group(backend, store=store, rank=rank_number, world_size=world_size, timeout=timeout)
    except RuntimeError as error:
        raise RuntimeError(f"{where}: {error}") from None


def _rendezvous(dist: Any, timeout: datetime.timedelta, where: str) -> tuple[Any, int, int]:
    """torch's env:// rendezvous, ``(store, rank, world size)``, in a thread that is given up on after the timeout:
    a store client connected to a port that another program holds waits for an answer with no limit, and cannot
    be interrupted."""
    found: list[Any] = []

    def rendezvous() -> None:
        try:
            found.append(next(dist.rendezvous("env://", timeout=timeout)))
        except Exception as error:  # handed to the caller's thread below
            found.append(error)

    joining = threading.Thread(target=rendezvous, name="rdl-rendezvous", daemon=True)
    joining.start()
    joining.join(timeout.total_seconds())
    if not found:
        raise RuntimeError(f"{where} within {timeout.total_seconds():g} s: nothing answered as rank 0's store (is "
                           "MASTER_PORT taken by another program, or did rank 0 fail to start?); choose a free "
                           f"MASTER_PORT, or a longer ${TIMEOUT_VARIABLE} if rank 0 starts late")
    if isinstance(found[0], Exception):
        error = found[0]
        if "EADDRINUSE" in str(error) or "address already in use" in str(error):
            raise RuntimeError(f"{where}: MASTER_PORT is taken by another program (address already in use); "
                               "choose a free port (torchrun --master-port)") from None
        raise RuntimeError(f"{where}: {error}") from None
    return found[0]


def _gather_text(who: str, text: str, device: torch.device) -> list[str]:
    """Every rank's ``text``, in rank order: two all-gathers, of the lengths, then of the UTF-8 bytes, padded."""
    dist = _dist()
    size = dist.get_world_size()
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).to(device)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    _guarded(who, dist.all_gather, lengths, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    longest = max(int(length) for length in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(size)]
    _guarded(who, dist.all_gather, parts, padded)
    return [bytes(part[: int(length)].cpu().tolist()).decode() for part, length in zip(parts, lengths, strict=True)]


def _disagreement(who: str, settings: dict[str, Any], device: torch.device) -> tuple[int, str, str, str] | None:
    """The first rank whose ``settings`` (JSON data) differ from rank 0's, and how: ``(rank, path, its value,
    rank 0's value)``, both values as short JSON; ``None`` when every rank holds the same. Every rank gets the same
    answer (each compares the same gathered texts), so every rank can raise the same error."""
    texts = _gather_text(who, json.dumps(settings, default=lambda value: f"<{type(value).__name__}>"), device)
    first = json.loads(texts[0])
    for rank, text in enumerate(texts[1:], start=1):
        found = _first_difference(json.loads(text), first, "")
        if found is not None:
            return rank, *found
    return None


# ---------------------------------------------------------------------------
# Data-parallel as a transform of the step.


def data_parallel(step: Any) -> Any:
    """The training step ``step`` (an :class:`~rdl_functional.TrainStep`) run data-parallel: a step with the same
    signature, ``state, metrics = step(state, x, target)``, where each process of the ``torch.distributed`` group
    computes the gradient of its shard of the global batch ``x`` ``(batch, ...)`` and one all-reduce per dtype
    sums the shards' shares, so that every process makes the global batch's update, equal to one process's to
    float rounding (batch norm and dropout included: each layer gets a :class:`BatchShard`).

    Made once the group is up: the processes are first checked to run the same step (model, loss, optimizer),
    each raising the same ``ValueError`` naming the first difference. Start every process from the same state,
    e.g. ``attrs.evolve(state, params=rf.broadcast_params(state.params))``, and feed each the same global batches.
    Outside a group of several processes the step comes back as it is.

    Raises:
        TypeError: ``step`` is not a TrainStep (a compiled or captured step shards no batch).
        ValueError: the loss sums over rows (each shard's loss is weighed by its share of the rows, right for a
            mean), or the processes run different steps.

    >>> import rdl_functional as rf
    >>> model = rf.compose(rf.linear(2, 3), rf.relu, rf.linear(3, 1))
    >>> step = rf.data_parallel(rf.train_step(model, rf.mse_loss, rf.sgd(0.1)))
    >>> type(step).__name__                 # one process here: the step as it was
    'TrainStep'
    """
    from .step import TrainStep

    if not isinstance(step, TrainStep):
        order = (" (data_parallel shards the eager step; compile or capture the sharded one: "
                 "rf.compiled(rf.data_parallel(step)))" if type(step).__name__ in ("CompiledStep", "CapturedStep")
                 else "")
        raise TypeError(f"data_parallel: expected an rf.TrainStep (rf.train_step(model, loss, optimizer)), got "
                        f"{type(step).__name__}{order}")
    rank, size = world()
    if size == 1:
        return step
    from .checkpoint import describe_optimizer

    settings = {"model": step.model.name, "loss": step.loss.name,
                "optimizer": describe_optimizer(step.optimizer, 0)}
    found = _disagreement("data_parallel", settings, torch.device("cpu") if _dist().get_backend() == "gloo"
                          else torch.device("cuda", torch.cuda.current_device()))
    if found is not None:
        other, path, theirs, first = found
        raise ValueError(f"data_parallel: the {size} processes must run the same step, but rank {other} differs "
                         f"from rank 0 in {path}: {theirs} on rank {other}, {first} on rank 0")
    return _sharded(step, rank, size, "data_parallel")


def _sharded(step: Any, rank: int, size: int, who: str) -> Any:
    """``step`` with its gradient taken from rank ``rank``'s shard of each batch and summed over ``size`` ranks."""
    import attrs

    from .stateful import StatefulLayer

    if "reduction='sum'" in step.loss.name:
        raise ValueError(f"{who}: data-parallel training weighs each process's loss by its share of the rows, "
                         f"which is right for a mean over rows; {step.loss.name} sums (use reduction='mean')")
    made = _stateful_shard_grad if isinstance(step.model, StatefulLayer) else _shard_grad
    return attrs.evolve(step, grad=made(step.model, step.loss, rank, size, who))


def _shard_grad(model: Any, loss: Any, rank: int, size: int, who: str) -> Callable[..., tuple[Tensor, Tree]]:
    """``value_and_grad`` of a global minibatch, computed from this rank's shard: the shard's share of the global
    mean loss (its cotangent is rows_shard / rows_batch), summed over the ranks by one all-reduce per dtype."""
    from .autodiff import _gradient_fn
    from .tree import tree_map

    run = _gradient_fn(model, loss)

    def grad(params: Tree, x: Tensor, target: Tensor) -> tuple[Tensor, Tree]:
        a, b = shard(0, x.shape[0], rank, size)
        if b > a:
            weight = torch.tensor((b - a) / x.shape[0], dtype=x.dtype, device=x.device)
            value, grads = run(params, x[a:b], target[a:b], weight)
        else:  # a batch smaller than the world: this rank adds nothing
            weight = torch.zeros((), dtype=x.dtype, device=x.device)
            value, grads = weight, tree_map(torch.zeros_like, params)
        return _summed(value, grads, weight)

    return grad


def _summed(value: Tensor, grads: Tree, weight: Tensor) -> tuple[Tensor, Tree]:
    """The global batch's loss and gradient from each rank's: its shard's loss weighted by the shard's share of
    the rows (the gradient is weighted already, through the loss's cotangent), summed by one all-reduce per dtype."""
    summed = all_reduce_mean({"grads": grads, "value": (value * weight).reshape(1)}, weight=1.0)
    return summed["value"][0], summed["grads"]


def _stateful_shard_grad(model: Any, loss: Any, rank: int, size: int, who: str) -> Callable[..., Any]:
    """:func:`_shard_grad` for a model with state or randomness: each layer gets a :class:`BatchShard` where the
    generator goes, so dropout keeps its rows of the global batch's mask and batch norm uses the global batch's
    statistics; the new state is then the same on every rank, as one process would compute it."""
    from .autodiff import _stateful_gradient_fn

    run = _stateful_gradient_fn(model, loss)

    def grad(params: Tree, state: Tree, x: Tensor, target: Tensor, *, generator: torch.Generator,
             train: bool = True) -> tuple[Tensor, Tree, Tree]:
        rows = x.shape[0]
        if rows < size:
            raise ValueError(f"{who}: a global batch of {rows} row(s) leaves a process of the {size} without rows, "
                             "which a model with state or randomness cannot take (every process runs the model, to "
                             "draw the same masks and take part in batch norm's sums); use batches of at least as "
                             "many rows as processes")
        a, b = shard(0, rows, rank, size)
        weight = torch.tensor((b - a) / rows, dtype=x.dtype, device=x.device)
        value, grads, new_state = run(params, state, x[a:b], target[a:b], BatchShard(generator, a, b, rows), train,
                                      weight)
        return *_summed(value, grads, weight), new_state

    return grad
