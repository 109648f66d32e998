"""Losses: ``apply(pred, target) -> value`` and ``vjp(pred, target) -> (value, pullback)``.

``value`` is a 0-dim tensor and ``pullback(g) -> dpred`` takes the cotangent
of that scalar (``1.0`` to get the plain gradient), as ``torch.func.vjp`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch import Tensor

from .layers import autocast_on
from .trace import reads_values

_aten = torch.ops.aten

__all__ = [
    "Loss",
    "bce_with_logits_loss",
    "cross_entropy_loss",
    "huber_loss",
    "l1_loss",
    "mse_loss",
    "nll_loss",
]

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
    """

    apply: Callable[[Tensor, Tensor], Tensor]
    vjp: Callable[[Tensor, Tensor], tuple[Tensor, LossPullback]]
    name: str = "loss"

    def __call__(self, *args: Tensor) -> Tensor:
        if len(args) != 2:
            raise TypeError(f"{self.name}: a Loss is called as loss(pred, target), got {len(args)} arguments"
                            + (f" ({self.name} is a Loss already, not a factory: pass it without calling it)"
                               if not args else ""))
        return self.apply(*args)

    def __repr__(self) -> str:
        return self.name


def check_loss(where: str, loss: object, expected: str = "loss must be a Loss") -> None:
    """Raise a ``TypeError`` unless ``loss`` is a :class:`Loss`: the one check of a loss argument.

    A loss factory passed uncalled (``rf.l1_loss`` for ``rf.l1_loss()``) is
    told to call it, and torch's plain function to use ours (which has a pullback).

    >>> check_loss("fit", l1_loss)
    Traceback (most recent call last):
    TypeError: fit: loss must be a Loss, got function rf.l1_loss: rf.l1_loss is a factory: call it, rf.l1_loss()
    """
    if not isinstance(loss, Loss):
        raise TypeError(f"{where}: {expected}, got {type(loss).__name__}{_not_a_loss_hint(loss)}")


def _not_a_loss_hint(value: object) -> str:
    name = getattr(value, "__name__", None)
    if any(value is factory for factory in _FACTORIES):
        return f" rf.{name}: rf.{name} is a factory: call it, rf.{name}()"
    if callable(value) and name in _OURS:
        module = getattr(value, "__module__", None) or "?"
        return f" {module}.{name} (a plain function has no pullback: use {_OURS[name]})"
    return ""


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
    if g.dtype != value.dtype:
        raise TypeError(f"{where}: the cotangent g is {g.dtype} but the loss is {value.dtype}")
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
)
"""Mean squared error over all elements, exactly ``torch.nn.functional.mse_loss``.

For ``(batch, 2)`` predictions this is the seed report's ``1/(2n) Σ‖y − a‖²``.
"""


# ---------------------------------------------------------------------------
# Cross-entropy on logits


def _check_cross_entropy(where: str, logits: Tensor, labels: Tensor, ignore_index: int | None = None) -> None:
    _check_pred(where, logits)
    if logits.dim() < 1:
        raise ValueError(f"{where}: logits must have shape (..., classes), got {tuple(logits.shape)}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"{where}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{where}: labels must be int64 class indices, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{where}: labels must have shape {tuple(logits.shape[:-1])} to match the logits, got {tuple(labels.shape)}"
        )
    classes = logits.shape[-1]
    # Read where a read is free and allowed (reads_values); elsewhere torch's kernel refuses a label out of range.
    if not reads_values(labels) or not labels.numel():
        return
    kept = labels if ignore_index is None else labels[labels != ignore_index]
    if kept.numel() and (kept.min() < 0 or kept.max() >= classes):
        ignored = "" if ignore_index in (None, -100) else f" (or be ignore_index={ignore_index})"  # -100: the default
        raise ValueError(
            f"{where}: labels must lie in [0, {classes}){ignored}, got values in "
            f"[{int(kept.min())}, {int(kept.max())}]"
        )


# The ignore_index passed to torch's nll kernels: one no label can take. torch's default, -100, would make a
# replayed record skip a label of -100 (a replay skips the range check above); with this one
# the kernel refuses it as out of range, and the step falls back to the checked path and its message. Where no
# label is ignored the kernels' bits do not depend on it.
_NO_IGNORE = torch.iinfo(torch.int64).min


