"""Checkpoints: everything the rest of a ``fit`` run depends on, in one safetensors file.

A checkpoint holds the params, the optimizer's state, the model's state,
the generator's state, the current epoch's shuffle and position in it, the
step count (which is the schedule's position), the history so far, and the
settings of the run. ``fit(..., checkpoint=PATH)`` writes one every
``checkpoint_every`` steps (and at the end), each replacing the last whole or
not at all, and, started again with the same arguments, resumes from it: a
run killed at any moment ends with the params and history it would have
had, bit for bit.

Each file proves itself whole: a SHA-256 digest of its record and of every
tensor (path, dtype, shape and bytes) is written with it and checked on
read, and the record is checked as a whole (types, ranges, the shuffle a
permutation, the history as long as the epochs done, ...) before anything
uses it; a damaged or inconsistent file is refused with a ``ValueError``
that names it.

:func:`save_state` and :func:`load_state` keep a :class:`~rdl_functional.TrainState`
the same way (one file, its digest checked on read), and ``load_state`` also
takes the TrainState out of a ``fit`` checkpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from .io import _FORMAT_KEY, _json_depth, _load, _save, _skeleton
from .step import TrainState
from .tree import Tree, _first_difference, tree_flatten, tree_leaves, tree_map

__all__ = ["Checkpoint", "load_state", "read_checkpoint", "save_state"]

_KEY = "rdl_functional.checkpoint"
_DIGEST_KEY = "rdl_functional.digest"
_FORMAT = 2  # 2: with a digest (format 1 had none)
_STATE_KEY = "rdl_functional.train_state"  # a TrainState of rf.save_state, signed with the same digest
_STATE_FORMAT = 1


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
    """Write ``checkpoint`` to ``path`` whole or not at all, with the digest that :func:`read_checkpoint` checks.

    Raises:
        OSError: the file could not be written (naming it); a file already at ``path`` is left as it was.
    """
    tree = {"params": checkpoint.params, "opt_state": checkpoint.opt_state or {},
            "model_state": checkpoint.model_state or {}, "generator": checkpoint.generator_state}
    if checkpoint.order is not None:
        tree["order"] = checkpoint.order
    record = {
        "format": _FORMAT, "epochs_done": checkpoint.epochs_done, "position": checkpoint.position,
        "steps": checkpoint.steps, "history": checkpoint.history, "settings": checkpoint.settings,
        "has_opt_state": checkpoint.opt_state is not None, "has_model_state": checkpoint.model_state is not None,
    }
    _write(path, tree, json.dumps(record))


def _write(path: str | os.PathLike[str], tree: Tree, record: str, who: str = "checkpoint", key: str = _KEY) -> None:
    """The file itself: ``tree`` and the ``record`` text (under ``key``), signed with their digest."""
    on_cpu = tree_map(lambda t: t.detach().contiguous().cpu(), tree)  # one copy, for the digest and the file
    _save(on_cpu, path, who, {key: record, _DIGEST_KEY: _checksum(on_cpu, record)})


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint that ``fit(..., checkpoint=PATH)`` (or ``rdl-train --checkpoint``) wrote.

    The file's digest is checked first (any flipped bit, in a tensor or in
    the record, is found), then the record as a whole: counts are integers
    ≥ 0, the history holds a number per epoch done, the shuffle (present
    exactly when the checkpoint falls inside an epoch) is a permutation of
    the rows, the generator's state is one a CPU generator takes, the
    optimizer's step counts are integers ≥ 0, and the trees are there exactly
    when the record says.

    Raises:
        FileNotFoundError, IsADirectoryError, ValueError: as :func:`~rdl_functional.load`
            does; ValueError also when the file is not a checkpoint, is corrupted
            (its digest does not match), was written by an older version
            (format 1, without a digest), or holds an inconsistent record.
            Every message names the file.
    """
    tree, metadata = _load(path, "read_checkpoint")
    return _checkpoint(tree, metadata, repr(str(path)), "read_checkpoint")


