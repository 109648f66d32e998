"""Layers with state and randomness: the :class:`StatefulLayer` record, :func:`dropout` and :func:`batch_norm`.

The contract (docs/state-and-randomness.md explains the choice)::

    init(generator, *, dtype=torch.float32) -> params          as a Layer's
    init_state(*, dtype=torch.float32) -> state                a dict of tensors, {} if none
    apply(params, state, x, *, train, generator=None) -> (y, new_state)
    vjp(params, state, x, *, train, generator=None) -> (y, new_state, pullback)
        pullback(dy) -> (dparams, dx)                          state gets no gradient

``train`` says whether the layer is training (dropout drops, batch norm
normalizes with the batch's statistics and updates its running ones) or
evaluating; it is required, so no evaluation runs in training mode by
accident. Randomness comes only from ``generator``, a ``torch.Generator`` (or
an ``int`` seed) passed per call: a layer that needs it and gets none raises,
and the global RNG is never read. Nothing is mutated: ``new_state`` holds new
tensors, and the ``state`` passed in is still valid afterwards.

A plain :class:`~rdl_functional.Layer` needs none of this and keeps its
``apply(params, x)``; :func:`stateful` lifts one to this contract (state
``{}``), which is what ``compose`` does with the plain layers beside a
stateful one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import torch
from torch import Tensor

from ._checks import check_eps, check_no_params, check_params
from ._images import check_image
from ._random import BatchShard, as_generator
from .distributed import all_reduce_mean, is_data_parallel
from .layers import (
    Layer,
    Params,
    _check_cotangent,
    _check_features,
    _check_float_dtype,
    _no_params,
    autocast_on,
    called_as,
    placed,
    seeded,
    to_device,
)

State = dict[str, Any]
StatefulPullback = Callable[..., tuple[Params, Tensor | None]]

__all__ = ["State", "StatefulLayer", "batch_norm", "dropout", "stateful"]

_NO_STATE: Mapping[str, Any] = MappingProxyType({})
_native_batch_norm = torch.ops.aten.native_batch_norm.default
_native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward.default


@attrs.frozen
class StatefulLayer:
    """A layer that carries state (batch norm's running statistics) or draws randomness (dropout).

    ``layer(params, state, x, train=..., generator=...)`` is ``layer.apply(...)``
    and returns ``(y, new_state)``. Build one with :func:`dropout`,
    :func:`batch_norm`, or ``rf.compose`` of layers among which one is stateful.
    As a :class:`~rdl_functional.Layer`'s, its ``init`` gets a generator for an
    int seed, and its ``apply`` called the wrong way (``model.apply(params, x)``)
    raises a ``TypeError`` that says how it is called.

    Attributes:
        init: ``(generator, *, dtype=torch.float32) -> params``, as a Layer's.
        init_state: ``(*, dtype=torch.float32) -> state``, the state before any training.
        apply: ``(params, state, x, *, train, generator=None) -> (y, new_state)``.
        vjp: ``(params, state, x, *, train, generator=None) -> (y, new_state, pullback)``
            with ``pullback(dy) -> (dparams, dx)``.
        name: how the layer prints and how error messages name it.
        skips_dx: the pullback also takes ``need_dx=False`` (see :class:`~rdl_functional.Layer`).
        sequence: the layers this one chains, in order (set by ``compose``).
    """

    init: Callable[..., Params]
    init_state: Callable[..., State]
    apply: Callable[..., tuple[Tensor, State]]
    vjp: Callable[..., tuple[Tensor, State, StatefulPullback]]
    name: str = "stateful layer"
    skips_dx: bool = False
    sequence: tuple[Layer | StatefulLayer, ...] = ()

    def __attrs_post_init__(self) -> None:
        # As a Layer's: init gets a torch.Generator for an int seed, and apply called the wrong way says how.
        object.__setattr__(self, "init", seeded(self.init, lambda: self.name))
        object.__setattr__(self, "apply", called_as(self.apply, lambda: (
            f"{self.name} carries state or randomness: call it as layer(params, state, x, train=True or False, "
            "generator=...) -> (y, new_state) (or layer.apply(...)), with state = layer.init_state() to start from")))

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Tensor, State]:
        return self.apply(*args, **kwargs)

    def __repr__(self) -> str:
        return self.name


def check_train(name: str, train: Any) -> None:
    if type(train) is not bool:
        raise TypeError(f"{name}: train must be True (training) or False (evaluating), got {train!r}")


def check_no_state(where: str, name: str, state: Any) -> None:
    """A layer without state takes ``{}`` (or an absent entry, which a compose passes as ``{}``)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: state must be a dict ({{}} for a layer without state), got {type(state).__name__}")
    if state:
        raise ValueError(f"{where}: {name} has no state, so its state must be {{}}, got keys {sorted(state)} "
                         "(is the state of another model misplaced?)")


def _no_state(*, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> State:
    return {}


def stateful(layer: Layer) -> StatefulLayer:
    """A plain layer under the stateful contract: its state is ``{}``; ``train`` and ``generator`` are ignored.

    ``compose`` lifts the plain layers of a stateful model this way; call it
    yourself to handle plain and stateful models with one code path.

    >>> import torch, rdl_functional as rf
    >>> layer = rf.stateful(rf.relu)
    >>> layer({}, {}, torch.tensor([[-1.0, 2.0]]), train=True)
    (tensor([[0., 2.]]), {})
    """
    if isinstance(layer, StatefulLayer):
        return layer
    if not isinstance(layer, Layer):
        raise TypeError(f"stateful: expected a Layer, got {type(layer).__name__}")
    name = layer.name

    def apply(params: Params, state: State, x: Tensor, *, train: bool,
              generator: torch.Generator | int | None = None) -> tuple[Tensor, State]:
        if state or not isinstance(state, Mapping):
            check_no_state(f"{name}.apply", name, state)
        return layer.apply(params, x), {}

    def vjp(params: Params, state: State, x: Tensor, *, train: bool,
            generator: torch.Generator | int | None = None) -> tuple[Tensor, State, StatefulPullback]:
        if state or not isinstance(state, Mapping):
            check_no_state(f"{name}.vjp", name, state)
        y, pullback = layer.vjp(params, x)
        return y, {}, pullback

    return StatefulLayer(init=placed(layer.init, f"{name}.init"), init_state=_no_state, apply=apply, vjp=vjp,
                         name=name,
                         skips_dx=layer.skips_dx)


# ---------------------------------------------------------------------------
# Dropout


def dropout(p: float) -> StatefulLayer:
    """Inverted dropout: in training, each element is zeroed with probability ``p`` and the rest scaled by 1/(1−p).

    ``y = x ⊙ m`` with ``m = bernoulli(1 − p) / (1 − p)`` drawn from the
    ``generator`` passed to the call, so the same generator state gives the
    same mask, and the same bits as ``torch.nn.functional.dropout`` drawing
    from a global RNG in that state (on the CPU). The pullback multiplies by
    the same mask: ``dx = dy ⊙ m``. Evaluating (``train=False``), it is the
    identity and needs no generator. No params, no state.

    >>> import torch, rdl_functional as rf
    >>> drop = rf.dropout(0.5)
    >>> y, _ = drop({}, {}, torch.ones(2, 4), train=True, generator=torch.Generator().manual_seed(0))
    >>> y
    tensor([[0., 0., 2., 0.],
            [0., 0., 2., 2.]])
    >>> drop({}, {}, torch.ones(1, 2), train=False)
    (tensor([[1., 1.]]), {})

    Raises:
        ValueError: ``p`` is not in [0, 1); in training, no generator was given.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout: p must be a probability in [0, 1) (the chance of zeroing an element), got {p!r}"
                         + (" (p = 1 would zero everything)" if p == 1 else ""))
    p = float(p)
    keep = 1.0 - p
    name = f"dropout({p!r})"

    def mask(where: str, x: Tensor, train: Any, generator: Any) -> Tensor | None:
        """The scaled mask ``m`` in training, ``None`` evaluating (checks the call on the way)."""
        check_train(f"{name}.{where}", train)
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}.{where}: x must be a torch.Tensor, got {type(x).__name__}")
        shard = generator if isinstance(generator, BatchShard) else None
        if shard is not None:  # data-parallel: the global batch's mask, this shard's rows of it
            shard.check_rows(f"{name}.{where}", x)
            generator = shard.generator
        if not train:
            if generator is not None:
                as_generator(generator, f"{name}.{where}")  # checked, though evaluating draws nothing
            return None
        if generator is None:
            raise ValueError(f"{name}.{where}: in training (train=True) dropout draws a random mask and needs a "
                             "generator: pass generator=torch.Generator().manual_seed(seed) or an int seed "
                             "(the global RNG is never used), or train=False to evaluate")
        g = as_generator(generator, f"{name}.{where}")
        if p == 0:  # as torch: nothing is dropped and nothing is drawn
            return None
        # torch's CPU kernel, op for op: empty_like(x).bernoulli_(1 - p).div_(1 - p). On another device than the
        # generator's, the mask is drawn where the generator is and moved: the same bits on every device.
        if shard is not None:
            whole = torch.empty((shard.rows, *x.shape[1:]), dtype=x.dtype, device=g.device)
            return whole.bernoulli_(keep, generator=g).div_(keep)[shard.start:shard.stop].to(x.device)
        if x.device == g.device:
            return torch.empty_like(x).bernoulli_(keep, generator=g).div_(keep)
        return torch.empty(x.shape, dtype=x.dtype, device=g.device).bernoulli_(keep, generator=g).div_(keep).to(
            x.device)

    def apply(params: Params, state: State, x: Tensor, *, train: bool,
              generator: torch.Generator | int | None = None) -> tuple[Tensor, State]:
        _check_empty(name, "apply", params, state)
        m = mask("apply", x, train, generator)
        return (x.clone() if m is None else x * m), {}

    def vjp(params: Params, state: State, x: Tensor, *, train: bool,
            generator: torch.Generator | int | None = None) -> tuple[Tensor, State, StatefulPullback]:
        _check_empty(name, "vjp", params, state)
        m = mask("vjp", x, train, generator)
        y = x.clone() if m is None else x * m
        shape, dtype = y.shape, y.dtype

        def pullback(dy: Tensor) -> tuple[Params, Tensor]:
            _check_cotangent(name, dy, shape, dtype)
            return {}, dy.clone() if m is None else dy * m  # dx = dy ⊙ m

        return y, {}, pullback

    return StatefulLayer(init=_no_params, init_state=_no_state, apply=apply, vjp=vjp,
                         name=name)


def _check_empty(name: str, where: str, params: Params, state: State) -> None:
    if params or not isinstance(params, Mapping):
        check_no_params(name, where, params)
    if state or not isinstance(state, Mapping):
        check_no_state(f"{name}.{where}", name, state)


# ---------------------------------------------------------------------------
# Batch norm

_STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norm(features: int, momentum: float | None = 0.1, eps: float = 1e-5, affine: bool = True,
               track_running_stats: bool = True) -> StatefulLayer:
    """Batch normalization of ``(..., features)`` input: ``torch.nn.BatchNorm1d(features, eps, momentum, affine,
    track_running_stats)``.

    Training, each feature is normalized with the batch's mean μ and biased
    variance σ²: ``y = (x − μ) / √(σ² + ε) · weight + bias``, and the running
    statistics move toward the batch's: ``running_mean ← (1 − m)·running_mean + m·μ``
    and ``running_var ← (1 − m)·running_var + m·σ²·n/(n − 1)`` (the unbiased
    variance), with ``m = momentum``, or ``1/num_batches_tracked`` (a cumulative
    average) when ``momentum=None``. Evaluating, the running statistics stand
    in for the batch's, and the state comes back unchanged. With
    ``track_running_stats=False`` there are no running statistics: the state
    is ``{}`` and both modes normalize with the batch's, as torch.nn does.

    Params (``affine=True``): ``{"weight": ones(features), "bias": zeros(features)}``;
    ``{}`` without. State: ``{"running_mean": zeros, "running_var": ones,
    "num_batches_tracked": 0}`` (a 0-dim int64 tensor), torch's names and values
    (``{}`` with ``track_running_stats=False``).
    Input ``x``: ``(batch, features)``, or any leading dimensions ``(..., features)``,
    features last as for :func:`~rdl_functional.linear`, each leading position a
    row of the batch. (BatchNorm1d takes ``(N, C, L)``, channels second: ours
    on ``(N, L, C)`` equals it on ``x.transpose(1, 2)``.) The forward and backward passes run
    torch's own kernels (``native_batch_norm`` and its backward), so the
    bits are torch.nn's; the backward formula, through the batch statistics,
    is written out in docs/state-and-randomness.md.

    An empty batch (no rows) gives an empty output, as ``torch.nn`` does in
    both modes: the running statistics unchanged (training still counts it in
    ``num_batches_tracked``), zero param gradients. Under ``torch.autocast``, a
    float16 or bfloat16 ``x`` takes float32 params and state, as BatchNorm1d
    does: the output in ``x``'s dtype, the statistics and param gradients in
    float32, torch's kernels both ways.

    >>> import torch, rdl_functional as rf
    >>> bn = rf.batch_norm(2)
    >>> y, state = bn(bn.init(0), bn.init_state(), torch.tensor([[1.0, 2.0], [3.0, 6.0]]), train=True)
    >>> y
    tensor([[-1.0000, -1.0000],
            [ 1.0000,  1.0000]])
    >>> state["running_mean"], state["num_batches_tracked"]
    (tensor([0.2000, 0.4000]), tensor(1))

    Raises:
        ValueError: ``features`` is not a positive int, ``momentum`` is not in
            [0, 1] or None, ``eps`` is not > 0 (torch.nn refuses it in training); in training, or in both
            modes without running statistics, a batch of one row.
    """
    return channel_norm("batch_norm", features, momentum, eps, affine, spatial=None,
                        track_running_stats=track_running_stats)


def channel_norm(kind: str, features: int, momentum: float | None, eps: float, affine: bool, *,
                 spatial: int | None, track_running_stats: bool = True) -> StatefulLayer:
    """Batch norm over a channel dimension: the last (``spatial=None``, :func:`batch_norm` on ``(..., features)``)
    or the second, of an ``x`` ``(N, C, *spatial)`` with ``spatial`` spatial dimensions
    (:func:`~rdl_functional.batch_norm2d`). One piece of code for both: torch's kernels take the channels at
    dim 1, so features-last input goes to them as rows ``(positions, features)`` and channels-first as it is."""
    _check_features(kind, features=features)
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0 <= momentum <= 1):
        raise ValueError(f"{kind}: momentum must be in [0, 1] or None (a cumulative average), got {momentum!r}")
    eps = check_eps(kind, eps)
    for flag, value in (("affine", affine), ("track_running_stats", track_running_stats)):
        if not isinstance(value, bool):
            raise TypeError(f"{kind}: {flag} must be True or False, got {value!r}")
    tracking = track_running_stats
    options = [] if momentum == 0.1 else [f"momentum={momentum!r}"]
    options += [] if eps == 1e-5 else [f"eps={eps!r}"]
    options += [] if affine else ["affine=False"]
    options += [] if tracking else ["track_running_stats=False"]
    name = f"{kind}({', '.join([str(features), *options])})"
    shape = (features,)

    def to_kernel(t: Tensor) -> Tensor:
        """``t`` as torch's kernels take it, channels at dim 1: features-last input as rows (a view for 2-D)."""
        return t.reshape(-1, features) if spatial is None else t

    def to_rows(t: Tensor) -> Tensor:
        """``t`` with its channels last, as the data-parallel statistics take it (and back: ``from_rows``)."""
        return t if spatial is None else t.movedim(1, -1)

    def from_rows(t: Tensor) -> Tensor:
        return t if spatial is None else t.movedim(-1, 1)

    def init(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Params:
        as_generator(generator, f"{name}.init")  # checked; nothing is drawn, as torch draws nothing
        _check_float_dtype(f"{name}.init", dtype)
        params = {"weight": torch.ones(shape, dtype=dtype), "bias": torch.zeros(shape, dtype=dtype)} if affine else {}
        return to_device(params, device, f"{name}.init")

    def init_state(*, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> State:
        _check_float_dtype(f"{name}.init_state", dtype)
        if not tracking:
            return {}
        state = {"running_mean": torch.zeros(shape, dtype=dtype), "running_var": torch.ones(shape, dtype=dtype),
                 "num_batches_tracked": torch.zeros((), dtype=torch.int64)}
        return to_device(state, device, f"{name}.init_state")

    def unpack(where: str, params: Params, state: State, x: Tensor, train: Any,
               global_rows: int | None = None) -> tuple[Any, ...]:
        at = f"{name}.{where}"
        check_train(at, train)
        check_params(at, params, {"weight": shape, "bias": shape} if affine else {},
                     "" if affine else " (the layer was built with affine=False)")
        if tracking:
            _check_bn_state(at, state, shape)
        elif not isinstance(state, Mapping) or state:
            got = f"keys {sorted(state)}" if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"{at}: the layer was built with track_running_stats=False, so its state is {{}}, got "
                             f"{got} (is it the state of a batch norm that keeps running statistics?)")
        if spatial is not None:
            check_image(at, x, spatial, features)
        elif not isinstance(x, Tensor):
            raise TypeError(f"{at}: x must be a torch.Tensor, got {type(x).__name__}")
        elif x.dim() == 0 or x.shape[-1] != features:
            raise ValueError(f"{at}: x must have shape (..., {features}), features last, got {tuple(x.shape)}"
                             + _one_feature_hint(x, features))
        mean, var = (state["running_mean"], state["running_var"]) if tracking else (None, None)
        for what, tensor in (("weight", params.get("weight")), ("bias", params.get("bias")), ("running_mean", mean),
                             ("running_var", var)):
            if tensor is not None and tensor.dtype != x.dtype and not _autocast_mix(x, tensor):
                raise TypeError(f"{at}: x is {x.dtype} but {what} is {tensor.dtype} (convert x with "
                                f"x.to({tensor.dtype}), or init the params and state with that dtype)")
        positions = x.numel() if global_rows is None else global_rows * math.prod(x.shape[1:])
        if (train or not tracking) and positions == features:
            when = "in training" if tracking else "without running statistics"
            raise ValueError(f"{at}: {when}, batch norm normalizes each feature over the batch, which needs "
                             + (f"more than one row, got a batch of 1{'' if x.dim() == 2 else f' {tuple(x.shape)}'}; "
                                if spatial is None else f"more than one value per channel (N·H·W > 1), got x of "
                                f"shape {tuple(x.shape)}; ")
                             + ("train on larger batches, or evaluate (train=False) to use the running statistics"
                                if tracking else "with track_running_stats=False both modes normalize with the "
                                "batch's statistics: pass larger batches"))
        return params.get("weight"), params.get("bias"), mean, var

    def forward(where: str, params: Params, state: State, x: Tensor, train: Any,
                generator: Any = None) -> tuple[Any, ...]:
        batch_stats = train or not tracking  # without running statistics, both modes use the batch's
        if batch_stats and isinstance(generator, BatchShard):  # data-parallel: this process's rows of the batch
            weight, bias, mean, var = unpack(where, params, state, x, train, generator.rows)
            generator.check_rows(f"{name}.{where}", x)
            if is_data_parallel():
                rows = to_rows(x)
                y, new_state, backward = _synced_forward(rows.reshape(-1, features), generator, weight, bias, mean,
                                                         var, state["num_batches_tracked"] + 1 if tracking else None,
                                                         momentum, eps,
                                                         rows.shape)
                return from_rows(y), new_state, lambda dy, need_dx: _channels_back(backward(to_rows(dy), need_dx),
                                                                                   from_rows)
            if generator.stop - generator.start != generator.rows:
                raise ValueError(f"{name}.{where}: the shard is rows {generator.start}..{generator.stop} of "
                                 f"{generator.rows}, but there is no process group (torch.distributed) to sum the "
                                 "other rows' statistics over")
        weight, bias, mean, var = unpack(where, params, state, x, train)
        if x.numel() == 0:  # torch.nn's rule for an empty batch: an empty output, the running statistics unchanged
            if not tracking:
                return x.clone(), {}, None
            count = state["num_batches_tracked"] + 1 if train else state["num_batches_tracked"].clone()
            new_state = {"running_mean": mean.clone(), "running_var": var.clone(), "num_batches_tracked": count}
            return x.clone(), new_state, None
        rows = to_kernel(x)  # (..., features): every leading position a row; (N, C, *spatial): x itself
        if not tracking:  # the batch's statistics in both modes, and nothing to update
            y, saved_mean, saved_invstd = _native_batch_norm(rows, weight, bias, None, None, True, 0.0, eps)
            return y.reshape(x.shape), {}, (weight, None, None, saved_mean, saved_invstd)
        if not train:  # the running statistics stand in for the batch's; nothing is updated
            y, saved_mean, saved_invstd = _native_batch_norm(rows, weight, bias, mean, var, False, 0.0, eps)
            # New tensors, as every result is: writing into the new state never writes into the old.
            return y.reshape(x.shape), {key: state[key].clone() for key in _STATE_KEYS}, (
                weight, mean, var, saved_mean, saved_invstd)
        count = state["num_batches_tracked"] + 1
        factor = momentum if momentum is not None else 1.0 / float(count)
        # The kernel updates the running statistics in place: it gets copies, which become the new state.
        mean, var = mean.clone(), var.clone()
        y, saved_mean, saved_invstd = _native_batch_norm(rows, weight, bias, mean, var, True, factor, eps)
        new_state = {"running_mean": mean, "running_var": var, "num_batches_tracked": count}
        return y.reshape(x.shape), new_state, (weight, mean, var, saved_mean, saved_invstd)

    def apply(params: Params, state: State, x: Tensor, *, train: bool,
              generator: torch.Generator | int | None = None) -> tuple[Tensor, State]:
        y, new_state, _ = forward("apply", params, state, x, train, generator)
        return y, new_state

    def vjp(params: Params, state: State, x: Tensor, *, train: bool,
            generator: torch.Generator | int | None = None) -> tuple[Tensor, State, StatefulPullback]:
        y, new_state, saved = forward("vjp", params, state, x, train, generator)
        y_shape, dtype = y.shape, y.dtype
        if callable(saved):  # data-parallel: the synced backward pass
            def synced_pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Tensor | None]:
                _check_cotangent(name, dy, y_shape, dtype)
                dweight, dbias, dx = saved(dy, need_dx)
                return ({"weight": dweight, "bias": dbias} if affine else {}), dx

            return y, new_state, synced_pullback
        if saved is None:  # an empty batch: no kernel runs (torch's backward kernel divides by the batch's size)
            empty_params = {key: torch.zeros_like(value) for key, value in params.items()}

            def empty_pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Tensor | None]:
                _check_cotangent(name, dy, y_shape, dtype)
                return {key: value.clone() for key, value in empty_params.items()}, dy.clone() if need_dx else None

            return y, new_state, empty_pullback
        weight, mean, var, saved_mean, saved_invstd = saved

        def pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Tensor | None]:
            _check_cotangent(name, dy, y_shape, dtype)
            # With x̂ = (x − μ)·s, s = 1/√(σ² + ε): dbias = Σ_batch dy, dweight = Σ_batch dy ⊙ x̂, and
            # training, dx = weight·s/n · (n·dy − Σ dy − x̂ ⊙ Σ dy ⊙ x̂) (μ and σ² depend on x);
            # evaluating, dx = weight·s_running ⊙ dy. The kernel autograd runs for BatchNorm1d.
            dx, dweight, dbias = _native_batch_norm_backward(  # on rows, as the forward pass; dx in x's shape
                to_kernel(dy), to_kernel(x), weight, mean, var, saved_mean, saved_invstd,
                train or not tracking, eps, [need_dx, affine, affine]
            )
            dx = dx.reshape(x.shape) if dx is not None else None
            return ({"weight": dweight, "bias": dbias} if affine else {}), dx

        return y, new_state, pullback

    return StatefulLayer(init=init, init_state=init_state, apply=apply, vjp=vjp, name=name, skips_dx=True)


