"""Parameters out and in: flat torch state dicts, and safetensors files.

``to_state_dict`` gives the keys ``torch.nn.Sequential`` uses (``"0.weight"``),
so our params load into the equivalent torch model with
``load_state_dict(..., strict=True)``. ``save`` writes a safetensors file that
also records the tree's nesting, empty entries included, so ``load`` returns
exactly the tree that was saved. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._files import atomic_write
from .tree import Tree, _is_node, tree_flatten, tree_unflatten

__all__ = ["from_state_dict", "load", "save", "split_state", "to_state_dict"]

_FORMAT_KEY = "rdl_functional.tree"


def _check_tensor_tree(where: str, params: Tree) -> dict[str, Tensor]:
    if not _is_node(params):
        raise TypeError(f"{where}: params must be a dict of tensors, got {type(params).__name__}")
    flat = tree_flatten(params)
    for path, leaf in flat.items():
        if not isinstance(leaf, Tensor):
            raise TypeError(f'{where}: the leaf at "{path}" must be a torch.Tensor, got {type(leaf).__name__}')
    return flat


def to_state_dict(params: Tree, state: Tree | None = None) -> dict[str, Tensor]:
    """Flatten params to ``{"0.weight": ..., "0.bias": ...}``, the ``torch.nn`` layout.

    The tensors are the params' own (no copy). Parameterless layers have no
    entry, as in torch. With a stateful model's ``state`` (batch norm's running
    statistics), its tensors join the params under their layer's keys, after
    the layer's params, as torch's buffers do: ``"1.running_mean"``,
    ``"1.running_var"``, ``"1.num_batches_tracked"``; the result loads into the
    equivalent ``torch.nn.Sequential`` with ``load_state_dict(..., strict=True)``.

    >>> import rdl_functional as rf
    >>> list(rf.to_state_dict(rf.compose(rf.linear(2, 3), rf.relu).init(0)))
    ['0.weight', '0.bias']
    >>> model = rf.compose(rf.linear(2, 3), rf.batch_norm(3))
    >>> list(rf.to_state_dict(model.init(0), model.init_state()))  # doctest: +NORMALIZE_WHITESPACE
    ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked']

    Raises:
        TypeError: params or state is not a dict of tensors.
        ValueError: params and state both have a tensor at one path.
    """
    flat = _check_tensor_tree("to_state_dict", params)
    if state is None:
        return flat
    if not _is_node(state):
        raise TypeError(f"to_state_dict: state must be a dict of tensors (a stateful model's state), got "
                        f"{type(state).__name__}")
    _check_tensor_tree("to_state_dict: state", state)
    return tree_flatten(_merged(params, state, ""))


def _merged(params: Tree, state: Tree, path: str) -> Tree:
    """One tree holding both: each node's params first, then its state, as a torch module lists its buffers."""
    merged = dict(params)
    for key, child in state.items():
        where = f"{path}.{key}" if path else key
        if key not in merged:
            merged[key] = child
        elif _is_node(merged[key]) and _is_node(child):
            merged[key] = _merged(merged[key], child, where)
        else:
            raise ValueError(f'to_state_dict: params and state both hold "{where}"; a state is '
                             "model.init_state()'s tree, beside the params, not inside them")
    return merged


