"""Checkpoints: everything the rest of a ``fit`` run depends on, in one safetensors file.

A checkpoint holds the params, the optimizer's state, the model's state,
the generator's state, the current epoch's shuffle and position in it, the
step count (which is the schedule's position), the history so far, and the
settings of the run. ``fit(..., checkpoint=PATH)`` writes one every
``checkpoint_every`` steps (and at the end), each replacing the last whole or
not at all, and, started again with the same arguments, resumes from it: a
run killed at any moment ends with the params and history it would have
had, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from .io import _json_depth, _load, _save
from .tree import Tree, tree_flatten

__all__ = ["Checkpoint", "read_checkpoint"]

_KEY = "rdl_functional.checkpoint"
_FORMAT = 1


@attrs.frozen
class Checkpoint:
    """A run's state at a step boundary, as :func:`read_checkpoint` returns it.

    Attributes:
        params, opt_state, model_state: the trees (``opt_state`` of the in-place
            optimizer, ``None`` for a step function of your own; ``model_state``
            ``None`` for a plain model).
        generator_state: the generator's ``get_state()``.
        order: the current epoch's shuffle, when the checkpoint falls inside an epoch.
        epochs_done: whole epochs done; ``position``: rows of the next epoch done.
        steps: steps done (the schedule's position).
        history: ``{"train_loss": [...], "train_accuracy": [...], "test_loss": [...], "test_accuracy": [...]}``.
        settings: what the run was started with, compared on resume.
    """

    params: Tree = attrs.field(repr=False)
    opt_state: Tree | None = attrs.field(repr=False)
    model_state: Tree | None = attrs.field(repr=False)
    generator_state: Tensor = attrs.field(repr=False)
    order: Tensor | None = attrs.field(repr=False)
    epochs_done: int
    position: int
    steps: int
    history: dict[str, list[float]] = attrs.field(repr=False)
    settings: dict[str, Any] = attrs.field(repr=False)


def write_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint) -> None:
    tree = {"params": checkpoint.params, "opt_state": checkpoint.opt_state or {},
            "model_state": checkpoint.model_state or {}, "generator": checkpoint.generator_state}
    if checkpoint.order is not None:
        tree["order"] = checkpoint.order
    record = {
        "format": _FORMAT, "epochs_done": checkpoint.epochs_done, "position": checkpoint.position,
        "steps": checkpoint.steps, "history": checkpoint.history, "settings": checkpoint.settings,
        "has_opt_state": checkpoint.opt_state is not None, "has_model_state": checkpoint.model_state is not None,
    }
    _save(tree, path, "checkpoint", {_KEY: json.dumps(record)})


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint that ``fit(..., checkpoint=PATH)`` (or ``rdl-train --checkpoint``) wrote.

    Raises:
        FileNotFoundError, IsADirectoryError, ValueError: as :func:`~rdl_functional.load`
            does; ValueError also when the file is not a checkpoint. Every message names the file.
    """
    tree, metadata = _load(path, "read_checkpoint")
    shown = repr(str(path))
    try:
        text = metadata[_KEY]
        if _json_depth(text) > 64:
            raise ValueError("the record nests too deep")
        record = json.loads(text)
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise ValueError("the record or its settings is not a JSON object")
        if record.get("format") != _FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {_FORMAT}")
        return Checkpoint(
            params=tree["params"],
            opt_state=tree["opt_state"] if record["has_opt_state"] else None,
            model_state=tree["model_state"] if record["has_model_state"] else None,
            generator_state=tree["generator"],
            order=tree.get("order"),
            epochs_done=int(record["epochs_done"]),
            position=int(record["position"]),
            steps=int(record["steps"]),
            history={name: [float(v) for v in record["history"][name]] for name in _HISTORY},
            settings=record["settings"],
        )
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError, OverflowError) as error:
        raise ValueError(f"read_checkpoint: {shown} is not a checkpoint of rdl_functional ({error!r} in its "
                         "record)") from None


_HISTORY = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_rmse", "train_r2", "test_rmse",
            "test_r2")


def digest(*trees: Any) -> str:
    """A short fingerprint of tensors (their dtypes, shapes and bytes) and trees of them; ``None`` is allowed."""
    h = hashlib.sha256()
    for tree in trees:
        if tree is None:
            h.update(b"none")
            continue
        # By path, not by the dicts' order: the same trees built in another order are the same start.
        for path, leaf in (sorted(tree_flatten(tree).items()) if isinstance(tree, Mapping) else [("", tree)]):
            h.update(path.encode())
            if isinstance(leaf, Tensor):
                t = leaf.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()[:16]


