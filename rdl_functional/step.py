"""One pure training step: a :class:`TrainState` record, and ``state, metrics = step(state, x, target)``.

Everything a step depends on is one record of trees, and the step is a pure
function of it, in the shape of optax's and flax's ``TrainState``::

    state = train_state(model, optimizer, params, generator=0)
    step = train_step(model, loss, optimizer)
    state, metrics = step(state, x, target)     # the state passed in is not changed

The step runs ``value_and_grad(model, loss)`` (from the layers' own
pullbacks) and ``optimizer.step`` (bit-identical to torch.optim's foreach
implementation), so a loop of it trains as ``torch.nn`` + ``torch.optim``
do, bit for bit. A model with dropout draws its masks from a generator
rebuilt from ``state.generator``; the new state holds that generator's state
after the step, and batch norm's new running statistics.
:func:`~rdl_functional.save_state` and :func:`~rdl_functional.load_state`
keep and restore a whole run in one call each.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs
import torch
from torch import Tensor

from ._random import as_generator
from .autodiff import _gradient_fn, _stateful_gradient_fn, value_and_grad
from .layers import Layer, Params
from .losses import Loss, check_loss
from .optim import _FACTORIES, Optimizer
from .optim.base import _read_state
from .stateful import State, StatefulLayer
from .trace import Traced, is_tracing, trace
from .tree import (
    Tree,
    _filler,
    _leaves_by_spec,
    _spec_of,
    tree_difference,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)

__all__ = ["TrainState", "TrainStep", "train_state", "train_step"]


@attrs.frozen(eq=False)  # trees of tensors have no one truth value: records compare (and hash) by identity
class TrainState:
    """Everything a training step depends on, as five trees of tensors; :func:`train_state` makes one.

    Attributes:
        params: the model's params.
        opt_state: the optimizer's state (``optimizer.init(params)`` to start).
        model_state: a :class:`~rdl_functional.StatefulLayer`'s state (batch norm's running
            statistics); ``{}`` for a plain model.
        generator: the state of the CPU ``torch.Generator`` that the random layers (dropout)
            draw from: its ``get_state()``, a ``uint8`` tensor.
        step: the steps taken, a 0-dim ``int64`` tensor.

    Frozen: a step returns a new record, and ``attrs.evolve(state, params=...)`` makes one
    with a field replaced.
    """

    params: Params = attrs.field(repr=False)
    opt_state: Tree = attrs.field(repr=False)
    model_state: State = attrs.field(repr=False)
    generator: Tensor = attrs.field(repr=False)
    step: Tensor


def train_state(
    model: Layer | StatefulLayer,
    optimizer: Optimizer,
    params: Params,
    generator: torch.Generator | int = 0,
    *,
    opt_state: Tree | None = None,
    model_state: State | None = None,
) -> TrainState:
    """The :class:`TrainState` a run starts from: ``params``, the optimizer's and the model's state, a generator.

    Args:
        model: the model the params serve (a :class:`~rdl_functional.Layer` or
            :class:`~rdl_functional.StatefulLayer`); the params must fit it (keys, shapes,
            dtypes of ``model.init``'s; a parameterless layer's empty entry may be absent).
        optimizer: an :class:`~rdl_functional.Optimizer` (``rf.sgd(0.1)``, ``rf.adam(1e-3)``,
            a ``rf.chain``).
        params: the starting params (kept as they are, not copied: nothing changes them).
        generator: an ``int`` seed, or a CPU ``torch.Generator`` whose state is read (not
            advanced); the random layers draw from it.
        opt_state: the optimizer's state to start from; ``optimizer.init(params)`` by default.
        model_state: a stateful model's state to start from; ``model.init_state()`` in the
            params' dtype by default. A plain model has none (``{}``).

    Raises:
        TypeError: ``model``, ``optimizer`` or ``generator`` is not of a kind named above
            (a step function such as ``rf.sgd_step`` is told to use ``rf.sgd(lr)``).
        ValueError: the params do not fit the model, ``opt_state`` is not the optimizer's
            for these params, or ``model_state`` is not the model's.

    >>> import torch, rdl_functional as rf
    >>> model = rf.compose(rf.linear(2, 3), rf.relu, rf.linear(3, 1))
    >>> state = rf.train_state(model, rf.adam(1e-2), model.init(0), generator=0)
    >>> state.step, list(state.opt_state), state.model_state, state.generator.dtype
    (tensor(0), ['count', 'lr', 'exp_avg', 'exp_avg_sq'], {}, torch.uint8)
    """
    who = "train_state"
    _check_model(who, model)
    _check_optimizer(who, optimizer)
    _check_params_fit(who, model, params)
    if opt_state is None:
        opt_state = optimizer.init(params)
    else:
        _check_opt_state(who, optimizer, params, opt_state)
    return TrainState(params=params, opt_state=opt_state, model_state=_model_state(who, model, params, model_state),
                      generator=_generator_state(who, generator), step=torch.tensor(0, dtype=torch.int64))


@attrs.frozen(eq=False)
class TrainStep:
    """``state, metrics = step(state, x, target)``: one pure training step; :func:`train_step` makes one.

    Attributes:
        model, loss, optimizer: what it was made of (transforms of the step read them).
        _grad: ``rf.value_and_grad(model, loss)``, made once by :func:`train_step`.
    """

    model: Layer | StatefulLayer
    loss: Loss
    optimizer: Optimizer
    _grad: Any = attrs.field(repr=False)
    # The whole step as one traced record, when the step is train_step's own (not one a transform made with
    # another gradient or optimizer): made after init, so attrs.evolve(step, grad=...) makes it anew.
    _flat: Any = attrs.field(init=False, repr=False, default=None)
    _fills: dict[Any, Any] = attrs.field(init=False, repr=False, factory=dict)  # the params' structure: a filler
    _rates: dict[int, Any] = attrs.field(init=False, repr=False, factory=dict)  # each rule's last rate tensor

    def __attrs_post_init__(self) -> None:
        if type(self.optimizer) is Optimizer and getattr(self._grad, "_gradient_of", None) == (self.model, self.loss):
            object.__setattr__(self, "_flat", _flat_step(self.model, self.loss, self.optimizer))

    def __call__(self, state: TrainState, x: Tensor, target: Tensor) -> tuple[TrainState, dict[str, Tensor]]:
        """One step on the batch ``x`` ``(batch, ...)``, ``target`` ``(batch, ...)``: ``(new_state, metrics)``."""
        if type(state) is not TrainState:
            raise TypeError(f"train_step: state must be an rf.TrainState (from rf.train_state(model, optimizer, "
                            f"params) or rf.load_state(path)), got {type(state).__name__}")
        stateful = isinstance(self.model, StatefulLayer)
        if not stateful and state.model_state:
            raise ValueError(f"train_step: {self.model.name} is a plain Layer, which has no state, but "
                             f"state.model_state holds {sorted(state.model_state)} (a state of another model?)")
        generator = None
        if stateful:
            generator = torch.Generator()
            generator.set_state(state.generator)  # a copy of its bytes: the state passed in is not changed
        if self._flat is not None:
            return self._flat_call(state, x, target, generator)
        if stateful:
            value, grads, model_state = self._grad(state.params, state.model_state, x, target, generator=generator,
                                                   train=True)
        else:
            value, grads = self._grad(state.params, x, target)
            model_state = state.model_state
        params, opt_state = self.optimizer.step(state.params, grads, state.opt_state)
        new = TrainState(params=params, opt_state=opt_state, model_state=model_state,
                         generator=state.generator if generator is None else generator.get_state(),
                         step=state.step + 1)
        return new, {"loss": value}

    def _flat_call(self, state: TrainState, x: Tensor, target: Tensor,
                   generator: torch.Generator | None) -> tuple[TrainState, dict[str, Tensor]]:
        """The step through its traced record: the gradient, the optimizer's state read out as leaf lists and
        the new step count, in one replay; then the optimizer's rules on the leaves (their rates and bias
        corrections are Python numbers, as torch.optim's are, so they run outside the record), and the trees."""
        optimizer = self.optimizer
        enabled = _grad_enabled()
        _set_grad_enabled(False)  # the step records no autograd graph, whatever its tensors require
        try:
            value, p, g, links, model_state, step, spec = self._flat(
                state.params, state.opt_state, state.model_state, generator, state.step, x, target)
            last = self._fills.get(None)  # the structure of the last call: a record returns one object for it
            if last is not None and last[0] is spec:
                fill = last[1]
            else:
                fill = self._fills.get(spec) or _filler(spec)
                self._fills[spec] = fill
                self._fills[None] = (spec, fill)
            reads, counts = [], []
            for link, read in zip(optimizer.links, links, strict=True):
                if link.rule is None:
                    reads.append((0, {}, read))
                    continue
                count, new_count, buffers = read
                named = {name: leaves for (name, _), leaves in zip(link.buffers, buffers, strict=True)}
                reads.append((int(count), named, None))
                counts.append(new_count)
            final, new_states = optimizer._apply(p, g, state.params, reads, fill, optimizer.name + ".step", counts,
                                                 self._rates)
            if optimizer.links[-1].transform is not None:
                final = torch._foreach_add(p, final) if p else []
        finally:
            _set_grad_enabled(enabled)
        new = TrainState(params=fill(final), opt_state=new_states[0] if not optimizer.chained else
                         {str(i): s for i, s in enumerate(new_states)}, model_state=model_state,
                         generator=state.generator if generator is None else generator.get_state(), step=step)
        return new, {"loss": value}


