"""The compilers behind :func:`~rdl_functional.compiled`, and the cache on disk of AOTInductor's packages.

``_inductor`` and ``_aoti`` turn the flat step (a function of tensors, from
``transforms._Flat``) into a runner, ``runner(leaves) -> outputs``;
``_measure`` times runners against each other; ``_digest`` names a package by
what its graph was traced for.
"""

from __future__ import annotations

import functools
import hashlib
import os
import statistics
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from .step import TrainStep

Runner = Callable[[list[Tensor]], list[Tensor]]


def _inductor(fn: Callable[..., tuple[Tensor, ...]]) -> Runner:
    """``torch.compile`` of ``fn``: inductor, one graph, static shapes, its C++ wrapper (measured on the seed step,
    CPU: 96 µs a call against the Python wrapper's 106)."""
    run = torch.compile(fn, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
    return lambda leaves: list(run(*leaves))


class _Module(torch.nn.Module):
    """The flat step as a module, the form ``torch.export`` takes."""

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return self.fn(*inputs)


def _aoti(fn: Callable[..., tuple[Tensor, ...]], leaves: list[Tensor], package: Path) -> Runner:
    """AOTInductor's package of ``fn`` at ``package``, built (export, compile, package) when not there yet."""
    with warnings.catch_warnings():  # torch 2.13's own use of a deprecated pytree check, in export and the loader
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        if not package.exists():
            package.parent.mkdir(parents=True, exist_ok=True)
            exported = torch.export.export(_Module(fn), tuple(leaves), strict=False)
            partial = package.with_suffix(f".{os.getpid()}.partial.pt2")  # whole or not at all, as checkpoints
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
            os.replace(partial, package)
        loader = torch._inductor.aoti_load_package(str(package)).loader
    return lambda leaves: loader.boxed_run(list(leaves))


def _measure(runners: dict[str, Runner], leaves: list[Tensor], rounds: int = 15) -> dict[str, float]:
    """Median µs per call of each runner on these inputs, interleaved, after three calls each to warm up."""
    sync = torch.cuda.synchronize if leaves[0].device.type == "cuda" else (lambda: None)
    for runner in runners.values():
        for _ in range(3):
            runner(leaves)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            sync()
            start = time.perf_counter()
            runner(leaves)
            sync()
            times[name].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def _fingerprint(obj: Any, out: list[str], seen: set[int], depth: int = 0) -> None:
    """What the compiled graph depends on in ``obj``: functions' bytecode and constants, the numbers they close
    over (hyperparameters), records' fields; recursively, each object once."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype)):
        out.append(repr(obj))
        return
    if id(obj) in seen or depth > 12:
        return
    seen.add(id(obj))
    if isinstance(obj, (tuple, list)):
        for item in obj:
            _fingerprint(item, out, seen, depth + 1)
    elif isinstance(obj, (set, frozenset)):  # iterated in an order that changes with each process's hash seed
        parts = []
        for item in obj:
            part: list[str] = []
            _fingerprint(item, part, set(seen), depth + 1)
            parts.append("\n".join(part))
        out += sorted(parts)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _fingerprint(key, out, seen, depth + 1)
            _fingerprint(value, out, seen, depth + 1)
    elif isinstance(obj, types.FunctionType):
        out.append(obj.__qualname__)
        _fingerprint(obj.__code__, out, seen, depth + 1)
        _fingerprint(obj.__defaults__, out, seen, depth + 1)
        for cell in obj.__closure__ or ():
            _fingerprint(cell.cell_contents, out, seen, depth + 1)
    elif isinstance(obj, types.CodeType):
        out.append(obj.co_code.hex())
        _fingerprint(obj.co_consts, out, seen, depth + 1)
    elif isinstance(obj, Tensor):
        out.append(f"{obj.shape}{obj.dtype}{hashlib.sha256(obj.detach().cpu().numpy().tobytes()).hexdigest()}")
    elif attrs.has(type(obj)):
        out.append(type(obj).__qualname__)
        for field in attrs.fields(type(obj)):
            _fingerprint(getattr(obj, field.name), out, seen, depth + 1)
    elif isinstance(obj, functools.partial):
        _fingerprint((obj.func, obj.args, obj.keywords), out, seen, depth + 1)
    elif isinstance(obj, (types.BuiltinFunctionType, types.ModuleType, type, torch._ops.OpOverload,
                          torch._ops.OpOverloadPacket)):  # named for good: torch.tanh, aten.mm.default, a class
        out.append(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', None) or repr(obj)}")
    else:  # an object whose values this cannot read (a callable object, a module of torch.nn, ...)
        out.append(_OPAQUE + type(obj).__qualname__)


# Marks a fingerprint that may leave out something the graph depends on: its package is not kept for later.
_OPAQUE = "\x00opaque:"
# What train_step computes its gradient with; any other (rf.data_parallel's, yours) is not fingerprinted.
_OWN_GRAD = "value_and_grad.<locals>.value_and_grad_fn"


def _digest(step: TrainStep, key: Any) -> tuple[str, bool]:
    """The cache's name for what a signature's graph was traced for: the model's, the loss's and the optimizer's
    code and hyperparameters (not the rate: an input), how the step takes its gradient, the signature, the device
    and the torch version; and whether that name says everything the graph depends on, so that a later process may
    load its package (not when it holds an object whose values it cannot read, or a gradient function other than
    train_step's own, such as rf.data_parallel's, whose all-reduce the package must not lose)."""
    out = [torch.__version__, repr(key), getattr(step._grad, "__qualname__", type(step._grad).__qualname__)]
    links = [attrs.evolve(link, lr=None) for link in step.optimizer.links]  # the schedule is not in the graph
    _fingerprint((step.model, step.loss, links), out, set())
    reusable = out[2] == _OWN_GRAD and not any(part.startswith(_OPAQUE) for part in out)
    return hashlib.sha256("\n".join(out).encode()).hexdigest()[:32], reusable


def _package_folder(cache: Path, reusable: bool) -> Path:
    """Where a signature's package goes: the cache, or a folder of its own that no later process looks in."""
    return cache / "aoti" if reusable else Path(tempfile.mkdtemp(prefix="rdl-aoti-"))


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("RDL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rdl_functional"
