"""Training: minibatch gradient descent over a data set, and the metrics it records."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch import Tensor

from ._random import as_generator
from .autodiff import value_and_grad
from .layers import Layer, Params
from .losses import Loss
from .optim import Schedule, _check_lr, constant_schedule, sgd_step
from .tree import Tree, tree_difference, tree_flatten, tree_leaves, tree_map

__all__ = ["History", "accuracy", "evaluate", "fit", "predict"]

Optimizer = Callable[[Tree, Tree, float], Tree]
"""``(params, grads, lr) -> new params``, as :func:`~rdl_functional.sgd_step`."""


@attrs.frozen
class History:
    """What :func:`fit` measured at the end of each epoch, one entry per epoch.

    Losses are means over the whole set; accuracies are the fraction of rows
    whose largest output is the row's class. ``test_*`` are empty when
    ``fit`` had no test data.
    """

    train_loss: tuple[float, ...] = ()
    train_accuracy: tuple[float, ...] = ()
    test_loss: tuple[float, ...] = ()
    test_accuracy: tuple[float, ...] = ()

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def _append(self, train: tuple[float, float], test: tuple[float, float] | None) -> History:
        return History(
            train_loss=(*self.train_loss, train[0]),
            train_accuracy=(*self.train_accuracy, train[1]),
            test_loss=(*self.test_loss, test[0]) if test else self.test_loss,
            test_accuracy=(*self.test_accuracy, test[1]) if test else self.test_accuracy,
        )


def predict(model: Layer, params: Params, x: Tensor) -> Tensor:
    """Class predictions: the index of the largest output, ``(batch,)`` int64."""
    return model.apply(params, x).argmax(dim=1)


def _labels(target: Tensor) -> Tensor:
    """Class indices from a target: the target itself (integer indices) or its argmax (one-hot).

    Works with leading dimensions too, as a stack of models has.
    """
    return target if not target.is_floating_point() else target.argmax(dim=-1)


def accuracy(model: Layer, params: Params, x: Tensor, labels: Tensor) -> float:
    """The fraction of rows of ``x`` whose predicted class equals ``labels`` (int64, ``(batch,)``)."""
    _check_rows("accuracy", x, labels)
    if labels.shape != x.shape[:1]:
        raise ValueError(f"accuracy: labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    return (predict(model, params, x) == labels).double().mean().item()


def evaluate(model: Layer, loss: Loss, params: Params, x: Tensor, target: Tensor) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``params`` on a whole data set.

    The accuracy compares the largest output with the class of each row:
    ``target`` itself when it holds class indices, its argmax when it is one-hot.
    """
    _check_rows("evaluate", x, target)
    pred = model.apply(params, x)
    correct = (pred.argmax(dim=1) == _labels(target)).double().mean()
    return loss.apply(pred, target).item(), correct.item()


def _rate(schedule: Schedule, count: int, where: str) -> float:
    """The schedule's rate for step ``count``, checked; the message is composed only when it is bad."""
    rate = schedule(count)
    if type(rate) is float and rate >= 0 and rate != float("inf"):
        return rate
    return _check_lr(rate, f"{where}: the lr schedule at step {count}")