_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled  # what torch.no_grad sets, without its context manager's cost


_FLAT_STEPS: collections.OrderedDict[Any, Traced] = collections.OrderedDict()  # the last 32 made


def _flat_step(model: Layer | StatefulLayer, loss: Loss, optimizer: Optimizer) -> Traced:
    """The step up to the optimizer's rules, traced (:mod:`rdl_functional.trace`):
    ``(params, opt_state, model_state, generator, step, x, target) -> (value, params leaves, grads leaves, links,
    new model state, step + 1, the params' structure)``, where ``links`` holds per rule its count, the count + 1
    and its buffers as leaf lists in the params' order (and per other link its state as it is). Its first call
    of a signature runs it, with the optimizer's checks of its state and the layers' of the params, so what does
    not fit is refused with their messages; the record then guards that signature.

    Kept per (model, loss) and the optimizer's structure (its links' names, kinds and buffers: all the function
    reads of it), as value_and_grad's records are, so each new ``rf.adam(...)`` of a loop or a fit reuses them."""
    structure = (optimizer.name, optimizer.chained, tuple((link.name, link.rule is None, link.transform is None,
                                                           link.custom is None, tuple(n for n, _ in link.buffers))
                                                          for link in optimizer.links))
    key = (model, loss, structure)
    found = _FLAT_STEPS.get(key)
    if found is None:
        found = _FLAT_STEPS[key] = _made_flat_step(model, loss, optimizer)
        if len(_FLAT_STEPS) > 32:
            _FLAT_STEPS.popitem(last=False)
    return found


