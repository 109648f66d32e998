"""The update rules: torch.optim's foreach implementations, op for op, over flat lists of leaves.

Each rule runs the ``torch._foreach_*`` calls that torch.optim's
``_multi_tensor_*`` function runs for the same settings, in its order, so
float32 results are bit-identical to it. ``o`` is the op table: its ops are
the first write to a buffer or the params (out of place for the pure
functions, in place on fit's private copies); every later op writes only
into a list the rule itself made. ``count`` is the step being taken (1 for
the first), torch.optim's ``step`` after its increment; ``count`` and ``lr``
are Python numbers, or 0-dim float64 tensors when the rule is traced into a
compiled graph (``base._Traced``), so the rules use them only in arithmetic
and through the op table (``o.first_step`` for SGD's first-step branch).
"""

from __future__ import annotations

import torch

from ..tree import Tree, _map, _paired, tree_difference
from .base import Leaves, Ops, Optimizer, _at_least, _fraction, _Link, _lr
from .schedules import MAX_LR, Schedule, _check_lr

__all__ = ["adagrad", "adam", "adamw", "rmsprop", "sgd", "sgd_step"]

Buffers = dict[str, Leaves]


def _negated(grads: Leaves, maximize: bool) -> Leaves:
    # maximize: g ← −g, torch's first op (``torch._foreach_neg``), into new tensors.
    return torch._foreach_neg(grads) if maximize else grads


def _flag(who: str, name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be True or False, got {value!r}")
    return value


def _weight_decay(grads: Leaves, params: Leaves, weight_decay: float) -> Leaves:
    # g ← g + λ p, into new tensors (the caller's grads are never written).
    return torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads


def sgd(
    lr: float | Schedule = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> Optimizer:
    """Stochastic gradient descent with optional momentum: ``torch.optim.SGD``, the same defaults and bits.

    ::

        g ← g + λ p                                   (weight_decay λ)
        b ← g at the first step, else μ b + (1 − τ) g  (momentum μ, dampening τ)
        g ← g + μ b if nesterov, else b
        p ← p − lr · g

    ``maximize=True`` first negates the grads (``g ← −g``, torch's ``_foreach_neg``), for every rule here.

    State: ``count``, ``lr``, and ``momentum_buffer`` (a tree like params) when ``momentum > 0``.

    >>> import torch, rdl_functional as rf
    >>> opt = rf.sgd(0.1, momentum=0.9)
    >>> params = {"w": torch.tensor([1.0])}
    >>> state = opt.init(params)
    >>> params, state = opt.step(params, {"w": torch.tensor([1.0])}, state)
    >>> params, state = opt.step(params, {"w": torch.tensor([1.0])}, state)
    >>> params["w"], state["momentum_buffer"]["w"], int(state["count"])
    (tensor([0.7100]), tensor([1.9000]), 2)
    """
    who = "sgd"
    schedule = _lr(lr, who)
    momentum = _at_least(who, "momentum", momentum)
    dampening = _at_least(who, "dampening", dampening)
    weight_decay = _at_least(who, "weight_decay", weight_decay)
    maximize = _flag(who, "maximize", maximize)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{who}: nesterov needs momentum > 0 and dampening = 0, got momentum={momentum}, "
                         f"dampening={dampening}")

    def rule(o: Ops, p: Leaves, g: Leaves, buffers: Buffers, count: int, lr: float) -> tuple[Leaves, Buffers]:
        g = _weight_decay(_negated(g, maximize), p, weight_decay)
        if momentum:
            def later() -> Leaves:
                b = o.mul(buffers["momentum_buffer"], momentum)
                torch._foreach_add_(b, g, alpha=1 - dampening)
                return b

            # torch starts the buffer at the first gradient
            b = o.first_step(count, lambda: o.copy(buffers["momentum_buffer"], g), later)
            buffers = {"momentum_buffer": b}
            g = torch._foreach_add(g, b, alpha=momentum) if nesterov else b
        return o.add(p, g, alpha=-lr), buffers

    name = "sgd" if not momentum else ("nesterov" if nesterov else "momentum")
    buffers = (("momentum_buffer", 0.0),) if momentum else ()
    return Optimizer(links=(_Link(name=name, rule=rule, buffers=buffers, lr=schedule),), name=name)


def _adam(who: str, lr: float | Schedule, betas: tuple[float, float], eps: float, weight_decay: float,
          amsgrad: bool, decoupled: bool, maximize: bool) -> Optimizer:
    schedule = _lr(lr, who)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{who}: betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = _fraction(who, "betas[0]", betas[0]), _fraction(who, "betas[1]", betas[1])
    eps = _at_least(who, "eps", eps, strict=True)
    weight_decay = _at_least(who, "weight_decay", weight_decay)
    maximize = _flag(who, "maximize", maximize)

    def rule(o: Ops, p: Leaves, g: Leaves, buffers: Buffers, count: int, lr: float) -> tuple[Leaves, Buffers]:
        g = _negated(g, maximize)
        if decoupled and weight_decay:
            p = o.mul(p, 1 - lr * weight_decay)  # p ← (1 − lr λ) p, AdamW's decoupled decay
        elif weight_decay:
            g = _weight_decay(g, p, weight_decay)
        m = o.lerp(buffers["exp_avg"], g, 1 - beta1)  # m ← β₁ m + (1 − β₁) g
        v = o.mul(buffers["exp_avg_sq"], beta2)  # v ← β₂ v + (1 − β₂) g²
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        new = {"exp_avg": m, "exp_avg_sq": v}
        bias_correction1, bias_correction2 = 1 - beta1**count, 1 - beta2**count
        step_size = (lr / bias_correction1) * -1
        if amsgrad:
            new["max_exp_avg_sq"] = o.maximum(buffers["max_exp_avg_sq"], v)  # v̂ ← max(v̂, v)
            denom = torch._foreach_sqrt(new["max_exp_avg_sq"])
        else:
            denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias_correction2**0.5)
        torch._foreach_add_(denom, eps)  # √(v / (1 − β₂ᵗ)) + ε
        return o.addcdiv(p, m, denom, value=step_size), new  # p ← p − lr/(1 − β₁ᵗ) · m / denom

    buffers = (("exp_avg", 0.0), ("exp_avg_sq", 0.0)) + ((("max_exp_avg_sq", 0.0),) if amsgrad else ())
    return Optimizer(links=(_Link(name=who, rule=rule, buffers=buffers, lr=schedule),), name=who)


