"""Normalization of channels-first images: :func:`batch_norm2d` (``torch.nn.BatchNorm2d``) and
:func:`group_norm` (``torch.nn.GroupNorm``), through torch's own kernels both ways, so the bits are torch.nn's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._checks import check_eps, check_params, check_x
from ._images import check_image
from ._random import as_generator
from .layers import Layer, Params, Pullback, _check_cotangent, _check_features, _check_float_dtype, to_device
from .stateful import StatefulLayer, channel_norm

__all__ = ["batch_norm2d", "group_norm"]

_native_group_norm = torch.ops.aten.native_group_norm.default
_native_group_norm_backward = torch.ops.aten.native_group_norm_backward.default
_suggest_memory_format = torch._prims_common.suggest_memory_format  # C++'s Tensor::suggest_memory_format, in Python


def _kernel_layout(x: Tensor) -> torch.memory_format:
    """The memory format torch's group_norm hands its kernels ``x`` (and ``dy``) in."""
    return _suggest_memory_format(x) if x.device.type == "cpu" else torch.contiguous_format


def batch_norm2d(num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> StatefulLayer:
    """Batch normalization of images ``(N, C, H, W)``, per channel over ``N, H, W``: ``torch.nn.BatchNorm2d``.

    :func:`~rdl_functional.batch_norm`'s maths, state and modes (one piece of code serves both), with the
    channels at dim 1 and torch's argument order ``(num_features, eps, momentum, affine)``. Training, each
    channel is normalized with its mean μ and biased variance σ² over the batch and the positions,
    ``y = (x − μ) / √(σ² + ε) · weight + bias``, and the running statistics move toward the batch's
    (``running_var`` toward the unbiased variance, ``n = N·H·W``); evaluating, the running statistics stand in.
    Params ``weight`` ``(C,)``, ``bias`` ``(C,)`` (none with ``affine=False``); state ``running_mean``,
    ``running_var``, ``num_batches_tracked``: torch's names, so both load into BatchNorm2d strictly
    (``{}`` with ``track_running_stats=False``: both modes then use the batch's statistics, as torch.nn does).

    Backward (``native_batch_norm_backward``), with ``x̂ = (x − μ)·s``, ``s = 1/√(σ² + ε)``, sums over
    ``N, H, W``: ``dbias = Σ dy``, ``dweight = Σ dy ⊙ x̂``; training, ``dx = weight·s/n · (n·dy − Σ dy −
    x̂ ⊙ Σ dy ⊙ x̂)``; evaluating, ``dx = weight·s_running ⊙ dy``.

    >>> import torch
    >>> bn = batch_norm2d(3)
    >>> y, state = bn(bn.init(0), bn.init_state(), torch.randn(4, 3, 5, 5), train=True)
    >>> y.shape, state["num_batches_tracked"]
    (torch.Size([4, 3, 5, 5]), tensor(1))
    """
    return channel_norm("batch_norm2d", num_features, momentum, eps, affine, spatial=2,
                        track_running_stats=track_running_stats)


def group_norm(num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True) -> Layer:
    """Group normalization, ``torch.nn.GroupNorm``: ``x`` ``(N, C, *)``, channels first, any number of spatial dims.

    The ``C`` channels split into ``num_groups`` groups of consecutive channels; each example's group is
    normalized by its own mean μ and biased variance σ² over its channels and positions, then each channel
    scaled and shifted: ``y = (x − μ) / √(σ² + ε) · weight[c] + bias[c]``. No state: training and
    evaluating are the same. Params ``weight`` ``(C,)`` ones, ``bias`` ``(C,)`` zeros (none with
    ``affine=False``).

    Backward (``native_group_norm_backward``), with ``x̂ = (x − μ)·s``, ``s = 1/√(σ² + ε)`` per example and group
    and ``m`` the values in a group: ``dbias[c] = Σ_{n, positions} dy``, ``dweight[c] = Σ_{n, positions} dy ⊙ x̂``,
    and with ``g = dy ⊙ weight``, ``dx = s/m · (m·g − Σ_group g − x̂ ⊙ Σ_group g ⊙ x̂)``.

    >>> import torch
    >>> norm = group_norm(2, 4)
    >>> norm(norm.init(0), torch.randn(3, 4, 5, 5)).shape
    torch.Size([3, 4, 5, 5])
    """
    _check_features("group_norm", num_groups=num_groups, num_channels=num_channels)
    if num_channels % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide num_channels={num_channels} (each group "
                         "is num_channels/num_groups consecutive channels)")
    eps = check_eps("group_norm", eps)
    if not isinstance(affine, bool):
        raise TypeError(f"group_norm: affine must be True or False, got {affine!r}")
    options = [f"eps={eps!r}"] * (eps != 1e-5) + ["affine=False"] * (not affine)
    name = f"group_norm({', '.join([str(num_groups), str(num_channels), *options])})"
    shapes = {"weight": (num_channels,), "bias": (num_channels,)} if affine else {}
    fix = "" if affine else " (the layer was built with affine=False)"

    def init(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Params:
        as_generator(generator, f"{name}.init")  # checked; nothing is drawn, as torch draws nothing
        _check_float_dtype(f"{name}.init", dtype)
        params = {"weight": torch.ones(num_channels, dtype=dtype), "bias": torch.zeros(num_channels, dtype=dtype)}
        return to_device(params if affine else {}, device, f"{name}.init")

    def forward(where: str, params: Params, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor, int]:
        at = f"{name}.{where}"
        check_params(at, params, shapes, fix)
        check_image(at, x, None, num_channels)
        weight, bias = params.get("weight"), params.get("bias")
        check_x(at, x, "weight", weight)
        n, positions = x.shape[0], math.prod(x.shape[2:])
        # As torch's group_norm: the kernel on x made contiguous in its own layout (channels-last stays so) on
        # the CPU, in (N, C, positions) order elsewhere: the kernels' sums run in that order, so the bits follow it.
        y, mean, rstd = _native_group_norm(x.contiguous(memory_format=_kernel_layout(x)), weight, bias, n,
                                           num_channels, positions, num_groups, eps)
        return y, weight, mean, rstd, positions

    def apply(params: Params, x: Tensor) -> Tensor:
        return forward("apply", params, x)[0]

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        y, weight, mean, rstd, positions = forward("vjp", params, x)
        shape, dtype = y.shape, y.dtype

        def pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Any]:
            _check_cotangent(name, dy, shape, dtype)
            # dbias = Σ dy, dweight = Σ dy ⊙ x̂, dx = s/m · (m·g − Σ g − x̂ ⊙ Σ g ⊙ x̂), g = dy ⊙ weight: autograd's kernel
            layout = _kernel_layout(x)  # x's, for dy too: as autograd's formula for native_group_norm
            dx, dweight, dbias = _native_group_norm_backward(dy.contiguous(memory_format=layout),
                                                             x.contiguous(memory_format=layout), mean, rstd, weight,
                                                             shape[0], num_channels, positions, num_groups,
                                                             [need_dx, affine, affine])
            return ({"weight": dweight, "bias": dbias} if affine else {}), dx

        return y, pullback

    return Layer(init=init, apply=apply, vjp=vjp, name=name, skips_dx=True)