def _made_flat_step(model: Layer | StatefulLayer, loss: Loss, optimizer: Optimizer) -> Traced:
    stateful = isinstance(model, StatefulLayer)
    grad = _stateful_gradient_fn(model, loss).traced._fn if stateful else _gradient_fn(model, loss)._fn
    who = f"{optimizer.name}.step"

    def flat(params: Params, opt_state: Tree, model_state: State, generator: Any, step: Tensor, x: Tensor,
             target: Tensor) -> tuple[Any, ...]:
        states = optimizer._states(opt_state, who)
        if not is_tracing():  # the optimizer's checks, once per signature (a record cannot read a count)
            for link, (link_state, where) in zip(optimizer.links, states, strict=True):
                _read_state(link, link_state, params, where, who)
        if stateful:
            value, grads, model_state = grad(params, model_state, x, target, generator, True, None)
        else:
            value, grads = grad(params, x, target, None)
        p: list[Tensor] = []
        spec = _spec_of(params, p)
        g: list[Tensor] = []
        _leaves_by_spec(spec, grads, g)
        links = []
        for link, (link_state, _) in zip(optimizer.links, states, strict=True):
            if link.rule is None:
                links.append(link_state)
                continue
            buffers = []
            for name, _ in link.buffers:
                buffers.append([])
                _leaves_by_spec(spec, link_state[name], buffers[-1])
            links.append((link_state["count"], link_state["count"] + 1, buffers))
        return value, p, g, links, model_state, step + 1, spec

    return trace(flat)


