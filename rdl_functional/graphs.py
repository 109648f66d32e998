"""A whole step recorded once as a CUDA graph and replayed: one launch for its every kernel.

A small model's step on a GPU is a few dozen tiny kernels, and the GPU waits
on Python to launch each one. A CUDA graph records the kernels of one call
and replays them all with one launch. :func:`capture` wraps a pure function
of tensor trees so that each call replays its graph::

    fast = rf.capture(rf.train_step(model, loss, optimizer))     # a training step
    state, metrics = fast(state, x, target)
    run = rf.capture(fn)             # or a function of tensor trees: fn(params, x, target) -> (loss, new_params)
    loss, params = run(params, x, target)

Per call: one ``torch._foreach_copy_`` of the arguments into the graph's own
input buffers, the replay, and one ``torch._foreach_copy_`` of its outputs
into new tensors. So a captured step stays pure: its results are the caller's
to keep, and the next call does not change them.

What a graph can hold: device kernels, in a fixed order, on fixed shapes.
Everything else is fixed at the first call of each shape and replayed as it
was then:

- a Python number computed inside the function (a rate from a schedule, a
  step count read from a CPU tensor): pass it as a 0-dim tensor argument on
  the device and use it in tensor arithmetic (``p - lr * g``; ``sgd_step``
  takes a Python number). A training step's capture does this for you: its
  step count and rate are graph inputs (see ``rdl_functional.transforms``);
- randomness drawn on the CPU and moved (``rf.dropout``'s default
  generator): the copy from the CPU fails at the recording (from pinned
  memory, it would replay one mask forever);
- a read back to the host (``.item()``), which fails at capture.

Arguments must be trees (dicts, tuples, lists) of tensors on one CUDA
device; a new shape or dtype records a new graph (at most ``max_shapes``),
and so does a call under ``torch.autocast`` where the last was not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .transforms import CapturedStep

__all__ = ["Captured", "capture"]

Spec = Any  # a tree's structure: None for a tensor, (type, keys, children) for a dict, list or tuple
Recorder = Callable[[Callable[..., Any], tuple, int], tuple[Any, Callable[[], None]]]


def _flatten(tree: Any, leaves: list[Tensor], who: str, where: str) -> Spec:
    if isinstance(tree, Tensor):
        leaves.append(tree)
        return None
    if type(tree) is dict:
        keys = tuple(tree)
        return dict, keys, tuple(_flatten(tree[k], leaves, who, f"{where}[{k!r}]") for k in keys)
    if type(tree) in (tuple, list):
        return type(tree), len(tree), tuple(_flatten(v, leaves, who, f"{where}[{i}]") for i, v in enumerate(tree))
    hint = (": a number is fixed at capture; pass one that changes as a 0-dim tensor on the device"
            if isinstance(tree, (int, float)) else "")
    raise TypeError(f"{who}: {where} must be a tensor, or a dict, tuple or list of them, got "
                    f"{type(tree).__name__}{hint}")


def _unflatten(spec: Spec, leaves: Any) -> Any:
    if spec is None:
        return next(leaves)
    kind, keys, children = spec
    if kind is dict:
        return {key: _unflatten(child, leaves) for key, child in zip(keys, children, strict=True)}
    return kind(_unflatten(child, leaves) for child in children)


def _cuda_graph(fn: Callable[..., Any], args: tuple, warmup: int) -> tuple[Any, Callable[[], None]]:
    """Run ``fn(*args)`` ``warmup`` times on a side stream (cuBLAS and the allocator settle there, as torch's
    CUDA graph notes ask), then record one call; return its outputs and the replay."""
    leaves: list[Tensor] = []
    _flatten(args, leaves, "capture", "the arguments")
    with torch.cuda.device(leaves[0].device):  # streams and the capture on the arguments' device, not device 0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            outputs = fn(*args)
    return outputs, graph.replay


def _autocast(device_types: set[str]) -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast dtype of each of these device types where autocast is on (a device type autocast does not
    know, such as meta, has none)."""
    state = []
    for kind in sorted(device_types):
        try:
            if torch.is_autocast_enabled(kind):
                state.append((kind, torch.get_autocast_dtype(kind)))
        except RuntimeError:
            continue
    return tuple(state)