def _check_count(where: str, name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int ≥ {minimum}, got {value!r}")


def _check_rows(where: str, x: Tensor, target: Tensor) -> None:
    for name, value in (("x", x), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.shape[:1] != target.shape[:1]:
        raise ValueError(f"{where}: x has {x.shape[0]} rows but target has {target.shape[0]}")


def fit(
    model: Layer,
    loss: Loss,
    params: Params,
    x: Tensor,
    target: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float | Schedule,
    generator: torch.Generator | int,
    test: tuple[Tensor, Tensor] | None = None,
    optimizer: Optimizer = sgd_step,
    callback: Callable[[int, Params, History], None] | None = None,
    record_history: bool = True,
    compile: bool = False,
) -> tuple[Params, History]:
    """Train on shuffled minibatches; return the final params and the per-epoch history.

    Each epoch draws a permutation of the rows from ``generator`` and steps
    through it ``batch_size`` rows at a time (the last batch may be shorter);
    each step is ``params = optimizer(params, grads, lr)``. After each epoch
    the loss and accuracy on the whole training set (and on ``test``, if
    given) are recorded. Pure: ``params``, ``x`` and ``target`` are not
    changed, nothing global is read or written, and the same generator state
    gives the same params and history, bit for bit. Prints nothing.

    Args:
        model: what to train.
        loss: what to minimize, ``loss(model(params, x), target)``.
        params: the starting params (not changed).
        x: ``(n, features)`` inputs.
        target: ``(n, ...)``, what ``loss`` compares with.
        epochs: passes over the data, ≥ 0.
        batch_size: rows per step, ≥ 1.
        lr: the learning rate, finite and ≥ 0, or a schedule: a function of the
            step count (0, 1, ...) such as :func:`~rdl_functional.linear_schedule`.
        generator: a ``torch.Generator`` (advanced) or an ``int`` seed, for shuffling.
        test: optional ``(x_test, target_test)`` to measure after every epoch.
        optimizer: the step, ``(params, grads, lr) -> params``; :func:`~rdl_functional.sgd_step` by default.
        callback: called as ``callback(epoch, params, history)`` after each
            epoch (epochs count from 1), e.g. to show progress.
        record_history: measure the loss and accuracy after each epoch (a
            forward pass over the training set, and the test set if given);
            with ``False`` the history stays empty and training runs alone.
            The measurement is a real cost, not bookkeeping: on the seed task
            it adds about a fifth of the training time at batch 100 and about
            half at batch 1000, where an epoch is one step (docs/performance.md
            has the figures). The step losses cannot stand in for it: the
            params change during an epoch, so their mean is another number.
        compile: run each step through :func:`~rdl_functional.compiled_step`
            (``torch.compile``; plain SGD only). The first step compiles, which
            takes tens of seconds on a CPU; the results equal eager training
            to float rounding, not bit for bit.

    With the default ``optimizer``, ``fit`` updates a private copy of the
    params in place (the kernel of ``sgd_step``, so the same bits): a new
    tree per step would cost a fresh allocation per parameter per step, and
    page faults with it, for nothing the caller can see.

    >>> import rdl_functional as rf
    >>> x, labels = rf.disc_dataset(200, 0)
    >>> model = rf.compose(rf.linear(2, 8), rf.relu, rf.linear(8, 2))
    >>> params, history = rf.fit(model, rf.cross_entropy_loss, model.init(0), x, labels,
    ...                          epochs=3, batch_size=50, lr=0.1, generator=0)
    >>> history.epochs, len(history.train_accuracy), history.test_loss
    (3, 3, ())
    """
    _check_count("fit", "epochs", epochs, 0)
    _check_count("fit", "batch_size", batch_size, 1)
    schedule = lr if callable(lr) else constant_schedule(_check_lr(lr, "fit"))
    _check_rows("fit", x, target)
    if test is not None:
        _check_rows("fit: test", *test)
    g = as_generator(generator, "fit")
    if compile and optimizer is not sgd_step:
        raise ValueError("fit: compile=True runs plain SGD inside the compiled step; it takes no other optimizer")
    step = _compiled_sgd(model, loss) if compile else value_and_grad(model, loss)
    update = _sgd_in_place(params) if optimizer is sgd_step and epochs and not compile else None
    if update is not None:
        params = update.params
    history, count = History(), 0
    for epoch in range(1, epochs + 1):
        # Shuffle once an epoch; each batch is then a slice, a view that costs no copy.
        order = torch.randperm(x.shape[0], generator=g)
        x_shuffled, target_shuffled = x.index_select(0, order), target.index_select(0, order)
        for start in range(0, x.shape[0], batch_size):
            stop = start + batch_size
            rate = _rate(schedule, count, "fit")
            if compile:
                params = step(params, x_shuffled[start:stop], target_shuffled[start:stop], rate)
            else:
                _, grads = step(params, x_shuffled[start:stop], target_shuffled[start:stop])
                params = update(grads, rate) if update is not None else optimizer(params, grads, rate)
                del grads  # not alive through the next step's forward pass
            count += 1
        if record_history:
            on_test = evaluate(model, loss, params, *test) if test is not None else None
            history = history._append(evaluate(model, loss, params, x, target), on_test)
        if callback is not None:
            # A copy: the params in hand are updated in place by the next epoch.
            callback(epoch, _copy(params) if update is not None else params, history)
    return params, history


def _copy(tree: Tree) -> Tree:
    return tree_map(torch.clone, tree)


class _sgd_in_place:
    """``p ← p − lr·g`` on a private copy of the params: ``sgd_step`` without a new tree per step."""

    def __init__(self, params: Params) -> None:
        self.params = _copy(params)
        self.leaves = tree_leaves(self.params)
        # The keys down to each leaf, found once: walking the grads this way each
        # step costs a few dict lookups instead of a recursive tree walk.
        self.paths = [tuple(path.split(".")) for path in tree_flatten(self.params)]
        self.checked = False

    def __call__(self, grads: Params, lr: float) -> Params:
        if not self.checked:  # the pullbacks keep the structure; look once
            found = tree_difference(self.params, grads, names=("params", "grads"), leaves=True)
            if found:
                raise ValueError(f"fit: {found}")
            self.checked = True
        grad_leaves = []
        for keys in self.paths:
            node = grads
            for key in keys:
                node = node[key]
            grad_leaves.append(node)
        torch._foreach_add_(self.leaves, grad_leaves, alpha=-lr)  # the kernel of sgd_step
        return self.params


def _compiled_sgd(model: Layer, loss: Loss) -> Callable[[Params, Tensor, Tensor, float], Params]:
    """The compiled step with the rate passed as a tensor, so that a schedule never recompiles it."""
    from .compiled import compiled_step

    step = compiled_step(model, loss)

    def run(params: Params, x: Tensor, target: Tensor, lr: float) -> Params:
        return step(params, x, target, torch.tensor(lr, dtype=x.dtype))[1]

    return run
