"""Pooling over channels-first images ``(N, C, H, W)``: :func:`max_pool2d`, :func:`avg_pool2d` and
:data:`global_avg_pool2d`, parameterless layers with torch.nn's arguments and defaults.

Forward and backward run torch's own kernels (``max_pool2d_with_indices`` and its backward,
``avg_pool2d`` and ``avg_pool2d_backward``), the ops torch's autograd runs for the modules: the bits are torch.nn's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._checks import check_no_params, check_x
from ._images import as_tuple, check_image, check_windows
from .layers import Layer, Params, Pullback, _check_cotangent, _no_params

__all__ = ["avg_pool2d", "global_avg_pool2d", "max_pool2d"]

_aten = torch.ops.aten
_max_pool2d_with_indices = _aten.max_pool2d_with_indices.default
_max_pool2d_with_indices_backward = _aten.max_pool2d_with_indices_backward.default
_avg_pool2d = _aten.avg_pool2d.default
_avg_pool2d_backward = _aten.avg_pool2d_backward.default


def _pool(name: str, forward: Callable[[Tensor], tuple[Tensor, Any]],
          backward: Callable[[Tensor, Tensor, Any], Tensor], check: Callable[[str, Tensor], None]) -> Layer:
    """A parameterless layer ``y, saved = forward(x)`` with ``dx = backward(dy, x, saved)``; ``check(where, x)``
    refuses an ``x`` it cannot take."""

    def checked(where: str, params: Params, x: Any) -> None:
        check_no_params(name, where, params)
        check(f"{name}.{where}", x)
        check_x(f"{name}.{where}", x)

    def apply(params: Params, x: Tensor) -> Tensor:
        checked("apply", params, x)
        return forward(x)[0]

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        checked("vjp", params, x)
        y, saved = forward(x)
        shape, dtype = y.shape, y.dtype

        def pullback(dy: Tensor) -> tuple[Params, Tensor]:
            _check_cotangent(name, dy, shape, dtype)
            return {}, backward(dy, x, saved)

        return y, pullback

    return Layer(init=_no_params, apply=apply, vjp=vjp, name=name)


def _pool_arguments(kind: str, kernel_size: Any, stride: Any, padding: Any, dilation: Any = 1,
                    ceil_mode: Any = False) -> tuple[tuple[int, int], ...]:
    kernel = as_tuple(kind, "kernel_size", kernel_size, 2, 1)
    strides = kernel if stride is None else as_tuple(kind, "stride", stride, 2, 1)
    pads = as_tuple(kind, "padding", padding, 2, 0)
    dilations = as_tuple(kind, "dilation", dilation, 2, 1)
    if any(p > k // 2 for p, k in zip(pads, kernel, strict=True)):
        raise ValueError(f"{kind}: padding must be at most half the kernel size (as torch checks it), got "
                         f"padding={padding!r} for kernel_size={kernel_size!r}")
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"{kind}: ceil_mode must be True or False, got {ceil_mode!r}")
    return kernel, strides, pads, dilations


def _options(stride: Any, padding: Any, **more: tuple[Any, Any]) -> list[str]:
    """The arguments that differ from their defaults, as the layer's name shows them."""
    shown = [f"stride={stride!r}"] * (stride is not None) + [f"padding={padding!r}"] * (padding != 0)
    return shown + [f"{key}={value!r}" for key, (value, default) in more.items() if value != default]


