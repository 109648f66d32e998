"""More parameterless layers: softmax, log_softmax, elu, gelu, silu, softplus, flatten.

Each runs the forward kernel ``torch.nn.functional`` runs and, in its
pullback, the backward kernel torch's autograd runs for it, so each equals
its torch twin and trains bit for bit like it. The formulas are beside the
code; ``docs/vjp.md`` derives the ones the seed model uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from .layers import Layer, Params, Pullback, _check_cotangent, _check_tensor, _elementwise, _no_params

__all__ = ["elu", "flatten", "gelu", "log_softmax", "silu", "softmax", "softplus"]

_aten = torch.ops.aten


def _number(where: str, name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{where}: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{where}: {name} must be > 0, got {value}")
    return float(value)


@attrs.frozen(repr=False)
class _OnDim(Layer):
    """A layer over one dimension that, called with ``dim=`` alone, is the factory of the layer on that dimension:
    ``rf.softmax`` is the layer on the last dimension, ``rf.softmax(dim=1)`` the layer on dimension 1."""

    make: Callable[..., Layer] | None = attrs.field(default=None, repr=False, eq=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args and self.make is not None and kwargs.keys() <= {"dim"}:
            return self.make(**kwargs)
        return super().__call__(*args, **kwargs)


def _on_dim(kind: str, forward: Callable[..., Tensor], backward: Callable[..., Tensor], dim: Any = -1) -> _OnDim:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{kind}: dim must be an int, got {dim!r}")
    name = kind if dim == -1 else f"{kind}(dim={dim})"

    def layer(d: int) -> Layer:
        def checked(x: Tensor) -> Tensor:
            dims = max(x.dim(), 1)  # a 0-dim x reads as one dimension, as torch reads it
            if not -dims <= d < dims:
                raise ValueError(f"{name}: dim={dim} is out of range for an input of shape {tuple(x.shape)}")
            return forward(x, d)

        return _elementwise(name, checked, lambda dy, y: backward(dy, y, d, y.dtype))

    plain = layer(dim)
    stacked = layer(dim + 1) if dim >= 0 else plain  # a stack of models: dimensions count after the model's
    return _OnDim(init=plain.init, apply=plain.apply, vjp=plain.vjp, name=name, stacked=stacked,
                  make=lambda dim=-1: _on_dim(kind, forward, backward, dim))


# Softmax over dimension ``dim`` (the last by default): yᵢ = e^{xᵢ} / Σⱼ e^{xⱼ}; dx = y ⊙ (dy − Σ(dy ⊙ y)).
# ``rf.softmax`` is the layer on the last dimension; ``rf.softmax(dim=1)`` the layer on dimension 1.
softmax = _on_dim("softmax", torch.softmax, _aten._softmax_backward_data)

# log softmax over ``dim`` (the last by default): y = x − log Σ e^{x}; dx = dy − e^{y} Σ dy.
log_softmax = _on_dim("log_softmax", torch.log_softmax, _aten._log_softmax_backward_data)

# SiLU (swish): y = x σ(x); dx = dy σ(x) (1 + x (1 − σ(x))).
silu = _elementwise("silu", _aten.silu.default, _aten.silu_backward.default, keeps="x")


def elu(alpha: float = 1.0) -> Layer:
    """ELU: ``y = x`` for ``x > 0``, else ``alpha (eˣ − 1)``; ``dx = dy`` or ``dy · alpha eˣ``.

    >>> import torch
    >>> elu(1.0)({}, torch.tensor([[-1.0, 2.0]]))
    tensor([[-0.6321,  2.0000]])
    """
    alpha = _number("elu", "alpha", alpha)
    return _elementwise(
        f"elu({alpha!r})",
        lambda x: _aten.elu(x, alpha),
        lambda dy, x: _aten.elu_backward(dy, alpha, 1, 1, False, x),
        keeps="x",
    )


def gelu(approximate: str = "none") -> Layer:
    """GELU: ``y = x Φ(x)`` (``approximate="tanh"``: its tanh approximation), torch's kernels both ways.

    >>> import torch
    >>> gelu()({}, torch.tensor([[1.0]]))
    tensor([[0.8413]])
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _elementwise(
        "gelu" if approximate == "none" else "gelu(approximate='tanh')",
        lambda x: _aten.gelu(x, approximate=approximate),
        lambda dy, x: _aten.gelu_backward(dy, x, approximate=approximate),
        keeps="x",
    )


def softplus(beta: float = 1.0, threshold: float = 20.0) -> Layer:
    """Softplus: ``y = log(1 + e^{βx}) / β``, linear (``y = x``) where ``βx > threshold``; ``dx = dy σ(βx)``.

    >>> import torch
    >>> softplus()({}, torch.tensor([[0.0]]))
    tensor([[0.6931]])
    """
    beta = _number("softplus", "beta", beta, positive=True)
    threshold = _number("softplus", "threshold", threshold)
    return _elementwise(
        f"softplus(beta={beta!r}, threshold={threshold!r})",
        lambda x: _aten.softplus(x, beta, threshold),
        lambda dy, x: _aten.softplus_backward(dy, x, beta, threshold),
        keeps="x",
    )


def flatten(start_dim: int = 1, end_dim: int = -1) -> Layer:
    """Join dimensions ``start_dim..end_dim`` of the input into one, as ``torch.nn.Flatten``; ``dx`` is ``dy``
    in ``x``'s shape. For a stack of models (:func:`~rdl_functional.stacked`) the dimensions count from after
    the model dimension.

    >>> import torch
    >>> flatten()({}, torch.zeros(4, 2, 3)).shape
    torch.Size([4, 6])
    """
    for name, value in (("start_dim", start_dim), ("end_dim", end_dim)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"flatten: {name} must be an int, got {value!r}")

    def build(shift: int) -> Layer:
        name = f"flatten({start_dim}, {end_dim})"
        first = start_dim + shift if start_dim >= 0 else start_dim
        last = end_dim + shift if end_dim >= 0 else end_dim

        def check(where: str, params: Params, x: Any) -> None:
            if params:
                raise ValueError(f"{name}.{where}: {name} has no parameters, so params must be {{}}, got keys "
                                 f"{sorted(params)} (are the params of another layer misplaced?)")
            _check_tensor(f"{name}.{where}", "x", x)
            dims = x.dim()
            if not (-dims <= first < dims and -dims <= last < dims and first % dims <= last % dims):
                raise ValueError(f"{name}.{where}: cannot join dimensions {start_dim}..{end_dim} of an input of "
                                 f"shape {tuple(x.shape)}")

        def apply(params: Params, x: Tensor) -> Tensor:
            check("apply", params, x)
            return x.flatten(first, last).clone()  # a new tensor, as every layer returns

        def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
            check("vjp", params, x)
            y = x.flatten(first, last).clone()
            shape, in_shape, dtype = y.shape, x.shape, y.dtype

            def pullback(dy: Tensor) -> tuple[Params, Tensor]:
                _check_cotangent(name, dy, shape, dtype)
                return {}, dy.reshape(in_shape).clone()  # dx = dy, unflattened

            return y, pullback

        return Layer(init=_no_params, apply=apply, vjp=vjp, name=name)

    return attrs.evolve(build(0), stacked=build(1))
