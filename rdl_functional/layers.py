"""Layers: each one a record of three pure functions, ``init`` / ``apply`` / ``vjp``.

The contract, stated once (the vocabulary is ``torch.func``'s)::

    init(generator, *, dtype=torch.float32) -> params      a dict of tensors ({} if none)
    apply(params, x) -> y                                   x: (batch, features)
    vjp(params, x) -> (y, pullback)                         one forward pass
        pullback(dy) -> (dparams, dx)                       dparams mirrors params

What the library may exploit about a layer is declared on its record, never
set on a function: ``skips_dx`` (its pullback takes ``need_dx=False``),
``sequence`` (the layers a compose chains) and ``stacked`` (its form for a
stack of models). A layer that declares nothing is still a whole layer.

A pullback closes over what its forward computed (the output ``y`` for the
activations, ``x`` for linear), so nothing is computed twice. Nothing here
mutates an argument, caches between calls, or touches the global RNG.

Each backward formula is written beside its code. Where torch has a fused
kernel for the formula (``threshold_backward``, ``tanh_backward``, ...) we call
that kernel: it is one tensor op instead of three, and it is the very op that
torch's autograd runs, so our float32 training trajectories match torch.nn's
bit for bit.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from ._random import as_generator
from .initializers import INITIALIZERS, Initializer

Params = dict[str, Any]
Pullback = Callable[[Tensor], tuple[Params, Tensor]]

__all__ = [
    "Layer",
    "identity",
    "leaky_relu",
    "linear",
    "relu",
    "sigmoid",
    "tanh",
]

_aten = torch.ops.aten
_threshold_backward = _aten.threshold_backward.default
_tanh_backward = _aten.tanh_backward.default
_sigmoid_backward = _aten.sigmoid_backward.default
_leaky_relu = _aten.leaky_relu.default
_leaky_relu_backward = _aten.leaky_relu_backward.default
# The binding behind torch.nn.functional.linear: at::linear, which for a matrix
# input is addmm(b, x, Wᵀ), the same kernel, without the Python-side transpose
# and with cheaper argument parsing than torch.addmm's (about 7 µs a call here).
_linear = torch._C._nn.linear


@attrs.frozen
class Layer:
    """A layer: three pure functions over an explicit params tree.

    ``layer(params, x)`` is ``layer.apply(params, x)``. Build layers with the
    constructors (:func:`linear`, :func:`leaky_relu`, :func:`~rdl_functional.compose`)
    or use the parameterless values (:data:`relu`, :data:`tanh`, ...).

    The record keeps one contract for every layer, the library's and yours:
    ``init`` called with an int seed passes your init function a
    ``torch.Generator`` seeded with it (as ``compose`` passes one), and
    ``apply`` called with arguments it cannot take
    (``layer(params, state, x, train=True)``) raises a ``TypeError`` that says
    how it is called and what was passed.

    Attributes:
        init: ``(generator, *, dtype=torch.float32) -> params``.
        apply: ``(params, x) -> y``.
        vjp: ``(params, x) -> (y, pullback)`` with ``pullback(dy) -> (dparams, dx)``.
        name: how the layer prints and how error messages name it.
        skips_dx: the pullback also takes ``pullback(dy, need_dx=False)`` and may
            then return ``None`` for ``dx``, skipping an input gradient nobody reads
            (the first layer's). Leave it ``False`` unless the pullback accepts it.
        sequence: the layers this one chains, in order (set by ``compose``), so
            that :func:`~rdl_functional.value_and_grad` can plan through them.
        stacked: this layer's form for a stack of models, whose every param and
            input have a leading model dimension; ``None`` lets
            :func:`~rdl_functional.stacked` map the layer over the models with
            ``torch.func.vmap``, which is correct for any layer, only slower.
    """

    init: Callable[..., Params]
    apply: Callable[[Params, Tensor], Tensor]
    vjp: Callable[[Params, Tensor], tuple[Tensor, Pullback]]
    name: str = "layer"
    skips_dx: bool = False
    sequence: tuple[Layer, ...] = ()
    stacked: Layer | None = None

    def __attrs_post_init__(self) -> None:
        # Said once here for every layer, the library's and yours: init gets a torch.Generator for an int seed
        # (as compose passes one), and apply called the wrong way says how it is called.
        object.__setattr__(self, "init", seeded(self.init, lambda: self.name))
        object.__setattr__(self, "apply", called_as(self.apply, lambda: (
            f"{self.name}: a Layer is called as layer(params, x) -> y (or layer.apply(params, x))"), _plain_hint))

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.apply(*args, **kwargs)

    def __repr__(self) -> str:
        return self.name


def _plain_hint(args: tuple, kwargs: dict) -> str:
    if len(args) > 2 or {"state", "train", "generator"} & kwargs.keys():
        return ("; it has no state and takes no train= or generator=: call layer(params, x), or lift it with "
                "rf.stateful(layer) to call it as layer(params, {}, x, train=...)")
    return ""


def seeded(init: Callable[..., Any], name: Callable[[], str] = lambda: "layer") -> Callable[..., Any]:
    """``init`` given a ``torch.Generator`` seeded with an int where it was called with the int (``init(0)``),
    as ``compose`` passes a generator to its layers: one kind of argument for every init function. Anything
    else (``init(1.5)``, ``init(True)``) is refused with a ``TypeError`` naming the layer (``name()``)."""
    if getattr(init, "_rf_seeded", False):
        return init

    @functools.wraps(init)
    def init_from_seed(*args: Any, **kwargs: Any) -> Any:
        if args and not isinstance(args[0], torch.Generator):
            args = (as_generator(args[0], f"{name()}.init"), *args[1:])
        elif "generator" in kwargs and not isinstance(kwargs["generator"], torch.Generator):
            kwargs["generator"] = as_generator(kwargs["generator"], f"{name()}.init")
        return init(*args, **kwargs)

    init_from_seed._rf_seeded = True  # type: ignore[attr-defined]
    return init_from_seed


def called_as(fn: Callable[..., Any], contract: Callable[[], str],
              hint: Callable[[tuple, dict], str] = lambda args, kwargs: "") -> Callable[..., Any]:
    """``fn``, whose call with arguments it cannot take raises a ``TypeError`` saying ``contract()`` (how it
    is called) and what was passed, instead of Python's "missing 1 required positional argument". Costs
    nothing more than a call until then: the arguments are looked at only when the call fails."""
    if getattr(fn, "_rf_called_as", False):
        return fn

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TypeError:
            if _binds(fn, args, kwargs):
                raise  # a TypeError from inside fn, the layer's own message
            passed = [type(a).__name__ for a in args] + [
                f"{key}={value!r}" if value is None or type(value) in (bool, int, float) else
                f"{key}={type(value).__name__}" for key, value in kwargs.items()]
            raise TypeError(f"{contract()}; got ({', '.join(passed)}){hint(args, kwargs)}") from None

    checked._rf_called_as = True  # type: ignore[attr-defined]
    return checked


def _binds(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    """Whether ``fn`` takes these arguments (True where its signature cannot be read: nothing to say then)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _check_float_dtype(where: str, dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}")


def _check_tensor(where: str, what: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {what} must be a torch.Tensor, got {type(x).__name__}")


def _check_cotangent(name: str, dy: Any, shape: torch.Size, dtype: torch.dtype) -> None:
    """``shape`` and ``dtype`` are the output's: a pullback keeps them, not the output, alive.

    Runs on every backward step, so nothing is formatted unless ``dy`` is wrong.
    """
    if not isinstance(dy, Tensor) or dy.shape != shape or dy.dtype != dtype:
        _check_tensor(f"{name} pullback", "the cotangent dy", dy)
        if dy.shape != shape:
            raise ValueError(f"{name} pullback: dy has shape {tuple(dy.shape)} but the output y has shape "
                             f"{tuple(shape)}")
        raise TypeError(f"{name} pullback: dy is {dy.dtype} but the output y is {dtype} (a cotangent has its "
                        "output's dtype)")


# ---------------------------------------------------------------------------
# Parameterless, elementwise layers


def _no_params(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Params:
    return {}


def to_device(tree: Any, device: torch.device | str | None, where: str) -> Any:
    """``tree`` moved to ``device`` (``None``: left where it is), with a clear error for a device that is not there.

    Params are drawn on the CPU and then moved, so a generator state gives the
    same bits on every device.
    """
    if device is None:
        return tree
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{where}: device must be a torch.device or a name such as 'cpu' or 'cuda', "
                         f"got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}: CUDA was asked for (device={str(device)!r}) but torch sees no CUDA device on this "
                         "machine (torch.cuda.is_available() is False)")
    from .tree import tree_map  # the tree module imports nothing of ours; imported here to keep layers first

    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree) if isinstance(tree, Mapping) else \
        tree.to(device)


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for a device type (``False`` for one autocast does not know, as meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def placed(draw: Callable[..., Any], where: str) -> Callable[..., Any]:
    """``draw(generator, *, dtype)`` with a ``device`` keyword: drawn on the CPU, then moved there."""

    def init(*args: Any, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Any:
        return to_device(draw(*args, dtype=dtype), device, where)

    return init


def _elementwise(
    name: str,
    forward: Callable[[Tensor], Tensor],
    backward: Callable[[Tensor, Tensor], Tensor],
    *,
    keeps: str = "y",
) -> Layer:
    """A parameterless layer ``y = forward(x)`` with ``dx = backward(dy, kept)``.

    ``kept`` is ``y`` (``keeps="y"``) or ``x`` (``keeps="x"``): the pullback
    holds on to that one tensor only, so the other can be freed during the
    forward pass, as torch's autograd frees it.
    """

    def check(where: str, params: Params, x: Tensor) -> None:
        if params:
            raise ValueError(
                f"{name}.{where}: {name} has no parameters, so params must be {{}}, "
                f"got keys {sorted(params)} (are the params of another layer misplaced?)"
            )
        if not isinstance(x, Tensor):
            _check_tensor(f"{name}.{where}", "x", x)

    def apply(params: Params, x: Tensor) -> Tensor:
        if params or not isinstance(x, Tensor):
            check("apply", params, x)
        return forward(x)

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        if params or not isinstance(x, Tensor):
            check("vjp", params, x)
        y = forward(x)
        kept, shape, dtype = (y if keeps == "y" else x), y.shape, y.dtype

        def pullback(dy: Tensor) -> tuple[Params, Tensor]:
            _check_cotangent(name, dy, shape, dtype)
            return {}, backward(dy, kept)

        return y, pullback

    layer = Layer(init=_no_params, apply=apply, vjp=vjp, name=name)
    # Elementwise, so any leading dimensions, a stack of models' included, need nothing new.
    return attrs.evolve(layer, stacked=layer)


relu = _elementwise(
    "relu",
    torch.relu,  # y = max(x, 0)
    lambda dy, y: _threshold_backward(dy, y, 0),  # dx = dy ⊙ [y > 0]
)

tanh = _elementwise(
    "tanh",
    torch.tanh,
    _tanh_backward,  # dx = dy ⊙ (1 − y²)
)

sigmoid = _elementwise(
    "sigmoid",
    torch.sigmoid,  # y = 1 / (1 + e⁻ˣ)
    _sigmoid_backward,  # dx = dy ⊙ y ⊙ (1 − y)
)

# Identity returns new tensors, as every layer does, so that a caller who
# writes into y (or dx) never writes into x (or dy).
identity = _elementwise("identity", torch.clone, lambda dy, y: dy.clone())  # dx = dy


def leaky_relu(negative_slope: float = 0.01) -> Layer:
    """Leaky ReLU, ``y = x`` for ``x > 0`` else ``negative_slope · x``.

    The backward pass is ``dx = dy`` where ``x > 0``, else ``negative_slope · dy``.

    >>> import torch
    >>> leaky_relu(0.1)({}, torch.tensor([[-2.0, 3.0]]))
    tensor([[-0.2000,  3.0000]])
    """
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"leaky_relu: negative_slope must be a number, got {type(negative_slope).__name__}")
    if not math.isfinite(negative_slope):
        raise ValueError(f"leaky_relu: negative_slope must be finite, got {negative_slope}")
    slope = float(negative_slope)
    return _elementwise(
        f"leaky_relu({slope!r})",
        lambda x: _leaky_relu(x, slope),
        lambda dy, x: _leaky_relu_backward(dy, x, slope, False),
        keeps="x",
    )


# ---------------------------------------------------------------------------
# Linear


def _check_features(name: str, **sizes: Any) -> None:
    for arg, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {size!r}")


def weight_initializer(where: str, init: Any) -> tuple[Initializer, list[str]]:
    """The function ``(generator, shape, dtype) -> weight`` that ``init`` names (or is), and the option that
    prints in the layer's name (``[]`` for the default ``"torch_default"``): what linear and conv take as ``init=``."""
    if isinstance(init, str):
        if init not in INITIALIZERS:
            raise ValueError(f"{where}: init must be one of {sorted(INITIALIZERS)} or a function "
                             f"(generator, shape, dtype) -> weight, got {init!r}")
        return INITIALIZERS[init], [] if init == "torch_default" else [f"init={init!r}"]
    if callable(init):
        return init, [f"init={getattr(init, '__name__', 'function')}"]
    raise TypeError(f"{where}: init must be a name or a function (generator, shape, dtype) -> weight, "
                    f"got {type(init).__name__}")


def draw_weight_checked(where: str, draw: Initializer, generator: torch.Generator, shape: tuple[int, ...],
                        dtype: torch.dtype) -> Tensor:
    """``draw(generator, shape, dtype)``, refused by name where a user's init function returns anything else."""
    weight = draw(generator, shape, dtype)
    if not isinstance(weight, Tensor) or weight.shape != shape or weight.dtype != dtype:
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{where}: the init function must return a {dtype} tensor of shape {shape}, got {got}")
    return weight


def linear(in_features: int, out_features: int, bias: bool = True, *,
           init: str | Initializer = "torch_default") -> Layer:
    """A fully connected layer, ``y = x Wᵀ + b``, with torch.nn.Linear's layout.

    Params: ``{"weight": (out_features, in_features), "bias": (out_features,)}``,
    drawn as ``torch.nn.Linear`` draws them (uniform in ``±1/√in_features``;
    given a generator in the same state, the very same numbers). With
    ``bias=False``, ``y = x Wᵀ`` and the params are ``{"weight": ...}`` alone,
    as ``torch.nn.Linear(..., bias=False)``'s state dict.

    ``init`` chooses how the weight is drawn: a name of
    :data:`~rdl_functional.initializers.INITIALIZERS` (``"torch_default"``,
    ``"xavier_uniform"``, ``"xavier_normal"``, ``"kaiming_uniform"``,
    ``"kaiming_normal"``, ``"orthogonal"``, ``"zeros"``: ``torch.nn.init``'s
    formulas with their default arguments) or a function
    ``(generator, shape, dtype) -> weight``. The weight is drawn first, then
    the bias as ``torch.nn.Linear`` draws it.

    Input ``x``: ``(..., in_features)``, with any leading dimensions (none: one
    example, as ``torch.func.vmap`` passes), as ``torch.nn.Linear`` takes it;
    output: ``(..., out_features)``. Backward: ``dW = dyᵀ x``, ``db = Σ dy``
    (the sums over all leading dimensions), ``dx = dy W``.

    >>> import torch
    >>> layer = linear(3, 2)
    >>> params = layer.init(torch.Generator().manual_seed(0))
    >>> {k: tuple(v.shape) for k, v in params.items()}
    {'weight': (2, 3), 'bias': (2,)}
    >>> layer(params, torch.ones(5, 3)).shape
    torch.Size([5, 2])
    >>> list(linear(3, 2, bias=False).init(0))
    ['weight']
    >>> linear(3, 2, init="zeros").init(0)["weight"]
    tensor([[0., 0., 0.],
            [0., 0., 0.]])
    """
    _check_features("linear", in_features=in_features, out_features=out_features)
    if not isinstance(bias, bool):
        raise TypeError(f"linear: bias must be True or False, got {bias!r}")
    draw_weight, option = weight_initializer("linear", init)
    keys = ("weight", "bias") if bias else ("weight",)
    name = f"linear({', '.join([str(in_features), str(out_features), *([] if bias else ['bias=False']), *option])})"
    bias_bound = 1 / math.sqrt(in_features)  # torch.nn.Linear's: uniform_(bias, ±1/√fan_in)

    def init_params(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Params:
        g = as_generator(generator, f"{name}.init")
        _check_float_dtype(f"{name}.init", dtype)
        params = {"weight": draw_weight_checked(f"{name}.init", draw_weight, g, (out_features, in_features), dtype)}
        if bias:
            params["bias"] = torch.empty(out_features, dtype=dtype).uniform_(-bias_bound, bias_bound, generator=g)
        return to_device(params, device, f"{name}.init")

    def apply(params: Params, x: Tensor) -> Tensor:
        weight, b = _linear_unpack(name, "apply", params, x, in_features, 2, out_features, keys)
        return _linear(x, weight, b)  # y = x Wᵀ + b

    def with_bias(dweight: Tensor, dbias: Any) -> Params:
        return {"weight": dweight, "bias": dbias() if callable(dbias) else dbias} if bias else {"weight": dweight}

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        weight, b = _linear_unpack(name, "vjp", params, x, in_features, 2, out_features, keys)
        y = _linear(x, weight, b)
        shape, dtype = y.shape, y.dtype
        mixed = dtype != weight.dtype or x.dtype != weight.dtype  # only under torch.autocast

        def pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Tensor | None]:
            _check_cotangent(name, dy, shape, dtype)
            if mixed:
                dparams, dx = _autocast_pullback(dy, x, weight, in_features, out_features, need_dx)
                return with_bias(dparams["weight"], dparams["bias"]), dx
            if x.dim() == 2:
                # dW = dyᵀ x, db = Σ_batch dy, dx = dy W: the products torch's addmm backward forms.
                return with_bias(dy.t().mm(x), lambda: dy.sum(0)), dy.mm(weight) if need_dx else None
            # Any other leading dimensions (none: one example, as under vmap): the same sums over all of them.
            flat_dy = dy.reshape(-1, out_features)
            dweight = flat_dy.t().mm(x.reshape(-1, in_features))
            return with_bias(dweight, lambda: flat_dy.sum(0)), dy.matmul(weight) if need_dx else None

        return y, pullback

    def stacked_forward(weight: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
        if b is None:
            return torch.bmm(x, weight.transpose(1, 2))  # yₘ = xₘ Wₘᵀ
        return torch.baddbmm(b.unsqueeze(1), x, weight.transpose(1, 2))  # yₘ = xₘ Wₘᵀ + bₘ

    def stacked_apply(params: Params, x: Tensor) -> Tensor:
        return stacked_forward(*_linear_unpack(name, "apply", params, x, in_features, 3, out_features, keys), x)

    def stacked_vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        y = stacked_forward(*_linear_unpack(name, "vjp", params, x, in_features, 3, out_features, keys), x)
        weight = params["weight"]
        shape, dtype = y.shape, y.dtype

        def pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Tensor | None]:
            _check_cotangent(name, dy, shape, dtype)
            # Per model m: dWₘ = dyₘᵀ xₘ, dbₘ = Σ_batch dyₘ, dxₘ = dyₘ Wₘ, one batched product each.
            return with_bias(dy.transpose(1, 2).bmm(x), lambda: dy.sum(1)), dy.bmm(weight) if need_dx else None

        return y, pullback

    # The stack of models: weight (models, out, in), bias (models, out), x (models, batch, in).
    stacked = Layer(init=init_params, apply=stacked_apply, vjp=stacked_vjp, name=name, skips_dx=True)
    return Layer(init=init_params, apply=apply, vjp=vjp, name=name, skips_dx=True, stacked=stacked)


def _autocast_pullback(dy: Tensor, x: Tensor, weight: Tensor, in_features: int, out_features: int,
                       need_dx: bool) -> tuple[Params, Tensor | None]:
    """linear's pullback under torch.autocast: the products in the autocast dtype, as autograd runs them, and
    each gradient in the dtype of what it is the gradient of (a float32 param's in float32, x's in x's)."""
    flat_dy = dy.reshape(-1, out_features)
    dweight = flat_dy.t().mm(x.reshape(-1, in_features).to(flat_dy.dtype)).to(weight.dtype)
    dx = dy.matmul(weight.to(dy.dtype)).to(x.dtype) if need_dx else None
    return {"weight": dweight, "bias": flat_dy.sum(0).to(weight.dtype)}, dx


def _linear_params_error(where: str, params: Any, keys: tuple[str, ...]) -> Exception:
    expected = ", ".join(repr(key) for key in keys)
    if not isinstance(params, Mapping):
        return TypeError(f"{where}: params must be a dict with {expected.replace(', ', ' and ')}, "
                         f"got {type(params).__name__}")
    missing = [key for key in keys if key not in params]
    if missing:
        return ValueError(f"{where}: params has no {missing[0]!r} (expected keys {expected}; got {sorted(params)})")
    extra = sorted(set(params) - set(keys))
    fix = " (a layer built with bias=False takes no 'bias')" if extra == ["bias"] else ""
    return ValueError(f"{where}: params has unexpected keys {extra} (expected {expected}){fix}")


def _linear_input_error(where: str, x: Any, weight: Any, bias: Any, in_features: int, out_features: int,
                        dims: int) -> Exception | None:
    for key, value in (("weight", weight), ("bias", bias)):
        if not isinstance(value, Tensor) and (key == "weight" or value is not None):
            return TypeError(f"{where}: params[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    if not isinstance(x, Tensor):
        return TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    stacked = weight.dim() == 3
    if weight.dim() not in (2, 3):
        return ValueError(f"{where}: weight must have shape (out, in), got {tuple(weight.shape)}")
    if weight.dim() != dims:
        return ValueError(
            f"{where}: weight {tuple(weight.shape)} holds a stack of {weight.shape[0]} models; "
            "run a stack through rf.stacked(layer)"
            if stacked
            else f"{where}: weight has shape {tuple(weight.shape)} but a stack of models needs (models, out, in)"
        )
    models = (weight.shape[0],) if stacked else ()
    if weight.shape[-2:] != (out_features, in_features):
        return ValueError(f"{where}: params['weight'] has shape {tuple(weight.shape)} but the layer was built for "
                          f"{(*models, out_features, in_features)} (out, in) (are these another layer's params?)")
    if bias is not None and bias.shape != (*models, out_features):
        return ValueError(f"{where}: params['bias'] has shape {tuple(bias.shape)} but the layer was built for "
                          f"{(*models, out_features)} (are these another layer's params?)")
    if bias is not None and bias.dtype != weight.dtype:
        return TypeError(f"{where}: params['bias'] is {bias.dtype} but params['weight'] is {weight.dtype}")
    for what, tensor in (("params['bias']", bias), ("x", x)):
        if tensor is not None and tensor.device != weight.device:
            return ValueError(f"{where}: {what} is on {tensor.device} but params['weight'] is on {weight.device} "
                              "(move them to one device: rf.tree_map(lambda p: p.to(device), params), x.to(device))")
    if (x.dim() != weight.dim()) if stacked else x.dim() < 1:
        expected = f"(models={weight.shape[0]}, batch, {in_features})" if stacked else f"(..., {in_features})"
        return ValueError(f"{where}: x must have shape {expected}, got {tuple(x.shape)}")
    if stacked and x.shape[0] != weight.shape[0]:
        return ValueError(f"{where}: x holds {x.shape[0]} models' inputs but the params stack {weight.shape[0]}")
    if x.dim() == 1 and x.shape[0] != weight.shape[-1]:  # read as one example: its entries are its features
        n, expected = x.shape[0], weight.shape[-1]
        fix = (f"for {n} rows of one feature, pass x[:, None] or x.reshape(-1, 1)" if expected == 1 else
               f"a batch is (batch, {expected}), one example ({expected},)")
        return ValueError(f"{where}: x is 1-D with {n} entries, which reads as one example of {n} features, but "
                          f"weight expects {expected} ({fix})")
    if x.shape[-1] != weight.shape[-1]:
        return ValueError(
            f"{where}: x has {x.shape[-1]} features but weight expects {weight.shape[-1]} "
            f"(was the layer built as linear({x.shape[-1]}, ...)?)"
        )
    if autocast_on(x.device.type):
        return None  # under torch.autocast the dtypes differ on purpose: its rules cast them
    return TypeError(
        f"{where}: x is {x.dtype} but weight is {weight.dtype} "
        f"(convert x with x.to({weight.dtype}) or init the params with that dtype)"
    )


def _linear_unpack(
    name: str, where: str, params: Params, x: Tensor, in_features: int, dims: int, out_features: int = 0,
    keys: tuple[str, ...] = ("weight", "bias"),
) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` once params and ``x`` (of ``dims`` dimensions, 3 for a stack) fit the layer; the bias
    is ``None`` for a layer built with ``bias=False`` (``keys`` is then ``("weight",)``).

    Runs on every call, so the happy path is a few cheap comparisons; the
    messages are composed only when something is wrong.
    """
    try:
        weight, bias = params["weight"], (params["bias"] if len(keys) == 2 else None)
    except (KeyError, TypeError, IndexError):
        raise _linear_params_error(f"{name}.{where}", params, keys) from None
    if len(params) != len(keys):
        raise _linear_params_error(f"{name}.{where}", params, keys)
    keep = bias
    if bias is None:  # a view of the weight's first column stands in for the shape, dtype and device checks below
        usable = isinstance(weight, Tensor) and weight.dim() >= 1 and weight.size(-1) > 0
        bias = weight[..., 0] if usable else weight
    if (
        not isinstance(x, Tensor)
        or not isinstance(weight, Tensor)
        or not isinstance(bias, Tensor)
        or (x.dim() != dims if dims == 3 else x.dim() < 1)
        or weight.dim() != dims
        or weight.shape[-2:] != (out_features, in_features)
        or bias.dim() != dims - 1
        or bias.size(-1) != out_features
        or bias.dtype != weight.dtype
        or x.size(-1) != in_features
        or x.dtype != weight.dtype
        or x.device != weight.device
        or bias.device != weight.device
        or (dims == 3 and (x.size(0) != weight.size(0) or bias.size(0) != weight.size(0)))
    ):
        error = _linear_input_error(f"{name}.{where}", x, weight, keep, in_features, out_features, dims)
        if error is not None:
            raise error
    return weight, keep