def from_state_dict(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    """Nest a flat state dict: ``{"0.weight": w}`` becomes ``{"0": {"weight": w}}``.

    Accepts a ``torch.nn.Sequential``'s ``state_dict()``; the result feeds the
    equivalent :func:`~rdl_functional.compose` model (which accepts the absent
    entries of parameterless layers). Tensors are taken as they are (detached
    by torch's ``state_dict`` already).
    """
    if not isinstance(flat, Mapping):
        raise TypeError(f"from_state_dict: expected a dict of tensors, got {type(flat).__name__}")
    for key, value in flat.items():
        if not isinstance(key, str):
            raise TypeError(f"from_state_dict: keys must be strings, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f'from_state_dict: the value at "{key}" must be a torch.Tensor, got {type(value).__name__}')
    return tree_unflatten(flat)


def split_state(tree: Tree, like: Tree) -> tuple[dict[str, Any], dict[str, Any]]:
    """Undo :func:`to_state_dict`'s merge: ``(params, state)`` from a tree holding both, laid out as ``like``.

    ``like`` is a state of the model (``model.init_state()``): the paths it
    has are taken as state, every other path as params. With
    :func:`from_state_dict` this reads a ``torch.nn.Sequential`` with batch norm
    back into params and state.

    >>> import torch, rdl_functional as rf
    >>> model = rf.compose(rf.linear(2, 3), rf.batch_norm(3))
    >>> torch_model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    >>> params, state = rf.split_state(rf.from_state_dict(torch_model.state_dict()), model.init_state())
    >>> list(params["1"]), list(state["1"])
    (['weight', 'bias'], ['running_mean', 'running_var', 'num_batches_tracked'])

    Raises:
        ValueError: a path of ``like`` is missing from ``tree``.
    """
    if not _is_node(tree) or not _is_node(like):
        raise TypeError(f"split_state: expected two dicts (the merged tree, and a state such as "
                        f"model.init_state()), got {type(tree).__name__} and {type(like).__name__}")
    return _split(tree, like, "")


def _split(tree: Tree, like: Tree, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    params, state = {}, {}
    for key, child in tree.items():
        where = f"{path}.{key}" if path else key
        if key not in like:
            params[key] = child
        elif _is_node(like[key]) and _is_node(child):
            params[key], state[key] = _split(child, like[key], where)
        elif not _is_node(like[key]) and not _is_node(child):
            state[key] = child
        else:
            raise ValueError(f'split_state: "{where}" is a {"dict" if _is_node(child) else "tensor"} in the tree '
                             f"but a {'dict' if _is_node(like[key]) else 'tensor'} in the state")
    for key, child in like.items():
        if key not in state:  # absent from the tree: fine for a layer without state, not for one with
            state[key] = _split({}, child, f"{path}.{key}" if path else key)[1] if _is_node(child) else _missing(
                f"{path}.{key}" if path else key)
    return params, {key: state[key] for key in like}


def _missing(where: str) -> Any:
    raise ValueError(f'split_state: the tree has no "{where}", which the state holds (is it another model\'s tree?)')


def _skeleton(tree: Tree) -> Any:
    """The tree's nesting with ``None`` for each leaf: what safetensors' flat keys lose."""
    return {key: _skeleton(child) for key, child in tree.items()} if _is_node(tree) else None


def _fill(skeleton: Any, flat: Mapping[str, Tensor], path: str) -> Tree:
    if skeleton is None:
        return flat[path]
    return {key: _fill(child, flat, f"{path}.{key}" if path else key) for key, child in skeleton.items()}


def save(params: Tree, path: str | os.PathLike[str]) -> None:
    """Write ``params`` to a safetensors file at ``path``, dtypes and nesting preserved.

    The file is written under a temporary name beside ``path`` and renamed,
    so an existing file is replaced whole or not at all. The tensors are
    plain safetensors entries with dotted keys, readable by any safetensors
    reader.

    Raises:
        TypeError: a leaf is not a tensor.
        ValueError: a key could not be written as a dotted path.
        OSError: the folder does not exist or is not writable.
    """
    flat = _check_tensor_tree("save", params)
    tensors, seen = {}, set()
    for key, tensor in flat.items():
        tensor = tensor.detach().contiguous().cpu()
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[key] = tensor.clone() if storage in seen else tensor  # safetensors refuses shared memory
        seen.add(storage)
    metadata = {_FORMAT_KEY: json.dumps(_skeleton(params))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read params written by :func:`save` (or any safetensors file of tensors).

    A file written by :func:`save` comes back as the very tree that was saved;
    a plain safetensors state dict (``"0.weight"``, ...) comes back nested by
    its dotted keys. Never unpickles.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file is not a whole safetensors file (truncated, or
            some other format); the message names the file.
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"load: no such file: {str(target)!r}")
    try:
        with safe_open(target, framework="pt") as reader:
            metadata = reader.metadata() or {}
            flat = {key: reader.get_tensor(key) for key in reader.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(
            f"load: {str(target)!r} is not a readable safetensors file "
            f"(truncated, or another format?): {error}"
        ) from None
    if _FORMAT_KEY not in metadata:
        return from_state_dict(flat)
    try:
        skeleton = json.loads(metadata[_FORMAT_KEY])
        params = _fill(skeleton, flat, "")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"load: {str(target)!r} has a damaged {_FORMAT_KEY} record: {error!r}") from None
    if len(tree_flatten(params)) != len(flat):
        raise ValueError(f"load: {str(target)!r} holds tensors that its {_FORMAT_KEY} record does not name")
    return params
