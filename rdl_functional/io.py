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
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
from safetensors import SafetensorError
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
    if merged and all(key.isdigit() for key in merged):  # a compose's children: torch's order, by index
        merged = {key: merged[key] for key in sorted(merged, key=int)}
    return merged


def from_state_dict(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    """Nest a flat state dict: ``{"0.weight": w}`` becomes ``{"0": {"weight": w}}``.

    Accepts a ``torch.nn.Sequential``'s ``state_dict()``; the result feeds the
    equivalent :func:`~rdl_functional.compose` model, which accepts the absent
    entries of parameterless layers (its grads have none either) and trains on
    this tree as fast as on ``model.init``'s. Tensors are taken as they are
    (detached by torch's ``state_dict`` already).
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


# Bounds on what a file may hold, so that a hostile or damaged file is refused with a message
# rather than exhausting the stack or the memory: far beyond any model's.
MAX_DEPTH = 256
MAX_TENSORS = 1_000_000
_MAX_HEADER_BYTES = 100 * 2**20


def _skeleton(tree: Tree, who: str) -> Any:
    """The tree's nesting with ``None`` for each leaf (what safetensors' flat keys lose), built without recursion."""
    root: dict[str, Any] = {}
    stack = [(tree, root, 0)]
    while stack:
        node, out, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise ValueError(f"{who}: the tree nests deeper than {MAX_DEPTH} levels")
        for key, child in node.items():
            if _is_node(child):
                out[key] = {}
                stack.append((child, out[key], depth + 1))
            else:
                out[key] = None
    return root


def _fill(skeleton: Any, flat: Mapping[str, Tensor]) -> Tree:
    """The tree ``skeleton`` describes, its leaves taken from ``flat`` by dotted path (without recursion)."""
    if not isinstance(skeleton, dict):
        raise TypeError(f"the record is a {type(skeleton).__name__}, not a dict")
    root: dict[str, Any] = {}
    stack = [(skeleton, root, "")]
    while stack:
        node, out, path = stack.pop()
        for key, child in node.items():
            where = f"{path}.{key}" if path else key
            if child is None:
                if where not in flat:
                    raise ValueError(f'it names a tensor "{where}" that the file does not hold')
                out[key] = flat[where]
            elif isinstance(child, dict):
                out[key] = {}
                stack.append((child, out[key], where))
            else:
                raise TypeError(f'the record holds a {type(child).__name__} at "{where}"')
    return root


# A JSON string (escapes included), or an unterminated one running to the end; and a bracket.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _json_depth(text: str) -> int:
    """The deepest nesting of brackets in a JSON text (strings skipped), found without parsing it."""
    depth = deepest = 0
    for char in _BRACKET.findall(_JSON_STRING.sub("", text)):  # the scanning in C: a header is read at every load
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def save(params: Tree, path: str | os.PathLike[str]) -> None:
    """Write ``params`` to a safetensors file at ``path``, dtypes and nesting preserved.

    The file is written under a temporary name beside ``path``, flushed to
    disk and renamed, so an existing file is replaced whole or not at all
    (and keeps its mode; a symlink is written through). The tensors are
    plain safetensors entries with dotted keys, readable by any safetensors
    reader.

    Raises:
        TypeError: a leaf is not a tensor.
        ValueError: a key could not be written as a dotted path, or the tree
            nests deeper than :data:`MAX_DEPTH` levels.
        OSError: the path cannot be written (its folder is missing or not
            writable, the name is too long, it is a folder or a symlink loop);
            raised before anything is written. Or the write failed (a full
            disk, a file-size limit, the folder deleted meanwhile): the message
            names the file, and a file already there is left as it was.
    """
    _save(params, path, "save")


def _save(tree: Tree, path: str | os.PathLike[str], who: str, extra: Mapping[str, str] | None = None) -> None:
    """:func:`save` with more metadata (``extra``, strings), as checkpoints write."""
    if not _is_node(tree):
        raise TypeError(f"{who}: params must be a dict of tensors, got {type(tree).__name__}")
    skeleton = _skeleton(tree, who)
    flat = _check_tensor_tree(who, tree)
    tensors, seen = {}, set()
    for key, tensor in flat.items():
        tensor = tensor.detach().contiguous().cpu()
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensors[key] = tensor.clone() if storage in seen else tensor  # safetensors refuses shared memory
        seen.add(storage)
    metadata = {_FORMAT_KEY: json.dumps(skeleton), **(extra or {})}
    # The bytes are made here and written into atomic_write's own temporary file: safetensors' save_file
    # writes through a temporary file of its own (.tmpXXXXXX), which a kill would leave behind.
    data = safetensors.torch.save(tensors, metadata=metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), who=who)


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read params written by :func:`save` (or any safetensors file of tensors).

    A file written by :func:`save` comes back as the very tree that was saved;
    a plain safetensors state dict (``"0.weight"``, ...) comes back nested by
    its dotted keys. The file is read whole and closed: the tensors are the
    process's own, so nothing done to the file afterwards (overwritten,
    truncated, deleted) reaches them. Never unpickles.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        IsADirectoryError: ``path`` is a folder.
        ValueError: the file is not a whole safetensors file (truncated,
            damaged, another format, a FIFO or device), or holds more than
            :data:`MAX_TENSORS` tensors or a tree deeper than :data:`MAX_DEPTH`.
            Its size is checked against its header before its bytes are read.
        MemoryError: the file, whole as its header says, is larger than the
            memory this process can allocate.
        Every message names the file.
    """
    return _load(path, "load")[0]