class _Recording:
    """One recorded shape: the graph's input buffers, its output buffers and the replay."""

    __slots__ = ("inputs", "outputs", "replay", "spec")

    def __init__(self, inputs: list[Tensor], outputs: list[Tensor], replay: Callable[[], None], spec: Spec) -> None:
        self.inputs, self.outputs, self.replay, self.spec = inputs, outputs, replay, spec


class Captured:
    """A function that replays a recorded CUDA graph: made by :func:`capture`.

    Call it as the function it wraps. ``shapes`` is the number of graphs
    recorded so far (one per distinct structure, shape and dtype of the
    arguments).
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int, max_shapes: int, name: str,
                 recorder: Recorder = _cuda_graph) -> None:
        self.fn, self.warmup, self.max_shapes, self.name = fn, warmup, max_shapes, name
        self._recorder = recorder
        self._recordings: dict[Any, _Recording] = {}

    def __repr__(self) -> str:
        inner, plural = self.name[len("capture("):-1], "s" if self.shapes != 1 else ""
        return f"<capture of {inner}: {self.shapes} shape{plural} recorded>"

    @property
    def shapes(self) -> int:
        return len(self._recordings)

    def __call__(self, *args: Any) -> Any:
        leaves: list[Tensor] = []
        specs = tuple(_flatten(arg, leaves, self.name, f"argument {i}") for i, arg in enumerate(args))
        spec = (tuple, len(args), specs)
        # What the recording depends on besides the arguments' shapes: autocast (the layers read it), per device.
        key = (spec, _autocast({t.device.type for t in leaves}), *((t.shape, t.dtype, t.device) for t in leaves))
        recording = self._recordings.get(key)
        with torch.no_grad():  # the copies never join an autograd graph, whatever the arguments require
            if recording is None:
                recording = self._record(spec, leaves, key)
            if leaves:
                torch._foreach_copy_(recording.inputs, leaves)
            recording.replay()
            fresh = [torch.empty_like(t) for t in recording.outputs]
            if fresh:
                torch._foreach_copy_(fresh, recording.outputs)
        return _unflatten(recording.spec, iter(fresh))

    def _record(self, spec: Spec, leaves: list[Tensor], key: Any) -> _Recording:
        who = self.name
        if not leaves:
            raise ValueError(f"{who}: a captured function needs at least one tensor argument (on the CUDA device "
                             "its graph runs on), got none")
        devices = {t.device for t in leaves}
        if self._recorder is _cuda_graph:
            if len(devices) > 1 or next(iter(devices)).type != "cuda":
                names = ", ".join(sorted(str(d) for d in devices))
                raise ValueError(
                    f"{who}: a CUDA graph needs every argument on one CUDA device, got tensors on {names} (only CUDA "
                    "launches can be recorded; on the CPU run the step as it is, or compile it)")
        if len(self._recordings) >= self.max_shapes:
            raise ValueError(
                f"{who}: called with new shapes after {len(self._recordings)} recorded; each set of shapes is a "
                f"graph of its own that holds its own memory (max_shapes={self.max_shapes}). Pad the inputs to a "
                "few shapes, or raise max_shapes")
        with torch.inference_mode(False):  # buffers that later calls may write, in inference mode or not
            inputs = [torch.empty_like(t) for t in leaves]
        torch._foreach_copy_(inputs, leaves)
        static = _unflatten(spec, iter(inputs))
        try:
            outputs, replay = self._recorder(self.fn, tuple(static), self.warmup)
        except RuntimeError as error:
            raise RuntimeError(
                f"{who}: the step could not be recorded as a CUDA graph: {error}. A captured step may run only device "
                "kernels: no .item() or other read back to the host, no tensors made on the CPU and moved "
                "(randomness included); run it without capture") from error
        out_leaves: list[Tensor] = []
        out_spec = _flatten(outputs, out_leaves, who, "the result")
        stray = sorted({str(t.device) for t in out_leaves} - {str(d) for d in devices})
        if stray:
            raise ValueError(f"{who}: the result has tensors on {', '.join(stray)}, which the graph does not compute "
                             f"(the arguments are on {', '.join(sorted(str(d) for d in devices))})")
        recording = _Recording(inputs, out_leaves, replay, out_spec)
        self._recordings[key] = recording
        return recording


def capture(fn: Callable[..., Any], *, warmup: int = 3, max_shapes: int = 8) -> Captured | CapturedStep:
    """``fn``, recorded as a CUDA graph at its first call and replayed at every call: one launch a step.

    ``fn`` is a training step (``rf.train_step(...)``, or ``rf.compiled(rf.train_step(...))``,
    whose compiled code is then recorded) or a function of tensor trees. A step's capture is
    a :class:`~rdl_functional.transforms.CapturedStep`, called as the step is, ``state,
    metrics = captured(state, x, target)``, with the step's results to float rounding: the
    step count and the rate (a schedule's) are tensor inputs of the graph, copied in at each
    call, so the graph replays them as they change. It takes a plain model (dropout's masks
    are drawn on the CPU) and refuses the rest as :func:`~rdl_functional.compiled` does.

    ``fn`` must be pure and run only device kernels: a training step made of
    ``rf.value_and_grad`` and ``rf.sgd_step`` is. Its arguments and results
    are trees (dicts, tuples, lists) of tensors, the arguments on one CUDA
    device. Each call copies the arguments into the graph's input buffers,
    replays it, and copies the results out into new tensors, so the caller's
    tensors are never the graph's and calls do not change earlier results.

    Args:
        fn: the function to capture, ``fn(*trees) -> tree``.
        warmup: calls run (and thrown away) on a side stream before the
            recording, as CUDA graphs need.
        max_shapes: distinct argument shapes, each recorded as its own
            graph, before a call is refused.

    Anything that is not a tensor argument is fixed at the first call: a rate
    computed in Python, a step count read from the CPU, randomness drawn on the
    CPU. Keep them outside, or pass them as tensors on the device. See
    docs/devices.md.

    >>> import torch, rdl_functional as rf
    >>> model = rf.seed_model()
    >>> grad = rf.value_and_grad(model, rf.mse_loss)
    >>> def step(params, x, target):
    ...     loss, grads = grad(params, x, target)
    ...     return loss, rf.sgd_step(params, grads, 0.1)
    >>> step = rf.capture(step)
    >>> step
    <capture of step: 0 shapes recorded>

    Then ``loss, params = step(params, x, target)`` with CUDA tensors records at
    the first call and replays after.
    """
    if not callable(fn):
        raise TypeError(f"capture: expected a function to capture, got {type(fn).__name__}")
    for name, value, low in (("warmup", warmup, 1), ("max_shapes", max_shapes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"capture: {name} must be an int ≥ {low}, got {value!r}")
    from .step import TrainStep  # imported here: graphs is loaded on first use, after the step's module
    from .transforms import CapturedStep, CompiledStep

    if isinstance(fn, (TrainStep, CompiledStep, CapturedStep)):
        return CapturedStep(fn, warmup=warmup, max_shapes=max_shapes, recorder=_cuda_graph)
    if isinstance(fn, Captured):
        raise TypeError(f"capture: {fn!r} is captured already (a graph's replay cannot be recorded in another)")
    name = f"capture({getattr(fn, 'name', None) or getattr(fn, '__name__', None) or type(fn).__name__})"
    return Captured(fn, warmup=warmup, max_shapes=max_shapes, name=name)