def _checkpoint(tree: Tree, metadata: Mapping[str, str], shown: str, who: str) -> Checkpoint:
    """The checkpoint a file read by ``_load`` holds, once proven and checked (errors begin ``who: shown``)."""
    record = _proven_record(tree, metadata, shown, who)
    try:
        _check_record(tree, record)
    except ValueError as error:
        raise ValueError(f"{who}: {shown} holds an inconsistent checkpoint ({error}); it cannot be "
                         "resumed: remove it to start afresh") from None
    return Checkpoint(
        params=tree["params"],
        opt_state=tree["opt_state"] if record["has_opt_state"] else None,
        model_state=tree["model_state"] if record["has_model_state"] else None,
        generator_state=tree["generator"],
        order=tree.get("order"),
        epochs_done=record["epochs_done"],
        position=record["position"],
        steps=record["steps"],
        history={name: [float(v) for v in record["history"][name]] for name in _HISTORY},
        settings=record["settings"],
    )


def _checksum(tree: Tree, record: str) -> str:
    """SHA-256 of a checkpoint's record text, its tree's nesting, and each tensor's path, dtype, shape and bytes;
    each part preceded by its length, so that no two contents give one sequence of bytes."""
    h = hashlib.sha256()
    _put(h, record.encode())
    _put(h, json.dumps(_skeleton(tree, "checkpoint")).encode())
    _hash_leaves(h, tree_flatten(tree).items())
    return "sha256:" + h.hexdigest()