def adam(lr: float | Schedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False) -> Optimizer:
    """Adam: ``torch.optim.Adam``, the same defaults and bits (its foreach implementation).

    ::

        g ← g + λ p                                   (weight_decay λ: L2, added to the gradient)
        m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
        v̂ ← max(v̂, v) if amsgrad
        p ← p − lr / (1 − β₁ᵗ) · m / (√(v or v̂) / √(1 − β₂ᵗ) + ε)

    State: ``count``, ``lr``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad).

    >>> import torch, rdl_functional as rf
    >>> opt = rf.adam(0.1)
    >>> params = {"w": torch.tensor([1.0, -2.0])}
    >>> params, state = opt.step(params, {"w": torch.tensor([0.5, -3.0])}, opt.init(params))
    >>> params["w"]   # the first Adam step moves each weight by lr, against its gradient's sign
    tensor([ 0.9000, -1.9000])
    """
    return _adam("adam", lr, betas, eps, weight_decay, amsgrad, decoupled=False, maximize=maximize)


def adamw(lr: float | Schedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False) -> Optimizer:
    """AdamW: Adam with decoupled weight decay, ``p ← (1 − lr λ) p`` before the step: ``torch.optim.AdamW``.

    State as :func:`adam`'s.
    """
    return _adam("adamw", lr, betas, eps, weight_decay, amsgrad, decoupled=True, maximize=maximize)


