"""Gradients of a loss through a model, from the hand-written pullbacks, run by a plan and traced once.

``value_and_grad(model, loss)`` looks at the model once and makes a *plan*:
the flat list of its leaf layers (composes seen through, however nested),
each with the keys of its params in the tree. A call runs the leaves'
``vjp`` forward and their pullbacks in reverse, dropping each pullback (and
the tensors it saved) as soon as it has run, as autograd frees a node's.

What can change between calls is checked on every call: each leaf checks
its own params and input, as it does when called alone, and a guard checks
that every compose's params are a plain dict with no key the model lacks.
Anything the guard does not vouch for (a ``Mapping`` that is not a dict, an
unknown key) runs the general path, ``model.vjp``, which gives the same
results and raises the same messages; a leaf's error is prefixed with its
path exactly as compose prefixes it.

The plan is then traced (:mod:`rdl_functional.trace`): the first call of a
signature (the params' structure and key order, every tensor's shape, dtype,
device and strides, ``train``) runs the plan, then records the aten
operations it ran; later calls of that signature run the record, the same
kernels in the same order. ``fn.traced`` is the :class:`~rdl_functional.trace.Traced`
behind a returned ``fn``: ``fn.traced.signatures`` and ``fn.traced.replayed``
say what it holds and what the last call ran.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .combinators import _NO_PARAMS, _in_layer
from .layers import Layer, Params
from .losses import Loss, check_loss
from .stateful import State, StatefulLayer
from .trace import trace

__all__ = ["value_and_grad"]

ValueAndGrad = Callable[[Params, Tensor, Tensor], tuple[Tensor, Params]]
StatefulValueAndGrad = Callable[..., tuple[Tensor, Params, State]]


class _Leaf(NamedTuple):
    keys: tuple[str, ...]  # where its params sit in the model's tree
    path: str  # the same, as error messages spell it: "2.0"
    layer: Layer


class _Node(NamedTuple):
    """A compose inside the model: its params must be a dict whose keys are among ``allowed``."""

    keys: tuple[str, ...]
    allowed: frozenset[str]


# How the grads tree is built back: a leaf's index in the plan, or a compose's {key: spec}.
_Spec = Any


def _plan(layer: Layer, keys: tuple[str, ...], leaves: list[_Leaf], nodes: list[_Node]) -> _Spec:
    if not layer.sequence:
        leaves.append(_Leaf(keys, ".".join(keys), layer))
        return len(leaves) - 1
    nodes.append(_Node(keys, frozenset(str(i) for i in range(len(layer.sequence)))))
    return {str(i): _plan(child, (*keys, str(i)), leaves, nodes) for i, child in enumerate(layer.sequence)}


def _lookup(params: Params, keys: tuple[str, ...]) -> Any:
    for key in keys:
        params = params.get(key, _NO_PARAMS)
    return params


def _assemble(spec: _Spec, params: Params, grads: list[Params]) -> Params:
    """The grads tree: params' own key order, and no entry that params left out, as compose returns."""
    if type(spec) is int:
        return grads[spec]
    return {key: _assemble(spec[key], child, grads) for key, child in params.items()}


# The plan and its traced records are kept per (model, loss) (equal records: the same layers and functions), so
# value_and_grad called again with them (each fit does) reuses the records instead of tracing anew (~90 ms each).
@functools.lru_cache(maxsize=32)
def _gradient_fn(model: Layer, loss: Loss) -> Callable[[Params, Tensor, Tensor, Tensor | None], tuple[Tensor, Params]]:
    """``fn(params, x, target, seed) -> (value, grads)``: the plan, traced; ``seed`` is the loss's cotangent
    (None: 1)."""
    leaves: list[_Leaf] = []
    nodes: list[_Node] = []
    spec = _plan(model, (), leaves, nodes)
    # Per leaf: its first key (or None for a model that is one layer), the keys below it, its vjp, its path.
    steps = [(leaf.keys[0] if leaf.keys else None, leaf.keys[1:], leaf.layer.vjp, leaf.path) for leaf in leaves]
    first_skips_dx = leaves[0].layer.skips_dx
    # A compose of leaves (the usual model): the grads tree is one dict, built in one comprehension.
    flat = type(spec) is dict and all(type(child) is int for child in spec.values())
    loss_vjp = loss.vjp

    def general(params: Params, x: Tensor, target: Tensor, seed: Tensor | None) -> tuple[Tensor, Params]:
        pred, pullback = model.vjp(params, x)
        value, loss_pullback = loss_vjp(pred, target)
        dy = loss_pullback(torch.ones_like(value) if seed is None else seed)
        grads, _ = pullback(dy, need_dx=False) if model.skips_dx else pullback(dy)
        return value, grads

    def planned(params: Params, x: Tensor, target: Tensor, seed: Tensor | None) -> tuple[Tensor, Params]:
        for node in nodes:  # the structure guard: plain dicts, no key the model lacks
            tree = _lookup(params, node.keys)
            if type(tree) is not dict or not tree.keys() <= node.allowed:
                return general(params, x, target, seed)
        pullbacks = []
        for key, below, vjp, path in steps:
            # An absent entry (a parameterless layer's, in a torch state dict) reads as a fresh {}: torch.compile
            # (2.13) takes an empty MappingProxyType for true, and broke its graph on the layer's check.
            leaf_params = params if key is None else params[key] if key in params else {}
            for inner in below:
                leaf_params = leaf_params[inner] if inner in leaf_params else {}
            try:
                x, pullback = vjp(leaf_params, x)
            except (ValueError, TypeError) as error:
                raise (_in_layer(error, path) if path else error) from None
            pullbacks.append(pullback)
        value, loss_pullback = loss_vjp(x, target)
        dy = loss_pullback(torch.ones_like(value) if seed is None else seed)
        grads: list[Params] = [{}] * len(steps)
        for i in range(len(steps) - 1, 0, -1):
            grads[i], dy = pullbacks[i](dy)
            pullbacks[i] = None  # free what this layer saved, as autograd frees a node's
        grads[0], _ = pullbacks[0](dy, need_dx=False) if first_skips_dx else pullbacks[0](dy)
        if flat:
            return value, {key: grads[spec[key]] for key in params}
        return value, _assemble(spec, params, grads)

    return trace(planned)


