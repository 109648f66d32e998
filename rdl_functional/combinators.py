"""Combinators: layers built from layers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from ._random import as_generator
from .layers import Layer, Params, Pullback

__all__ = ["compose"]

# The params a parameterless layer gets when its (empty) entry is left out, as
# rf.from_state_dict leaves it out: torch state dicts have no entry for ReLU.
_NO_PARAMS: Mapping[str, Any] = MappingProxyType({})
_LAYER_PREFIX = re.compile(r"^layer ([^:]+): ")


def _in_layer(error: Exception, key: str) -> Exception:
    """The same error, its message prefixed with the layer's path: ``layer 2.0: ...``.

    Only plain ValueError and TypeError (what the layers raise for bad input)
    are rewritten; a subclass, which may carry more, passes through as it is.
    """
    if type(error) not in (ValueError, TypeError):
        return error
    message = str(error)
    inner = _LAYER_PREFIX.match(message)
    if inner:
        return type(error)(f"layer {key}.{inner.group(1)}: {message[inner.end():]}")
    return type(error)(f"layer {key}: {message}")


def compose(*layers: Layer) -> Layer:
    """Chain layers: ``compose(f, g, h)(params, x) == h(params["2"], g(params["1"], f(params["0"], x)))``.

    Params: ``{"0": ..., "1": ..., ...}``, one entry per layer in order, ``{}``
    for a parameterless one (which may also be left out). Composes nest, and
    the keys match ``torch.nn.Sequential``'s, so ``rf.to_state_dict(params)``
    loads into the equivalent Sequential.

    The pullback runs the layers' pullbacks in reverse: the chain rule,
    ``dx = J₀ᵀ J₁ᵀ ⋯ Jₙᵀ dy``. It can be called any number of times; called
    as ``pullback(dy, release=True)`` it frees each layer's saved tensors as
    soon as that layer is done (as autograd does) and cannot be called again,
    and with ``need_dx=False`` it may return ``None`` for ``dx`` and skip
    computing it (the compose declares ``skips_dx``).
    :func:`~rdl_functional.value_and_grad` does not call it: it plans through
    the compose (``layer.sequence``) and runs the leaves itself.

    >>> import torch
    >>> import rdl_functional as rf
    >>> model = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 1))
    >>> params = model.init(0)
    >>> list(params), params["1"]
    (['0', '1', '2'], {})
    >>> model(params, torch.zeros(3, 2)).shape
    torch.Size([3, 1])

    Raises:
        TypeError: an argument is not a :class:`Layer`.
        ValueError: no layers were given.
    """
    if not layers:
        raise ValueError("compose: expected at least one layer, got none")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(
                f"compose: argument {i} must be a Layer, got {type(layer).__name__} "
                "(did you pass a constructor such as rf.linear without calling it?)"
            )
    keyed = tuple((str(i), layer) for i, layer in enumerate(layers))
    keys = frozenset(key for key, _ in keyed)
    name = f"compose({', '.join(layer.name for layer in layers)})"

    def init(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32) -> Params:
        g = as_generator(generator, f"{name}.init")
        return {key: layer.init(g, dtype=dtype) for key, layer in keyed}

    def check(where: str, params: Params) -> None:
        if type(params) is not dict and not isinstance(params, Mapping):
            raise TypeError(
                f"compose.{where}: params must be a dict keyed '0'..'{len(layers) - 1}', got {type(params).__name__}"
            )
        if not params.keys() <= keys:
            extra = sorted(set(params) - keys)
            raise ValueError(
                f"compose.{where}: params has entries {extra} but the model has {len(layers)} "
                f"layers, keyed '0'..'{len(layers) - 1}'"
            )

    def apply(params: Params, x: Tensor) -> Tensor:
        check("apply", params)
        for key, layer in keyed:
            try:
                x = layer.apply(params.get(key, _NO_PARAMS), x)
            except (ValueError, TypeError) as error:
                raise _in_layer(error, key) from None
        return x

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        check("vjp", params)
        pullbacks = []
        for key, layer in keyed:
            try:
                x, pullback = layer.vjp(params.get(key, _NO_PARAMS), x)
            except (ValueError, TypeError) as error:
                raise _in_layer(error, key) from None
            pullbacks.append((key, pullback))

        def pullback(dy: Tensor, *, release: bool = False, need_dx: bool = True) -> tuple[Params, Tensor | None]:
            if not pullbacks:
                raise RuntimeError(f"{name} pullback: it ran with release=True, which freed its saved tensors")
            dparams = {}
            for i in range(len(pullbacks) - 1, -1, -1):
                key, layer_pullback = pullbacks[i]
                if i == 0 and not need_dx and layers[0].skips_dx:
                    dparams[key], dy = layer_pullback(dy, need_dx=False)  # the input gradient nobody reads
                else:
                    dparams[key], dy = layer_pullback(dy)
                if release:
                    # Drop the layer's pullback, and the tensors it saved, as soon as it has
                    # run, as autograd frees a node's: the backward pass then never holds
                    # every activation and every gradient at once.
                    del pullbacks[i], layer_pullback
            # dparams mirrors params: its key order, and no entry that params left out.
            return {key: dparams[key] for key in params}, dy

        return x, pullback

    return Layer(init=init, apply=apply, vjp=vjp, name=name, skips_dx=True, sequence=layers)