def _cross_entropy_forward(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(value, log_p, flat_labels, total_weight)``: F.cross_entropy's kernels on the rows ``(-1, classes)``."""
    log_p = _aten._log_softmax.default(logits.reshape(-1, logits.shape[-1]), 1, False)
    flat_labels = labels.reshape(-1)
    value, total_weight = _aten.nll_loss_forward.default(log_p, flat_labels, None, 1, _NO_IGNORE)  # 1: the mean
    return value, log_p, flat_labels, total_weight


def _cross_entropy_apply(logits: Tensor, labels: Tensor) -> Tensor:
    _check_cross_entropy("cross_entropy_loss.apply", logits, labels)
    # L = −mean_i log softmax(zᵢ)[yᵢ]; log_softmax subtracts the row max, so large logits are safe.
    return _cross_entropy_forward(logits, labels)[0]


def _cross_entropy_vjp(logits: Tensor, labels: Tensor) -> tuple[Tensor, LossPullback]:
    _check_cross_entropy("cross_entropy_loss.vjp", logits, labels)
    value, log_p, flat_labels, total_weight = _cross_entropy_forward(logits, labels)
    shape = logits.shape

    def pullback(g: Tensor) -> Tensor:
        g = _scalar_cotangent("cross_entropy_loss pullback", g, value)
        # dz = (softmax(z) − onehot(y)) g / rows: nll_loss_backward puts −g/rows at each label, and
        # _log_softmax_backward_data maps d(log p) to dz = d − softmax(z) Σ d: the kernels F.cross_entropy's
        # autograd runs, so the bits are torch's.
        d_log_p = _aten.nll_loss_backward.default(g, log_p, flat_labels, None, 1, _NO_IGNORE, total_weight)
        return _aten._log_softmax_backward_data.default(d_log_p, log_p, 1, log_p.dtype).view(shape)

    return value, pullback


cross_entropy_loss = Loss(apply=_cross_entropy_apply, vjp=_cross_entropy_vjp, name="cross_entropy_loss")
"""Softmax cross-entropy of logits ``(batch, classes)`` against int64 labels ``(batch,)``,
averaged over the batch: ``torch.nn.functional.cross_entropy``, equal to float rounding.
Logits may have leading dimensions, ``(..., batch, classes)`` as a stack of
models has; the mean is then over all of them.

Its forward and backward run ``F.cross_entropy``'s kernels on the rows
``(-1, classes)`` (``_log_softmax``, ``nll_loss_forward``, and backward
``nll_loss_backward``, ``_log_softmax_backward_data``): the pullback is
``(softmax(z) − onehot(y)) g / rows``, and the bits are torch's in float32."""


# ---------------------------------------------------------------------------
# Losses with a reduction: built by a constructor, as torch.nn.functional's are called.

_REDUCTIONS = {"mean": 1, "sum": 2}  # torch's Reduction::Mean and ::Sum


def _reduction(where: str, reduction: str) -> int:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: reduction must be 'mean' or 'sum', got {reduction!r}")
    return _REDUCTIONS[reduction]


def _check_like(where: str, pred: Tensor, target: Tensor) -> None:
    """A target of pred's own shape and dtype, as the elementwise losses need."""
    if isinstance(pred, Tensor) and isinstance(target, Tensor) and pred.shape == target.shape and (
        pred.dtype == target.dtype and pred.is_floating_point()
    ):
        return
    _check_mse(where, pred, target)


def _elementwise_loss(
    name: str,
    forward: Callable[[Tensor, Tensor], Tensor],
    backward: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
) -> Loss:
    """A loss of a target shaped like pred: ``value = forward(pred, target)``,
    ``dpred = backward(g, pred, target, value)``."""

    def apply(pred: Tensor, target: Tensor) -> Tensor:
        _check_like(f"{name}.apply", pred, target)
        return forward(pred, target)

    def vjp(pred: Tensor, target: Tensor) -> tuple[Tensor, LossPullback]:
        _check_like(f"{name}.vjp", pred, target)
        value = forward(pred, target)

        def pullback(g: Tensor) -> Tensor:
            return backward(_scalar_cotangent(f"{name} pullback", g, value), pred, target, value)

        return value, pullback

    return Loss(apply=apply, vjp=vjp, name=name)


def huber_loss(delta: float = 1.0, reduction: str = "mean") -> Loss:
    """Huber loss: ``½ r²`` where ``|r| ≤ delta``, else ``delta (|r| − ½ delta)``, ``r = pred − target``;
    ``torch.nn.functional.huber_loss``, its kernels both ways.

    >>> import torch
    >>> huber_loss()(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]))
    tensor(1.3125)
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < float("inf"):
        raise ValueError(f"huber_loss: delta must be a finite number > 0, got {delta!r}")
    mode, delta = _reduction("huber_loss", reduction), float(delta)
    return _elementwise_loss(
        f"huber_loss(delta={delta!r}, reduction={reduction!r})",
        lambda pred, target: torch.ops.aten.huber_loss(pred, target, mode, delta),
        lambda g, pred, target, value: torch.ops.aten.huber_loss_backward(g, pred, target, mode, delta),
    )


def l1_loss(reduction: str = "mean") -> Loss:
    """Mean (or sum) absolute error, ``torch.nn.functional.l1_loss``; ``dpred = sgn(pred − target) g`` (/ N).

    >>> import torch
    >>> l1_loss()(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 0.0]))
    tensor(1.5000)
    """
    mode = _reduction("l1_loss", reduction)

    def backward(g: Tensor, pred: Tensor, target: Tensor, value: Tensor) -> Tensor:
        dpred = (pred - target).sgn() * g  # torch's l1_loss backward: sgn(pred − target) · g
        return dpred / pred.numel() if mode == 1 else dpred

    return _elementwise_loss(
        f"l1_loss(reduction={reduction!r})",
        lambda pred, target: torch.ops.aten.l1_loss(pred, target, mode),
        backward,
    )


def bce_with_logits_loss(reduction: str = "mean") -> Loss:
    """Binary cross-entropy on logits against targets in [0, 1], as
    ``torch.nn.functional.binary_cross_entropy_with_logits`` (stable for large logits);
    ``dpred = (σ(pred) − target) g`` (/ N).

    >>> import torch
    >>> bce_with_logits_loss()(torch.tensor([0.0]), torch.tensor([1.0]))
    tensor(0.6931)
    """
    mode = _reduction("bce_with_logits_loss", reduction)

    def backward(g: Tensor, pred: Tensor, target: Tensor, value: Tensor) -> Tensor:
        dpred = (torch.sigmoid(pred) - target) * g
        return dpred / pred.numel() if mode == 1 else dpred

    return _elementwise_loss(
        f"bce_with_logits_loss(reduction={reduction!r})",
        lambda pred, target: torch.ops.aten.binary_cross_entropy_with_logits(pred, target, None, None, mode),
        backward,
    )


def nll_loss(reduction: str = "mean", ignore_index: int = -100) -> Loss:
    """Negative log-likelihood of log-probabilities ``(..., classes)`` (from :data:`log_softmax`) at int64
    labels ``(...)``: ``torch.nn.functional.nll_loss``, its kernels both ways. Any leading dimensions (none:
    one example) are flattened into one batch: the mean is over all of them.

    A label equal to ``ignore_index`` (torch's argument and default) adds nothing and its row gets no gradient;
    the mean is over the other labels. ``log_softmax`` then ``nll_loss(ignore_index=-1)`` is
    ``F.cross_entropy(..., ignore_index=-1)``, bit for bit: a loss on some positions of a sequence only.

    >>> import torch
    >>> nll_loss()(torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]])), torch.tensor([0, 0]))
    tensor(0.3993)
    >>> nll_loss(ignore_index=-1)(torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]])), torch.tensor([-1, 0]))
    tensor(0.1054)
    """
    mode = _reduction("nll_loss", reduction)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"nll_loss: ignore_index must be an int (a label to leave out), got {ignore_index!r}")
    name = f"nll_loss(reduction={reduction!r})" if ignore_index == -100 else \
        f"nll_loss(reduction={reduction!r}, ignore_index={ignore_index})"

    def check(where: str, pred: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The kernels' layout: ``(batch, classes)`` and ``(batch,)``, or one example's ``(classes,)`` and ``()``."""
        _check_cross_entropy(where, pred, labels, ignore_index)
        if pred.dim() > 2:
            return pred.reshape(-1, pred.shape[-1]), labels.reshape(-1)
        return pred, labels

    def apply(pred: Tensor, labels: Tensor) -> Tensor:
        flat, flat_labels = check(f"{name}.apply", pred, labels)
        return torch.ops.aten.nll_loss_forward(flat, flat_labels, None, mode, ignore_index)[0]

    def vjp(pred: Tensor, labels: Tensor) -> tuple[Tensor, LossPullback]:
        flat, flat_labels = check(f"{name}.vjp", pred, labels)
        value, total_weight = torch.ops.aten.nll_loss_forward(flat, flat_labels, None, mode, ignore_index)

        def pullback(g: Tensor) -> Tensor:
            g = _scalar_cotangent(f"{name} pullback", g, value)
            # dpred[i, yᵢ] = −g / (labels kept) for the mean (−g for the sum), 0 elsewhere and on ignored rows
            dflat = torch.ops.aten.nll_loss_backward(g, flat, flat_labels, None, mode, ignore_index, total_weight)
            return dflat.reshape(pred.shape)

        return value, pullback

    return Loss(apply=apply, vjp=vjp, name=name)


# The factories, which a loss argument gets uncalled by mistake; torch's functions and the Loss to use for each.
_FACTORIES = (huber_loss, l1_loss, bce_with_logits_loss, nll_loss)
_OURS = {
    "mse_loss": "rf.mse_loss", "cross_entropy": "rf.cross_entropy_loss",
    "cross_entropy_loss": "rf.cross_entropy_loss", "l1_loss": "rf.l1_loss()", "huber_loss": "rf.huber_loss()",
    "nll_loss": "rf.nll_loss()", "binary_cross_entropy_with_logits": "rf.bce_with_logits_loss()",
    "bce_with_logits_loss": "rf.bce_with_logits_loss()",
}