def describe_rate(lr: Any, steps: int) -> Any:
    """A rate, or a schedule by its first and last values and a fingerprint of its value at every step (a
    function cannot be compared otherwise; past 100,000 steps, at 100,000 steps spread over the run)."""
    if not callable(lr):
        return float(lr) if isinstance(lr, numbers.Real) and not isinstance(lr, bool) else repr(lr)
    counts = range(steps + 1) if steps <= 100_000 else sorted({round(i * steps / 100_000) for i in range(100_001)})
    try:
        values = [float(lr(count)) for count in counts]
    except Exception:
        return getattr(lr, "__qualname__", type(lr).__name__)
    return {"first": values[0], "last": values[-1], "every step": digest(torch.tensor(values, dtype=torch.float64))}


def describe_optimizer(optimizer: Any, steps: int) -> Any:
    """An optimizer by what it does: its name, and the params it makes of a fixed probe over three steps (which
    tells momentum, betas, weight decay, ... apart); a step function by its module, name, code (its bytecode,
    constants and the names it calls) and defaults."""
    if hasattr(optimizer, "links") and hasattr(optimizer, "init"):
        probe = {"p": torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)}
        try:
            state = optimizer.init(probe)
            for k in range(3):
                grads = {"p": torch.tensor([0.3, -0.1, 2.0, -1.5], dtype=torch.float64) * (k + 1)}
                probe, state = optimizer.step(probe, grads, state)
            behaviour = digest(probe)
        except Exception:
            behaviour = None
        rates = [describe_rate(link.lr, steps) for link in optimizer.links if link.rule]
        return {"name": optimizer.name, "probe": behaviour, "rates": rates}
    code = getattr(optimizer, "__code__", None)
    if code is None:
        return {"name": getattr(optimizer, "__qualname__", type(optimizer).__name__), "code": None}
    h = hashlib.sha256()
    _hash_code(h, code)
    h.update(_stable_repr(getattr(optimizer, "__defaults__", None)).encode())
    h.update(_stable_repr(sorted((getattr(optimizer, "__kwdefaults__", None) or {}).items())).encode())
    return {"name": f"{getattr(optimizer, '__module__', None)}.{optimizer.__qualname__}",
            "code": h.hexdigest()[:16]}


def _hash_code(h: Any, code: Any) -> None:
    """A code object's bytecode, constants and names into ``h``; nested code (an inner function, a generator
    expression) by its own content, not by its repr, which holds a memory address."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _hash_code(h, const)
        elif isinstance(const, frozenset):  # `x in {"a", "b"}`: its order follows the strings' hash, per process
            h.update(repr(sorted(map(repr, const))).encode())
        else:
            h.update(repr(const).encode())


def _stable_repr(value: Any) -> str:
    """``repr`` of plain data; other objects by their type alone (their repr may hold a memory address)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_stable_repr(item) for item in value) + ")"
    return type(value).__qualname__


def unidentified(step: Any) -> str | None:
    """Why a checkpoint cannot tell the step function ``step`` from another, or ``None`` when it can: a plain
    function without a closure is its code and defaults; a closure's values, a lambda, a ``functools.partial``'s
    arguments and a callable object's fields are not in any record (``make(1.0)`` and ``make(3.0)`` share their
    code)."""
    import functools
    import types

    if not callable(step) or (hasattr(step, "links") and hasattr(step, "init")):
        return None  # an Optimizer, described by what it does; a non-callable is refused elsewhere
    if isinstance(step, functools.partial):
        return "is a functools.partial, whose bound arguments a checkpoint does not record"
    if not isinstance(step, types.FunctionType):
        return f"is a callable {type(step).__name__} object, whose fields a checkpoint does not record"
    if step.__name__ == "<lambda>":
        return "is a lambda, which a checkpoint can record by neither name nor values"
    if step.__closure__:
        names = ", ".join(step.__code__.co_freevars)
        return f"closes over values ({names}) that a checkpoint does not record"
    return None


def difference(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """The first setting that differs, in words: ``"epochs: 200 in the checkpoint, 100 now"``."""
    for key in dict.fromkeys([*saved, *now]):
        if saved.get(key) != now.get(key):
            if isinstance(saved.get(key), Mapping) and isinstance(now.get(key), Mapping):
                inner = difference(saved[key], now[key])
                return f"{key}.{inner}" if inner else None
            return f"{key}: {_short(saved.get(key))} in the checkpoint, {_short(now.get(key))} now"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


