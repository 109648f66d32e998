"""The straight-line floor: the seed model's training step written out by hand as aten ops.

No library, no autograd, no checks, no trees, no closures: forward,
backward and update as the kernels torch.nn + autograd + torch.optim
(foreach) run for the 2-25-25-25-2 ReLU/Tanh MLP with the MSE loss, and no
more. What is left of a step once all the Python a library adds is gone,
and so the bar for any eager step. The params are copied once and then
updated in place; the batches are the ones every other side draws
(``torch.randperm`` from a generator seeded with ``seed``, split in
``batch_size``).
"""

from __future__ import annotations

import torch

_aten = torch.ops.aten
_linear = torch._C._nn.linear
_mse, _mse_back = _aten.mse_loss.default, _aten.mse_loss_backward.default
_KEYS = ("0", "2", "4", "6")


def _leaves(params) -> list[torch.Tensor]:
    """[w0, b0, w1, b1, w2, b2, w3, b3], cloned: the floor updates them in place."""
    return [params[k][name].clone() for k in _KEYS for name in ("weight", "bias")]


def _grads(leaves: list[torch.Tensor], a0: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """The seed step's gradients, in the order of ``leaves``: the kernels autograd runs for torch.nn's model."""
    w0, b0, w1, b1, w2, b2, w3, b3 = leaves
    h1 = torch.relu(_linear(a0, w0, b0))
    h2 = torch.relu(_linear(h1, w1, b1))
    h3 = torch.relu(_linear(h2, w2, b2))
    y = torch.tanh(_linear(h3, w3, b3))
    value = _mse(y, t, 1)
    dz = _aten.tanh_backward(_mse_back(torch.ones_like(value), y, t, 1), y)  # dz = dL/dy · (1 − y²)
    g3w, g3b, dh = dz.t().mm(h3), dz.sum(0), dz.mm(w3)  # dW = dzᵀ h, db = Σ_batch dz, dh = dz W
    dz = _aten.threshold_backward(dh, h3, 0)
    g2w, g2b, dh = dz.t().mm(h2), dz.sum(0), dz.mm(w2)
    dz = _aten.threshold_backward(dh, h2, 0)
    g1w, g1b, dh = dz.t().mm(h1), dz.sum(0), dz.mm(w1)
    dz = _aten.threshold_backward(dh, h1, 0)
    return [dz.t().mm(a0), dz.sum(0), g1w, g1b, g2w, g2b, g3w, g3b]


def floor_sgd(params, x: torch.Tensor, target: torch.Tensor, epochs: int, batch_size: int, lr: float,
              seed: int) -> list[torch.Tensor]:
    """SGD on the seed model as straight-line code; returns the leaves ``[w0, b0, ..., w3, b3]``.

    ``params`` is the seed model's tree (keys "0", "2", "4", "6"), ``x`` is
    ``(n, 2)``, ``target`` is ``(n, 2)``. The update is torch.optim.SGD's
    foreach kernel, ``p ← p − lr·g``, one ``_foreach_add_`` over all leaves.
    """
    leaves = _leaves(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
            torch._foreach_add_(leaves, _grads(leaves, x[rows], target[rows]), alpha=-lr)
    return leaves


def floor_adam(params, x: torch.Tensor, target: torch.Tensor, epochs: int, batch_size: int, lr: float,
               seed: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> list[torch.Tensor]:
    """Adam on the seed model as straight-line code: torch.optim.Adam(foreach=True)'s kernels, in its order.

    ::

        m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
        p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

    The step count is a Python int (torch.optim keeps a tensor per leaf and
    reads each back with ``.item()``; a floor does not).
    """
    leaves = _leaves(params)
    beta1, beta2 = betas
    m = [torch.zeros_like(p) for p in leaves]
    v = [torch.zeros_like(p) for p in leaves]
    count = 0
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
            grads = _grads(leaves, x[rows], target[rows])
            count += 1
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, (1 - beta2**count) ** 0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(leaves, m, denom, (lr / (1 - beta1**count)) * -1)
    return leaves