def _load(path: str | os.PathLike[str], who: str) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`load`, and the file's metadata."""
    target = Path(path)
    shown = repr(str(target))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{who}: no such file: {shown}") from None
    except OSError as error:
        raise OSError(f"{who}: cannot read {shown}: {error.strerror}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{who}: {shown} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{who}: {shown} is not a regular file (a FIFO, socket or device?)")
    try:
        with open(target, "rb") as file:
            data, metadata = _read_checked(file, os.fstat(file.fileno()).st_size, shown, who)
    except OSError as error:
        raise OSError(f"{who}: cannot read {shown}: {error.strerror}") from None
    try:
        # Each tensor is copied out of the bytes read: the process owns it, and it is writable.
        flat = {key: tensor.clone() for key, tensor in safetensors.torch.load(data).items()}
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as error:
        raise ValueError(f"{who}: {shown} is not a readable safetensors file (truncated, or another "
                         f"format?): {error}") from None
    if _FORMAT_KEY not in metadata:
        try:
            return from_state_dict(flat), metadata
        except ValueError as error:
            raise ValueError(f"{who}: {shown}: its tensor names are not a tree ({error})") from None
    try:
        record = metadata[_FORMAT_KEY]
        if _json_depth(record) > MAX_DEPTH:
            raise ValueError(f"the tree nests deeper than {MAX_DEPTH} levels")
        tree = _fill(json.loads(record), flat)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise ValueError(f"{who}: {shown} has a damaged {_FORMAT_KEY} record: {error}") from None
    if len(tree_flatten(tree)) != len(flat):
        raise ValueError(f"{who}: {shown} holds tensors that its {_FORMAT_KEY} record does not name")
    return tree, metadata


def _read_checked(file: BinaryIO, size: int, shown: str, who: str) -> tuple[bytes, dict[str, str]]:
    """The file's bytes and its ``__metadata__``, read only once its header proves the file as long as it describes
    (so a truncated, padded or sparse file costs a header's read, never the whole file's memory)."""
    problem = f"{who}: {shown} is not a readable safetensors file"
    if size < 8:
        raise ValueError(f"{problem}: it is {size} bytes long, shorter than a header")
    length = int.from_bytes(file.read(8), "little")
    if length > size - 8 or length > _MAX_HEADER_BYTES:
        raise ValueError(f"{problem}: its header claims {length} bytes, but the file holds {size - 8} after "
                         "the length (truncated, or another format?)")
    header = _parse_header(file.read(length), problem)
    expected = 8 + length + _data_size(header, problem)
    if size != expected:
        raise ValueError(f"{problem}: its header describes a file of {expected} bytes, but it holds {size} "
                         "(truncated, padded, or another format?)")
    file.seek(0)
    try:
        data = file.read(size + 1)  # one more: a file grown since its size was taken is caught too
    except MemoryError:
        raise MemoryError(f"{who}: {shown} is {size} bytes long, more than this process can "
                          "allocate") from None
    if len(data) != size:
        raise ValueError(f"{problem}: it changed while it was read ({size} bytes, then {len(data)})")
    return data, header.get("__metadata__") or {}


def _parse_header(raw: bytes, problem: str) -> dict[str, Any]:
    """The safetensors header as JSON, after checking its depth, entry count and metadata."""
    try:
        text = raw.decode("utf-8")
        if _json_depth(text) > 3:  # {"name": {"shape": [...]}} at most
            raise ValueError("the header nests too deep")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"{problem}: its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{problem}: its header is a {type(header).__name__}, not an object")
    if len(header) > MAX_TENSORS + 1:
        raise ValueError(f"{problem}: it names {len(header) - 1} tensors, more than the {MAX_TENSORS} allowed")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{problem}: its __metadata__ is not a map of strings")
    return header


def _data_size(header: dict[str, Any], problem: str) -> int:
    """The bytes of tensor data the header describes: the end of the last entry's ``data_offsets``."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
            raise ValueError(f"{problem}: its header gives {name!r} no data_offsets [begin, end] (damaged?)")
        end = max(end, offsets[1])
    return end
