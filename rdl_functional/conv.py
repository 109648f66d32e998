"""Convolutions over channels-first input: :func:`conv1d` on ``(N, C, L)``, :func:`conv2d` on ``(N, C, H, W)``.

Each is a :class:`~rdl_functional.Layer` with torch.nn.Conv1d's / Conv2d's arguments, defaults, params
(``weight`` ``(out, in/groups, *kernel)``, ``bias`` ``(out,)``, no ``bias`` with ``bias=False``) and
initial draws. Forward and backward run torch's own kernels, ``convolution`` and ``convolution_backward``,
the ops torch's autograd runs for a Conv module: the bits are torch.nn's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._checks import check_params, check_x
from ._images import as_tuple, check_image, check_spans
from ._random import as_generator
from .initializers import Initializer
from .layers import (
    Layer,
    Params,
    Pullback,
    _check_cotangent,
    _check_features,
    _check_float_dtype,
    draw_weight_checked,
    to_device,
    weight_initializer,
)

__all__ = ["conv1d", "conv2d"]

_aten = torch.ops.aten
_convolution = _aten.convolution.default
_convolution_backward = _aten.convolution_backward.default
_constant_pad_nd = _aten.constant_pad_nd.default


def conv1d(in_channels: int, out_channels: int, kernel_size: int | tuple[int], stride: int | tuple[int] = 1,
           padding: int | tuple[int] | str = 0, dilation: int | tuple[int] = 1, groups: int = 1, bias: bool = True,
           *, init: str | Initializer = "torch_default") -> Layer:
    """A 1-D convolution, ``torch.nn.Conv1d``: ``x`` ``(N, in_channels, L)`` → ``(N, out_channels, L_out)``.

    Arguments, params and backward as :func:`conv2d`'s, with one spatial dimension.

    >>> import torch
    >>> layer = conv1d(2, 4, 3, padding="same")
    >>> layer(layer.init(0), torch.ones(5, 2, 10)).shape
    torch.Size([5, 4, 10])
    """
    return _conv(1, "conv1d", in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, init)


def conv2d(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
           stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
           dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
           *, init: str | Initializer = "torch_default") -> Layer:
    """A 2-D convolution, ``torch.nn.Conv2d``: ``x`` ``(N, in_channels, H, W)`` → ``(N, out_channels, H_out, W_out)``.

    ``y[n, o] = bias[o] + Σ_{c in o's group} Σ_k weight[o, c, k] · x_padded[n, c, stride·p + dilation·k]``, with
    ``H_out = ⌊(H + 2·padding − dilation·(kernel − 1) − 1) / stride⌋ + 1`` (the same for W).
    ``kernel_size``, ``stride``, ``padding``, ``dilation``: an int or a pair; ``padding`` also ``"valid"``
    (none) or ``"same"`` (the output as large as the input; stride 1 only, as torch: where the total
    padding ``dilation·(kernel − 1)`` is odd, the extra row or column goes on the right, as torch pads it).
    ``groups`` splits the channels into that many independent convolutions.

    Params: ``{"weight": (out_channels, in_channels/groups, kH, kW), "bias": (out_channels,)}`` (no ``bias``
    with ``bias=False``), drawn as torch.nn.Conv2d draws them: ``init="torch_default"`` is kaiming uniform
    with ``a = √5``, uniform in ``±1/√fan_in`` with ``fan_in = in_channels/groups · kH · kW``; the bias
    uniform in ``±1/√fan_in``. Given a generator in the same state, the very same numbers. ``init`` takes
    the names and functions :func:`~rdl_functional.linear` takes (the weight only; the bias is torch's).

    Backward (the transposed convolution of ``dy``, as ``convolution_backward`` computes it):
    ``dx = conv_transpose(dy, weight)``, ``dweight[o, c, k] = Σ_{n, p} dy[n, o, p] · x_padded[n, c, stride·p +
    dilation·k]``, ``dbias = Σ_{n, spatial} dy``.

    >>> import torch
    >>> layer = conv2d(3, 8, 3, stride=2, padding=1)
    >>> params = layer.init(0)
    >>> {k: tuple(v.shape) for k, v in params.items()}
    {'weight': (8, 3, 3, 3), 'bias': (8,)}
    >>> layer(params, torch.ones(4, 3, 32, 32)).shape
    torch.Size([4, 8, 16, 16])
    """
    return _conv(2, "conv2d", in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, init)


def _same_padding(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, ...], list[int]]:
    """torch's ``padding='same'``: ``dilation·(kernel − 1)`` in all, half on the left (the convolution's own
    padding) and what is left over (0 or 1) on the right, as ``constant_pad_nd``'s pad list (last dim first)."""
    left = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    extra = [d * (k - 1) - 2 * lo for k, d, lo in zip(kernel, dilation, left, strict=True)]
    return left, [value for e in reversed(extra) for value in (0, e)] if any(extra) else []


def _conv_arguments(spatial: int, kind: str, in_channels: int, out_channels: int, kernel_size: Any, stride: Any,
                    padding: Any, dilation: Any, groups: int, bias: bool) -> tuple[Any, ...]:
    """``(kernel, strides, pads, extra, dilations)`` as tuples of ints, read and checked as torch.nn.Conv does;
    ``extra`` is 'same' padding's right-hand remainder as ``constant_pad_nd`` takes it (``[]``: none)."""
    _check_features(kind, in_channels=in_channels, out_channels=out_channels, groups=groups)
    kernel = as_tuple(kind, "kernel_size", kernel_size, spatial, 1)
    strides = as_tuple(kind, "stride", stride, spatial, 1)
    dilations = as_tuple(kind, "dilation", dilation, spatial, 1)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"{kind}: groups={groups} must divide in_channels={in_channels} and "
                         f"out_channels={out_channels} (each group convolves in/groups channels to out/groups)")
    if not isinstance(bias, bool):
        raise TypeError(f"{kind}: bias must be True or False, got {bias!r}")
    if not isinstance(padding, str):
        return kernel, strides, as_tuple(kind, "padding", padding, spatial, 0), [], dilations
    if padding not in ("valid", "same"):
        raise ValueError(f"{kind}: padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
    if padding == "valid":
        return kernel, strides, (0,) * spatial, [], dilations
    if strides != (1,) * spatial:
        raise ValueError(f"{kind}: padding='same' is not supported for strided convolutions (stride={stride!r}), "
                         "as torch refuses it: pass an int padding")
    return kernel, strides, *_same_padding(kernel, dilations), dilations


def _conv(spatial: int, kind: str, in_channels: int, out_channels: int, kernel_size: Any, stride: Any,
          padding: Any, dilation: Any, groups: int, bias: bool, init: Any) -> Layer:
    kernel, strides, pads, extra, dilations = _conv_arguments(spatial, kind, in_channels, out_channels, kernel_size,
                                                              stride, padding, dilation, groups, bias)
    draw_weight, init_option = weight_initializer(kind, init)
    options = [f"stride={stride!r}"] * (stride != 1) + [f"padding={padding!r}"] * (padding != 0) + [
        f"dilation={dilation!r}"] * (dilation != 1) + [f"groups={groups}"] * (groups != 1) + ["bias=False"] * (
        not bias) + init_option
    name = f"{kind}({', '.join([str(in_channels), str(out_channels), repr(kernel_size), *options])})"
    weight_shape = (out_channels, in_channels // groups, *kernel)
    shapes = {"weight": weight_shape, **({"bias": (out_channels,)} if bias else {})}
    fix = "" if bias else " (the layer was built with bias=False)"
    fan_in = math.prod(weight_shape[1:])
    no_output_padding = [0] * spatial

    def init_params(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Params:
        g = as_generator(generator, f"{name}.init")
        _check_float_dtype(f"{name}.init", dtype)
        params = {"weight": draw_weight_checked(f"{name}.init", draw_weight, g, weight_shape, dtype)}
        if bias:  # torch.nn.Conv's reset_parameters: uniform_(bias, ±1/√fan_in), after the weight
            bound = 1 / math.sqrt(fan_in)
            params["bias"] = torch.empty(out_channels, dtype=dtype).uniform_(-bound, bound, generator=g)
        return to_device(params, device, f"{name}.init")

    def forward(where: str, params: Params, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, weight, x_padded)``; ``x_padded`` is ``x`` but for 'same' with an odd total padding."""
        at = f"{name}.{where}"
        check_params(at, params, shapes, fix)
        weight, b = params["weight"], params.get("bias")
        check_image(at, x, spatial, in_channels)
        check_x(at, x, "weight", weight)
        if padding != "same":  # 'same' has an output as large as the input, whatever its size
            check_spans(at, x, kernel, strides, pads, dilations)
        x_padded = _constant_pad_nd(x, extra, 0.0) if extra else x  # torch's _convolution_mode, op for op
        return _convolution(x_padded, weight, b, strides, pads, dilations, False, no_output_padding, groups), \
            weight, x_padded

    def apply(params: Params, x: Tensor) -> Tensor:
        return forward("apply", params, x)[0]

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        y, weight, x_padded = forward("vjp", params, x)
        shape, dtype = y.shape, y.dtype
        bias_sizes = [out_channels] if bias else None

        def pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Tensor | None]:
            _check_cotangent(name, dy, shape, dtype)
            # dx = conv_transpose(dy, W), dW = Σ_{n,p} dy ⋆ x_padded, db = Σ_{n,spatial} dy: autograd's kernel
            dx, dweight, dbias = _convolution_backward(dy, x_padded, weight, bias_sizes, strides, pads, dilations,
                                                       False, no_output_padding, groups, [need_dx, True, bias])
            if dx is not None and extra:  # the backward of the right-hand padding: its rows cropped off
                dx = _constant_pad_nd(dx, [-e for e in extra], 0.0)
            return ({"weight": dweight, "bias": dbias} if bias else {"weight": dweight}), dx

        return y, pullback

    return Layer(init=init_params, apply=apply, vjp=vjp, name=name, skips_dx=True)
