"""fit's loop, the parts chosen before it: the batches (from tensors or any iterable) and the step it runs.

The step is chosen once: a :class:`~rdl_functional.TrainStep` with the optimizer applied in place to private
copies (``optim.base._Running``, the kernels of ``optimizer.step``), a step function at each step's rate, or
``compile=True``'s :func:`~rdl_functional.compiled` train_step; data-parallel and capture are transforms of its
gradient. Each is called as
``state, metrics = step(state, x, target)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor

from .autodiff import value_and_grad
from .layers import Layer, Params
from .losses import Loss
from .optim import _FACTORIES, Optimizer, sgd, sgd_step
from .optim.base import _Running
from .optim.schedules import _check_lr, _rate
from .stateful import State, StatefulLayer
from .step import TrainState, TrainStep, train_state, train_step
from .tree import Tree, tree_leaves, tree_map

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


StepFunction = Callable[[Tree, Tree, float], Tree]
"""``(params, grads, lr) -> new params``, as :func:`~rdl_functional.sgd_step`."""


def _check_count(where: str, name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int ≥ {minimum}, got {value!r}")


def _check_rows(where: str, x: Tensor, target: Tensor) -> None:
    for name, value in (("x", x), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:  # the mean loss and every metric of no rows is NaN
        raise ValueError(f"{where}: x has no rows (shape {tuple(x.shape)}); expected (rows, ...) with rows ≥ 1")
    if x.shape[:1] != target.shape[:1]:
        raise ValueError(f"{where}: x has {x.shape[0]} rows but target has {target.shape[0]}")


def _batches_of(x: Any, target: Any, batch_size: Any, drop_last: Any, validation: Any, test: Any,
                epochs: int) -> tuple[_Tensors | _Iterable, tuple[Tensor, Tensor] | None]:
    """What the loop draws its batches from, and the held-out data (``test`` or ``validation``), checked."""
    if test is not None and validation is not None:
        raise ValueError("fit: test= and validation= both give held-out data, measured as history.test_*; pass one")
    if not isinstance(drop_last, bool):
        raise TypeError(f"fit: drop_last must be True or False, got {type(drop_last).__name__}")
    fraction = isinstance(validation, float)
    if isinstance(x, Tensor):
        _check_count("fit", "batch_size", batch_size, 1)
        if target is None:
            raise ValueError("fit: target is missing: pass fit(model, loss, params, x, target, ...) with tensors, or "
                             "an iterable of (x, target) batches as x")
        _check_rows("fit", x, target)
        x, target = x.detach(), target.detach()  # data that requires grad would grow a graph through every step
        if fraction:
            x, target, test = _split(x, target, validation)
        elif validation is not None:
            test = validation
        data: _Tensors | _Iterable = _Tensors(x, target, batch_size, drop_last)
        if drop_last and data.per_epoch == 0:
            raise ValueError(f"fit: drop_last=True with {x.shape[0]} rows in batches of {batch_size} leaves no batch; "
                             "use a smaller batch_size")
    else:
        for name, value, unset in (("target", target, None), ("batch_size", batch_size, None),
                                   ("drop_last", drop_last, False)):
            if value is not unset:
                raise ValueError(f"fit: {name} goes with (x, target) tensors; an iterable of batches (a DataLoader) "
                                 f"makes its own batches (leave {name} out)")
        if fraction:
            raise ValueError("fit: validation as a fraction splits (x, target) tensors; with an iterable of batches, "
                             "pass validation=(x_val, target_val)")
        data = _Iterable.of(x, epochs)
    if test is not None:
        if not isinstance(test, (tuple, list)) or len(test) != 2:
            raise TypeError(f"fit: held-out data must be a pair (x, target) of tensors, got {type(test).__name__}")
        _check_rows("fit: test", *test)
        test = (test[0].detach(), test[1].detach())
    return data, test


def _split(x: Tensor, target: Tensor, fraction: float) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """The first rows to train on and the last ``fraction`` of them held out, as Keras' ``validation_split``."""
    n = x.shape[0]
    held = round(n * fraction) if 0 < fraction < 1 else 0
    if not 0 < held < n:
        raise ValueError(f"fit: validation={fraction!r} holds out {held} of {n} rows; expected a fraction in (0, 1) "
                         "that leaves at least one row on each side")
    return x[:-held], target[:-held], (x[-held:], target[-held:])


