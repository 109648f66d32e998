"""Losses: ``apply(pred, target) -> value`` and ``vjp(pred, target) -> (value, pullback)``.

``value`` is a 0-dim tensor and ``pullback(g) -> dpred`` takes the cotangent
of that scalar (``1.0`` to get the plain gradient), as ``torch.func.vjp`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch import Tensor

from .codegen import Code
from .data import one_hot

__all__ = ["Loss", "cross_entropy_loss", "mse_loss"]

LossPullback = Callable[[Tensor], Tensor]

_MEAN = 1  # torch's Reduction::Mean
_mse_loss = torch._C._nn.mse_loss
_mse_loss_backward = torch.ops.aten.mse_loss_backward.default


@attrs.frozen
class Loss:
    """A loss: two pure functions of ``(pred, target)``; ``loss(pred, target)`` is ``loss.apply``.

    Attributes:
        apply: ``(pred, target) -> value``, a 0-dim tensor.
        vjp: ``(pred, target) -> (value, pullback)`` with ``pullback(g) -> dpred``.
        name: how the loss prints and how error messages name it.
        code: the loss as lines of Python, as :class:`~rdl_functional.Layer`'s ``code``.
    """

    apply: Callable[[Tensor, Tensor], Tensor]
    vjp: Callable[[Tensor, Tensor], tuple[Tensor, LossPullback]]
    name: str = "loss"
    code: Code | None = attrs.field(default=None, repr=False)

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.apply(pred, target)

    def __repr__(self) -> str:
        return self.name


def _check_pred(where: str, pred: object) -> Tensor:
    if not isinstance(pred, Tensor):
        raise TypeError(f"{where}: pred must be a torch.Tensor, got {type(pred).__name__}")
    if not pred.is_floating_point():
        raise TypeError(f"{where}: pred must be a floating tensor, got {pred.dtype}")
    return pred


def _scalar_cotangent(where: str, g: Tensor | float, value: Tensor) -> Tensor:
    if isinstance(g, (int, float)) and not isinstance(g, bool):
        return torch.tensor(g, dtype=value.dtype)
    if not isinstance(g, Tensor) or g.dim() != 0:
        shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"{where}: the cotangent g must be a 0-dim tensor or a float, got {shape}")
    return g


# ---------------------------------------------------------------------------
# Mean squared error


def _check_mse(where: str, pred: Tensor, target: Tensor) -> None:
    if (
        isinstance(pred, Tensor)
        and isinstance(target, Tensor)
        and pred.shape == target.shape
        and pred.dtype == target.dtype
        and pred.is_floating_point()
    ):
        return  # the happy path: a few comparisons, no message composed
    _check_pred(where, pred)
    if not isinstance(target, Tensor):
        raise TypeError(f"{where}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != pred.shape:
        raise ValueError(
            f"{where}: target has shape {tuple(target.shape)} but pred has {tuple(pred.shape)} "
            "(for class labels, compare with rf.one_hot(labels, num_classes))"
        )
    if target.dtype != pred.dtype:
        raise TypeError(f"{where}: target is {target.dtype} but pred is {pred.dtype}")


def _mse_apply(pred: Tensor, target: Tensor) -> Tensor:
    _check_mse("mse_loss.apply", pred, target)
    return _mse_loss(pred, target, _MEAN)  # L = mean((pred − target)²)


def _mse_vjp(pred: Tensor, target: Tensor) -> tuple[Tensor, LossPullback]:
    _check_mse("mse_loss.vjp", pred, target)
    value = _mse_loss(pred, target, _MEAN)

    def pullback(g: Tensor) -> Tensor:
        g = _scalar_cotangent("mse_loss pullback", g, value)
        return _mse_loss_backward(g, pred, target, _MEAN)  # dpred = (2/N) (pred − target) g

    return value, pullback


mse_loss = Loss(
    apply=_mse_apply,
    vjp=_mse_vjp,
    name="mse_loss",
    code=Code(
        guard="isinstance({t}, _Tensor) and {t}.shape == {x}.shape and {t}.dtype == {x}.dtype",
        forward="{y} = _mse_loss({x}, {t}, 1)",
        pullback="{dx} = _mse_loss_backward({dy}, {x}, {t}, 1)",
        names={"_mse_loss": _mse_loss, "_mse_loss_backward": _mse_loss_backward},
    ),
)
"""Mean squared error over all elements, exactly ``torch.nn.functional.mse_loss``.

For ``(batch, 2)`` predictions this is the seed report's ``1/(2n) Σ‖y − a‖²``.
"""


# ---------------------------------------------------------------------------
# Cross-entropy on logits


def _check_cross_entropy(where: str, logits: Tensor, labels: Tensor) -> None:
    _check_pred(where, logits)
    if logits.dim() < 2:
        raise ValueError(f"{where}: logits must have shape (batch, classes), got {tuple(logits.shape)}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"{where}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{where}: labels must be int64 class indices, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{where}: labels must have shape {tuple(logits.shape[:-1])} to match the logits, got {tuple(labels.shape)}"
        )
    classes = logits.shape[-1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def _cross_entropy_apply(logits: Tensor, labels: Tensor) -> Tensor:
    _check_cross_entropy("cross_entropy_loss.apply", logits, labels)
    # L = −mean_i log softmax(zᵢ)[yᵢ]; log_softmax subtracts the row max, so large logits are safe.
    return -torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).mean()


def _cross_entropy_vjp(logits: Tensor, labels: Tensor) -> tuple[Tensor, LossPullback]:
    _check_cross_entropy("cross_entropy_loss.vjp", logits, labels)
    log_p = torch.log_softmax(logits, dim=-1)
    value = -log_p.gather(-1, labels.unsqueeze(-1)).mean()

    def pullback(g: Tensor) -> Tensor:
        g = _scalar_cotangent("cross_entropy_loss pullback", g, value)
        # dz = (softmax(z) − onehot(y)) g / batch
        target = one_hot(labels.reshape(-1), logits.shape[-1], dtype=logits.dtype).reshape(logits.shape)
        return (log_p.exp() - target) * (g / labels.numel())

    return value, pullback


cross_entropy_loss = Loss(apply=_cross_entropy_apply, vjp=_cross_entropy_vjp, name="cross_entropy_loss")
"""Softmax cross-entropy of logits ``(batch, classes)`` against int64 labels ``(batch,)``,
averaged over the batch: ``torch.nn.functional.cross_entropy``, equal to float rounding.
Logits may have leading dimensions, ``(..., batch, classes)`` as a stack of
models has; the mean is then over all of them.

Its pullback is the plain formula ``(softmax(z) − onehot(y)) g / batch`` rather
than torch's kernels, so unlike ``mse_loss`` it is not bit-identical to torch
in float32 (it agrees to ~1e-10 in float64)."""