def max_pool2d(kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
               ceil_mode: bool = False) -> Layer:
    """Max pooling, ``torch.nn.MaxPool2d``: ``y[n, c, p] = max`` of ``x`` over the window at ``p``, padded with −∞.

    ``x``: ``(N, C, H, W)``, channels first; ``y``: ``(N, C, H_out, W_out)`` with ``H_out = ⌊(H + 2·padding −
    dilation·(kernel − 1) − 1) / stride⌋ + 1`` (⌈⌉ with ``ceil_mode``). ``stride`` defaults to the kernel size.
    Backward: each ``dy`` goes to the position its window's maximum came from, summed where windows overlap
    (``max_pool2d_with_indices_backward`` on the indices the forward pass kept).

    >>> import torch
    >>> max_pool2d(2)({}, torch.arange(16.0).reshape(1, 1, 4, 4))
    tensor([[[[ 5.,  7.],
              [13., 15.]]]])
    """
    kernel, strides, pads, dilations = _pool_arguments("max_pool2d", kernel_size, stride, padding, dilation, ceil_mode)
    options = _options(stride, padding, dilation=(dilation, 1), ceil_mode=(ceil_mode, False))
    name = f"max_pool2d({', '.join([repr(kernel_size), *options])})"

    def check(where: str, x: Any) -> None:
        check_image(where, x, 2)
        check_windows(where, x, kernel, strides, pads, dilations, ceil_mode)

    return _pool(
        name,
        lambda x: _max_pool2d_with_indices(x, kernel, strides, pads, dilations, ceil_mode),  # (y, argmax indices)
        lambda dy, x, indices: _max_pool2d_with_indices_backward(dy, x, kernel, strides, pads, dilations, ceil_mode,
                                                                 indices),  # dx[argmax] += dy
        check,
    )


def avg_pool2d(kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Layer:
    """Average pooling, ``torch.nn.AvgPool2d``: ``y[n, c, p]`` = the sum of ``x`` over the window at ``p`` / its size.

    ``x``: ``(N, C, H, W)``, channels first; ``y``: ``(N, C, H_out, W_out)`` as for :func:`max_pool2d`
    (no dilation). The divisor is ``kH·kW`` with ``count_include_pad`` (torch's default: the zero padding
    counts), else the number of input positions in the window; ``divisor_override`` replaces it.
    Backward: ``dx`` at each position is the sum, over the windows holding it, of ``dy / divisor``
    (``avg_pool2d_backward``).

    >>> import torch
    >>> avg_pool2d(2)({}, torch.arange(16.0).reshape(1, 1, 4, 4))
    tensor([[[[ 2.5000,  4.5000],
              [10.5000, 12.5000]]]])
    """
    kernel, strides, pads, dilations = _pool_arguments("avg_pool2d", kernel_size, stride, padding, 1, ceil_mode)
    if not isinstance(count_include_pad, bool):
        raise TypeError(f"avg_pool2d: count_include_pad must be True or False, got {count_include_pad!r}")
    if divisor_override is not None and (isinstance(divisor_override, bool) or not isinstance(divisor_override, int)
                                         or divisor_override < 1):
        raise ValueError(f"avg_pool2d: divisor_override must be a positive int or None, got {divisor_override!r}")
    options = _options(stride, padding, ceil_mode=(ceil_mode, False), count_include_pad=(count_include_pad, True),
                       divisor_override=(divisor_override, None))
    name = f"avg_pool2d({', '.join([repr(kernel_size), *options])})"
    settings = (kernel, strides, pads, ceil_mode, count_include_pad, divisor_override)

    def check(where: str, x: Any) -> None:
        check_image(where, x, 2)
        check_windows(where, x, kernel, strides, pads, dilations, ceil_mode)

    return _pool(
        name,
        lambda x: (_avg_pool2d(x, *settings), None),
        lambda dy, x, _: _avg_pool2d_backward(dy, x, *settings),  # dx = Σ_windows ∋ position dy / divisor
        check,
    )


def _global_average(x: Tensor) -> tuple[Tensor, None]:
    # torch's adaptive_avg_pool2d to 1×1 is this mean (over dims -1, -2, in that order); flattened to (N, C).
    return x.mean((-1, -2)), None


def _global_average_backward(dy: Tensor, x: Tensor, _: None) -> Tensor:
    n, c, h, w = x.shape
    return dy.reshape(n, c, 1, 1).expand(x.shape) / (h * w)  # dx = dy / (H·W) everywhere: mean's backward


global_avg_pool2d = _pool("global_avg_pool2d", _global_average, _global_average_backward,
                          lambda where, x: check_image(where, x, 2))
"""The mean of each channel over its positions: ``(N, C, H, W) -> (N, C)``, as ``torch.nn.AdaptiveAvgPool2d(1)``
followed by ``torch.nn.Flatten()``. Backward: ``dx = dy / (H·W)`` at every position of its channel."""
