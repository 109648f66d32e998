"""Trees: nested dicts of tensors, and the few walks every other module needs.

A *tree* is a leaf (a tensor, or any value that is not a mapping) or a dict
from ``str`` keys to trees. Params, grads and optimizer state are trees. Every
walk follows the first tree's own key order, so ``tree_map`` keeps the order
of its input, as ``torch.func`` and ``torch.utils._pytree`` do.

A *path* names one entry by its keys joined with dots: ``"2.bias"`` is
``tree["2"]["bias"]``. The empty path ``""`` is the root.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

Tree = Any
"""A leaf or a ``dict[str, Tree]``; spelled ``Any`` because Python's type
system cannot say "nested dict" without recursion that checkers reject."""

__all__ = [
    "Tree",
    "tree_difference",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_same_structure",
    "tree_unflatten",
]


def _is_node(x: Any) -> bool:
    # dict first: isinstance against the Mapping ABC is slow, and this runs per leaf per step.
    return isinstance(x, dict) or (not isinstance(x, torch.Tensor) and isinstance(x, Mapping))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _where(path: str) -> str:
    return f'at "{path}"' if path else "at the root"


def _describe(x: Any) -> str:
    if _is_node(x):
        return "a dict"
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _enter(on_path: set[int], node: Any, who: str, path: str) -> None:
    """Note ``node`` as on the walk's current path; a dict met again there contains itself, a cycle."""
    if id(node) in on_path:
        raise ValueError(f"{who}: the tree contains itself {_where(path)} (a dict that holds itself is no tree)")
    on_path.add(id(node))


def tree_leaves(tree: Tree) -> list[Any]:
    """Return the leaves of ``tree`` in key order.

    >>> tree_leaves({"w": 1, "sub": {"b": 2}, "empty": {}})
    [1, 2]
    """
    if not _is_node(tree):
        return [tree]
    leaves: list[Any] = []
    stack = [(iter(tree.values()), id(tree))]  # a walk without recursion: any depth, no RecursionError
    on_path = {id(tree)}
    while stack:
        for child in stack[-1][0]:
            if _is_node(child):
                _enter(on_path, child, "tree_leaves", "")
                stack.append((iter(child.values()), id(child)))
                break
            leaves.append(child)
        else:
            on_path.discard(stack.pop()[1])
    return leaves


def tree_flatten(tree: Tree) -> dict[str, Any]:
    """Return ``{path: leaf}`` with dotted paths; empty dicts leave no entry.

    This is the key layout of ``torch.nn.Module.state_dict()``. A lone leaf
    flattens to ``{"": leaf}``.

    >>> tree_flatten({"0": {"weight": 1, "bias": 2}, "1": {}})
    {'0.weight': 1, '0.bias': 2}

    Raises:
        ValueError: a key is not a non-empty string without dots, so the
            path could not be read back.
    """
    if not _is_node(tree):
        return {"": tree}
    flat: dict[str, Any] = {}
    stack = [(iter(tree.items()), "", id(tree))]  # a walk without recursion: any depth, no RecursionError
    on_path = {id(tree)}
    while stack:
        items, path, _ = stack[-1]
        for key, child in items:
            if not isinstance(key, str) or not key or "." in key:
                raise ValueError(
                    f"tree_flatten: key {key!r} {_where(path)} must be a non-empty "
                    "string without dots, so that dotted paths can be read back"
                )
            if _is_node(child):
                _enter(on_path, child, "tree_flatten", _join(path, key))
                stack.append((iter(child.items()), _join(path, key), id(child)))
                break
            flat[_join(path, key)] = child
        else:
            on_path.discard(stack.pop()[2])
    return flat


