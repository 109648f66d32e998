"""Losses: ``apply(pred, target) -> value`` and ``vjp(pred, target) -> (value, pullback)``.

One form for every loss: ``rf.X_loss`` is the loss with torch's defaults, and ``rf.X_loss(**options)``, with
the keyword arguments of ``torch.nn.functional``'s twin, is the loss with those options (built from torch's
defaults each time; ``rf.X_loss()`` is ``rf.X_loss``). ``reduction`` is ``'mean'`` (a 0-dim ``value``),
``'sum'``, or ``'none'`` (one value per element, or per row for the class losses); ``pullback(g) -> dpred``
takes the cotangent of ``value``, of its shape (a float: that value everywhere; ``1.0`` gives the plain
gradient), as ``torch.func.vjp`` does. Each loss runs the aten kernels that ``F.<loss>`` and its autograd run,
in the same order, so its value and gradient are torch's bit for bit in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._class_losses import _cross_entropy_loss, _nll_loss
from ._loss_core import (
    Loss,
    check_like,
    check_loss,
    check_same_dtype,
    check_weight,
    elementwise_loss,
    options_name,
    reduction_code,
)

_aten = torch.ops.aten

__all__ = [
    "Loss",
    "bce_with_logits_loss",
    "check_loss",
    "cross_entropy_loss",
    "huber_loss",
    "l1_loss",
    "mse_loss",
    "nll_loss",
]

_mse_loss = torch._C._nn.mse_loss
_mse_loss_backward = _aten.mse_loss_backward.default


def _weighted(name: str, weight: Tensor, mode: int, by_weight: bool,
              elementwise: Callable[[Tensor, Tensor], Tensor],
              derivative: Callable[[Tensor, Tensor, Tensor], Tensor],
              options: Callable[..., Loss]) -> Loss:
    """F's elementwise losses with a ``weight`` of pred's shape, as their Python code and autograd run them:
    ``ℓ = e(pred, target) ⊙ w``, reduced by ``Σ ℓ / Σ w`` (mse, l1: ``by_weight``) or ``mean ℓ`` (huber) for the
    mean; the pullback spreads ``g`` back through the reduction, multiplies by ``w``, then by ``∂e/∂pred``."""

    def check(at: str, pred: Tensor, target: Tensor) -> None:
        check_like(at, pred, target)
        check_same_dtype(at, "weight", weight, pred)
        if weight.shape != pred.shape:
            raise ValueError(f"{at}: weight must have pred's shape {tuple(pred.shape)} (one weight per element, as "
                             f"torch requires), got {tuple(weight.shape)}")

    def forward(pred: Tensor, target: Tensor) -> Tensor:
        weighted = elementwise(pred, target) * weight
        if mode == 1:
            return weighted.sum() / weight.sum() if by_weight else weighted.mean()
        return weighted.sum() if mode == 2 else weighted

    def backward(g: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        if mode == 1:
            g = (g / weight.sum()).expand(pred.shape) if by_weight else g.expand(pred.shape) / pred.numel()
        elif mode == 2:
            g = g.expand(pred.shape)
        return derivative(g * weight, pred, target)

    return elementwise_loss(name, forward, backward, options, check)


def _mse(reduction: str = "mean", *, weight: Tensor | None = None) -> Loss:
    mode, weight = reduction_code("mse_loss", reduction), check_weight("mse_loss", "weight", weight)
    name = options_name("mse_loss", **({} if reduction == "mean" else {"reduction": reduction}),
                        **({} if weight is None else {"weight": weight}))
    if weight is not None:  # ℓ = (pred − target)² w; ∂e/∂pred = 2 (pred − target), as autograd's pow backward
        return _weighted(name, weight, mode, True, lambda pred, target: torch.pow(pred - target, 2),
                         lambda d, pred, target: d * (torch.pow(pred - target, 1.0) * 2.0), _mse)
    return elementwise_loss(
        name,
        lambda pred, target: _mse_loss(pred, target, mode),  # L = mean((pred − target)²)
        lambda g, pred, target: _mse_loss_backward(g, pred, target, mode),  # dpred = (2/N) (pred − target) g
        _mse,
    )


mse_loss = _mse()
"""Mean squared error over all elements, exactly ``torch.nn.functional.mse_loss``; options: ``reduction``,
``weight`` (one per element, of pred's shape, as torch requires; the mean is then ``Σ w (pred − target)² / Σ w``).

For ``(batch, 2)`` predictions this is the seed report's ``1/(2n) Σ‖y − a‖²``.

>>> import torch
>>> mse_loss(reduction="none")(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 0.0]))
tensor([1., 4.])
"""


def _huber(delta: float = 1.0, reduction: str = "mean", *, weight: Tensor | None = None) -> Loss:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < float("inf"):
        raise ValueError(f"huber_loss: delta must be a finite number > 0, got {delta!r}")
    mode, delta = reduction_code("huber_loss", reduction), float(delta)
    shown = {key: value for key, value, default in [("delta", delta, 1.0), ("reduction", reduction, "mean")]
             if value != default}
    weight = check_weight("huber_loss", "weight", weight)
    name = options_name("huber_loss", **shown, **({} if weight is None else {"weight": weight}))
    if weight is not None:  # ℓ = huber(pred − target) w: the unreduced kernels, then F.huber_loss's reduction
        return _weighted(name, weight, mode, False, lambda pred, target: _aten.huber_loss(pred, target, 0, delta),
                         lambda d, pred, target: _aten.huber_loss_backward(d, pred, target, 0, delta), _huber)
    return elementwise_loss(
        name,
        lambda pred, target: _aten.huber_loss(pred, target, mode, delta),
        lambda g, pred, target: _aten.huber_loss_backward(g, pred, target, mode, delta),
        _huber,
    )


huber_loss = _huber()
"""Huber loss: ``½ r²`` where ``|r| ≤ delta``, else ``delta (|r| − ½ delta)``, ``r = pred − target``;
``torch.nn.functional.huber_loss``, its kernels both ways. Options: ``delta`` (> 0), ``reduction``, ``weight``
(one per element, of pred's shape, as torch requires: the mean is then ``mean(w ⊙ huber)``).

>>> import torch
>>> huber_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]))
tensor(1.3125)
>>> huber_loss(delta=0.5, reduction="sum")(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]))
tensor(1.5000)
"""


def _l1(reduction: str = "mean", *, weight: Tensor | None = None) -> Loss:
    mode, weight = reduction_code("l1_loss", reduction), check_weight("l1_loss", "weight", weight)
    name = options_name("l1_loss", **({} if reduction == "mean" else {"reduction": reduction}),
                        **({} if weight is None else {"weight": weight}))
    if weight is not None:  # ℓ = |pred − target| w; ∂e/∂pred = sgn(pred − target)
        return _weighted(name, weight, mode, True, lambda pred, target: torch.abs(pred - target),
                         lambda d, pred, target: d * (pred - target).sgn(), _l1)

    def forward(pred: Tensor, target: Tensor) -> Tensor:
        return _aten.l1_loss(pred, target, mode)  # L = mean |pred − target| (sub, abs, mean: F.l1_loss's ops)

    def backward(g: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        # dpred = g / N · sgn(pred − target): autograd's order (expand, divide, then the sign)
        sign = (pred - target).sgn()
        if mode == 0:
            return g * sign
        spread = g.expand(pred.shape)
        return (spread / pred.numel() if mode == 1 else spread) * sign

    return elementwise_loss(name, forward, backward, _l1)


l1_loss = _l1()
"""Mean (or sum) absolute error, ``torch.nn.functional.l1_loss``; ``dpred = sgn(pred − target) g`` (/ N).
Options: ``reduction``, ``weight`` (one per element, of pred's shape, as torch requires; the mean is then
``Σ w |pred − target| / Σ w``).

