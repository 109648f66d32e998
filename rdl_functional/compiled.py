"""An opt-in compiled training step: the library's pure functions under ``torch.compile``.

``torch.compile`` (and with it ``torch._dynamo``) is imported only when a
compiled step is asked for. The update inside the compiled step is written
``p − lr·g`` rather than ``torch.add(p, g, alpha=-lr)``: torch 2.13's compiler
on CPU silently drops ``alpha``. The compiled step agrees with the eager one
to float rounding (the compiler may fuse ``lr·g`` and the subtraction), not
bit for bit.

It compiles ``value_and_grad`` and plain SGD only, for ``fit(compile=True)``.
:func:`rdl_functional.compiled` (``rdl_functional.transforms``) compiles a
whole :class:`~rdl_functional.TrainStep`, every library optimizer and
schedule included, with inductor or AOTInductor; ``fit(compile=True)``
should be rebuilt on it once ``fit`` runs a ``TrainStep`` (issue 17, item 4),
and this module then go.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from .autodiff import value_and_grad
from .layers import Layer, Params
from .losses import Loss

__all__ = ["compiled_step"]

CompiledStep = Callable[[Params, Tensor, Tensor, Tensor], tuple[Tensor, Params]]


@functools.lru_cache(maxsize=16)
def compiled_step(model: Layer, loss: Loss) -> CompiledStep:
    """``step(params, x, target, lr) -> (loss_value, new_params)``, compiled with ``torch.compile``.

    ``lr`` is a 0-dim tensor, so that a schedule's changing rate does not
    force a recompilation. The first call compiles (tens of seconds on a
    CPU); later calls with the same shapes reuse the code. One compiled step
    is kept per (model, loss), so repeated ``fit(..., compile=True)`` calls
    compile once.
    """
    import torch  # torch.compile pulls in torch._dynamo on first use only

    if not isinstance(model, Layer):
        raise TypeError(f"compiled_step: expected a plain Layer, got {type(model).__name__} "
                        f"({getattr(model, 'name', model)!s}; a model with state or randomness is not compiled)")
    value_and_grad_fn = value_and_grad(model, loss)

    def step(params: Params, x: Tensor, target: Tensor, lr: Tensor) -> tuple[Tensor, Params]:
        value, grads = value_and_grad_fn(params, x, target)
        return value, _sgd(params, grads, lr)  # not alpha=-lr: see the module doc

    return torch.compile(step, dynamic=False)


def _sgd(params: Params, grads: Params, lr: Tensor) -> Params:
    """``p - lr·g`` leaf by leaf, written plainly for torch.compile to trace (tree_map's walk guards against
    cycles with ids, which dynamo would not trace into one graph). The structure was checked by the plan."""
    return {key: _sgd(value, grads[key], lr) if isinstance(value, dict) else value - lr * grads[key]
            for key, value in params.items()}