def tree_unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Invert :func:`tree_flatten`: ``{"0.weight": w}`` becomes ``{"0": {"weight": w}}``.

    >>> tree_unflatten({"0.weight": 1, "0.bias": 2, "2.weight": 3})
    {'0': {'weight': 1, 'bias': 2}, '2': {'weight': 3}}

    Raises:
        ValueError: a path is empty, has an empty part, or is both a leaf and
            the prefix of another path (``"0"`` and ``"0.weight"``).
    """
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        parts = path.split(".") if isinstance(path, str) else [""]
        if not all(parts):
            raise ValueError(f"tree_unflatten: {path!r} is not a dotted path of non-empty keys")
        node = tree
        for depth, key in enumerate(parts[:-1]):
            node = node.setdefault(key, {})
            if not _is_node(node):
                prefix = ".".join(parts[: depth + 1])
                raise ValueError(f'tree_unflatten: "{prefix}" is a leaf and also the prefix of "{path}"')
        if parts[-1] in node:
            raise ValueError(f'tree_unflatten: "{path}" is a leaf and also the prefix of another path')
        node[parts[-1]] = leaf
    return tree


def tree_difference(
    tree: Tree,
    other: Tree,
    *,
    names: tuple[str, str] = ("tree", "other"),
    leaves: bool = False,
) -> str | None:
    """Describe the first place where ``other`` differs in structure from ``tree``.

    Returns ``None`` when both have the same nested keys (order aside). With
    ``leaves=True``, tensor leaves must also agree in shape and dtype.

    >>> tree_difference({"0": {"w": 1, "b": 2}}, {"0": {"w": 1}}, names=("params", "grads"))
    'grads has no entry at "0.b" that params has'
    """
    a_name, b_name = names

    def visit(a: Tree, b: Tree, path: str) -> str | None:
        """What differs at this pair itself (its keys, or its leaves); the children are visited after."""
        a_node, b_node = _is_node(a), _is_node(b)
        if a_node and b_node:
            for key in a:
                if key not in b:
                    return f'{b_name} has no entry at "{_join(path, key)}" that {a_name} has'
            for key in b:
                if key not in a:
                    return f'{b_name} has an entry at "{_join(path, key)}" that {a_name} lacks'
            return None
        if a_node or b_node:
            return f"{a_name} has {_describe(a)} {_where(path)} but {b_name} has {_describe(b)}"
        if leaves and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                return f"{a_name} has {_describe(a)} {_where(path)} but {b_name} has {_describe(b)}"
        return None

    found = visit(tree, other, "")
    if found or not _is_node(tree):
        return found
    stack = [(iter(tree.items()), other, "", id(tree))]  # depth first, in key order, without recursion
    on_path = {id(tree)}
    while stack:
        items, twin, path, _ = stack[-1]
        for key, child in items:
            where = _join(path, key)
            found = visit(child, twin[key], where)
            if found:
                return found
            if _is_node(child):
                _enter(on_path, child, "tree_difference", where)
                stack.append((iter(child.items()), twin[key], where, id(child)))
                break
        else:
            on_path.discard(stack.pop()[3])
    return None


def tree_same_structure(tree: Tree, other: Tree) -> bool:
    """True when both trees have the same nested keys (order aside).

    >>> tree_same_structure({"a": 1, "b": {}}, {"b": {}, "a": 5})
    True
    """
    return tree_difference(tree, other) is None


def _map(fn: Callable[..., Any], tree: Tree, rest: tuple[Tree, ...]) -> Tree:
    if not _is_node(tree):
        return fn(tree, *rest)
    root: dict[str, Any] = {}
    stack = [(iter(tree.items()), rest, root, id(tree))]  # a walk without recursion: any depth, no RecursionError
    on_path = {id(tree)}
    while stack:
        items, others, out, _ = stack[-1]
        for key, child in items:
            twins = tuple(r[key] for r in others)
            if _is_node(child):
                _enter(on_path, child, "tree_map", key)
                out[key] = {}
                stack.append((iter(child.items()), twins, out[key], id(child)))
                break
            out[key] = fn(child, *twins)
        else:
            on_path.discard(stack.pop()[3])
    return root


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf by leaf, returning a new tree shaped like ``tree``.

    With several trees, ``fn`` gets the leaves found at the same path in each;
    all trees must have the same structure.

    >>> tree_map(lambda a, b: a + b, {"w": 1, "s": {"b": 2}}, {"w": 10, "s": {"b": 20}})
    {'w': 11, 's': {'b': 22}}

    Raises:
        ValueError: the trees differ in structure; the message names the first
            differing path.
    """
    for i, other in enumerate(rest, start=1):
        found = tree_difference(tree, other, names=("tree", f"trees[{i}]"))
        if found:
            raise ValueError(f"tree_map: {found}")
    return _map(fn, tree, rest)


class _Paired:
    """Two trees' tensor leaves, read in one walk, and a new tree shaped like the first to put results in."""

    __slots__ = ("mine", "skeleton", "slots", "theirs")

    def __init__(self, skeleton: dict, slots: list[tuple[dict, str]], mine: list, theirs: list) -> None:
        self.skeleton, self.slots, self.mine, self.theirs = skeleton, slots, mine, theirs

    def fill(self, leaves: list[Any]) -> dict:
        """The new tree, with ``leaves`` where the first tree had its leaves (in its key order)."""
        for (node, key), leaf in zip(self.slots, leaves, strict=True):
            node[key] = leaf
        return self.skeleton


def _spec_of(tree: Any, leaves: list[Any]) -> Any:
    """The structure of a tree of dicts as nested ``(key, spec)`` tuples (``None`` for a leaf); leaves appended.
    On every call's path: a loop rather than a recursion per leaf."""
    if type(tree) is not dict:
        leaves.append(tree)
        return None
    spec = []
    for key, child in tree.items():
        if type(child) is dict:
            spec.append((key, _spec_of(child, leaves)))
        else:
            leaves.append(child)
            spec.append((key, None))
    return tuple(spec)