def train_step(model: Layer | StatefulLayer, loss: Loss, optimizer: Optimizer) -> TrainStep:
    """A pure training step: ``state, metrics = step(state, x, target)``.

    The gradient of ``loss(model(params, x), target)`` from the layers' pullbacks
    (:func:`~rdl_functional.value_and_grad`), then ``optimizer.step`` on it: bit-identical to
    ``torch.nn`` + ``torch.optim`` (foreach) over the same batches. A
    :class:`~rdl_functional.StatefulLayer` runs in training mode: dropout draws its masks
    from a generator set to ``state.generator``, and batch norm normalizes with the batch's
    statistics. The new state holds the new params, the optimizer's new state, the model's
    new state, the generator's state after the draws and ``step + 1``; the state passed in
    is not changed. ``metrics`` is ``{"loss": value}``, a 0-dim tensor (read it with
    ``.item()`` when you need the number: the step itself never waits on the device).

    Args:
        model: a :class:`~rdl_functional.Layer` or :class:`~rdl_functional.StatefulLayer`.
        loss: a :class:`~rdl_functional.Loss` such as ``rf.mse_loss``.
        optimizer: an :class:`~rdl_functional.Optimizer`; chains included.

    Raises:
        TypeError: a model, loss or optimizer of another kind (a step function such as
            ``rf.sgd_step`` is told to use ``rf.sgd(lr)``); at a call, a state that is not a
            :class:`TrainState`. The layers and the optimizer check the rest at each call,
            with their own messages.

    >>> import torch, rdl_functional as rf
    >>> model = rf.compose(rf.linear(2, 3), rf.relu, rf.linear(3, 1))
    >>> step = rf.train_step(model, rf.mse_loss, rf.sgd(0.1))
    >>> state = rf.train_state(model, rf.sgd(0.1), model.init(0))
    >>> x, target = torch.ones(4, 2), torch.zeros(4, 1)
    >>> for _ in range(3):
    ...     state, metrics = step(state, x, target)
    >>> int(state.step), metrics["loss"].shape
    (3, torch.Size([]))
    """
    who = "train_step"
    _check_model(who, model)
    check_loss(who, loss)
    _check_optimizer(who, optimizer)
    return TrainStep(model, loss, optimizer, grad=value_and_grad(model, loss))


# ---------------------------------------------------------------------------
# The checks at the boundary.


def _check_model(who: str, model: Any) -> None:
    if not isinstance(model, (Layer, StatefulLayer)):
        raise TypeError(f"{who}: model must be an rf.Layer or rf.StatefulLayer (rf.compose(...), rf.linear(...)), "
                        f"got {type(model).__name__}")