def _put(h: Any, data: bytes | memoryview) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _hash_leaves(h: Any, items: Any) -> None:
    """Each ``(path, leaf)`` into ``h``: the path, and a tensor's dtype, shape and bytes (anything else by its repr),
    each part preceded by its length. The one hasher of checkpoints' digests and runs' fingerprints."""
    for path, leaf in items:
        _put(h, path.encode())
        if isinstance(leaf, Tensor):
            t = leaf.detach().contiguous().cpu()
            _put(h, f"{t.dtype}{tuple(t.shape)}".encode())
            _put(h, memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
        else:
            _put(h, repr(leaf).encode())


def _proven_record(tree: Tree, metadata: Mapping[str, str], shown: str, who: str = "read_checkpoint",
                   key: str = _KEY, version: int = _FORMAT, kind: str = "checkpoint") -> dict[str, Any]:
    """The record, once the file's digest proves the record and the tensors are as they were written: a
    ``kind`` file's record under ``key``, of format ``version``."""
    who = f"{who}: {shown}"
    text = metadata.get(key)
    if text is None and _DIGEST_KEY in metadata:
        raise ValueError(f"{who} is corrupted: its metadata holds {sorted(metadata)}, not the three entries a "
                         f"{kind} has ({sorted([_FORMAT_KEY, key, _DIGEST_KEY])})")
    if text is None:
        raise ValueError(f"{who} is not a {kind} of rdl_functional (its metadata holds no {key} record; "
                         "rf.load reads a file of params)")
    written = metadata.get(_DIGEST_KEY)
    if written is None:
        found = _format_of(text)
        if isinstance(found, int) and found < version:
            raise ValueError(f"{who} is a {kind} of format {found}, written by an older version of "
                             "rdl_functional: it holds no digest to prove it whole, so it is not resumed. Start "
                             "the run afresh (remove the file, or give another checkpoint path), or finish it with "
                             "the version that wrote it")
        raise ValueError(f"{who} is corrupted: it holds no digest ({_DIGEST_KEY}) to prove it whole")
    if set(metadata) != {_FORMAT_KEY, key, _DIGEST_KEY}:
        raise ValueError(f"{who} is corrupted: its metadata holds {sorted(metadata)}, not the three entries a "
                         f"{kind} has ({sorted([_FORMAT_KEY, key, _DIGEST_KEY])})")
    if not hmac.compare_digest(written.encode(), _checksum(tree, text).encode()):
        raise ValueError(f"{who} is corrupted: its contents do not match the digest written with it (a damaged "
                         "disk, copy or transfer, or a file edited by hand); resume from a good copy, or remove it "
                         "to start afresh")
    found = _format_of(text)
    if found != version:
        raise ValueError(f"{who} is a {kind} of format {found!r}, which this version of rdl_functional "
                         f"(format {version}) does not read")
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError(f"{who}: its record is a {type(record).__name__}, not a JSON object")
    return record


def _format_of(text: str) -> Any:
    """The record's ``format``, or ``None`` when the text is no JSON object."""
    try:
        if _json_depth(text) > 64:
            return None
        record = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return record.get("format") if isinstance(record, dict) else None


_RECORD = ("format", "epochs_done", "position", "steps", "history", "settings", "has_opt_state", "has_model_state")


def _check_record(tree: Tree, record: dict[str, Any]) -> None:
    """Raise ValueError, saying what is wrong, unless ``record`` and ``tree`` make one consistent checkpoint."""
    if sorted(record) != sorted(_RECORD):
        raise ValueError(f"the record holds the fields {sorted(record)}, expected {sorted(_RECORD)}")
    if not {"params", "opt_state", "model_state", "generator"} <= set(tree) <= {
            "params", "opt_state", "model_state", "generator", "order"}:
        raise ValueError(f"the tensors hold {sorted(tree)}, expected params, opt_state, model_state, generator "
                         "and, inside an epoch, order")
    for name in ("epochs_done", "position", "steps"):
        if type(record[name]) is not int or record[name] < 0:
            raise ValueError(f"{name} is {record[name]!r}, expected an integer ≥ 0")
    for name in ("has_opt_state", "has_model_state"):
        if type(record[name]) is not bool:
            raise ValueError(f"{name} is {record[name]!r}, expected true or false")
    if not isinstance(record["settings"], dict):
        raise ValueError(f"settings is a {type(record['settings']).__name__}, expected a JSON object")
    _check_history(record["history"], record["epochs_done"])
    _check_order(tree.get("order"), record["position"])
    _check_generator(tree["generator"])
    for name in ("params", "opt_state", "model_state"):
        if not isinstance(tree[name], dict):
            raise ValueError(f"{name} is a tensor, expected a tree of them")
    for name in ("opt_state", "model_state"):
        if not record[f"has_{name}"] and tree_leaves(tree[name]):
            raise ValueError(f"has_{name} is false, but {name} holds {len(tree_leaves(tree[name]))} tensor(s)")
    _check_counts(tree["opt_state"])


def _check_counts(opt_state: Tree) -> None:
    """The optimizer's step counts are 0-dim integer tensors ≥ 0."""
    for path, leaf in tree_flatten(opt_state).items():
        if path.rsplit(".", 1)[-1] == "count" and (
                leaf.dim() != 0 or leaf.dtype.is_floating_point or leaf.dtype.is_complex or leaf.dtype == torch.bool
                or int(leaf) < 0):
            raise ValueError(f'the optimizer\'s step count at "opt_state.{path}" is {leaf!r}, expected a 0-dim '
                             "integer tensor ≥ 0")


def _check_history(history: Any, epochs_done: int) -> None:
    if not isinstance(history, dict) or sorted(history) != sorted(_HISTORY):
        shown = sorted(history) if isinstance(history, dict) else type(history).__name__
        raise ValueError(f"the history holds {shown}, expected {sorted(_HISTORY)}")
    for name in _HISTORY:
        values = history[name]
        if not isinstance(values, list):
            raise ValueError(f"history.{name} must be a list of numbers, got {type(values).__name__}")
        bad = [v for v in values if not (isinstance(v, float) or (type(v) is int and abs(v) < 2**1000))]
        if bad:
            raise ValueError(f"history.{name} must be a list of numbers, but holds {str(bad[0])[:40]!r} "
                             f"({type(bad[0]).__name__})")
        if len(values) not in (0, epochs_done):
            raise ValueError(f"history.{name} holds {len(values)} values for {epochs_done} epoch(s) done "
                             "(one an epoch, or none when not recorded)")


def _check_order(order: Any, position: int) -> None:
    """The epoch's shuffle: there exactly when the checkpoint falls inside an epoch, a permutation of its rows."""
    if position == 0:
        if order is not None:
            raise ValueError("it holds a shuffle (order) at position 0, where none is written")
        return
    if order is None:
        raise ValueError(f"position is {position} (inside an epoch), but it holds no shuffle (order)")
    if not isinstance(order, Tensor) or order.dim() != 1 or order.dtype != torch.int64:
        shown = f"{order.dtype} of shape {tuple(order.shape)}" if isinstance(order, Tensor) else "a tree"
        raise ValueError(f"the shuffle (order) is {shown}, expected a 1-D int64 tensor")
    n = order.numel()
    if position >= n:
        raise ValueError(f"position is {position}, not inside an epoch of {n} rows")
    if not torch.equal(torch.sort(order).values, torch.arange(n)):
        raise ValueError(f"the shuffle (order) is not a permutation of 0..{n - 1}")


def _check_generator(state: Any) -> None:
    expected = torch.Generator().get_state()
    if not isinstance(state, Tensor) or state.dtype != torch.uint8 or state.shape != expected.shape:
        shown = f"{state.dtype} of shape {tuple(state.shape)}" if isinstance(state, Tensor) else "a tree"
        raise ValueError(f"the generator's state is {shown}, expected uint8 of shape {tuple(expected.shape)} (a "
                         "CPU torch.Generator's get_state())")
    try:
        torch.Generator().set_state(state)
    except RuntimeError as error:
        raise ValueError(f"a CPU generator refuses its state ({error})") from None


def save_state(state: TrainState, path: str | os.PathLike[str]) -> None:
    """Write a whole :class:`~rdl_functional.TrainState` to one safetensors file, whole or not at all.

    The file holds the five trees (params, the optimizer's and the model's
    state, the generator's state, the step count) and a SHA-256 digest of
    them, which :func:`load_state` checks: a damaged file is refused, never
    resumed into another run. A file already at ``path`` is replaced only
    once the new one is written whole. Tensors on a GPU are written from a
    copy on the CPU.

    Raises:
        TypeError: ``state`` is not a :class:`~rdl_functional.TrainState`.
        ValueError: ``state`` holds what a TrainState cannot (a generator state a CPU
            generator refuses, a step count that is not a 0-dim int64 tensor ≥ 0, ...).
        OSError: the file could not be written (naming it); a file already there is kept.

    >>> import os, tempfile, torch, rdl_functional as rf
    >>> model = rf.compose(rf.linear(2, 3), rf.relu, rf.linear(3, 1))
    >>> step = rf.train_step(model, rf.mse_loss, rf.adam(1e-2))
    >>> state, _ = step(rf.train_state(model, rf.adam(1e-2), model.init(0)), torch.ones(4, 2), torch.zeros(4, 1))
    >>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
    >>> rf.save_state(state, path)
    >>> restored = rf.load_state(path)
    >>> int(restored.step), torch.equal(restored.params["2"]["weight"], state.params["2"]["weight"])
    (1, True)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"save_state: state must be an rf.TrainState (from rf.train_state or a step), got "
                        f"{type(state).__name__}")
    tree = {name: getattr(state, name) for name in _STATE_TREES}
    try:
        _check_state(tree)
    except ValueError as error:
        raise ValueError(f"save_state: the state cannot be saved to {str(path)!r}: {error}") from None
    _write(path, tree, json.dumps({"format": _STATE_FORMAT}), "save_state", _STATE_KEY)


def load_state(path: str | os.PathLike[str]) -> TrainState:
    """Read the :class:`~rdl_functional.TrainState` that :func:`save_state` wrote, or the one in a ``fit`` checkpoint.

    A file of :func:`save_state` comes back as the state saved, bit for bit,
    so that a run goes on as if it had never stopped. A checkpoint that
    ``rf.fit(..., checkpoint=PATH)`` wrote gives its params, the optimizer's
    and the model's state (``{}`` for a plain model), the generator's state
    and ``step`` = its steps taken (the loop's place in an epoch stays with
    :func:`read_checkpoint`). Either file's digest is checked first, then its
    record as a whole. The tensors are on the CPU.

    Raises:
        FileNotFoundError, IsADirectoryError: as :func:`~rdl_functional.load`.
        ValueError: the file is not whole safetensors, holds neither a saved TrainState nor a
            checkpoint, is corrupted (its digest does not match), holds an inconsistent record,
            or is the checkpoint of a run with a step function of its own (which keeps no
            optimizer state). Every message names the file.

    >>> import os, tempfile, rdl_functional as rf
    >>> x, labels = rf.disc_dataset(40, 0)
    >>> model = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2))
    >>> path = os.path.join(tempfile.mkdtemp(), "fit.ckpt")
    >>> _ = rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2), epochs=2, batch_size=20,
    ...            optimizer=rf.sgd(0.1), generator=0, checkpoint=path)
    >>> state = rf.load_state(path)                 # 2 epochs of 2 steps
    >>> int(state.step), list(state.opt_state), state.model_state
    (4, ['count', 'lr'], {})
    """
    tree, metadata = _load(path, "load_state")
    shown = repr(str(path))
    if _STATE_KEY not in metadata and _KEY in metadata:
        return _state_of(_checkpoint(tree, metadata, shown, "load_state"), shown)
    if _STATE_KEY not in metadata and _DIGEST_KEY not in metadata:
        raise ValueError(f"load_state: {shown} is neither a saved TrainState (rf.save_state) nor a checkpoint of "
                         f"rf.fit: its metadata holds no {_STATE_KEY} or {_KEY} record (rf.load reads a file of "
                         "params)")
    record = _proven_record(tree, metadata, shown, "load_state", _STATE_KEY, _STATE_FORMAT, "saved TrainState")
    try:
        if sorted(record) != ["format"]:
            raise ValueError(f"the record holds the fields {sorted(record)}, expected ['format']")
        _check_state(tree)
    except ValueError as error:
        raise ValueError(f"load_state: {shown} holds an inconsistent TrainState ({error}); it cannot be resumed") \
            from None
    return TrainState(**{name: tree[name] for name in _STATE_TREES})


_STATE_TREES = ("params", "opt_state", "model_state", "generator", "step")


def _check_state(tree: dict[str, Any]) -> None:
    """Raise ValueError, saying what is wrong, unless ``tree`` holds a TrainState's five trees."""
    if sorted(tree) != sorted(_STATE_TREES):
        raise ValueError(f"the tensors hold {sorted(tree)}, expected {sorted(_STATE_TREES)}")
    for name in ("params", "opt_state", "model_state"):
        if not isinstance(tree[name], dict):
            raise ValueError(f"{name} is a {type(tree[name]).__name__}, expected a tree of tensors (a dict)")
    _check_generator(tree["generator"])
    step = tree["step"]
    if not isinstance(step, Tensor) or step.dim() != 0 or step.dtype != torch.int64 or int(step) < 0:
        raise ValueError(f"the step count is {step!r}, expected a 0-dim int64 tensor ≥ 0")
    _check_counts(tree["opt_state"])


