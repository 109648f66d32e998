"""Combinators: layers built from layers."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType, SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ._random import as_generator, as_source
from .layers import Layer, Params, Pullback, _no_params, placed, to_device
from .stateful import _NO_STATE, State, StatefulLayer, StatefulPullback, check_train, stateful

__all__ = ["add", "compose", "concat", "fan_out", "parallel", "residual"]

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


def _children(who: str, layers: tuple[Layer | StatefulLayer, ...]) -> tuple[
    tuple[tuple[str, Layer | StatefulLayer], ...], Callable[..., Params], Callable[[str, Params], None]
]:
    """What every combinator of layers needs: its layers keyed '0', '1', ..., their init, and the params check.

    Params are ``{"0": ..., "1": ..., ...}``, one entry per layer; a
    parameterless layer's entry may be left out, as torch state dicts leave it out.
    """
    if not layers:
        raise ValueError(f"{who}: expected at least one layer, got none")
    for i, layer in enumerate(layers):
        if not isinstance(layer, (Layer, StatefulLayer)):
            raise TypeError(
                f"{who}: argument {i} must be a Layer, got {type(layer).__name__} "
                "(did you pass a constructor such as rf.linear without calling it?)"
            )
    keyed = tuple((str(i), layer) for i, layer in enumerate(layers))
    keys = frozenset(key for key, _ in keyed)
    name = f"{who}({', '.join(layer.name for layer in layers)})"

    def init(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Params:
        g = as_generator(generator, f"{name}.init")
        # Drawn on the CPU, layer by layer (a layer of your own need not know devices), then moved at once.
        return to_device({key: layer.init(g, dtype=dtype) for key, layer in keyed}, device, f"{name}.init")

    def check(where: str, params: Params) -> None:
        if type(params) is not dict and not isinstance(params, Mapping):
            raise TypeError(
                f"{who}.{where}: params must be a dict keyed '0'..'{len(layers) - 1}', got {type(params).__name__}"
            )
        if not params.keys() <= keys:
            extra = sorted(set(params) - keys)
            raise ValueError(
                f"{who}.{where}: params has entries {extra} but the model has {len(layers)} "
                f"layers, keyed '0'..'{len(layers) - 1}'"
            )

    return keyed, init, check


def _state_of_children(name: str, who: str, keyed: tuple[tuple[str, Any], ...]) -> tuple[
    tuple[tuple[str, StatefulLayer], ...], Callable[..., State], Callable[[str, State, Any, Any], Any]
]:
    """For a combinator with a stateful child: its children lifted to the stateful contract, their
    ``init_state``, and the per-call check of state, ``train`` and ``generator`` (which returns the generator).

    State mirrors params: ``{"0": ..., "1": ..., ...}``, ``{}`` for a layer without state (which may be left out).
    """
    lifted = tuple((key, stateful(layer)) for key, layer in keyed)
    keys = frozenset(key for key, _ in keyed)
    last = len(keyed) - 1

    def init_state(*, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> State:
        return to_device({key: layer.init_state(dtype=dtype) for key, layer in lifted}, device, f"{name}.init_state")

    def check(where: str, state: State, train: Any, generator: Any) -> torch.Generator | None:
        check_train(f"{name}.{where}", train)
        if type(state) is not dict and not isinstance(state, Mapping):
            raise TypeError(f"{who}.{where}: state must be a dict keyed '0'..'{last}' (model.init_state() to "
                            f"start from), got {type(state).__name__}")
        if not state.keys() <= keys:
            raise ValueError(f"{who}.{where}: state has entries {sorted(set(state) - keys)} but the model has "
                             f"{len(keyed)} layers, keyed '0'..'{last}' (is it another model's state?)")
        return as_source(generator, f"{name}.{where}")

    return lifted, init_state, check


def _reverse(name: str, first_skips_dx: bool, pullbacks: list[tuple[str, Any]], params: Params) -> Callable[
    ..., tuple[Params, Tensor | None]
]:
    """A chain's pullback: its layers' pullbacks in reverse, ``dx = J₀ᵀ J₁ᵀ ⋯ Jₙᵀ dy`` (see :func:`compose`)."""

    def pullback(dy: Tensor, *, release: bool = False, need_dx: bool = True) -> tuple[Params, Tensor | None]:
        if not pullbacks:
            raise RuntimeError(f"{name} pullback: it ran with release=True, which freed its saved tensors")
        dparams = {}
        for i in range(len(pullbacks) - 1, -1, -1):
            key, layer_pullback = pullbacks[i]
            if i == 0 and not need_dx and first_skips_dx:
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

    return pullback


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
    keyed, init, check = _children("compose", layers)
    name = f"compose({', '.join(layer.name for layer in layers)})"
    if any(isinstance(layer, StatefulLayer) for layer in layers):
        return _stateful_compose(name, keyed, init, check, layers)

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

        return x, _reverse(name, layers[0].skips_dx, pullbacks, params)

    return Layer(init=init, apply=apply, vjp=vjp, name=name, skips_dx=True, sequence=layers)


def _stateful_compose(name: str, keyed: tuple[tuple[str, Any], ...], init: Callable[..., Params],
                      check: Callable[[str, Params], None], layers: tuple[Any, ...]) -> StatefulLayer:
    """compose with a stateful layer among its children: state and the generator are threaded through them.

    Each child gets its own entry of state and returns its new one; the random
    children draw from the one generator in order, so one generator state
    gives one set of masks.
    """
    lifted, init_state, check_call = _state_of_children(name, "compose", keyed)

    def apply(params: Params, state: State, x: Tensor, *, train: bool,
              generator: torch.Generator | int | None = None) -> tuple[Tensor, State]:
        check("apply", params)
        g = check_call("apply", state, train, generator)
        new_state = {}
        for key, layer in lifted:
            try:
                x, new_state[key] = layer.apply(params.get(key, _NO_PARAMS), state.get(key, _NO_STATE), x,
                                                train=train, generator=g)
            except (ValueError, TypeError) as error:
                raise _in_layer(error, key) from None
        return x, {key: new_state[key] for key in state}  # new_state mirrors state

    def vjp(params: Params, state: State, x: Tensor, *, train: bool,
            generator: torch.Generator | int | None = None) -> tuple[Tensor, State, StatefulPullback]:
        check("vjp", params)
        g = check_call("vjp", state, train, generator)
        new_state, pullbacks = {}, []
        for key, layer in lifted:
            try:
                x, new_state[key], pullback = layer.vjp(params.get(key, _NO_PARAMS), state.get(key, _NO_STATE), x,
                                                        train=train, generator=g)
            except (ValueError, TypeError) as error:
                raise _in_layer(error, key) from None
            pullbacks.append((key, pullback))
        return x, {key: new_state[key] for key in state}, _reverse(name, layers[0].skips_dx, pullbacks, params)

    return StatefulLayer(init=init, init_state=init_state, apply=apply, vjp=vjp, name=name, skips_dx=True,
                         sequence=layers)


def _branches(who: str, layers: tuple[Layer, ...], split: Callable[[Tensor], list[Tensor]] | None,
              merge: Callable[[list[Tensor]], Tensor], unmerge: Callable[[Tensor, list[Tensor]], list[Tensor]],
              unsplit: Callable[[list[Tensor], Tensor], Tensor]) -> Layer | StatefulLayer:
    """A layer that gives each of ``layers`` an input (all ``x``, or ``split(x)``'s parts) and merges the outputs.

    The pullback splits ``dy`` back into the branches' cotangents (``unmerge``), runs each branch's
    pullback, and joins the input gradients (``unsplit``): ``dx = Σ dxᵢ`` when every branch saw all of ``x``.
    With a stateful layer among ``layers`` the result is a :class:`StatefulLayer` that threads state and
    the generator through the branches in order, as compose does.
    """
    keyed, init, check = _children(who, layers)
    name = f"{who}({', '.join(layer.name for layer in layers)})"
    has_state = any(isinstance(layer, StatefulLayer) for layer in layers)
    lifted, init_state, check_call = _state_of_children(name, who, keyed) if has_state else (keyed, None, None)

    def inputs(x: Tensor) -> list[Tensor]:
        if split is not None:
            return split(x)  # it checks x
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
        return [x] * len(keyed)

    def run(where: str, params: Params, x: Tensor, with_vjp: bool, state: State | None = None, train: bool = False,
            generator: Any = None) -> tuple[Tensor, State, list[Tensor], list[tuple[str, Any]]]:
        """The branches run forward: ``(y, new_state, outputs, pullbacks)`` (``new_state`` ``{}`` without state)."""
        check(where, params)
        if state is not None:
            generator = check_call(where, state, train, generator)
        outputs, pullbacks, new_state = [], [], {}
        for (key, layer), part in zip(lifted, inputs(x), strict=True):
            layer_params = params.get(key, _NO_PARAMS)
            try:
                if state is None:
                    y, pullback = layer.vjp(layer_params, part) if with_vjp else (layer.apply(layer_params, part), None)
                elif with_vjp:
                    y, new_state[key], pullback = layer.vjp(layer_params, state.get(key, _NO_STATE), part,
                                                            train=train, generator=generator)
                else:
                    (y, new_state[key]), pullback = layer.apply(layer_params, state.get(key, _NO_STATE), part,
                                                                train=train, generator=generator), None
            except (ValueError, TypeError) as error:
                raise _in_layer(error, key) from None
            outputs.append(y)
            pullbacks.append((key, pullback))
        mirrored = {key: new_state[key] for key in state} if state is not None else {}
        return _merged(name, merge, outputs), mirrored, outputs, pullbacks

    def make_pullback(params: Params, x: Tensor, y: Tensor, outputs: list[Tensor],
                      pullbacks: list[tuple[str, Any]]) -> Pullback:
        shape = _shapes(y)

        def pullback(dy: Tensor) -> tuple[Params, Tensor]:
            if _shapes(dy) != shape:
                got = _shapes(dy) or type(dy).__name__
                raise ValueError(f"{name} pullback: dy has shape {got} but the output y has shape {shape}")
            dparams, dxs = {}, []
            for (key, branch_pullback), dy_branch in zip(pullbacks, unmerge(dy, outputs), strict=True):
                dparams[key], dx = branch_pullback(dy_branch)
                dxs.append(dx)
            return {key: dparams[key] for key in params}, unsplit(dxs, x)

        return pullback

    if has_state:
        def stateful_apply(params: Params, state: State, x: Tensor, *, train: bool,
                           generator: torch.Generator | int | None = None) -> tuple[Tensor, State]:
            y, new_state, _, _ = run("apply", params, x, False, state, train, generator)
            return y, new_state

        def stateful_vjp(params: Params, state: State, x: Tensor, *, train: bool,
                         generator: torch.Generator | int | None = None) -> tuple[Tensor, State, StatefulPullback]:
            y, new_state, outputs, pullbacks = run("vjp", params, x, True, state, train, generator)
            return y, new_state, make_pullback(params, x, y, outputs, pullbacks)

        return StatefulLayer(init=init, init_state=init_state, apply=stateful_apply, vjp=stateful_vjp, name=name)

    def apply(params: Params, x: Tensor) -> Tensor:
        return run("apply", params, x, False)[0]

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        y, _, outputs, pullbacks = run("vjp", params, x, True)
        return y, make_pullback(params, x, y, outputs, pullbacks)

    return Layer(init=init, apply=apply, vjp=vjp, name=name)


def _shapes(value: Any) -> tuple | None:
    """A tensor's shape, a tuple of tensors' shapes (as a tuple), or None for anything else."""
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple) and value and all(isinstance(part, Tensor) for part in value):
        return tuple(tuple(part.shape) for part in value)
    return None


def _parts(name: str, x: Any, count: int | None) -> list[Tensor]:
    """The parts of a tuple input, checked: a tuple of ``count`` tensors (any number ≥ 1 when ``count`` is None)."""
    if not isinstance(x, tuple) or not x or not all(isinstance(part, Tensor) for part in x) or (
        count is not None and len(x) != count
    ):
        want = f"a tuple of {count} tensors" if count is not None else "a tuple of tensors"
        got = (f"a tuple of {len(x)}: ({', '.join(type(part).__name__ for part in x)})" if isinstance(x, tuple)
               else type(x).__name__)
        raise TypeError(f"{name}: x must be {want} (as rf.fan_out or rf.parallel return), got {got}")
    return list(x)


def _merged(name: str, merge: Callable[[list[Tensor]], Tensor], outputs: list[Tensor]) -> Tensor:
    try:
        return merge(outputs)
    except RuntimeError:
        shapes = ", ".join(f"{tuple(y.shape)} {str(y.dtype).removeprefix('torch.')}" for y in outputs)
        raise ValueError(f"{name}: the branches' outputs cannot be merged: {shapes}") from None


def _alike(tensors: list[Tensor], *, last_dim: bool = True) -> None:
    """Raise RuntimeError (which _merged words) unless the parts have one dtype and one shape (but for the last
    dimension, with ``last_dim=False``): a merge must not broadcast or promote, or the pullback's dx would not fit."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.dtype != first.dtype or (t.shape != first.shape if last_dim else t.shape[:-1] != first.shape[:-1]):
            raise RuntimeError("parts differ")


def _sum(tensors: list[Tensor]) -> Tensor:
    _alike(tensors)
    total = tensors[0].clone()  # a new tensor even for one branch, as every layer returns
    for t in tensors[1:]:
        total = total + t
    return total


def add(*layers: Layer) -> Layer:
    """One input to every layer; the outputs added: ``y = Σᵢ layerᵢ(x)``.

    Params ``{"0": ..., "1": ...}`` as compose's. Backward: each branch gets ``dy``,
    and ``dx = Σᵢ dxᵢ``. The outputs must have one shape. ``add()``, with no
    layers, is the merge alone: it sums the parts of a tuple input (what
    :func:`fan_out` and :func:`parallel` return), so
    ``compose(fan_out(f, g), add())`` is ``add(f, g)``.

    >>> import torch, rdl_functional as rf
    >>> both = rf.add(rf.linear(2, 3), rf.linear(2, 3))
    >>> both(both.init(0), torch.ones(4, 2)).shape
    torch.Size([4, 3])
    >>> rf.add()({}, (torch.ones(2), torch.ones(2)))
    tensor([2., 2.])
    """
    if not layers:
        return _tuple_merge("add", _sum, lambda dy, parts: [dy.clone() for _ in parts])
    return _branches("add", layers, None, _sum, lambda dy, outputs: [dy] * len(outputs), lambda dxs, x: _sum(dxs))


def _split_last(dy: Tensor, parts: list[Tensor]) -> list[Tensor]:
    """``dy`` cut along the last dimension into the widths of ``parts``: a merge by concatenation, undone."""
    return list(dy.split([part.shape[-1] for part in parts], dim=-1))


def _cat(parts: list[Tensor]) -> Tensor:
    _alike(parts, last_dim=False)
    return torch.cat(parts, dim=-1)


def concat(*layers: Layer) -> Layer:
    """One input to every layer; the outputs joined along the last dimension: ``y = [layer₀(x), layer₁(x), ...]``.

    Params ``{"0": ..., "1": ...}`` as compose's. Backward: each branch gets its
    slice of ``dy``, and ``dx = Σᵢ dxᵢ``. ``concat()``, with no layers, joins
    the parts of a tuple input (see :func:`add`).

    >>> import torch, rdl_functional as rf
    >>> wide = rf.concat(rf.linear(2, 3), rf.linear(2, 4))
    >>> wide(wide.init(0), torch.ones(5, 2)).shape
    torch.Size([5, 7])
    """
    if not layers:
        return _tuple_merge("concat", _cat, lambda dy, parts: [part.clone() for part in _split_last(dy, parts)])
    return _branches("concat", layers, None, _cat, _split_last, lambda dxs, x: _sum(dxs))


def fan_out(*layers: Layer) -> Layer:
    """One input to every layer; the outputs as a tuple: ``y = (layer₀(x), layer₁(x), ...)``.

    Params ``{"0": ..., "1": ...}`` as compose's. The pullback takes a tuple
    ``dy`` (one cotangent per output) and returns ``dx = Σᵢ dxᵢ``. Follow it
    with :func:`parallel` (each part through its own layers) and a merge,
    ``add()`` or ``concat()``: stax's FanOut, parallel and FanIn.

    >>> import torch, rdl_functional as rf
    >>> model = rf.compose(rf.fan_out(rf.linear(2, 3), rf.tanh), rf.parallel(rf.relu, rf.linear(2, 1)), rf.concat())
    >>> model(model.init(0), torch.ones(4, 2)).shape
    torch.Size([4, 4])
    """
    return _branches("fan_out", layers, None, tuple, lambda dy, outputs: list(dy), lambda dxs, x: _sum(dxs))


def parallel(*layers: Layer, sizes: tuple[int, ...] | None = None) -> Layer:
    """Layer ``i`` applied to part ``i`` of the input.

    The parts are a tuple's (``sizes=None``: ``x`` is a tuple of one tensor per
    layer, as :func:`fan_out` returns, and ``y`` is the tuple of their outputs),
    or slices of one tensor's last dimension (``sizes``: ``x[..., :2]``,
    ``x[..., 2:5]``, ... for ``sizes=(2, 3)``, and the outputs joined along
    the last dimension). Backward: each branch gets its part of ``dy``; ``dx``
    is the branches' input gradients, as a tuple or joined back.

    >>> import torch, rdl_functional as rf
    >>> both = rf.parallel(rf.linear(2, 1), rf.tanh, sizes=(2, 3))
    >>> both(both.init(0), torch.ones(4, 5)).shape
    torch.Size([4, 4])
    >>> pair = rf.parallel(rf.relu, rf.tanh)
    >>> pair({}, (torch.tensor([-1.0]), torch.tensor([0.0])))
    (tensor([0.]), tensor([0.]))
    """
    if sizes is None:
        name = f"parallel({', '.join(getattr(layer, 'name', '?') for layer in layers)})"
        return _branches("parallel", layers, lambda x: _parts(name, x, len(layers)), tuple,
                         lambda dy, outputs: list(dy), lambda dxs, x: tuple(dxs))
    if not isinstance(sizes, (tuple, list)) or len(sizes) != len(layers) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes
    ):
        raise ValueError(f"parallel: sizes must give a positive int for each of the {len(layers)} layers, "
                         f"got {sizes!r}")
    sizes = tuple(sizes)

    def split(x: Tensor) -> list[Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"parallel: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != sum(sizes):
            raise ValueError(f"parallel: x must have {sum(sizes)} features (sizes {sizes}), got shape "
                             f"{tuple(x.shape)}")
        return list(x.split(sizes, dim=-1))

    return _branches("parallel", layers, split, _cat, _split_last, lambda dxs, x: _cat(dxs))


def _tuple_merge(who: str, merge: Callable[[list[Tensor]], Tensor],
                 unmerge: Callable[[Tensor, list[Tensor]], list[Tensor]]) -> Layer:
    """A parameterless layer that merges the parts of a tuple input into one tensor; ``dx`` is a tuple."""
    name = f"{who}()"

    def forward(where: str, params: Params, x: Any) -> tuple[Tensor, list[Tensor]]:
        if params or not isinstance(params, Mapping):
            got = f"keys {sorted(params)}" if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(f"{name}.{where}: {name} has no parameters, so params must be {{}}, got {got}")
        parts = _parts(f"{name}.{where}", x, None)
        return _merged(name, merge, parts), parts

    def apply(params: Params, x: Any) -> Tensor:
        return forward("apply", params, x)[0]

    def vjp(params: Params, x: Any) -> tuple[Tensor, Pullback]:
        y, parts = forward("vjp", params, x)
        shape, shapes = y.shape, [part.shape for part in parts]

        def pullback(dy: Tensor) -> tuple[Params, tuple[Tensor, ...]]:
            if not isinstance(dy, Tensor) or dy.shape != shape:
                raise ValueError(f"{name} pullback: dy has shape {_shapes(dy) or type(dy).__name__} but the output "
                                 f"y has shape {tuple(shape)}")
            # The merge's inverse needs the parts' shapes only: the parts themselves are not kept alive.
            return {}, tuple(unmerge(dy, [SimpleNamespace(shape=s) for s in shapes]))

        return y, pullback

    return Layer(init=_no_params, apply=apply, vjp=vjp, name=name)


def residual(layer: Layer | StatefulLayer) -> Layer | StatefulLayer:
    """``y = x + layer(x)``: a skip connection. Params (and state) are the layer's own; ``dx = dy + dx_layer``.

    >>> import torch, rdl_functional as rf
    >>> block = rf.residual(rf.compose(rf.linear(3, 3), rf.relu))
    >>> block(block.init(0), torch.zeros(2, 3)).shape
    torch.Size([2, 3])
    """
    if not isinstance(layer, (Layer, StatefulLayer)):
        raise TypeError(f"residual: expected a Layer, got {type(layer).__name__}")
    name = f"residual({layer.name})"

    def checked(y: Tensor, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or y.shape != x.shape:
            raise ValueError(f"{name}: the layer's output has shape {tuple(y.shape)} but x has "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}; a skip "
                             "connection needs the two alike")
        return x + y

    def skip(inner_pullback: Callable[[Tensor], tuple[Params, Tensor]]) -> Pullback:
        def pullback(dy: Tensor) -> tuple[Params, Tensor]:
            dparams, dx = inner_pullback(dy)
            return dparams, dy + dx  # the skip passes dy through untouched

        return pullback

    if isinstance(layer, StatefulLayer):
        def stateful_apply(params: Params, state: State, x: Tensor, *, train: bool,
                           generator: torch.Generator | int | None = None) -> tuple[Tensor, State]:
            inner, new_state = layer.apply(params, state, x, train=train, generator=generator)
            return checked(inner, x), new_state

        def stateful_vjp(params: Params, state: State, x: Tensor, *, train: bool,
                         generator: torch.Generator | int | None = None) -> tuple[Tensor, State, StatefulPullback]:
            inner, new_state, inner_pullback = layer.vjp(params, state, x, train=train, generator=generator)
            return checked(inner, x), new_state, skip(inner_pullback)

        return StatefulLayer(init=placed(layer.init, f"{name}.init"),
                             init_state=placed(lambda *, dtype: layer.init_state(dtype=dtype), f"{name}.init_state"),
                             apply=stateful_apply, vjp=stateful_vjp, name=name)

    def apply(params: Params, x: Tensor) -> Tensor:
        return checked(layer.apply(params, x), x)

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        inner, inner_pullback = layer.vjp(params, x)
        return checked(inner, x), skip(inner_pullback)

    return Layer(init=placed(layer.init, f"{name}.init"), apply=apply, vjp=vjp, name=name)