>>> import torch
>>> l1_loss(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 0.0]))
tensor(1.5000)
"""


def _bce(reduction: str = "mean", *, weight: Tensor | None = None, pos_weight: Tensor | None = None) -> Loss:
    where = "bce_with_logits_loss"
    mode = reduction_code(where, reduction)
    weight, pos_weight = check_weight(where, "weight", weight), check_weight(where, "pos_weight", pos_weight)
    shown = {"reduction": reduction} if reduction != "mean" else {}
    name = options_name(where, **shown, **{k: v for k, v in [("weight", weight), ("pos_weight", pos_weight)]
                                          if v is not None})

    def check(at: str, pred: Tensor, target: Tensor) -> None:
        check_like(at, pred, target)
        for label, option in (("weight", weight), ("pos_weight", pos_weight)):
            if option is None:
                continue
            check_same_dtype(at, label, option, pred)
            try:
                fits = torch.broadcast_shapes(option.shape, pred.shape) == pred.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"{at}: {label} of shape {tuple(option.shape)} must broadcast to pred's "
                                 f"{tuple(pred.shape)}")

    def backward(g: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        # dpred = ((1 + (p_w − 1) t) σ(x) − p_w t) g w / N; without pos_weight (σ(x) − t) g w / N: autograd's ops
        if pos_weight is None:
            dpred = (torch.sigmoid(pred) - target) * g
        else:
            weighted = pos_weight * target
            dpred = ((weighted + 1 - target) * torch.sigmoid(pred) - weighted) * g
        if weight is not None:
            dpred = dpred * weight
        return dpred / pred.numel() if mode == 1 else dpred

    return elementwise_loss(
        name,
        lambda pred, target: _aten.binary_cross_entropy_with_logits(pred, target, weight, pos_weight, mode),
        backward, _bce, check,
    )


bce_with_logits_loss = _bce()
"""Binary cross-entropy on logits against targets in [0, 1], as
``torch.nn.functional.binary_cross_entropy_with_logits`` (stable for large logits);
``dpred = (σ(pred) − target) g`` (/ N). Options: ``reduction``, ``weight`` (broadcast to pred, each element's
weight), ``pos_weight`` (broadcast to pred, usually one per class in the last dimension: the positives' weight).

>>> import torch
>>> bce_with_logits_loss(torch.tensor([0.0]), torch.tensor([1.0]))
tensor(0.6931)
>>> bce_with_logits_loss(pos_weight=torch.tensor([3.0]))(torch.tensor([0.0]), torch.tensor([1.0]))
tensor(2.0794)
"""

nll_loss = _nll_loss()
"""Negative log-likelihood of log-probabilities ``(..., classes)`` (from :data:`log_softmax`) at int64
labels ``(...)``: ``torch.nn.functional.nll_loss``, its kernels both ways. Any leading dimensions (none:
one example) are flattened into one batch: the mean is over all of them. Options: ``reduction``
(``'none'``: one value per label, shaped like the labels), ``ignore_index``, ``weight`` (one per class).

A label equal to ``ignore_index`` (torch's argument and default, -100) adds nothing and its row gets no gradient;
the mean is over the other labels (weighted: divided by their weights' sum). ``log_softmax`` then
``nll_loss(ignore_index=-1)`` is ``F.cross_entropy(..., ignore_index=-1)``, bit for bit.

>>> import torch
>>> nll_loss(torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]])), torch.tensor([0, 0]))
tensor(0.3993)
>>> nll_loss(ignore_index=-1)(torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]])), torch.tensor([-1, 0]))
tensor(0.1054)
"""

cross_entropy_loss = _cross_entropy_loss()
"""Softmax cross-entropy of logits ``(..., classes)`` against int64 labels ``(...)`` or class probabilities
of the logits' shape: ``torch.nn.functional.cross_entropy`` with the classes in the last dimension, bit for bit
in float32, value and gradient. Leading dimensions are flattened into rows ``(-1, classes)``; the mean is over
all of them. Options, torch's: ``weight`` (one per class), ``ignore_index`` (-100; labels only),
``reduction`` (``'none'``: one value per row, shaped like the labels), ``label_smoothing`` in [0, 1].

It runs ``F.cross_entropy``'s kernels (``_log_softmax``, ``nll_loss_forward``, and backward
``nll_loss_backward``, ``_log_softmax_backward_data``; label smoothing and probability targets as torch's
composite runs them): the pullback is ``(softmax(z) − onehot(y)) g / rows`` without options.

>>> import torch
>>> cross_entropy_loss(torch.zeros(2, 3), torch.tensor([0, 2]))
tensor(1.0986)
>>> cross_entropy_loss(label_smoothing=0.1, reduction="none")(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
tensor([0.2269])
"""
