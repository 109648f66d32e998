"""Gradients of a loss through a model, from the hand-written pullbacks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .combinators import _pull
from .layers import Layer, Params
from .losses import Loss

__all__ = ["value_and_grad"]


def value_and_grad(model: Layer, loss: Loss) -> Callable[[Params, Tensor, Tensor], tuple[Tensor, Params]]:
    """Return ``fn(params, x, target) -> (loss_value, grads)``; grads mirror params.

    One forward pass through ``model.vjp`` and ``loss.vjp``, then the pullbacks
    in reverse from the seed cotangent 1: the gradient of
    ``loss(model(params, x), target)`` with respect to ``params``. Needs no
    autograd, so it runs under ``torch.inference_mode()`` too.

    >>> import rdl_functional as rf
    >>> model = rf.compose(rf.linear(2, 3), rf.tanh)
    >>> fn = rf.value_and_grad(model, rf.mse_loss)
    >>> value, grads = fn(model.init(0), torch.ones(4, 2), torch.zeros(4, 3))
    >>> value.shape, list(grads["0"])
    (torch.Size([]), ['weight', 'bias'])
    """
    if not isinstance(model, Layer):
        raise TypeError(f"value_and_grad: model must be a Layer, got {type(model).__name__}")
    if not isinstance(loss, Loss):
        raise TypeError(f"value_and_grad: loss must be a Loss, got {type(loss).__name__}")

    def value_and_grad_fn(params: Params, x: Tensor, target: Tensor) -> tuple[Tensor, Params]:
        pred, model_pullback = model.vjp(params, x)
        value, loss_pullback = loss.vjp(pred, target)
        grads, _ = _pull(model_pullback, loss_pullback(torch.ones_like(value)), need_dx=False)
        return value, grads

    return value_and_grad_fn
