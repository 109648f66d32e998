"""The Loss record and the checks every loss shares: one form for all of them.

A loss is a :class:`Loss`: ``loss(pred, target)`` is its value, and ``loss(**options)`` (torch's keyword
arguments) is the same loss with those options, built afresh from torch's defaults; ``loss()`` is the loss
with torch's defaults. ``rf.mse_loss`` and ``rf.mse_loss()`` are the same loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from .layers import autocast_on

LossPullback = Callable[[Tensor], Tensor]

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # torch's Reduction::None, ::Mean, ::Sum


@attrs.frozen
class Loss:
    """A loss: two pure functions of ``(pred, target)``; ``loss(pred, target)`` is ``loss.apply``.

    Attributes:
        apply: ``(pred, target) -> value``, a 0-dim tensor (with ``reduction='none'``, one value per element or row).
        vjp: ``(pred, target) -> (value, pullback)`` with ``pullback(g) -> dpred``, ``g`` shaped like ``value``.
        name: how the loss prints and how error messages name it.
        options: the constructor, ``(**torch's keyword arguments) -> Loss``; ``loss(reduction='sum')`` calls it.
            ``None`` for a loss that takes no options (one written by hand).

    >>> import torch, rdl_functional as rf
    >>> rf.l1_loss(reduction="sum")(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 0.0]))
    tensor(3.)
    """

    apply: Callable[[Tensor, Tensor], Tensor]
    vjp: Callable[[Tensor, Tensor], tuple[Tensor, LossPullback]]
    name: str = "loss"
    options: Callable[..., Loss] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], Tensor) and not kwargs:
            if len(args) != 2:
                raise TypeError(f"{self.name}: a Loss is called as loss(pred, target), got {len(args)} arguments")
            return self.apply(*args)
        if any(isinstance(arg, Tensor) for arg in args):
            shown = ", ".join(f"{key}=..." for key in kwargs)
            raise TypeError(f"{self.name}: options go to the loss, the tensors to the loss it returns: "
                            f"{self.name}({shown})(pred, target), not {self.name}(pred, target, {shown})")
        if self.options is None:
            raise TypeError(f"{self.name}: a Loss is called as loss(pred, target), got {len(args)} arguments"
                            + (f" ({self.name} takes no options: pass it without calling it)" if not args else ""))
        return self.options(*args, **kwargs)

    def __repr__(self) -> str:
        return self.name


def check_loss(where: str, loss: object, expected: str = "loss must be a Loss") -> None:
    """Raise a ``TypeError`` unless ``loss`` is a :class:`Loss`: the one check of a loss argument.

    torch's plain function is told to use ours (which has a pullback).

    >>> import torch.nn.functional as F
    >>> check_loss("fit", F.l1_loss)
    Traceback (most recent call last):
    TypeError: fit: loss must be a Loss, got function torch.nn.functional.l1_loss (a plain function has no pullback: use rf.l1_loss)
    """  # noqa: E501
    if not isinstance(loss, Loss):
        raise TypeError(f"{where}: {expected}, got {type(loss).__name__}{_not_a_loss_hint(loss)}")


# torch's functions (and our names), and the Loss to use for each.
_OURS = {
    "mse_loss": "rf.mse_loss", "cross_entropy": "rf.cross_entropy_loss",
    "cross_entropy_loss": "rf.cross_entropy_loss", "l1_loss": "rf.l1_loss", "huber_loss": "rf.huber_loss",
    "nll_loss": "rf.nll_loss", "binary_cross_entropy_with_logits": "rf.bce_with_logits_loss",
    "bce_with_logits_loss": "rf.bce_with_logits_loss",
}


def _not_a_loss_hint(value: object) -> str:
    name = getattr(value, "__name__", None)
    if callable(value) and name in _OURS:
        module = getattr(value, "__module__", None) or "?"
        return f" {module}.{name} (a plain function has no pullback: use {_OURS[name]})"
    return ""


def reduction_code(where: str, reduction: object) -> int:
    """torch's code for ``reduction``, refused unless one of ``'none'``, ``'mean'``, ``'sum'``."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return REDUCTIONS[reduction]