_set_grad_enabled = torch._C._set_grad_enabled  # what torch.no_grad sets, without its context manager's 4 µs


def _no_graph(run: Callable[..., Any], *args: Any) -> Any:
    """``run(*args)`` with autograd's recording off: an x or params that require grad would otherwise make torch
    record a graph of every step, which the grads, and then a loop's new params, carry on. The pullbacks compute
    the gradient; autograd has nothing to record."""
    if not torch.is_grad_enabled():
        return run(*args)
    _set_grad_enabled(False)
    try:
        return run(*args)
    finally:
        _set_grad_enabled(True)


def value_and_grad(model: Layer | StatefulLayer, loss: Loss) -> ValueAndGrad | StatefulValueAndGrad:
    """Return ``fn(params, x, target) -> (loss_value, grads)``; grads mirror params.

    One forward pass through the model's layers and ``loss.vjp``, then the
    pullbacks in reverse from the seed cotangent 1: the gradient of
    ``loss(model(params, x), target)`` with respect to ``params``. Needs no
    autograd, so it runs under ``torch.inference_mode()`` too.

    The model's structure is read once, here (see the module's doc): each
    call checks only what can change between calls, and gives the same bits
    and the same error messages as going through ``model.vjp``. The records
    traced for a (model, loss) are kept: calling ``value_and_grad`` again with
    the same model and loss objects (as each ``fit`` does) reuses them.

    For a :class:`~rdl_functional.StatefulLayer` (a model with dropout or
    batch norm) the function is
    ``fn(params, state, x, target, *, generator=None, train=True) -> (loss_value, grads, new_state)``:
    the forward pass in training mode by default, its random layers drawing
    from ``generator``, and the model's new state beside the gradient.

    >>> import rdl_functional as rf
    >>> model = rf.compose(rf.linear(2, 3), rf.tanh)
    >>> fn = rf.value_and_grad(model, rf.mse_loss)
    >>> value, grads = fn(model.init(0), torch.ones(4, 2), torch.zeros(4, 3))
    >>> value.shape, list(grads["0"])
    (torch.Size([]), ['weight', 'bias'])
    """
    check_loss("value_and_grad", loss)
    if isinstance(model, StatefulLayer):
        run_stateful = _stateful_gradient_fn(model, loss)

        def value_and_grad_fn(params: Params, state: State, x: Tensor, target: Tensor, *,
                              generator: torch.Generator | int | None = None,
                              train: bool = True) -> tuple[Tensor, Params, State]:
            return _no_graph(run_stateful, params, state, x, target, generator, train, None)

        value_and_grad_fn.traced = run_stateful.traced  # type: ignore[attr-defined]
        value_and_grad_fn._gradient_of = (model, loss)  # type: ignore[attr-defined]  # train_step reads it
        return value_and_grad_fn
    if not isinstance(model, Layer):
        raise TypeError(f"value_and_grad: model must be a Layer, got {type(model).__name__}")
    run = _gradient_fn(model, loss)

    def value_and_grad_fn(params: Params, x: Tensor, target: Tensor) -> tuple[Tensor, Params]:
        return _no_graph(run, params, x, target, None)

    value_and_grad_fn.traced = run  # type: ignore[attr-defined]
    value_and_grad_fn._gradient_of = (model, loss)  # type: ignore[attr-defined]  # train_step reads it
    return value_and_grad_fn


@functools.lru_cache(maxsize=32)
def _stateful_gradient_fn(model: StatefulLayer, loss: Loss) -> Callable[..., tuple[Tensor, Params, State]]:
    """``fn(params, state, x, target, generator, train, seed) -> (value, grads, new_state)``: the stateful
    model's ``model.vjp``, the loss's, and the pullback run with release and without ``dx``; ``seed`` is the
    loss's cotangent (None: 1)."""
    loss_vjp = loss.vjp
    # A compose's pullback frees each layer's saved tensors as it goes; a leaf's is dropped whole.
    options = {"release": True} if model.sequence else {}
    if model.skips_dx:
        options["need_dx"] = False

    def closures(params: Params, state: State, x: Tensor, target: Tensor, generator: Any, train: bool,
                 seed: Tensor | None) -> tuple[Tensor, Params, State]:
        pred, new_state, pullback = model.vjp(params, state, x, train=train, generator=generator)
        value, loss_pullback = loss_vjp(pred, target)
        grads, _ = pullback(loss_pullback(torch.ones_like(value) if seed is None else seed), **options)
        return value, grads, new_state

    traced = trace(closures)

    def value_and_grad_fn(params: Params, state: State, x: Tensor, target: Tensor, generator: Any, train: bool,
                          seed: Tensor | None) -> tuple[Tensor, Params, State]:
        if type(generator) is int:  # the one generator compose would make of the seed, made here for the record
            generator = torch.Generator().manual_seed(generator)
        return traced(params, state, x, target, generator, train, seed)

    value_and_grad_fn.traced = traced  # type: ignore[attr-defined]
    return value_and_grad_fn
