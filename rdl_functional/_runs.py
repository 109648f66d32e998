"""What a run is, for checkpoints and data-parallel ranks: its settings, and the checks that a checkpoint (or
another rank) belongs to the same run before it is resumed (or trained with).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._files import check_writable
from .distributed import broadcast_params
from .layers import Params
from .loop import _Tensors
from .losses import Loss
from .optim import Optimizer, sgd, sgd_step
from .stateful import State
from .tree import Tree, tree_difference, tree_flatten, tree_leaves

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


def _data_parallel_start(model: Any, loss: Loss, optimizer: Any, lr: Any, params: Params, opt_state: Any,
                         model_state: Any, data: Any, test: Any, epochs: int, generator: Any, record_history: bool,
                         info: Any, compile: bool, capture: bool, check_finite: bool, checkpoint: Any,
                         checkpoint_every: Any, task: Any, size: int) -> Params:
    """Before a data-parallel run: every rank trains the same run (or every rank says where they differ), and
    rank 0's params, broadcast, are everyone's."""
    if not isinstance(data, _Tensors):
        raise ValueError("fit: data-parallel training takes (x, target) tensors, whose shuffle every process draws "
                         "alike; with an iterable of batches, write the loop with rf.data_parallel(step)")
    # First, before any collective that takes the ranks to agree (a broadcast of params of other shapes aborts
    # in gloo): every rank trains the same run, or every rank says where they differ.
    _check_same_run({
        **_run_settings(model, loss, optimizer, lr, params, opt_state, model_state, data.x, data.target, test,
                        epochs, data.batch_size, generator, record_history, info, data.per_epoch, compile,
                        drop_last=data.drop_last),
        "start": _start_shapes(params, opt_state, model_state),  # rank 0's params, broadcast, are everyone's
        "capture": capture, "check_finite": check_finite, "device": data.x.device.type,
        "checkpoint": None if checkpoint is None else {"path": os.fspath(checkpoint), "every": checkpoint_every,
                                                      "file": _file_digest(checkpoint)},
    }, data.x.device, size)
    if compile or capture:
        raise ValueError("fit: data-parallel training (torch.distributed with several processes) runs the step "
                         "as it is, without compile=True or capture=True (not yet)")
    if "reduction='sum'" in loss.name:
        raise ValueError(f"fit: data-parallel training weighs each process's loss by its share of the rows, "
                         f"which is right for a mean over rows; {loss.name} sums (use reduction='mean')")
    return broadcast_params(params)


def _resumed(model: Any, loss: Loss, optimizer: Any, lr: Any, params: Params, opt_state: Any, model_state: Any,
             data: Any, test: Any, epochs: int, generator: Any, record_history: bool, info: Any, compile: bool,
             checkpoint: Any, task: Any) -> tuple[Checkpoint | None, dict[str, Any]]:
    """``(the checkpoint to resume from or None, the run's settings)``, every check passed."""
    if not isinstance(data, _Tensors):
        raise ValueError("fit: checkpoint= resumes a run inside an epoch of (x, target) tensors, whose shuffle it "
                         "records; an iterable of batches cannot be taken up where it stopped. Save the state after "
                         "an epoch yourself (a hook's on_epoch: rf.save_state(progress.state, path))")
    check_writable(checkpoint, "fit: checkpoint")  # before any work: a path that cannot be written fails now

    def describe(total: int) -> dict[str, Any]:  # the run's settings, as if it were `total` epochs long
        settings = _run_settings(model, loss, optimizer, lr, params, opt_state, model_state, data.x, data.target,
                                 test, total, data.batch_size, generator, record_history, info, data.per_epoch,
                                 compile, checkpoint, data.drop_last)
        # What the history measures: a resumed run measures alike.
        return {**settings, "task": task if record_history else None}

    settings = describe(epochs)
    resumed = _resume(checkpoint, settings, describe)
    if resumed is not None:
        _check_resumed(checkpoint, resumed, optimizer, params, opt_state, model_state, data.rows, data.batch_size,
                       data.per_epoch, _recorded(record_history, task, test))
    return resumed, settings


def _check_same_run(settings: dict[str, Any], device: torch.device, size: int) -> None:
    """Every rank of a data-parallel run trains the same run: each rank's settings (those a checkpoint records,
    and how it checkpoints) are gathered, and every rank raises the same error naming the first that differs."""
    from .distributed import _disagreement

    found = _disagreement("fit", settings, device)
    if found is not None:
        rank, path, theirs, first = found
        raise ValueError(f"fit: the {size} processes of a data-parallel run must train the same run, but rank "
                         f"{rank} differs from rank 0 in {path}: {theirs} on rank {rank}, {first} on rank 0 (start "
                         "every process with the same arguments: data, seed, model, loss, optimizer, rate, ...)")


def _start_shapes(params: Params, opt_state: Tree | None, model_state: Any) -> dict[str, Any]:
    """What must agree of the start of a data-parallel run: the params' shapes and dtypes (their values are rank
    0's, which the broadcast gives every rank) and the optimizer's and model's states, which are not broadcast."""
    from .checkpoint import digest
    from .tree import tree_flatten

    return {"params": {path: f"{leaf.dtype} {tuple(leaf.shape)}" if isinstance(leaf, Tensor) else repr(leaf)
                       for path, leaf in tree_flatten(params).items()},
            "states": digest(opt_state, model_state)}


def _file_digest(path: str | os.PathLike[str]) -> str | None:
    """A fingerprint of the file's bytes (``None`` when there is none): every rank must resume from the same
    checkpoint, which ranks on machines that do not share the file would not."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"unreadable: {error.strerror or error}"


def _run_settings(model: Any, loss: Loss, optimizer: Any, lr: Any, params: Params, opt_state: Tree | None,
                  model_state: Any, x: Tensor, target: Tensor, test: Any, epochs: int, batch_size: int,
                  generator: Any, record_history: bool, info: Any, per_epoch: int,
                  compile: bool = False, path: Any = None, drop_last: bool = False) -> dict[str, Any]:
    """What a checkpoint (at ``path``) records of the run, and a resumed run must match, as JSON data."""
    from .checkpoint import describe_optimizer, describe_rate, digest, unidentified

    reason = unidentified(optimizer) if info is None and path is not None else None  # a checkpoint must know it
    if reason:
        inner = getattr(optimizer, "func", optimizer)  # a functools.partial's function
        name = getattr(inner, "__qualname__", None) or type(optimizer).__name__
        values = ", ".join(f"'{free}': ..." for free in getattr(getattr(optimizer, "__code__", None), "co_freevars",
                                                                ())) or "'values': ..."
        raise ValueError(f"fit: checkpoint={str(path)!r} knows a run by its settings, and the step function {name} "
                         f"{reason}: "
                         "a checkpoint of it would be taken up by another that differs only there (as one of "
                         "make(1.0) by make(3.0)). Pass checkpoint_info naming it and those values (e.g. "
                         f"checkpoint_info={{'step': '{name}', {values}}}), which a resumed run must match; or use "
                         "an rf.Optimizer, or a module-level function without a closure")
    settings = {  # the plainest first, so that a difference is named by the plainest setting that shows it
        "info": info,
        "model": model.name,
        "loss": loss.name,
        "epochs": epochs,
        "batch_size": batch_size,
        "data": f"{x.shape[0]} rows, {digest(x, target)}",
        "test": digest(*test) if test is not None else None,
        "start": digest(params, opt_state, model_state),
        "generator": generator if isinstance(generator, int) else digest(generator.get_state()),
        "record_history": record_history,
        "compile": compile,
        "optimizer": describe_optimizer(optimizer, epochs * per_epoch),
        "lr": describe_rate(lr, epochs * per_epoch),
        **({"drop_last": True} if drop_last else {}),  # a key only when set: older checkpoints resume as they were
    }
    try:  # before any work: the settings go into every checkpoint as JSON
        return json.loads(json.dumps(settings, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"fit: checkpoint_info must be JSON data (dicts, lists, strings, numbers), which it "
                         f"is not: {error} (it goes into the checkpoint {str(path)!r})") from None


def _check_resumed(path: Any, saved: Checkpoint, optimizer: Any, params: Params, opt_state: Tree | None,
                   model_state: State | None, n: int, batch_size: int, per_epoch: int, recorded: set[str]) -> None:
    """The checkpoint's record agrees with itself and with the run that resumes it: its position and step count
    with the data and batches, its trees with the model's and the optimizer's (an optimizer that keeps a state has
    it there, its step counts those of the steps taken), its history with what the run records (``recorded``: the
    names of the history's lists that are not empty after an epoch). A checkpoint edited by hand and signed anew
    would otherwise resume into another run."""

    def refuse(what: str) -> None:
        raise ValueError(f"fit: the checkpoint {str(path)!r} {what}: it cannot be resumed; remove it to start afresh")

    total = saved.settings.get("epochs")
    if isinstance(total, int) and _ahead_of(saved, total):
        refuse(f"{_ahead_of(saved, total)}, more than the {total} epochs of its run")
    if saved.position >= n or saved.position % batch_size:
        refuse(f"records a position of {saved.position} rows into an epoch of {n} rows in batches of {batch_size}")
    steps = saved.epochs_done * per_epoch + saved.position // batch_size
    if saved.steps != steps:
        refuse(f"records {saved.steps} steps, where {saved.epochs_done} epochs of {per_epoch} steps and "
               f"{saved.position} rows in batches of {batch_size} are {steps}")
    found = tree_difference(params, saved.params, names=("the model's params", "the checkpoint's"), leaves=True)
    if found:
        refuse(f"holds other params than the model's ({found})")
    if model_state is not None:
        found = tree_difference(model_state, saved.model_state if saved.model_state is not None else {},
                                names=("the model's state", "the checkpoint's"), leaves=True)
        if saved.model_state is None or found:
            refuse(f"holds {'no' if saved.model_state is None else 'another'} model state than the model keeps "
                   f"(batch norm's running statistics){f': {found}' if found else ''}")
        for where, leaf in tree_flatten(saved.model_state).items():
            if where.endswith("num_batches_tracked") and int(leaf) < 0:
                refuse(f"records {int(leaf)} batches at {where}, fewer than none")
    if isinstance(optimizer, Optimizer) or optimizer is sgd_step:
        rule = optimizer if isinstance(optimizer, Optimizer) else sgd(0.0)
        start = opt_state if opt_state is not None else rule.init(params)
        if saved.opt_state is None and tree_leaves(start):
            refuse(f"holds no optimizer state, but {rule.name} keeps one (its step count and buffers)")
        found = tree_difference(start, saved.opt_state or {}, names=(f"{rule.name}'s state", "the checkpoint's"),
                                leaves=True)
        if found:
            refuse(f"holds another optimizer state than {rule.name} keeps ({found})")
        counts = tree_flatten(saved.opt_state or {})
        for where, first in tree_flatten(start).items():
            if where.split(".")[-1] == "count" and int(counts[where]) != int(first) + saved.steps:
                refuse(f"records {int(counts[where])} optimizer steps at {where}, where {saved.steps} steps were "
                       f"taken from {int(first)}")
    for name, values in saved.history.items():
        if bool(values) != (name in recorded and saved.epochs_done > 0):
            refuse(f"holds {len(values)} value(s) of {name}, which the run "
                   f"{'records once an epoch' if name in recorded else 'does not record'}")


def _recorded(record_history: bool, task: str | None, test: Any) -> set[str]:
    """The history's lists that fill once an epoch, as :meth:`History._append` fills them for ``task``."""
    if not record_history:
        return set()
    metrics = ("loss", "rmse", "r2") if task == "regression" else ("loss", "accuracy")
    return {f"{split}_{metric}" for split in ("train", *(("test",) if test is not None else ())) for metric in metrics}


def _ahead_of(saved: Checkpoint, epochs: int) -> str | None:
    """What ``saved`` has done beyond a run of ``epochs`` epochs, in words (``"has 3 epochs and 12 rows of the next
    done"``), or ``None`` when such a run can resume it: a checkpoint inside epoch ``epochs + 1`` is past its end."""
    if saved.epochs_done < epochs or (saved.epochs_done == epochs and not saved.position):
        return None
    rows = f" and {saved.position} rows of the next" if saved.position else ""
    return f"has {saved.epochs_done} epochs{rows} done"


def _resume(path: Any, settings: dict[str, Any], describe: Callable[[int], dict[str, Any]]) -> Checkpoint | None:
    """The checkpoint at ``path`` to resume from, ``None`` when there is none; refused if it records another run.

    A run of another length is the same run extended (or cut short) when everything else matches, the
    optimizer's rate at every step the two lengths share included (``describe(total)`` describes this run as
    if it were ``total`` epochs long): a constant rate, or a schedule that does not depend on the total.
    """
    from .checkpoint import difference, read_checkpoint

    if not os.path.exists(path):
        return None
    saved = read_checkpoint(path)
    shown, epochs = repr(str(path)), settings["epochs"]
    found = difference(saved.settings, settings)
    if found is None:
        return saved
    total = saved.settings.get("epochs")
    if isinstance(total, int) and not isinstance(total, bool) and 0 <= total != epochs:
        found = difference(saved.settings, describe(total))
        if found is None:
            ahead = _ahead_of(saved, epochs)
            if ahead:
                raise ValueError(f"fit: the checkpoint {shown} {ahead}, more than epochs={epochs}; resume it with "
                                 f"epochs ≥ {saved.epochs_done + (saved.position > 0)}")
            return saved
        if found.startswith(("optimizer", "lr")):
            raise ValueError(f"fit: the checkpoint {shown} records a run of {total} epochs, which cannot go on to "
                             f"{epochs}: the optimizer or its rate would differ over the steps it has taken "
                             f"({found}). A schedule tied to the run's length (a linear or cosine decay to its "
                             "last step) changes with it; only a run with a constant rate, or a schedule that does "
                             f"not depend on the total, can be extended. Resume it with epochs={total}, or remove "
                             "it to start afresh")
    raise ValueError(f"fit: the checkpoint {shown} records another run ({found}); resume with the "
                     "settings it was written with, or remove it to start afresh")