def _fill_spec(spec: Any, it: Any) -> Any:
    """The tree of ``spec`` with the leaves of the iterator ``it``, in :func:`_spec_of`'s order."""
    if spec is None:
        return next(it)
    return {key: next(it) if child is None else _fill_spec(child, it) for key, child in spec}


def _filler(spec: Any) -> Callable[[list[Any]], Tree]:
    """``fill(leaves) -> tree``: the tree of ``spec`` (:func:`~rdl_functional.tree._spec_of`'s) holding ``leaves``
    in order, as one dict display (a tree a step rebuilds three times is then about a microsecond)."""
    count = iter(range(1 << 30))

    def display(node: Any) -> str:
        if node is None:
            return f"leaves[{next(count)}]"
        return "{" + ", ".join(f"{key!r}: {display(child)}" for key, child in node) + "}"

    if spec is None or not all(type(key) is str for key in _keys(spec)):
        return lambda leaves: _fill_spec(spec, iter(leaves))
    return eval(f"lambda leaves: {display(spec)}")  # a display of string keys and subscripts, nothing else


def _keys(spec: Any) -> list[Any]:
    return [k for key, child in spec for k in [key, *(_keys(child) if child is not None else [])]]


def _leaves_by_spec(spec: Any, tree: Any, leaves: list[Any]) -> None:
    """``tree``'s leaves appended in the order of ``spec`` (:func:`_spec_of`'s, of another tree): read by key, so a
    tree of the same paths in another key order gives its leaves in ``spec``'s order."""
    if spec is None:
        leaves.append(tree)
        return
    for key, child in spec:
        if child is None:
            leaves.append(tree[key])
        else:
            _leaves_by_spec(child, tree[key], leaves)


def _pair_walk(a: dict, b: dict, paired: _Paired) -> dict | None:
    # A module-level function, not a closure: a closure that calls itself is a reference
    # cycle, which would keep every tensor it saw alive until the cyclic collector runs.
    out: dict = {}
    for key, child in a.items():
        twin = b.get(key)
        if type(child) is dict:
            if type(twin) is not dict or len(child) != len(twin):
                return None
            if child:
                inner = _pair_walk(child, twin, paired)
                if inner is None:
                    return None
                out[key] = inner
            else:
                out[key] = {}
        elif (
            isinstance(child, torch.Tensor)
            and isinstance(twin, torch.Tensor)
            and child.shape == twin.shape
            and child.dtype == twin.dtype
        ):
            out[key] = None  # keeps the key's place; filled by _Paired.fill
            paired.slots.append((out, key))
            paired.mine.append(child)
            paired.theirs.append(twin)
        else:
            return None
    return out


def _paired(tree: Tree, other: Tree) -> _Paired | None:
    """Pair the leaves of two trees of plain dicts with one structure and tensors of one shape and dtype.

    ``None`` when anything differs or is unusual (a Mapping that is not a
    dict, a leaf that is not a tensor): the caller then takes the general
    path, which says where they differ. One walk, for the hot path of every
    update: no message is formatted, and the new tree is laid out as it goes.
    """
    if type(tree) is not dict or type(other) is not dict or len(tree) != len(other):
        return None
    paired = _Paired({}, [], [], [])
    try:
        skeleton = _pair_walk(tree, other, paired)
    except RecursionError:  # a tree nested thousands deep: the general path walks it without recursion
        return None
    if skeleton is None:
        return None
    paired.skeleton = skeleton
    return paired


def _rebuild_like(tree: Tree, leaves: list[Any]) -> Tree:
    """A tree of plain dicts shaped like ``tree``, with ``leaves`` in its key order (as :func:`_paired` reads them).

    On the update's hot path, for a tree already walked (by :func:`_paired`): a plain recursion, without the
    general walk's cycle bookkeeping, which tripled its cost.
    """
    return _fill_like(tree, iter(leaves))


def _fill_like(node: Tree, it: Any) -> Tree:
    # A module-level function, not a closure: see _pair_walk.
    if _is_node(node):
        return {key: _fill_like(child, it) for key, child in node.items()}
    return next(it)


def _first_difference(mine: Any, theirs: Any, path: str) -> tuple[str, str, str] | None:
    """The first path at which two JSON values differ, in ``mine``'s order, with both values as short JSON: what a
    checkpoint's settings and a run's, or two ranks' settings, are compared by."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in dict.fromkeys([*mine, *theirs]):
            found = _first_difference(mine.get(key), theirs.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    texts = [json.dumps(value, sort_keys=True) for value in (mine, theirs)]  # NaN equals NaN here, as it should
    if texts[0] == texts[1]:
        return None
    return path, *(text if len(text) <= 80 else text[:77] + "..." for text in texts)
