"""Many models of one architecture, trained together in one pass.

Because params are plain trees and layers are pure, N independent models
are one tree whose every leaf has a leading dimension N, and
:func:`stacked` turns a layer into its form for such a tree. A layer may
declare that form (``Layer.stacked``): :func:`linear`'s multiplies each
model's inputs by its own weights with one batched product (``bmm``), and
the elementwise layers are their own, so a step of N models costs about
the tensor operations of one. A layer that declares nothing, a user's own
included, is mapped over the models with ``torch.func.vmap``: correct with
no extra code, only slower. Each model keeps its own data, initial params
and shuffles; the results equal training each alone, to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import torch
from torch import Tensor

from .autodiff import _gradient_fn
from .combinators import compose
from .hooks import _check_losses
from .layers import Layer, Params, Pullback
from .loop import StepFunction, _check_count, _detached, _optimizer
from .losses import Loss, check_loss
from .metrics import Evaluation, check_task, measure
from .optim import Optimizer, Schedule, sgd_step
from .stateful import StatefulLayer
from .train import History, _task_of_run
from .tree import Tree, tree_difference, tree_leaves, tree_map

__all__ = ["fit_stacked", "stack_params", "stacked", "unstack_params"]


def stacked(layer: Layer) -> Layer:
    """The layer for a stack of models: every param and the input gain a leading model dimension.

    A compose stacks its layers one by one; a layer that declares its
    stacked form (``layer.stacked``) uses it; any other layer is mapped over
    the models with ``torch.func.vmap``, its pullback running its forward
    pass again (for each model, the same maths as alone).

    >>> import rdl_functional as rf
    >>> layer = rf.linear(2, 3)
    >>> params = rf.stack_params([layer.init(seed) for seed in range(4)])
    >>> tuple(rf.stacked(layer)(params, torch.ones(4, 5, 2)).shape)
    (4, 5, 3)
    """
    if isinstance(layer, StatefulLayer):
        raise TypeError(f"stacked: {layer.name} carries state or randomness, which a stack of models does not "
                        "thread yet; train such models one at a time with rf.fit")
    if not isinstance(layer, Layer):
        raise TypeError(f"stacked: expected a Layer, got {type(layer).__name__}")
    if layer.sequence:
        return compose(*(stacked(child) for child in layer.sequence))
    if layer.stacked is not None:
        return layer.stacked
    return _vmapped(layer)


def _vmapped(layer: Layer) -> Layer:
    from torch.func import vmap  # only a layer with no stacked form of its own needs it

    apply = vmap(layer.apply)
    # vmap cannot return a pullback, so each model's pullback is made and run inside the map.
    pull = vmap(lambda params, x, dy: layer.vjp(params, x)[1](dy))

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        y = apply(params, x)
        return y, lambda dy: pull(params, x, dy)

    return Layer(init=layer.init, apply=apply, vjp=vjp, name=layer.name)


def stack_params(trees: Sequence[Tree]) -> Tree:
    """Stack trees of one structure leaf by leaf: each leaf gains a leading dimension, the model.

    >>> import rdl_functional as rf
    >>> stacked = rf.stack_params([rf.linear(2, 3).init(seed) for seed in range(4)])
    >>> tuple(stacked["weight"].shape)
    (4, 3, 2)
    """
    if not trees:
        raise ValueError("stack_params: expected at least one tree, got none")
    for i, tree in enumerate(trees[1:], start=1):
        found = tree_difference(trees[0], tree, names=("trees[0]", f"trees[{i}]"), leaves=True)
        if found:
            raise ValueError(f"stack_params: {found}")
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def unstack_params(stacked: Tree) -> list[Tree]:
    """Split a stacked tree back into one tree per model (new tensors, not views).

    >>> import rdl_functional as rf
    >>> trees = [rf.linear(2, 3).init(seed) for seed in range(4)]
    >>> again = rf.unstack_params(rf.stack_params(trees))
    >>> all(torch.equal(a["weight"], b["weight"]) for a, b in zip(trees, again))
    True
    """
    leaves = tree_leaves(stacked)
    if not leaves:
        raise ValueError("unstack_params: the tree has no leaves, so no models to count")
    models = leaves[0].shape[0] if leaves[0].dim() else 0
    if any(leaf.dim() == 0 or leaf.shape[0] != models for leaf in leaves):
        raise ValueError("unstack_params: every leaf must have the same leading (model) dimension")
    return [tree_map(lambda leaf, i=i: leaf[i].clone(), stacked) for i in range(models)]


def _evaluate_each(model: Layer, loss: Loss, params: Params, x: Tensor, target: Tensor, task: str) -> list[Evaluation]:
    """The loss and the task's metrics of each stacked model on its own data set."""
    pred = model.apply(params, x)
    metrics = {name: values.tolist() for name, values in measure(pred, target, task, rows=2).items()}
    return [Evaluation(loss.apply(pred[m], target[m]).item(), task, **{name: values[m] for name, values in
                                                                         metrics.items()})
            for m in range(pred.shape[0])]


