"""Transforms of the training step: ``rf.compiled(step)``, one compiled graph, with the step's own signature.

::

    fast = rf.compiled(rf.train_step(model, loss, optimizer))
    state, metrics = fast(state, x, target)              # as step(state, x, target), to float rounding

The step is seen as one function of flat tensors: the params' leaves, ``x``,
``target``, and per optimizer rule its state's step count (0-dim int64) and
its rate (0-dim float64): graph inputs, so a schedule's rate and Adam's bias
corrections never become constants baked into the graph; then the rule's
buffers. It returns the loss, the new params, the new buffers and the new
counts. Inside,
it is ``rf.value_and_grad`` (the layers' own pullbacks) and the optimizer's
own rules run through a tensor-scalar op table (``optim.base._Traced``), so
no maths is written twice. Around it, on the host: the state is read into
the flat list and the new :class:`~rdl_functional.TrainState` is built from
the outputs (its ``count`` and ``lr`` entries as the eager step writes them).

That function is compiled by torch's own compilers, once per *signature*
(the trees' structure, every tensor's shape, dtype, stride and device):
``torch.compile`` (inductor, ``dynamic=False``, one graph) or AOTInductor
(``torch.export`` then ``torch._inductor.aoti_compile_and_package``, loaded
with ``aoti_load_package``). ``backend="auto"`` builds both and keeps the
faster, timed on the first call's own inputs. AOTInductor's packages, and
the auto choice, are cached on disk keyed by what the step was traced for,
so a second process loads instead of compiling.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from ._compilers import Runner, _aoti, _cache_dir, _digest, _inductor, _measure, _package_folder
from .layers import Layer
from .optim.base import _traced_run
from .optim.schedules import _rate
from .stateful import StatefulLayer
from .step import TrainState, TrainStep
from .trace import trace
from .tree import _fill_spec, _filler, _spec_of

__all__ = ["CapturedStep", "CompiledStep", "compiled"]

BACKENDS = ("auto", "inductor", "aoti")


@attrs.frozen
class _Layout:
    """What one signature's flat lists hold: the params' structure, and per rule its count, rate and buffers."""

    spec: Any
    counts: tuple[int, ...]  # the count each rule's state held (the step taken is count + 1)
    rates: tuple[Tensor, ...]  # each rule's rate as the new state keeps it: a 0-dim float64 CPU tensor
    fill: Callable[[list[Tensor]], Any]  # a tree of the params' structure from its leaves


class _Signature:
    """One signature met: its key, and what runs it (a compiled runner, or the flat function), once built."""

    __slots__ = ("key", "runner")

    def __init__(self, key: Any) -> None:
        self.key, self.runner = key, None


class _Flat:
    """A :class:`~rdl_functional.TrainStep` as a function of flat tensors, and the host code around it."""

    def __init__(self, step: Any, who: str) -> None:
        _check_step(step, who)
        self.step, self.who = step, who
        self.links = step.optimizer.links
        self.rules = [link for link in self.links if link.rule is not None]
        self.names = [tuple(name for name, _ in link.buffers) for link in self.rules]
        self.tokens: dict[Any, int] = {}  # each signature's key, numbered
        self.keys: dict[int, tuple[Any, Any]] = {}  # and back: the key and the params' structure
        self.checked: dict[int, tuple[_Signature, Any]] = {}  # the signatures the eager step vouched for
        self.rates: list[tuple[float, Tensor, Tensor] | None] = [None] * len(self.rules)  # the last rate, kept
        # The state read out as flat lists, traced (rdl_functional.trace): its record binds the trees' tensors
        # and checks their structure, shapes, dtypes and strides in one go, instead of a walk and a key per call.
        self.flatten = trace(self._flatten)

    def _flatten(self, params: Any, opt_state: Any, x: Tensor, target: Tensor) -> tuple[Any, ...]:
        """``(params leaves + [x, target], each rule's count, each rule's buffers' leaves, the signature's number)``."""
        leaves: list[Tensor] = []
        spec = _spec_of(params, leaves)
        leaves += (x, target)
        links = [opt_state[str(i)] for i in range(len(self.links))] if self.step.optimizer.chained else [opt_state]
        counts, buffers, shapes = [], [], []
        for link, link_state in zip(self.links, links, strict=True):
            if link.rule is None:
                shapes.append(())
                continue
            counts.append(link_state["count"])
            found: list[Tensor] = []
            shapes.append(tuple(_spec_of(link_state[name], found) for name, _ in link.buffers))
            buffers.append(found)
        every = [*leaves, *counts, *(leaf for found in buffers for leaf in found)]
        key = (spec, tuple(shapes), torch.is_autocast_enabled(x.device.type),
               tuple([(tuple(t.shape), t.dtype, t.device, t.stride()) for t in every]))
        token = self.tokens.setdefault(key, len(self.tokens))
        self.keys[token] = (key, spec)
        return leaves, counts, buffers, token

    def prepare(self, state: Any, x: Tensor, target: Tensor) -> tuple[_Signature, list[Tensor], _Layout]:
        """``(signature, flat inputs, layout)``; a new signature is first run by the eager step, whose checks
        (the layers', the optimizer's) refuse what does not fit, with their own messages."""
        if type(state) is not TrainState:
            self.step(state, x, target)  # its TypeError names what arrived
        if isinstance(state.model_state, dict) and state.model_state:
            self.step(state, x, target)  # its ValueError names the stray state
        try:
            leaves, counts, buffers, token = self.flatten(state.params, state.opt_state, x, target)
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError):
            token = None  # not a state of this optimizer, or a leaf that is not a tensor: the eager step says so
        checked = self.checked.get(token)
        if checked is None:
            self.step(state, x, target)
            if token is None:  # the eager step took what the flat walk could not: refuse rather than guess
                raise TypeError(f"{self.who}: the state's trees must be plain dicts of tensors to be compiled")
            key, spec = self.keys[token]
            checked = self.checked[token] = (_Signature(key), _filler(spec))
        signature, fill = checked
        device = x.device
        ints, rates = [], []
        for rule, (link, count_tensor, found) in enumerate(zip(self.rules, counts, buffers, strict=True)):
            count = int(count_tensor)
            on_device, on_cpu = self._rate(rule, _rate(link.lr, count, self.who), device)
            ints.append(count)
            rates.append(on_cpu)
            leaves += (count_tensor.to(device), on_device, *found)
        return signature, leaves, _Layout(self.keys[token][1], tuple(ints), tuple(rates), fill)

    def _rate(self, rule: int, rate: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """The rate as 0-dim float64 tensors on the device (the graph's input) and on the CPU (the state's ``lr``);
        a rate that has not changed (a constant one) reuses the tensors of the call before."""
        kept = self.rates[rule]
        if kept is None or kept[0] != rate or kept[1].device != device:
            on_cpu = torch.tensor(rate, dtype=torch.float64)
            kept = self.rates[rule] = (rate, on_cpu.to(device), on_cpu)
        return kept[1], kept[2]

    def finish(self, state: TrainState, layout: _Layout, out: list[Tensor]) -> tuple[TrainState, dict[str, Tensor]]:
        """The new state and metrics from the flat outputs ``[loss, *params, *buffers, *counts]``."""
        value, n = out[0], (len(out) - 1 - len(self.rules)) // (1 + sum(map(len, self.names)))
        params, at = layout.fill(out[1:1 + n]), 1 + n
        taken = out[len(out) - len(self.rules):]  # each rule's count + 1, int64, computed by the graph
        states, rule = [], 0
        for link in self.links:
            if link.rule is None:
                states.append({})
                continue
            count = taken[rule] if taken[rule].device.type == "cpu" else torch.tensor(layout.counts[rule] + 1)
            link_state = {"count": count, "lr": layout.rates[rule]}
            for name in self.names[rule]:
                link_state[name] = layout.fill(out[at:at + n])
                at += n
            states.append(link_state)
            rule += 1
        opt_state = {str(i): s for i, s in enumerate(states)} if self.step.optimizer.chained else states[0]
        new = TrainState(params=params, opt_state=opt_state, model_state={}, generator=state.generator,
                         step=state.step + 1)
        return new, {"loss": value}

    def function(self, layout: _Layout, n_params: int) -> Callable[..., tuple[Tensor, ...]]:
        """The step as ``fn(*flat inputs) -> (loss, *new params, *new buffers, *new counts)``: what the compilers
        trace. Each rule's inputs are its state's ``count`` (int64) and its rate (float64), 0-dim."""
        grad, optimizer, who, names = self.step._grad, self.step.optimizer, self.who, self.names
        spec = layout.spec

        def flat_step(*inputs: Tensor) -> tuple[Tensor, ...]:
            p = list(inputs[:n_params])
            params = _fill_spec(spec, iter(p))
            value, grads = grad(params, inputs[n_params], inputs[n_params + 1])
            g: list[Tensor] = []
            _spec_of(grads, g)
            at = n_params + 2
            counts, rates, buffers, taken = [], [], [], []
            for rule_names in names:
                taken.append(inputs[at] + 1)  # the step being taken
                counts.append(taken[-1].to(torch.float64))
                rates.append(inputs[at + 1])
                at += 2
                rule_buffers = {}
                for name in rule_names:
                    rule_buffers[name] = list(inputs[at:at + n_params])
                    at += n_params
                buffers.append(rule_buffers)
            new_p, new_buffers = _traced_run(optimizer, p, g, params, buffers, counts, rates, who)
            out = [value, *new_p]
            for rule_names, rule_buffers in zip(names, new_buffers, strict=True):
                for name in rule_names:
                    out += rule_buffers[name]
            return (*out, *taken)

        return flat_step


def _check_step(step: Any, who: str) -> None:
    """Refuse, by name, what is not a plain :class:`~rdl_functional.TrainStep` this module can trace."""
    if isinstance(step, CompiledStep):
        raise TypeError(f"{who}: {step!r} is compiled already")
    if isinstance(step, CapturedStep):
        raise TypeError(f"{who}: {step!r} is a captured step (a CUDA graph's replay cannot be compiled); compile "
                        "first, then capture: rf.capture(rf.compiled(step))")
    if not isinstance(step, TrainStep):
        name = getattr(step, "__name__", type(step).__name__)
        raise TypeError(f"{who}: expected an rf.TrainStep (rf.train_step(model, loss, optimizer)), got {name}: a "
                        "function of your own is not traced here (build the step with rf.train_step, or call "
                        "torch.compile on your function)")
    if isinstance(step.model, StatefulLayer) or not isinstance(step.model, Layer):
        raise ValueError(f"{who}: {step.model.name} carries state or randomness (dropout, batch norm), which is not "
                         "compiled: its masks come from state.generator, a CPU torch.Generator that a compiled graph "
                         "cannot draw from (inductor draws with its own RNG, so the masks, and a restored run, would "
                         "no longer be the step's); run the step as it is")
    for link in step.optimizer.links:
        if link.custom is not None:
            raise ValueError(f"{who}: the optimizer's link {link.name} is a transform of your own "
                             "(rf.gradient_transform), whose state is not a tree of buffers like params and is not "
                             "traced; compile a step whose optimizer is built from the library's rules and transforms")


class CompiledStep:
    """``state, metrics = fast(state, x, target)``: a :class:`~rdl_functional.TrainStep` compiled; :func:`compiled`.

    Attributes:
        step: the step it compiles; ``model``, ``loss`` and ``optimizer`` are its.
        backend: ``"auto"``, ``"inductor"`` or ``"aoti"``, as asked.
        chosen: per signature compiled so far (by its digest, the cache's file name):
            ``{"backend": ..., "compile_s": ..., "loaded": ...}`` (``loaded``: AOTInductor's package
            was read from the cache), and ``"us"``, µs per call of each backend, where auto measured.
    """

    def __init__(self, step: TrainStep, backend: str, cache_dir: Path) -> None:
        self._flat = _Flat(step, "compiled")
        self.step, self.backend, self.cache_dir = step, backend, cache_dir
        self.model, self.loss, self.optimizer = step.model, step.loss, step.optimizer
        self.chosen: dict[Any, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"<compiled({self.model.name}, {self.optimizer.name}; backend={self.backend})>"

    def __call__(self, state: TrainState, x: Tensor, target: Tensor) -> tuple[TrainState, dict[str, Tensor]]:
        """One step on the batch ``x`` ``(batch, ...)``, ``target`` ``(batch, ...)``: ``(new_state, metrics)``."""
        signature, leaves, layout = self._flat.prepare(state, x, target)
        return self._flat.finish(state, layout, self._run(signature, leaves, layout))

    def _run(self, signature: _Signature, leaves: list[Tensor], layout: _Layout) -> list[Tensor]:
        runner = signature.runner
        if runner is None:
            runner = signature.runner = self._build(signature.key, leaves, layout)
        return runner(leaves)

    def _build(self, key: Any, leaves: list[Tensor], layout: _Layout) -> Runner:
        fn = self._flat.function(layout, _count_leaves(layout.spec))
        digest, reusable = _digest(self.step, key)
        folder = _package_folder(self.cache_dir, reusable)
        package, record = folder / f"{digest}.pt2", folder / f"{digest}.json"
        start = time.perf_counter()
        wanted = self.backend
        if wanted == "auto" and record.exists():
            wanted = json.loads(record.read_text())["backend"]  # the choice a process made before
        info: dict[str, Any] = {"backend": wanted, "loaded": False}
        if wanted == "inductor":
            runner = _inductor(fn)
        elif wanted == "aoti":
            info["loaded"] = package.exists()
            runner = _aoti(fn, leaves, package)
        else:
            runners = {"inductor": _inductor(fn), "aoti": _aoti(fn, leaves, package)}
            info["us"] = _measure(runners, leaves)
            info["backend"] = min(info["us"], key=info["us"].get)
            runner = runners[info["backend"]]
            folder.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"backend": info["backend"], "us": info["us"]}))
        runner(list(leaves))  # compiled (inductor compiles at its first call) before the clock stops
        info["compile_s"] = time.perf_counter() - start
        self.chosen[digest] = info
        return runner


class CapturedStep:
    """``state, metrics = step(state, x, target)``, each call one replay of a CUDA graph: ``rf.capture(step)``.

    The flat step (the one :func:`compiled` compiles: the rate and the step count are tensor inputs,
    so the graph replays them as they change) recorded once per signature by
    :class:`~rdl_functional.Captured`; of a :class:`CompiledStep`, its compiled code is recorded.
    """

    def __init__(self, step: TrainStep | CompiledStep, *, warmup: int, max_shapes: int, recorder: Any) -> None:
        from .graphs import Captured

        if isinstance(step, CapturedStep):
            raise TypeError(f"capture: {step!r} is captured already (a graph's replay cannot be recorded in another)")
        if isinstance(step, CompiledStep):
            self._flat, run = step._flat, step._run
        else:
            self._flat, run = _Flat(step, "capture"), self._eager
        self.step = step
        self.model, self.loss, self.optimizer = step.model, step.loss, step.optimizer
        self._current: tuple[Any, _Layout] | None = None
        name = "capture(compiled step)" if isinstance(step, CompiledStep) else "capture(step)"
        self._captured = Captured(lambda *leaves: run(self._current[0], list(leaves), self._current[1]),
                                  warmup=warmup, max_shapes=max_shapes, name=name, recorder=recorder)

    def __repr__(self) -> str:
        return f"<capture of the step of {self.model.name}, {self.optimizer.name}: {self.shapes} recorded>"

    @property
    def shapes(self) -> int:
        """The signatures recorded so far, each its own graph."""
        return self._captured.shapes

    def _eager(self, signature: _Signature, leaves: list[Tensor], layout: _Layout) -> tuple[Tensor, ...]:
        if signature.runner is None:
            signature.runner = self._flat.function(layout, _count_leaves(layout.spec))
        return signature.runner(*leaves)

    def __call__(self, state: TrainState, x: Tensor, target: Tensor) -> tuple[TrainState, dict[str, Tensor]]:
        """One step on the batch ``x`` ``(batch, ...)``, ``target`` ``(batch, ...)``: ``(new_state, metrics)``."""
        signature, leaves, layout = self._flat.prepare(state, x, target)
        self._current = (signature, layout)
        return self._flat.finish(state, layout, list(self._captured(*leaves)))


def _count_leaves(spec: Any) -> int:
    return 1 if spec is None else sum(_count_leaves(child) for _, child in spec)


def compiled(step: TrainStep, *, backend: str = "auto", cache_dir: str | os.PathLike | None = None) -> CompiledStep:
    """The training step compiled as one graph: forward, backward and the optimizer's update.

    ``fast = rf.compiled(step)`` is called as the step is, ``state, metrics =
    fast(state, x, target)``, and gives its results to float rounding (a
    compiler fuses and reorders float operations: not bit for bit). The first
    call of each signature (the trees' structure; every tensor's shape, dtype,
    stride and device) runs the eager step once, whose checks refuse what does
    not fit, then compiles; later calls run the compiled code. The rate (a
    schedule's value) and the step count are tensor inputs of the graph: a
    schedule never recompiles it.

    Args:
        step: an :class:`~rdl_functional.TrainStep` of a plain model (``rf.train_step(model, loss,
            optimizer)``), with an optimizer built from the library's rules and transforms.
        backend: ``"inductor"`` (``torch.compile``), ``"aoti"`` (AOTInductor's package) or
            ``"auto"``: both built, a few calls of each timed on the first call's inputs, the faster
            kept (``fast.chosen`` says which, and the times).
        cache_dir: where AOTInductor's packages (and auto's choices) are kept, keyed by what the step
            was traced for, so another process loads them instead of compiling; by default
            ``$RDL_CACHE_DIR``, else ``~/.cache/rdl_functional``.

    Raises:
        TypeError: ``step`` is not an ``rf.TrainStep`` (a function of your own), or is compiled or
            captured already.
        ValueError: a model with dropout or batch norm (its masks are drawn from ``state.generator``,
            which a compiled graph cannot draw from), an optimizer with an ``rf.gradient_transform``
            link, or an unknown backend.

    >>> import torch, rdl_functional as rf
    >>> model = rf.compose(rf.linear(2, 3), rf.relu, rf.linear(3, 1))
    >>> fast = rf.compiled(rf.train_step(model, rf.mse_loss, rf.adam(1e-2)), backend="inductor")
    >>> fast
    <compiled(compose(linear(2, 3), relu, linear(3, 1)), adam; backend=inductor)>

    Then ``state, metrics = fast(state, x, target)``, as the step itself.
    """
    if backend not in BACKENDS:
        raise ValueError(f"compiled: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return CompiledStep(step, backend, _cache_dir(cache_dir))