def _autocast_mix(x: Tensor, param: Tensor) -> bool:
    """Under ``torch.autocast``, a float16 or bfloat16 ``x`` meets float32 params and state on purpose: torch's
    kernels take the mix (BatchNorm1d's output is in ``x``'s dtype, its statistics and gradients stay float32)."""
    return (x.dtype in (torch.bfloat16, torch.float16) and param.dtype == torch.float32
            and autocast_on(x.device.type))


def _channels_back(grads: tuple[Any, Any, Tensor | None], from_rows: Callable[[Tensor], Tensor]) -> tuple[Any, ...]:
    dweight, dbias, dx = grads
    return dweight, dbias, from_rows(dx) if dx is not None else None


def _one_feature_hint(x: Tensor, features: int) -> str:
    """For a 1-D ``x`` where a column was meant: the reshape that makes its entries rows of one feature."""
    if x.dim() == 1 and features == 1:
        return (f" (x is 1-D with {x.shape[0]} entries, read as one row of {x.shape[0]} features; for "
                f"{x.shape[0]} rows of one feature pass x[:, None] or x.reshape(-1, 1))")
    return ""


def _synced_forward(x: Tensor, shard: BatchShard, weight: Tensor | None, bias: Tensor | None,
                    running_mean: Tensor | None, running_var: Tensor | None, count: Tensor | None,
                    momentum: float | None, eps: float,
                    shape: torch.Size) -> tuple[Tensor, State, Callable[[Tensor, bool], tuple[Any, Any, Any]]]:
    """Batch norm in training on a shard, with the global batch's statistics (torch's SyncBatchNorm, on any
    device): the mean, then the centred sum of squares, each summed over the processes by one all-reduce.

    ``x`` is ``(rows, features)``: this shard's rows. The backward pass needs the global sums of ``dy`` and
    ``dy ⊙ x̂`` for ``dx`` (one all-reduce of both); ``dweight`` and ``dbias`` stay this shard's sums, which the
    gradient's all-reduce adds up as it does every other gradient.
    """
    n = shard.rows * math.prod(shape[1:-1])  # every leading position of every row of the global batch
    total = all_reduce_mean({"sum": x.sum(0)}, weight=1.0)["sum"]
    mean = total / n
    centred = x - mean
    var = all_reduce_mean({"sum": (centred * centred).sum(0)}, weight=1.0)["sum"] / n  # biased, as torch's
    invstd = torch.rsqrt(var + eps)
    x_hat = centred * invstd
    y = x_hat * weight + bias if weight is not None else x_hat
    new_state: State = {}
    if running_mean is not None:  # track_running_stats=False keeps none
        factor = momentum if momentum is not None else 1.0 / float(count)
        new_state = {"running_mean": running_mean * (1 - factor) + mean * factor,
                     "running_var": running_var * (1 - factor) + var * (n / (n - 1) * factor),
                     "num_batches_tracked": count}

    def backward(dy: Tensor, need_dx: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        dy = dy.reshape(x.shape)
        sums = {"dy": dy.sum(0), "dy_x_hat": (dy * x_hat).sum(0)}
        dx = None
        if need_dx:
            every = all_reduce_mean(sums, weight=1.0)
            scale = invstd / n if weight is None else weight * invstd / n
            dx = (scale * (n * dy - every["dy"] - x_hat * every["dy_x_hat"])).reshape(shape)
        return sums["dy_x_hat"], sums["dy"], dx

    return y.reshape(shape), new_state, backward


def _check_bn_state(where: str, state: Any, shape: tuple[int]) -> None:
    fix = "pass layer.init_state() to start, or the state the previous call returned"
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: state must be a dict with {list(_STATE_KEYS)}, got {type(state).__name__} "
                        f"({fix})")
    if not state:
        raise ValueError(f"{where}: batch norm needs its state ({', '.join(_STATE_KEYS)}), got {{}} ({fix})")
    if sorted(state) != sorted(_STATE_KEYS):
        raise ValueError(f"{where}: state must have the keys {list(_STATE_KEYS)}, got {sorted(state)} "
                         f"(is it another model's state?)")
    for key in _STATE_KEYS[:2]:
        tensor = state[key]
        if not isinstance(tensor, Tensor) or tensor.shape != shape or not tensor.is_floating_point():
            got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{where}: state[{key!r}] must be a floating tensor of shape {shape}, got {got} "
                             "(is it another model's state?)")
    count = state["num_batches_tracked"]
    if not isinstance(count, Tensor) or count.shape != () or count.dtype != torch.int64:
        got = f"{count.dtype} {tuple(count.shape)}" if isinstance(count, Tensor) else type(count).__name__
        raise ValueError(f"{where}: state['num_batches_tracked'] must be a 0-dim int64 tensor, got {got}")