def fit_stacked(
    model: Layer,
    loss: Loss,
    params: Params,
    x: Tensor,
    target: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float | Schedule | None = None,
    generators: Sequence[torch.Generator],
    test: tuple[Tensor, Tensor] | None = None,
    optimizer: Optimizer | StepFunction = sgd_step,
    opt_state: Tree | None = None,
    callback: Callable[[int, Params, list[History]], None] | None = None,
    record_history: bool = True,
    check_finite: bool = True,
    task: str | None = None,
) -> tuple[Params, list[History]]:
    """:func:`~rdl_functional.fit` for a stack of models: model ``m`` trains on ``x[m]``, shuffled by ``generators[m]``.

    Args:
        model: the architecture, as for one model; it runs as :func:`stacked` ``(model)``.
        loss: the loss of each model; a mean over the model's own batch.
        params: a stacked tree (:func:`stack_params`), leaves ``(models, ...)``.
        x: ``(models, n, features)``, each model's own training inputs.
        target: ``(models, n, ...)``, each model's own targets.
        epochs, batch_size, lr, optimizer, opt_state: as for ``fit``, shared by
            all models. The optimizer must work on each leaf alone, as every
            rule does, so that each model's state is its own slice of the
            stacked state; ``clip_by_global_norm`` (its norm would mix the
            models), ``add_decayed_weights`` (its mask reads shapes, and a
            stacked bias is 2-D) and a user's transform are refused.
        generators: one per model, for its shuffles.
        test: optional ``(x_test, target_test)``, stacked likewise.
        callback: ``callback(epoch, params, histories)`` after each epoch.
        record_history, check_finite: as for ``fit``; the loss checked is that of
            all models together, so a NaN in any one model stops the stack.
        task: as for ``fit``, one for all the models, inferred from the loss and
            all the models' targets where not given.

    Returns:
        The stacked trained params and one :class:`~rdl_functional.History` per
        model; the first history's ``opt_state`` holds the stacked optimizer state.
    """
    check_loss("fit_stacked", loss)
    _check_count("fit_stacked", "epochs", epochs, 0)
    _check_count("fit_stacked", "batch_size", batch_size, 1)
    if isinstance(optimizer, Optimizer) and not optimizer.elementwise:
        raise ValueError(f"fit_stacked: {optimizer.name} does not work on each leaf alone, so it would mix the "
                         "models (a global norm, a mask read from shapes); use a rule's own weight_decay instead")
    models = len(generators)
    if x.dim() < 3 or x.shape[0] != models or target.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"fit_stacked: expected x (models={models}, n, features) and target ({models}, n, ...), "
            f"got {tuple(x.shape)} and {tuple(target.shape)}"
        )
    # As fit: data or params that require grad would record an autograd graph through every update.
    params, x, target = _detached(params), x.detach(), target.detach()
    if test is not None:
        test = (test[0].detach(), test[1].detach())
    n = x.shape[1]
    offsets = torch.arange(models)[:, None] * n  # model m's rows in the flattened (models·n, ...) data
    x_flat, target_flat = x.reshape(models * n, *x.shape[2:]), target.reshape(models * n, *target.shape[2:])
    # The loss averages over all models' batches at once; each model's gradient is
    # its own mean loss's when the seed cotangent is the number of models.
    seed = torch.tensor(float(models), dtype=x.dtype)
    model = stacked(model)
    check_task("fit_stacked", task)
    if record_history:  # before any step: data that the metrics cannot measure fails now
        task = _task_of_run("fit_stacked", lambda rows: model.apply(params, rows), loss, x, target, test, task, 2)
    step = _gradient_fn(model, loss)
    runner, rate = _optimizer("fit_stacked", optimizer, lr, params, opt_state)
    if runner is not None:
        params = runner.params
    histories, count = [History() for _ in range(models)], 0
    for epoch in range(1, epochs + 1):
        # Each model's shuffle, applied once an epoch; each batch is then a slice (a view, no copy).
        order = (torch.stack([torch.randperm(n, generator=g) for g in generators]) + offsets).reshape(-1)
        order = order.to(x.device)
        x_shuffled = x_flat.index_select(0, order).reshape(x.shape)
        target_shuffled = target_flat.index_select(0, order).reshape(target.shape)
        losses: list[Tensor] = []  # checked for NaN and inf at the epoch's end: no sync per step
        for start in range(0, n, batch_size):
            stop = start + batch_size
            value, grads = step(params, x_shuffled[:, start:stop], target_shuffled[:, start:stop], seed)
            params = runner(grads) if runner is not None else optimizer(params, grads, rate(count))
            del grads
            count += 1
            if check_finite:
                losses.append(value)
        _check_losses(losses, epoch, 0, batch_size, None, check_finite, "fit_stacked (the loss of all models)")
        if record_history:
            train = _evaluate_each(model, loss, params, x, target, task)
            tested = _evaluate_each(model, loss, params, *test, task) if test is not None else [None] * models
            histories = [h._append(a, b) for h, a, b in zip(histories, train, tested, strict=True)]
        if callback is not None:
            callback(epoch, tree_map(torch.clone, params), histories)
    if runner is not None:
        histories[0] = attrs.evolve(histories[0], opt_state=runner.state())
    return params, histories
