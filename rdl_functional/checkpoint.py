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
import math
import os
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from .io import _load, _save
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
        record = json.loads(metadata[_KEY])
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
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"read_checkpoint: {shown} is not a checkpoint of rdl_functional ({error!r} in its "
                         "record)") from None


_HISTORY = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def digest(*trees: Any) -> str:
    """A short fingerprint of tensors (their dtypes, shapes and bytes) and trees of them; ``None`` is allowed."""
    h = hashlib.sha256()
    for tree in trees:
        if tree is None:
            h.update(b"none")
            continue
        for path, leaf in (tree_flatten(tree).items() if isinstance(tree, Mapping) else [("", tree)]):
            h.update(path.encode())
            if isinstance(leaf, Tensor):
                t = leaf.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()[:16]


def describe_rate(lr: Any, steps: int) -> Any:
    """A rate, or a schedule by its values at a few steps (a function cannot be compared otherwise)."""
    if not callable(lr):
        return lr
    counts = sorted({0, 1, steps // 2, max(steps - 1, 0), steps})
    values = []
    for count in counts:
        try:
            value = float(lr(count))
        except Exception:
            return getattr(lr, "__qualname__", type(lr).__name__)
        values.append(value if math.isfinite(value) else repr(value))
    return {str(c): v for c, v in zip(counts, values, strict=True)}


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


