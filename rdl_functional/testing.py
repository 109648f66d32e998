"""Checking a layer or loss against torch's own autograd: the library's test oracle, public.

This module, alone with :mod:`rdl_functional.apps.torch_baseline`, uses
``torch.func``: never on the training path, only to check it. ``torch.func`` is
imported when a check runs, not when the library is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from ._random import as_generator
from .layers import Layer
from .losses import Loss, check_loss
from .stateful import StatefulLayer
from .tree import Tree, tree_flatten, tree_map

__all__ = ["VjpMismatch", "VjpReport", "check_vjp"]


@attrs.frozen
class VjpReport:
    """What :func:`check_vjp` compared: one row per quantity, with its largest error.

    Attributes:
        name: the layer or loss checked.
        rows: ``(quantity, error, allowed, ok)``; ``error`` is the largest
            absolute difference, or for the finite-difference row the relative one.
    """

    name: str
    rows: tuple[tuple[str, float, float, bool], ...]

    @property
    def ok(self) -> bool:
        return all(ok for *_, ok in self.rows)

    def __str__(self) -> str:
        width = max(len(row[0]) for row in self.rows)
        lines = [f"check_vjp({self.name}) in float64: {'ok' if self.ok else 'MISMATCH'}"]
        for quantity, error, allowed, ok in self.rows:
            lines.append(f"  {quantity:<{width}}  error {error:9.2e}  allowed {allowed:8.1e}  {'ok' if ok else 'FAIL'}")
        return "\n".join(lines)


class VjpMismatch(AssertionError):
    """Raised by :func:`check_vjp`; ``.report`` holds the :class:`VjpReport`."""

    def __init__(self, report: VjpReport) -> None:
        super().__init__(str(report))
        self.report = report


def _map(fn: Callable[..., Tensor], value: Any, *rest: Any) -> Any:
    """``fn`` over the tensors of a params tree, a tensor, or a tuple of tensors (what fan_out passes on)."""
    if isinstance(value, tuple):
        return tuple(_map(fn, *parts) for parts in zip(value, *rest, strict=True))
    return tree_map(fn, value, *rest)


def _tree(value: Any) -> Tree:
    """A tuple as the tree ``{"0": ..., "1": ...}``, so that it compares and flattens as params do."""
    return {str(i): _tree(part) for i, part in enumerate(value)} if isinstance(value, tuple) else value


def _float64(tree: Tree) -> Tree:
    return _map(lambda t: t.to(torch.float64) if torch.is_floating_point(t) else t, tree)


def _is_float(leaf: Any) -> bool:
    return isinstance(leaf, Tensor) and leaf.is_floating_point()


def _leaves(primals: tuple) -> list[Tensor]:
    """The floating leaves of ``primals``, in order: what has a cotangent (an embedding's integer ids have none)."""
    found: list[Tensor] = []
    for primal in primals:
        _map(lambda t: found.append(t) if _is_float(t) else None, primal)
    return found


def _with_leaves(primals: tuple, leaves: Any) -> tuple:
    """``primals`` with their floating leaves replaced, in order, by ``leaves``; the others kept."""
    given = iter(leaves)
    return tuple(_map(lambda t: next(given) if _is_float(t) else t, primal) for primal in primals)


def _float_entries(primal: Any, cotangent: Any) -> dict[str, Any]:
    """``{path: leaf}`` of a cotangent, less the paths where the primal is not floating (no cotangent there:
    what the pullback gives for them, ``None`` by convention, is not read). A path the primal lacks stays, so
    that a wrong key shows."""
    skip = {path for path, leaf in tree_flatten(_tree(primal)).items() if not _is_float(leaf)}
    return {path: leaf for path, leaf in tree_flatten(_tree(cotangent)).items() if path not in skip}


def _max_error(got: Any, want: Tensor) -> float:
    if not isinstance(got, Tensor) or got.shape != want.shape:
        return float("inf")
    return (got.to(torch.float64) - want).abs().max().item() if want.numel() else 0.0


def _compare(rows: list, name: str, got_flat: dict[str, Any], want_flat: dict[str, Tensor], rtol: float,
             atol: float) -> None:
    """One row per leaf of ``want_flat`` (``{path: tensor}``), or one failed row when the paths differ."""
    if list(got_flat) != list(want_flat):
        rows.append((f"{name} keys {list(got_flat)} vs torch's {list(want_flat)}", float("inf"), 0.0, False))
        return
    for path, want_leaf in want_flat.items():
        error = _max_error(got_flat[path], want_leaf)
        allowed = atol + rtol * (want_leaf.abs().max().item() if want_leaf.numel() else 0.0)
        rows.append((f"{name}{'.' + path if path else ''}", error, allowed, error <= allowed))


def _flat(tree: Any) -> dict[str, Any]:
    return tree_flatten(_tree(tree))


def _abs(flat: dict[str, Any]) -> dict[str, Any]:
    return {path: leaf.abs() if isinstance(leaf, Tensor) else leaf for path, leaf in flat.items()}


def _dot(flat_a: dict[str, Any], flat_b: dict[str, Any]) -> Tensor:
    """Σ a·b over the leaves at the same paths; NaN where they do not match."""
    if flat_a.keys() != flat_b.keys() or any(
        not isinstance(flat_b[k], Tensor) or flat_a[k].shape != flat_b[k].shape for k in flat_a
    ):
        return torch.tensor(float("nan"), dtype=torch.float64)
    return sum(((flat_a[k] * flat_b[k]).sum() for k in flat_a), torch.zeros((), dtype=torch.float64))


def _central_difference(apply: Callable, leaves: list[Tensor], v: list[Tensor], u: Any, eps: float) -> Tensor:
    def shifted(sign: float) -> list[Tensor]:
        return [p + sign * eps * d for p, d in zip(leaves, v, strict=True)]

    return _dot(_flat(_map(lambda a, b: (a - b) / (2 * eps), apply(*shifted(+1)), apply(*shifted(-1)))), _flat(u))


def check_vjp(
    fn: Layer | StatefulLayer | Loss,
    *args: Any,
    generator: torch.Generator | int = 0,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    train: bool = True,
    layer_seed: int = 0,
) -> VjpReport:
    """Check a layer's or loss's ``vjp`` against ``torch.func.vjp`` and finite differences.

    For a :class:`~rdl_functional.Layer` pass ``(params, x)``; for a
    :class:`~rdl_functional.StatefulLayer` pass ``(params, state, x)``: it
    runs with ``train`` and, on every call, a fresh generator seeded with
    ``layer_seed``, so that a random layer draws one fixed mask and is a
    plain function of ``(params, x)``; its new state from ``vjp`` must equal
    ``apply``'s. For a :class:`~rdl_functional.Loss` pass ``(pred, target)``
    (the gradient is with respect to ``pred``). Floating tensors are converted to float64.
    Only floating tensors have a cotangent: integer and bool ones (an
    embedding's ids, a mask) are passed as they are and held fixed, so the
    float parts alone (params, float inputs) are compared against
    ``torch.func.vjp`` and differenced; what the pullback returns for an
    integer input (``None`` by convention) is not read.
    Checked: the output equals ``fn.apply``'s and torch's; the pullback of a
    random cotangent equals ``torch.func.vjp``'s, key order included; for a
    layer that declares ``skips_dx``, ``pullback(u, need_dx=False)`` gives
    the same ``dparams``; and
    ``<v, Jᵀu>`` from the pullback equals ``<J v, u>`` by central differences
    (which catches a wrong pullback even when the forward is wrong in the
    same way), relative to the size of the terms it sums, ``Σ|v|·|Jᵀu|``.

    Returns:
        The :class:`VjpReport`, when every row is within tolerance.

    Raises:
        VjpMismatch: an ``AssertionError`` whose message is the report.

    >>> import rdl_functional as rf
    >>> layer = rf.linear(3, 2)
    >>> report = rf.check_vjp(layer, layer.init(0), torch.randn(4, 3))
    >>> report.ok
    True
    """
    import torch.func  # the oracle; imported only when a check runs

    g = as_generator(generator, "check_vjp")
    if isinstance(fn, Layer):
        if len(args) != 2:
            raise TypeError(f"check_vjp: a Layer takes (params, x), got {len(args)} arguments")
        primals = (_float64(args[0]), _float64(args[1]))
        vjp, apply = fn.vjp, fn.apply
    elif isinstance(fn, StatefulLayer):
        if len(args) != 3:
            raise TypeError(f"check_vjp: a StatefulLayer takes (params, state, x), got {len(args)} arguments")
        state = _float64(args[1])
        primals = (_float64(args[0]), _float64(args[2]))
        new_states: list[Tree] = []

        def fresh() -> torch.Generator:
            return torch.Generator().manual_seed(layer_seed)

        def vjp(params: Tree, x: Tensor) -> tuple[Tensor, Callable]:
            y, new_state, pullback = fn.vjp(params, state, x, train=train, generator=fresh())
            new_states.append(new_state)
            return y, pullback

        def apply(params: Tree, x: Tensor) -> Tensor:
            y, new_state = fn.apply(params, state, x, train=train, generator=fresh())
            new_states.append(new_state)
            return y
    elif isinstance(fn, Loss):
        if len(args) != 2:
            raise TypeError(f"check_vjp: a Loss takes (pred, target), got {len(args)} arguments")
        target = _float64(args[1])
        primals = (_float64(args[0]),)

        def vjp(pred: Tensor) -> tuple[Tensor, Callable]:
            value, pullback = fn.vjp(pred, target)
            return value, lambda g: (pullback(g),)

        def apply(pred: Tensor) -> Tensor:
            return fn.apply(pred, target)
    else:
        check_loss("check_vjp", fn, "expected a Layer, a StatefulLayer or a Loss")

    rows: list[tuple[str, float, float, bool]] = []
    y, pullback = vjp(*primals)
    # torch.func differentiates the floating leaves only: integer or bool ones (an embedding's ids) stay fixed.
    leaves = _leaves(primals)

    def apply_leaves(*floats: Tensor) -> Any:
        return apply(*_with_leaves(primals, floats))

    y_ref, pullback_ref = torch.func.vjp(apply_leaves, *leaves)
    _compare(rows, "y (vjp vs torch.func)", _flat(y), _flat(y_ref), rtol, atol)
    _compare(rows, "y (vjp vs apply)", _flat(y), _flat(apply(*primals)), 0.0, 0.0)
    if isinstance(fn, StatefulLayer):
        _compare(rows, "new state (vjp vs apply)", _flat(new_states[0]), _flat(new_states[-1]), 0.0, 0.0)

    u = _map(lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64), y)
    cotangents = pullback(u)
    is_layer = isinstance(fn, (Layer, StatefulLayer))
    names = ("dparams", "dx") if is_layer else ("dpred",)
    ours = [_float_entries(p, c) for p, c in zip(primals, cotangents, strict=True)]
    for name, primal, got, want in zip(names, primals, ours, _with_leaves(primals, pullback_ref(u)), strict=True):
        _compare(rows, name, got, _float_entries(primal, want), rtol, atol)
    if is_layer and fn.skips_dx:
        # The declaration is a promise: skipping dx must leave dparams exactly as they were.
        _compare(rows, "dparams with need_dx=False", _flat(vjp(*primals)[1](u, need_dx=False)[0]),
                 _flat(cotangents[0]), 0.0, 0.0)

    # A central difference that straddles a ReLU kink averages two slopes; a
    # 1000× smaller step tells such a point from a wrong pullback (which fails both).
    v = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in leaves]
    directions = [_float_entries(p, d) for p, d in zip(primals, _with_leaves(primals, v), strict=True)]
    from_pullback = sum((_dot(d, c) for d, c in zip(directions, ours, strict=True)),
                        torch.zeros((), dtype=torch.float64))
    # The scale the two are compared at: Σ|v|·|Jᵀu|, the size of the terms the dot product adds. A sum that
    # cancels to nearly zero keeps the rounding error of its terms, so dividing by the sum alone would fail a
    # right pullback (it did, for softplus, at <v, Jᵀu> = -9.2e-5 from terms of order 1).
    magnitude = sum((_dot(_abs(d), _abs(c)) for d, c in zip(directions, ours, strict=True)),
                    torch.zeros((), dtype=torch.float64))
    for eps, fd_rtol in ((1e-6, 1e-6), (1e-9, 1e-4)):
        from_differences = _central_difference(apply_leaves, leaves, v, u, eps)
        scale = torch.maximum(from_differences.abs(), magnitude).clamp_min(1e-8)
        error = ((from_pullback - from_differences).abs() / scale).item()
        error = error if error == error else float("inf")  # NaN: the cotangents did not fit the primals
        if error <= fd_rtol:
            break
    retried = ", retried with a 1000× smaller step" if eps < 1e-6 else ""
    rows.append((f"<v, Jᵀu> vs finite differences (relative{retried})", error, fd_rtol, error <= fd_rtol))

    report = VjpReport(name=getattr(fn, "name", repr(fn)), rows=tuple(rows))
    if not report.ok:
        raise VjpMismatch(report)
    return report