def check_weight(where: str, name: str, weight: object, size: int | None = None) -> Tensor | None:
    """A class or element weight: ``None``, or a floating 1-d tensor (of ``size`` entries where given)."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating tensor, got {weight.dtype}")
    if size is not None and tuple(weight.shape) != (size,):
        raise ValueError(f"{where}: {name} must have shape ({size},), one entry per class, got {tuple(weight.shape)}")
    return weight


def check_pred(where: str, pred: object) -> Tensor:
    if not isinstance(pred, Tensor):
        raise TypeError(f"{where}: pred must be a torch.Tensor, got {type(pred).__name__}")
    if not pred.is_floating_point():
        raise TypeError(f"{where}: pred must be a floating tensor, got {pred.dtype}")
    return pred


def check_same_dtype(where: str, name: str, value: Tensor | None, pred: Tensor) -> None:
    """An option tensor (a weight) must have pred's dtype and device, as torch's kernels require."""
    if value is None:
        return
    if value.dtype != pred.dtype and not autocast_on(pred.device.type):
        raise TypeError(f"{where}: {name} is {value.dtype} but pred is {pred.dtype} (pass {name}.to({pred.dtype}))")
    if value.device != pred.device:
        raise ValueError(f"{where}: {name} is on {value.device} but pred is on {pred.device} "
                         f"(build the loss with {name}.to({str(pred.device)!r}))")


def cotangent(where: str, g: Tensor | float, value: Tensor) -> Tensor:
    """The cotangent of ``value``: a tensor of its shape and dtype, or a float (that value everywhere)."""
    if isinstance(g, (int, float)) and not isinstance(g, bool):
        return torch.full_like(value, g) if value.dim() else torch.tensor(g, dtype=value.dtype)
    if not isinstance(g, Tensor) or g.shape != value.shape:
        shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        expected = "a 0-dim tensor or a float" if value.dim() == 0 else f"of shape {tuple(value.shape)} (the loss's)"
        raise ValueError(f"{where}: the cotangent g must be {expected}, got {shape}")
    if g.dtype != value.dtype:
        raise TypeError(f"{where}: the cotangent g is {g.dtype} but the loss is {value.dtype}")
    return g


def check_like(where: str, pred: Tensor, target: Tensor) -> None:
    """A target of pred's own shape and dtype, as the elementwise losses need."""
    if (
        isinstance(pred, Tensor)
        and isinstance(target, Tensor)
        and pred.shape == target.shape
        and pred.dtype == target.dtype
        and pred.is_floating_point()
    ):
        return  # the happy path: a few comparisons, no message composed
    check_pred(where, pred)
    if not isinstance(target, Tensor):
        raise TypeError(f"{where}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != pred.shape:
        raise ValueError(f"{where}: target has shape {tuple(target.shape)} but pred has {tuple(pred.shape)}"
                         + _shape_hint(pred, target))
    if target.dtype != pred.dtype and not autocast_on(pred.device.type):
        # (under torch.autocast, dtypes differ on purpose, and the kernels follow autocast's rules)
        raise TypeError(f"{where}: target is {target.dtype} but pred is {pred.dtype}")


def _shape_hint(pred: Tensor, target: Tensor) -> str:
    """The likely fix for a target shaped unlike pred: a reshape where the two hold the same values (an ``(n,)``
    target for an ``(n, 1)`` pred, which would otherwise broadcast to ``(n, n)``), one-hot for class labels."""
    if target.numel() == pred.numel():
        if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
            return (f" (the same {target.numel()} values, one per row: pass target.unsqueeze(-1), that is "
                    "target[..., None], to give it pred's shape, or compare pred.squeeze(-1) with target)")
        if target.dim() == pred.dim() + 1 and target.shape[-1] == 1:
            return (f" (the same {target.numel()} values, one per row: pass target.squeeze(-1) to give it pred's "
                    "shape)")
        if target.squeeze().shape == pred.squeeze().shape:
            return f" (the same {target.numel()} values: pass target.reshape({tuple(pred.shape)}))"
    if pred.dim() == target.dim() + 1 and pred.shape[:-1] == target.shape and pred.shape[-1] > 1:
        return (f" (for class labels, compare with rf.one_hot(labels, {pred.shape[-1]}), or use "
                "rf.cross_entropy_loss on the labels)")
    return ""


def elementwise_loss(
    name: str,
    forward: Callable[[Tensor, Tensor], Tensor],
    backward: Callable[[Tensor, Tensor, Tensor], Tensor],
    options: Callable[..., Loss],
    check: Callable[[str, Tensor, Tensor], None] = check_like,
) -> Loss:
    """A loss of a target shaped like pred: ``value = forward(pred, target)``, ``dpred = backward(g, pred, target)``."""

    def apply(pred: Tensor, target: Tensor) -> Tensor:
        check(f"{name}.apply", pred, target)
        return forward(pred, target)

    def vjp(pred: Tensor, target: Tensor) -> tuple[Tensor, LossPullback]:
        check(f"{name}.vjp", pred, target)
        value = forward(pred, target)

        def pullback(g: Tensor) -> Tensor:
            return backward(cotangent(f"{name} pullback", g, value), pred, target)

        return value, pullback

    return Loss(apply=apply, vjp=vjp, name=name, options=options)


def options_name(loss: str, **options: Any) -> str:
    """``loss(reduction='sum')``: the options that differ from torch's defaults (passed as the non-default ones)."""
    shown = ", ".join(f"{key}={_short(value)}" for key, value in options.items())
    return f"{loss}({shown})" if shown else loss


def _short(value: object) -> str:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)