@attrs.frozen
class _Tensors:
    """Batches of ``(x, target)`` tensors: each epoch a shuffle drawn from the state's generator, then slices."""

    x: Tensor
    target: Tensor
    batch_size: int
    drop_last: bool

    @property
    def rows(self) -> int:
        """Rows trained on in an epoch."""
        n = self.x.shape[0]
        return n - n % self.batch_size if self.drop_last else n

    @property
    def per_epoch(self) -> int:
        return -(-self.rows // self.batch_size)

    def epoch(self, state: TrainState, resumed: Checkpoint | None) -> tuple[TrainState, Tensor, int, Iterator[Any]]:
        """``(state, order, steps done, batches)``: the epoch's shuffle (or the resumed one), and its batches as
        ``(rows done, x, target)``, each a slice (a view, no copy) of the shuffled data."""
        if resumed is not None and resumed.position:  # inside the epoch the checkpoint was written in
            order, first = resumed.order, resumed.position
        else:
            shuffler = torch.Generator()
            shuffler.set_state(state.generator)
            order, first = torch.randperm(self.x.shape[0], generator=shuffler), 0
            state = attrs.evolve(state, generator=shuffler.get_state())  # the masks are drawn after the shuffle
        on_device = order.to(self.x.device)  # drawn on the generator's device (the CPU), the same on every device
        x, target, size, n = self.x.index_select(0, on_device), self.target.index_select(0, on_device), \
            self.batch_size, self.x.shape[0]
        batches = ((min(start + size, n), x[start:start + size], target[start:start + size])
                   for start in range(first, self.rows, size))
        return state, order, first // size, batches


class _Iterable:
    """Batches from any iterable of ``(x, target)`` pairs, iterated once an epoch, as they come."""

    def __init__(self, source: Any) -> None:
        self.source, self.first = source, None

    @classmethod
    def of(cls, source: Any, epochs: int) -> _Iterable:
        # Not iter(source): a DataLoader draws its base seed from its generator at each iter().
        if not isinstance(source, Iterable):
            raise TypeError(f"fit: x must be a torch.Tensor (with target) or an iterable of (x, target) batches such "
                            f"as a DataLoader, got {type(source).__name__}")
        if isinstance(source, Iterator) and epochs > 1:
            raise ValueError(f"fit: x is a one-pass iterator ({type(source).__name__}), used up by the first of "
                             f"{epochs} epochs; pass a list of batches or a DataLoader, which can be iterated again")
        return cls(source)

    def epoch(self, state: TrainState, resumed: Any) -> tuple[TrainState, None, int, Iterator[Any]]:
        return state, None, 0, self._batches()

    def _batches(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        rows = 0
        for index, batch in enumerate(self.source):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
                shown = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else type(batch).__name__
                raise TypeError(f"fit: batch {index} of x is {shown}; an iterable of batches yields (x, target) "
                                "pairs of tensors (a DataLoader over a TensorDataset(x, target) does)")
            x, target = batch
            _check_rows(f"fit: batch {index}", x, target)
            if self.first is not None:  # the metrics' check, on the first batch, before its step
                self.first, check = None, self.first
                check(x, target)
            rows += x.shape[0]
            yield rows, x, target


def _model_state_of(model: Any, params: Params, data: Any, model_state: State | None, compile: bool) -> State | None:
    """The model's state to start from: a stateful model's (checked), ``None`` for a plain model."""
    if isinstance(model, StatefulLayer):
        if compile:
            raise ValueError(f"fit: compile=True compiles a plain model's step; {model.name} carries state or "
                             "randomness")
        return _start_state(model, params, data.x if isinstance(data, _Tensors) else None, model_state)
    if model_state is not None:
        raise ValueError(f"fit: model_state goes with a StatefulLayer; {model.name} is a plain Layer, which has none")
    return None


def _step_and_state(model: Any, loss: Loss, optimizer: Any, lr: Any, params: Params, opt_state: Any,
                    model_state: Any, g: torch.Generator, resumed: Checkpoint | None, compile: bool, capture: bool,
                    rank: int, size: int, data: Any) -> tuple[Callable[..., Any], TrainState]:
    """The step the loop runs, chosen once (the transforms applied: compile, data-parallel, capture), and the
    :class:`TrainState` it starts from (the checkpoint's, when one is resumed)."""
    if resumed is not None:
        params, model_state = resumed.params, resumed.model_state
        g.set_state(resumed.generator_state)
    steps = resumed.steps if resumed is not None else 0
    if compile:
        return _compiled_step(model, loss, optimizer, lr, params, opt_state, g, resumed, steps)
    runner, rate = _optimizer("fit", optimizer, lr, params, opt_state,
                              resumed=resumed.opt_state if resumed is not None else None)
    state = TrainState(params=runner.params if runner is not None else params,
                       opt_state=runner if runner is not None else {}, model_state=model_state or {},
                       generator=g.get_state(), step=torch.tensor(steps, dtype=torch.int64))
    # The optimizer applied in place to the runner's private copies, or a step function at the step's rate.
    step = TrainStep(model, loss, _InPlace(runner) if runner is not None else _Rated(optimizer, rate, steps),
                     grad=value_and_grad(model, loss))
    if size > 1:
        from .distributed import _sharded

        step = _sharded(step, rank, size, "fit")
    if capture:
        from .graphs import capture as record  # imported on first use, as compile's module

        step = attrs.evolve(step, grad=record(step._grad))
    if isinstance(model, StatefulLayer):
        return (_short_batch_named(step, data) if isinstance(data, _Tensors) else step), state
    return (_Applied(step._grad, runner) if runner is not None else step), state


class _InPlace:
    """The optimizer of fit's step: ``optim.base._Running``, which updates private copies of the params and its
    state in place with the kernels of ``optimizer.step`` (so the same bits), without a new tree per step. The
    state's ``opt_state`` is the runner itself; :attr:`Progress.state` reads it out."""

    def __init__(self, runner: _Running) -> None:
        self.runner = runner

    def step(self, params: Params, grads: Params, opt_state: Any) -> tuple[Params, _Running]:
        return self.runner(grads), self.runner


class _Applied:
    """A plain model's step with an optimizer, as fit runs it: the gradient (the TrainStep's, transforms
    included), then the optimizer applied in place by the runner. The state it returns is the one passed in,
    whose params and opt_state (the runner) are live: no record, and no step count tensor, is made per step
    (about 6 µs of a 110 µs step at batch 10); :attr:`Progress.state` reads the state out, step count included."""

    def __init__(self, grad: Callable[..., tuple[Tensor, Params]], runner: _Running) -> None:
        self.grad, self.runner = grad, runner

    def __call__(self, state: TrainState, x: Tensor, target: Tensor) -> tuple[TrainState, dict[str, Tensor]]:
        value, grads = self.grad(state.params, x, target)
        self.runner(grads)
        return state, {"loss": value}


class _Rated:
    """A step function ``(params, grads, lr) -> params`` as the step's optimizer, at the rate of each step count."""

    def __init__(self, function: StepFunction, rate: Callable[[int], float], count: int) -> None:
        self.function, self.rate, self.count = function, rate, count

    def step(self, params: Params, grads: Params, opt_state: Tree) -> tuple[Params, Tree]:
        new = self.function(params, grads, self.rate(self.count))
        self.count += 1
        return new, opt_state


def _compiled_step(model: Layer, loss: Loss, optimizer: Any, lr: Any, params: Params, opt_state: Tree | None,
                   g: torch.Generator, resumed: Checkpoint | None, steps: int) -> tuple[Callable[..., Any], TrainState]:
    """``compile=True``'s step: :func:`~rdl_functional.compiled` of the model's :func:`~rdl_functional.train_step`
    (inductor), kept per (model, loss, optimizer) so that fitting again reuses the compiled code; and its state."""
    if isinstance(optimizer, Optimizer):
        if lr is not None:
            raise ValueError(f"fit: {optimizer.name} carries its own lr; leave lr out (or pass lr=None)")
        key: Any = optimizer
    elif optimizer is sgd_step:
        if lr is None:
            raise ValueError("fit: lr is required with a step function such as sgd_step (or pass "
                             "optimizer=rf.sgd(lr), which carries its own)")
        if opt_state is not None:
            raise ValueError("fit: opt_state goes with an rf.Optimizer; a step function keeps no state")
        key, optimizer = "sgd_step", None
    else:
        raise ValueError("fit: compile=True compiles the step of an rf.Optimizer (rf.sgd(lr), rf.adam(lr), ...) or of "
                         "sgd_step with lr; a step function of your own is not compiled (pass optimizer=rf.sgd(lr) "
                         "and the like)")
    fast = _COMPILED.pop((model, loss, key), None)
    if fast is None:
        schedule = _Swapped()
        fast = _compile(model, loss, optimizer or sgd(schedule)), schedule
    _COMPILED[(model, loss, key)] = fast  # the most recent last
    if len(_COMPILED) > 8:
        del _COMPILED[next(iter(_COMPILED))]
    fast, schedule = fast
    if key == "sgd_step":  # the rate is an input of the compiled graph: this fit's schedule serves it
        schedule.schedule = lr if callable(lr) else _constant(lr, "fit")
    start = resumed.opt_state if resumed is not None else opt_state
    state = train_state(model, fast.step.optimizer, _copy(params), g, opt_state=start)
    return fast, attrs.evolve(state, step=torch.tensor(steps, dtype=torch.int64))


def _compile(model: Layer, loss: Loss, optimizer: Optimizer) -> Any:
    from .transforms import compiled  # imported on first use: it loads torch's compilers

    return compiled(train_step(model, loss, optimizer), backend="inductor")


# fit(compile=True)'s compiled steps, by (model, loss, optimizer): the last few, each holding its compiled code.
_COMPILED: dict[Any, Any] = {}


class _Swapped:
    """The schedule of sgd_step's compiled step: the schedule of the fit that runs it (a rate is a graph input,
    so one compiled step serves every fit of the model and loss, whatever their rates)."""

    schedule: Callable[[int], float] = staticmethod(lambda count: 0.0)

    def __call__(self, count: int) -> float:
        return self.schedule(count)


def _short_batch_named(step: Callable[..., Any], data: _Tensors) -> Callable[..., Any]:
    """``step``, with an error at an epoch's short last batch (batch norm cannot take one row) saying so."""

    def run(state: TrainState, x: Tensor, target: Tensor) -> tuple[TrainState, dict[str, Tensor]]:
        try:
            return step(state, x, target)
        except ValueError as error:
            if x.shape[0] == data.batch_size:
                raise
            raise ValueError(f"fit: the last batch of each epoch holds {x.shape[0]} row(s) ({data.x.shape[0]} rows in "
                             f"batches of {data.batch_size}): {error}") from None

    return run


def _check_capture(model: Any, data: Any, params: Params, compile: bool) -> None:
    if compile:
        raise ValueError("fit: compile=True and capture=True are two ways to run the step; choose one")
    if isinstance(model, StatefulLayer):
        raise ValueError(f"fit: capture=True records a plain model's step as a CUDA graph; {model.name} carries state "
                         "or randomness, whose step takes a generator and a state that the graph does not carry yet "
                         "(and dropout draws its masks on the CPU)")
    if not isinstance(data, _Tensors):  # an iterable's batches: the graph itself refuses one off the device
        return
    devices = {str(data.x.device), str(data.target.device), *(str(leaf.device) for leaf in tree_leaves(params))}
    if len(devices) > 1 or not next(iter(devices)).startswith("cuda"):
        raise ValueError(f"fit: capture=True records each step as a CUDA graph, so x, target and the params must be "
                         f"on one CUDA device; they are on {', '.join(sorted(devices))}")


def _detached(params: Params) -> Params:
    """The params detached from any autograd graph (a view each, no copy): params that require grad would
    otherwise grow a graph through every update, which is never freed, and hand back results with a grad_fn."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, params)


def _optimizer(
    who: str, optimizer: Any, lr: Any, params: Params, opt_state: Tree | None, resumed: Tree | None = None,
) -> tuple[_Running | None, Callable[[int], float]]:
    """``(runner, rate)``: the optimizer run in place on private copies, or ``None`` and the rate of step
    ``count`` for a step function of the user's own."""
    if isinstance(optimizer, Optimizer):
        if lr is not None:
            raise ValueError(f"{who}: {optimizer.name} carries its own lr; leave lr out (or pass lr=None)")
        return _Running(optimizer, params, resumed if resumed is not None else opt_state, who), lambda count: 0.0
    if any(optimizer is factory for factory in _FACTORIES):
        raise TypeError(f"{who}: optimizer rf.{optimizer.__name__} makes an optimizer: call it, e.g. "
                        f"optimizer=rf.{optimizer.__name__}(...) with its rate (a step function passed here takes "
                        "(params, grads, lr))")
    if not callable(optimizer):
        raise TypeError(f"{who}: optimizer must be an rf.Optimizer or a step function (params, grads, lr) -> params, "
                        f"got {type(optimizer).__name__}")
    if lr is None:
        raise ValueError(f"{who}: lr is required with a step function such as sgd_step "
                         "(or pass optimizer=rf.sgd(lr), which carries its own)")
    if opt_state is not None:
        raise ValueError(f"{who}: opt_state goes with an rf.Optimizer; a step function keeps no state")
    schedule = lr if callable(lr) else _constant(lr, who)
    if optimizer is sgd_step:  # the same kernel, run in place by the one optimizer path
        return _Running(sgd(schedule), params, resumed, who), lambda count: 0.0
    return None, lambda count: _rate(schedule, count, who)


def _start_state(model: StatefulLayer, params: Params, x: Tensor, state: State | None) -> State:
    """The state to train from: ``state``, or ``model.init_state()`` in the dtype of the params (else of ``x``)."""
    if state is not None:
        return _copy(state)  # the caller's tensors are never handed back as the result
    floats = [leaf for leaf in tree_leaves(params) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
    dtype = floats[0].dtype if floats else x.dtype if isinstance(x, Tensor) and x.is_floating_point() else None
    return model.init_state(dtype=dtype or torch.float32)


def _constant(lr: Any, who: str) -> Callable[[int], float]:
    """A checked constant rate, as a schedule."""
    value = _check_lr(lr, who)
    return lambda count: value


def _copy(tree: Tree) -> Tree:
    return tree_map(torch.clone, tree)
