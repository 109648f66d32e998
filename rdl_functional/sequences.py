"""Layers for sequences: :func:`layer_norm`, :func:`embedding`, :func:`positional_embedding`.

The layout, as for every layer of the library: features last. A sequence is
``(batch, sequence, features)``; token ids are ``(batch, sequence)`` (any
shape) of integers. Params have torch.nn's names and layouts (``weight``,
``bias``), so ``rf.to_state_dict(params)`` loads into the torch.nn twin
(``nn.LayerNorm``, ``nn.Embedding``) with ``strict=True``.

Each pullback calls the backward kernel torch's autograd runs for the twin
(``native_layer_norm_backward``, ``embedding_dense_backward``), so float32
training is bit for bit torch.nn's; the formula is written beside the call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._checks import check_eps, check_params, check_x
from ._random import as_generator
from .layers import Layer, Params, Pullback, _check_cotangent, _check_features, _check_float_dtype, to_device
from .trace import reads_values

__all__ = ["embedding", "layer_norm", "positional_embedding"]

_aten = torch.ops.aten
_native_layer_norm = _aten.native_layer_norm.default
_native_layer_norm_backward = _aten.native_layer_norm_backward.default
_embedding = _aten.embedding.default
_embedding_dense_backward = _aten.embedding_dense_backward.default


def _shape_of(name: str, normalized_shape: Any) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if (not isinstance(shape, (tuple, list, torch.Size)) or not shape
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"{name}: normalized_shape must be a positive int or a non-empty tuple of them, "
                         f"got {normalized_shape!r}")
    return tuple(shape)


# ---------------------------------------------------------------------------
# Layer norm


def layer_norm(normalized_shape: int | tuple[int, ...], eps: float = 1e-5, elementwise_affine: bool = True) -> Layer:
    """Layer normalization over the trailing ``normalized_shape`` dimensions: ``torch.nn.LayerNorm``.

    For each position (every leading index of ``x``), with μ and σ² the mean
    and biased variance of its ``normalized_shape`` trailing entries:
    ``y = (x − μ) / √(σ² + ε) ⊙ weight + bias``.

    Params (``elementwise_affine=True``): ``{"weight": ones(normalized_shape),
    "bias": zeros(normalized_shape)}``, torch's; ``{}`` without. Input ``x``:
    ``(..., *normalized_shape)``, for a sequence ``(batch, sequence, features)``
    with ``normalized_shape=features``; output of ``x``'s shape.

    Backward, with ``x̂ = (x − μ)·s``, ``s = 1/√(σ² + ε)``, ``g = dy ⊙ weight``
    and ``n`` the number of normalized entries: ``dweight = Σ_positions dy ⊙ x̂``,
    ``dbias = Σ_positions dy``, ``dx = s/n · (n·g − Σ g − x̂ ⊙ Σ g ⊙ x̂)`` (the
    sums over the normalized entries): torch's kernels ``native_layer_norm``
    and ``native_layer_norm_backward``, so the bits are ``nn.LayerNorm``'s.

    >>> import torch, rdl_functional as rf
    >>> norm = rf.layer_norm(2)
    >>> norm(norm.init(0), torch.tensor([[1.0, 3.0]]))
    tensor([[-1.0000,  1.0000]])
    """
    shape = _shape_of("layer_norm", normalized_shape)
    eps = check_eps("layer_norm", eps)
    if not isinstance(elementwise_affine, bool):
        raise TypeError(f"layer_norm: elementwise_affine must be True or False, got {elementwise_affine!r}")
    options = [str(shape[0]) if len(shape) == 1 else str(shape)]
    options += [] if eps == 1e-5 else [f"eps={eps!r}"]
    options += [] if elementwise_affine else ["elementwise_affine=False"]
    name = f"layer_norm({', '.join(options)})"
    keys = {"weight": shape, "bias": shape} if elementwise_affine else {}
    fix = "" if elementwise_affine else " (the layer was built with elementwise_affine=False)"

    def init(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Params:
        as_generator(generator, f"{name}.init")  # checked; nothing is drawn, as torch draws nothing
        _check_float_dtype(f"{name}.init", dtype)
        params = {"weight": torch.ones(shape, dtype=dtype), "bias": torch.zeros(shape, dtype=dtype)} \
            if elementwise_affine else {}
        return to_device(params, device, f"{name}.init")

    def forward(where: str, params: Params, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        at = f"{name}.{where}"
        check_params(at, params, keys, fix)
        if not isinstance(x, Tensor):
            raise TypeError(f"{at}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
            raise ValueError(f"{at}: x must be a floating tensor of shape (..., {', '.join(map(str, shape))}), "
                             f"features last, got {x.dtype} {tuple(x.shape)}")
        check_x(at, x, "weight", params.get("weight"))
        return _native_layer_norm(x, shape, params.get("weight"), params.get("bias"), eps)

    def apply(params: Params, x: Tensor) -> Tensor:
        return forward("apply", params, x)[0]

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        y, mean, rstd = forward("vjp", params, x)
        y_shape, dtype = y.shape, y.dtype
        weight, bias = params.get("weight"), params.get("bias")

        def pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Tensor | None]:
            _check_cotangent(name, dy, y_shape, dtype)
            # dweight = Σ dy ⊙ x̂, dbias = Σ dy, dx = s/n · (n·g − Σ g − x̂ ⊙ Σ g ⊙ x̂), g = dy ⊙ weight
            dx, dweight, dbias = _native_layer_norm_backward(
                dy, x, shape, mean, rstd, weight, bias, [need_dx, elementwise_affine, elementwise_affine])
            return ({"weight": dweight, "bias": dbias} if elementwise_affine else {}), dx

        return y, pullback

    return Layer(init=init, apply=apply, vjp=vjp, name=name, skips_dx=True)


# ---------------------------------------------------------------------------
# Embeddings


def _check_ids(where: str, ids: Any, num_embeddings: int) -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{where}: ids must be a torch.Tensor of integer token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: ids must be int64 (or int32) token ids, got {ids.dtype} (an embedding looks up "
                        "rows by index: pass ids.long(), not features)")
    # Read where a read is free and allowed (reads_values); elsewhere torch's kernel refuses an index out of range.
    if reads_values(ids) and ids.numel() and (ids.min() < 0 or ids.max() >= num_embeddings):
        raise ValueError(f"{where}: ids must lie in [0, {num_embeddings}) (num_embeddings={num_embeddings}), got "
                         f"values in [{int(ids.min())}, {int(ids.max())}]")


def embedding(num_embeddings: int, embedding_dim: int) -> Layer:
    """A lookup table of learned vectors: ``torch.nn.Embedding(num_embeddings, embedding_dim)``.

    ``y[..., :] = weight[ids[...]]``: integer ``ids`` of any shape, for a
    sequence ``(batch, sequence)``, in; ``(..., embedding_dim)`` out. Params:
    ``{"weight": (num_embeddings, embedding_dim)}`` drawn as torch draws it,
    normal(0, 1), from the generator. The ids have no gradient (the pullback
    returns ``None`` for them); the weight's is ``dweight[i] = Σ_{positions p
    with ids[p] = i} dy[p]`` (rows never looked up get 0): torch's kernel
    ``embedding_dense_backward``, so the bits are ``nn.Embedding``'s.

    >>> import torch, rdl_functional as rf
    >>> table = rf.embedding(10, 3)
    >>> table(table.init(0), torch.tensor([[1, 2, 2]])).shape
    torch.Size([1, 3, 3])

    Raises:
        TypeError: ``ids`` are not integers (a float tensor).
        ValueError: an id is outside ``[0, num_embeddings)`` (read on the CPU only, outside tracing: on other
            devices torch's kernel refuses it).
    """
    _check_features("embedding", num_embeddings=num_embeddings, embedding_dim=embedding_dim)
    name = f"embedding({num_embeddings}, {embedding_dim})"
    keys = {"weight": (num_embeddings, embedding_dim)}

    def init(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Params:
        g = as_generator(generator, f"{name}.init")
        _check_float_dtype(f"{name}.init", dtype)
        weight = torch.empty(num_embeddings, embedding_dim, dtype=dtype).normal_(generator=g)  # nn.init.normal_
        return to_device({"weight": weight}, device, f"{name}.init")

    def forward(where: str, params: Params, ids: Tensor) -> Tensor:
        check_params(f"{name}.{where}", params, keys)
        _check_ids(f"{name}.{where}", ids, num_embeddings)
        return _embedding(params["weight"], ids)

    def apply(params: Params, ids: Tensor) -> Tensor:
        return forward("apply", params, ids)

    def vjp(params: Params, ids: Tensor) -> tuple[Tensor, Pullback]:
        y = forward("vjp", params, ids)
        shape, dtype = y.shape, y.dtype

        def pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, None]:
            _check_cotangent(name, dy, shape, dtype)
            # dweight[i] = Σ_{p: ids[p] = i} dy[p]; the ids, integers, have no cotangent
            return {"weight": _embedding_dense_backward(dy, ids, num_embeddings, -1, False)}, None

        return y, pullback

    return Layer(init=init, apply=apply, vjp=vjp, name=name, skips_dx=True)


def positional_embedding(max_length: int, embedding_dim: int) -> Layer:
    """A learned position embedding added to a sequence: ``y[b, t] = x[b, t] + weight[t]``.

    Input ``x``: ``(batch, sequence, embedding_dim)`` (any leading dimensions
    before the sequence), ``sequence ≤ max_length``; output of ``x``'s shape.
    Params: ``{"weight": (max_length, embedding_dim)}``, normal(0, 1) as
    ``nn.Embedding``'s (the twin is ``x + nn.Embedding(max_length, dim)(arange(sequence))``).
    Backward: ``dx = dy``, ``dweight[t] = Σ_batch dy[:, t]`` for ``t < sequence``, 0 beyond.

    >>> import torch, rdl_functional as rf
    >>> pos = rf.positional_embedding(8, 3)
    >>> pos(pos.init(0), torch.zeros(2, 5, 3)).shape
    torch.Size([2, 5, 3])

    Raises:
        ValueError: the sequence is longer than ``max_length``.
    """
    _check_features("positional_embedding", max_length=max_length, embedding_dim=embedding_dim)
    name = f"positional_embedding({max_length}, {embedding_dim})"
    keys = {"weight": (max_length, embedding_dim)}

    def init(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Params:
        g = as_generator(generator, f"{name}.init")
        _check_float_dtype(f"{name}.init", dtype)
        weight = torch.empty(max_length, embedding_dim, dtype=dtype).normal_(generator=g)
        return to_device({"weight": weight}, device, f"{name}.init")

    def forward(where: str, params: Params, x: Tensor) -> Tensor:
        at = f"{name}.{where}"
        check_params(at, params, keys)
        if not isinstance(x, Tensor):
            raise TypeError(f"{at}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != embedding_dim:
            raise ValueError(f"{at}: x must have shape (batch, sequence, {embedding_dim}), features last, got "
                             f"{tuple(x.shape)}")
        if x.shape[-2] > max_length:
            raise ValueError(f"{at}: the sequence has {x.shape[-2]} positions but the layer holds "
                             f"max_length={max_length} (build it as positional_embedding({x.shape[-2]}, ...) or "
                             "cut the sequence)")
        check_x(at, x, "weight", params["weight"])
        return x + params["weight"][: x.shape[-2]]

    def apply(params: Params, x: Tensor) -> Tensor:
        return forward("apply", params, x)

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Pullback]:
        y = forward("vjp", params, x)
        shape, dtype, length = y.shape, y.dtype, x.shape[-2]
        leading = list(range(x.dim() - 2))

        def pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Tensor | None]:
            _check_cotangent(name, dy, shape, dtype)
            # dweight[:sequence] = Σ_batch dy (the sum autograd's broadcast runs), 0 beyond; dx = dy
            summed = dy.sum(leading) if leading else dy
            dweight = _aten.slice_backward(summed, [max_length, embedding_dim], 0, 0, length, 1)
            return {"weight": dweight}, dy.clone() if need_dx else None

        return y, pullback

    return Layer(init=init, apply=apply, vjp=vjp, name=name, skips_dx=True)