def _state_of(checkpoint: Checkpoint, shown: str) -> TrainState:
    """The TrainState in a ``fit`` checkpoint."""
    if checkpoint.opt_state is None:
        raise ValueError(f"load_state: {shown} is the checkpoint of a run of rf.fit with a step function of its own, "
                         "which keeps no optimizer state, so it holds no TrainState; rf.read_checkpoint reads it")
    return TrainState(params=checkpoint.params, opt_state=checkpoint.opt_state,
                      model_state=checkpoint.model_state if checkpoint.model_state is not None else {},
                      generator=checkpoint.generator_state, step=torch.tensor(checkpoint.steps, dtype=torch.int64))


_HISTORY = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_rmse", "train_r2", "test_rmse",
            "test_r2")


def digest(*trees: Any) -> str:
    """A short fingerprint of tensors (their dtypes, shapes and bytes) and trees of them; ``None`` is allowed."""
    h = hashlib.sha256()
    for tree in trees:
        if tree is None:
            _put(h, b"none")
            continue
        # By path, not by the dicts' order: the same trees built in another order are the same start.
        _hash_leaves(h, sorted(tree_flatten(tree).items()) if isinstance(tree, Mapping) else [("", tree)])
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
        # The rates before the probe: a run of another rate is named by its rate, not by two hashes.
        return {"name": optimizer.name, "rates": rates, "probe": behaviour}
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
    found = _first_difference(saved, now, "")
    return None if found is None else f"{found[0]}: {found[1]} in the checkpoint, {found[2]} now"