def rmsprop(lr: float | Schedule = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False, maximize: bool = False) -> Optimizer:
    """RMSprop: ``torch.optim.RMSprop``, the same defaults and bits.

    ::

        g ← g + λ p
        s ← α s + (1 − α) g²
        ḡ ← α ḡ + (1 − α) g,  d ← √(s − ḡ²) + ε   if centered, else  d ← √s + ε
        b ← μ b + g / d,  p ← p − lr b             if momentum μ > 0, else  p ← p − lr g / d

    State: ``count``, ``lr``, ``square_avg``, and ``momentum_buffer`` / ``grad_avg`` when used.
    """
    who = "rmsprop"
    schedule = _lr(lr, who)
    alpha = _at_least(who, "alpha", alpha)
    eps = _at_least(who, "eps", eps, strict=True)
    weight_decay = _at_least(who, "weight_decay", weight_decay)
    maximize = _flag(who, "maximize", maximize)
    momentum = _at_least(who, "momentum", momentum)

    def rule(o: Ops, p: Leaves, g: Leaves, buffers: Buffers, count: int, lr: float) -> tuple[Leaves, Buffers]:
        g = _weight_decay(_negated(g, maximize), p, weight_decay)
        s = o.mul(buffers["square_avg"], alpha)
        torch._foreach_addcmul_(s, g, g, value=1 - alpha)
        new = {"square_avg": s}
        if centered:
            new["grad_avg"] = mean = o.lerp(buffers["grad_avg"], g, 1 - alpha)
            denom = torch._foreach_addcmul(s, mean, mean, value=-1)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(s)
        torch._foreach_add_(denom, eps)
        if momentum > 0:
            new["momentum_buffer"] = b = o.mul(buffers["momentum_buffer"], momentum)
            torch._foreach_addcdiv_(b, g, denom)
            return o.add(p, b, alpha=-lr), new
        return o.addcdiv(p, g, denom, value=-lr), new

    buffers = (("square_avg", 0.0),) + ((("momentum_buffer", 0.0),) if momentum > 0 else ())
    buffers += (("grad_avg", 0.0),) if centered else ()
    return Optimizer(links=(_Link(name=who, rule=rule, buffers=buffers, lr=schedule),), name=who)


def adagrad(lr: float | Schedule = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
            initial_accumulator_value: float = 0.0, eps: float = 1e-10, maximize: bool = False) -> Optimizer:
    """Adagrad: ``torch.optim.Adagrad``, the same defaults and bits.

    ::

        g ← g + λ p
        S ← S + g²                       (S starts at initial_accumulator_value)
        p ← p − lr / (1 + (t − 1) · lr_decay) · g / (√S + ε)

    State: ``count``, ``lr``, ``sum``.
    """
    who = "adagrad"
    schedule = _lr(lr, who)
    lr_decay = _at_least(who, "lr_decay", lr_decay)
    weight_decay = _at_least(who, "weight_decay", weight_decay)
    maximize = _flag(who, "maximize", maximize)
    initial = _at_least(who, "initial_accumulator_value", initial_accumulator_value)
    eps = _at_least(who, "eps", eps, strict=True)

    def rule(o: Ops, p: Leaves, g: Leaves, buffers: Buffers, count: int, lr: float) -> tuple[Leaves, Buffers]:
        g = _weight_decay(_negated(g, maximize), p, weight_decay)
        minus_clr = -lr / (1 + (count - 1) * lr_decay)
        total = o.addcmul(buffers["sum"], g, g, value=1)
        std = torch._foreach_sqrt(total)
        torch._foreach_add_(std, eps)
        return o.addcdiv(p, torch._foreach_mul(g, minus_clr), std), {"sum": total}

    return Optimizer(links=(_Link(name=who, rule=rule, buffers=(("sum", initial),), lr=schedule),), name=who)


def sgd_step(params: Tree, grads: Tree, lr: float) -> Tree:
    """One step of gradient descent: ``p − lr · g`` for every leaf, into new tensors.

    Neither ``params`` nor ``grads`` is changed. The update is the kernel that
    ``torch.optim.SGD`` runs (``add`` with ``alpha=-lr``, a fused multiply-add),
    so both give the same bits; one ``torch._foreach_add`` call updates every
    leaf, and one walk over both trees checks them. It equals
    ``rf.sgd(lr).step(params, grads, state)``'s params, bit for bit.

    >>> import torch
    >>> sgd_step({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, lr=0.25)
    {'w': tensor([0.5000])}

    Raises:
        ValueError: ``grads`` differs from ``params`` in structure, shape or
            dtype (the message names the first differing path), or ``lr`` is
            negative, NaN or infinite.
        TypeError: ``lr`` is not a number.
    """
    if type(lr) is not float or not 0 <= lr <= MAX_LR:
        lr = _check_lr(lr)
    paired = _paired(params, grads)
    if paired is not None:
        return paired.fill(torch._foreach_add(paired.mine, paired.theirs, alpha=-lr) if paired.mine else [])
    # Not plain dicts of matching tensors: say where they differ, or take the general walk.
    found = tree_difference(params, grads, names=("params", "grads"), leaves=True)
    if found:
        raise ValueError(f"sgd_step: {found}")
    return _map(lambda p, g: torch.add(p, g, alpha=-lr), params, (grads,))