def _check_optimizer(who: str, optimizer: Any) -> None:
    if isinstance(optimizer, Optimizer):
        return
    if any(optimizer is factory for factory in _FACTORIES):
        raise TypeError(f"{who}: optimizer rf.{optimizer.__name__} makes an optimizer: call it, e.g. "
                        f"rf.{optimizer.__name__}(...) with its rate")
    if callable(optimizer):
        name = getattr(optimizer, "__name__", type(optimizer).__name__)
        raise TypeError(f"{who}: optimizer must be an rf.Optimizer, got the step function {name}: a TrainState "
                        "carries the optimizer's state, which a step function has none of; use rf.sgd(lr) for "
                        "plain gradient descent (the same kernel as rf.sgd_step, bit for bit)")
    raise TypeError(f"{who}: optimizer must be an rf.Optimizer (rf.sgd(0.1), rf.adam(1e-3), rf.chain(...)), "
                    f"got {type(optimizer).__name__}")


def _float_dtype(params: Params) -> torch.dtype:
    """The dtype of the params' first floating-point leaf (float32 when there is none)."""
    floats = [leaf for leaf in tree_leaves(params) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
    return floats[0].dtype if floats else torch.float32


def _check_params_fit(who: str, model: Layer | StatefulLayer, params: Any) -> None:
    """Raise ValueError naming the first path where ``params`` differ from ``model.init``'s in keys, shape or
    dtype; the empty entries of parameterless layers may be absent, as in a torch state dict."""
    if not isinstance(params, dict):
        raise TypeError(f"{who}: params must be a dict of tensors (model.init(seed)), got {type(params).__name__}")
    found = _params_difference(model, params, _float_dtype(params))
    if found:
        raise ValueError(f"{who}: the params do not fit {model.name}: {found}")


def _params_difference(model: Layer | StatefulLayer, params: Any, dtype: torch.dtype) -> str | None:
    """Where ``params`` cannot serve ``model``, in words, or ``None``: keys, shapes and dtypes compared with
    ``model.init(0, dtype=dtype)``'s (the empty entries of parameterless layers may be absent, as in a torch
    state dict), with a hint when the params hold other layers than the model has."""
    expected = tree_unflatten(tree_flatten(model.init(0, dtype=dtype)))
    given = tree_unflatten(tree_flatten(params))
    found = tree_difference(expected, given, names=("the model", "the params"), leaves=True)
    if found and isinstance(given, dict) and given.keys() != expected.keys():
        found += (f" (the params hold the layers {', '.join(given)}, the model has params in its layers "
                  f"{', '.join(expected)}: params of another arrangement of layers, such as the model with or "
                  "without dropout or batch norm, do not fit it)")
    return found


def _check_opt_state(who: str, optimizer: Optimizer, params: Params, opt_state: Any) -> None:
    """The optimizer's own checks of its state against the params: each link's keys, count and buffers."""
    for link, (link_state, where) in zip(optimizer.links, optimizer._states(opt_state, who), strict=True):
        _read_state(link, link_state, params, where, who)


def _model_state(who: str, model: Layer | StatefulLayer, params: Params, given: State | None) -> State:
    """``given`` once it fits the model, else the state the model starts from (``{}`` for a plain model)."""
    if not isinstance(model, StatefulLayer):
        if given:
            raise ValueError(f"{who}: model_state goes with a StatefulLayer; {model.name} is a plain Layer, which "
                             "has none")
        return {}
    fresh = model.init_state(dtype=_float_dtype(params))
    if given is None:
        return fresh
    found = tree_difference(fresh, given, names=("the model's state", "model_state"), leaves=True)
    if found:
        raise ValueError(f"{who}: model_state does not fit {model.name}: {found} (the state of another model?)")
    return given


def _generator_state(who: str, generator: Any) -> Tensor:
    """The state of the CPU generator ``generator`` is (an int seeds a fresh one); the generator is not advanced."""
    generator = as_generator(generator, who)
    if generator.device.type != "cpu":
        raise ValueError(f"{who}: generator must be a CPU torch.Generator (the random layers draw their masks on "
                         f"the CPU), got one on {generator.device}")
    return generator.get_state()
