"""Self-attention and the transformer block: :func:`multi_head_attention`, :func:`transformer_block`.

Sequences are ``(batch, sequence, embed_dim)``, features last, as for every
layer. The params are ``torch.nn.MultiheadAttention``'s, names and layout, so
``rf.to_state_dict(params)`` loads into it with ``strict=True``.

The twin is ``nn.MultiheadAttention(embed_dim, num_heads, dropout=..., bias=...,
batch_first=True)`` in training mode, called as ``mha(x, x, x, need_weights=False,
key_padding_mask=mask, attn_mask=causal_mask, is_causal=causal)``. Its CPU path
for that call is the one we follow op for op, and each backward op is the one
its autograd runs, so float32 training is torch.nn's bit for bit:

* the input projection ``x Wᵢₙᵀ`` as one ``mm`` on the sequence-major rows
  ``(sequence·batch, E)`` and the bias added after (torch transposes
  batch-first input to ``(sequence, batch, E)`` first; the order of the rows is
  the order of the gradient's sums, so it is kept);
* with no dropout (or evaluating), torch's fused CPU kernel
  ``_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``, which
  ``scaled_dot_product_attention`` picks on the CPU;
* with dropout in training, ``scaled_dot_product_attention``'s math path (torch
  takes it, the fused kernel has no dropout on the CPU): ``bmm``,
  ``_safe_softmax``, the mask ``bernoulli(1 − p)/(1 − p)``, ``bmm``; backward
  through ``bmm`` and ``_softmax_backward_data``;
* the output projection ``addmm(b, O, Wₒᵤₜᵀ)``.

On another device than the CPU the fused kernel is not there: the math path
runs, the same maths and gradients (checked in float64 on the CPU), but not
verified bit for bit against torch's CUDA kernels (flash or memory-efficient
attention, which SDPA picks there).

``need_weights=True`` would take a third path (softmax(QKᵀ/√d) by ``baddbmm``,
the weights averaged over heads and returned): not ours, since nothing here
returns the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._attention_ops import (
    additive_mask,
    math_attention,
    project_in,
    project_in_backward,
    project_out,
    project_out_backward,
)
from ._checks import check_params, check_x
from ._random import as_generator
from .activations import gelu
from .combinators import compose, residual
from .initializers import INITIALIZERS
from .layers import Layer, Params, Pullback, _check_cotangent, _check_features, _check_float_dtype, linear, to_device
from .sequences import layer_norm
from .stateful import State, StatefulLayer, StatefulPullback, _check_empty, _no_state, check_train

__all__ = ["multi_head_attention", "transformer_block"]

_aten = torch.ops.aten
_flash = _aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = _aten._scaled_dot_product_flash_attention_for_cpu_backward.default
# Where the fused kernel runs (it is the CPU's); elsewhere the math path, the same maths by bmm and softmax.
_FUSED_DEVICES = ("cpu",)


def _attention_shapes(embed_dim: int, bias: bool) -> dict[str, Any]:
    """The params' shapes, torch's: ``in_proj_weight``, ``in_proj_bias``, ``out_proj`` (an nn.Linear's)."""
    shapes: dict[str, Any] = {"in_proj_weight": (3 * embed_dim, embed_dim), "in_proj_bias": (3 * embed_dim,),
                              "out_proj": {"weight": (embed_dim, embed_dim), "bias": (embed_dim,)}}
    if not bias:
        del shapes["in_proj_bias"], shapes["out_proj"]["bias"]
    return shapes


def _split_input(where: str, x: Any, embed_dim: int, weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """``x`` or ``(x, key_padding_mask)``, checked: x ``(batch, sequence, E)``, the mask bool ``(batch, sequence)``."""
    mask = None
    if isinstance(x, tuple):
        if len(x) != 2:
            raise TypeError(f"{where}: x must be a tensor (batch, sequence, {embed_dim}) or a pair (x, "
                            f"key_padding_mask), got a tuple of {len(x)}")
        x, mask = x
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise ValueError(f"{where}: x must have shape (batch, sequence, {embed_dim}), batch first and features "
                         f"last, got {tuple(x.shape)}")
    if not x.shape[0] or not x.shape[1]:
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}, an empty batch or sequence; attention needs at "
                         "least one example of at least one position")
    check_x(where, x, "in_proj_weight", weight)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"{where}: key_padding_mask must be a bool tensor (True = ignore that key, torch's "
                            f"convention), got {got}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{where}: key_padding_mask must have shape (batch, sequence) = {tuple(x.shape[:2])}, "
                             f"got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"{where}: key_padding_mask is on {mask.device} but x is on {x.device} (move it: "
                             "mask.to(x.device))")
    return x, mask


def _drawn_params(g: torch.Generator, embed_dim: int, bias: bool, dtype: torch.dtype) -> Params:
    """The params drawn in torch's order: out_proj, an nn.Linear, draws its weight and bias; then
    _reset_parameters draws in_proj_weight (xavier-uniform) and zeroes the biases, out_proj's drawn one included."""
    out_weight = INITIALIZERS["torch_default"](g, (embed_dim, embed_dim), dtype)
    if bias:
        bound = 1 / math.sqrt(embed_dim)
        torch.empty(embed_dim, dtype=dtype).uniform_(-bound, bound, generator=g)  # drawn, then zeroed
    params: Params = {"in_proj_weight": INITIALIZERS["xavier_uniform"](g, (3 * embed_dim, embed_dim), dtype)}
    if bias:
        params["in_proj_bias"] = torch.zeros(3 * embed_dim, dtype=dtype)
    params["out_proj"] = {"weight": out_weight, **({"bias": torch.zeros(embed_dim, dtype=dtype)} if bias else {})}
    return params


def multi_head_attention(embed_dim: int, num_heads: int, *, causal: bool = False, bias: bool = True,
                         dropout: float = 0.0) -> Layer | StatefulLayer:
    """Multi-head self-attention, batch first: ``torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)``.

    With ``Q, K, V = x Wᵢₙᵀ + bᵢₙ`` split into ``num_heads`` heads of ``d = embed_dim / num_heads``, per head:
    ``S = QKᵀ/√d + mask``, ``P = softmax(S)`` (rows), ``O = PV``; the heads joined, ``y = O Wₒᵤₜᵀ + bₒᵤₜ``.
    The mask is −∞ where a query may not see a key: later positions (``causal=True``) and the keys where the
    key-padding mask is True. Backward, per head: ``dV = PᵀdO``, ``dP = dO Vᵀ``,
    ``dS = P ⊙ (dP − rowsum(dP ⊙ P))``, ``dQ = dS K/√d``, ``dK = dSᵀQ/√d``; then through the projections as
    :func:`~rdl_functional.linear`'s. The kernels are the torch.nn twin's (see the module's doc), so float32
    training is bit for bit ``nn.MultiheadAttention``'s called with ``need_weights=False``.

    Input: ``x`` ``(batch, sequence, embed_dim)``, or the pair ``(x, key_padding_mask)`` with a bool
    ``(batch, sequence)`` mask, True = ignore that key (torch's convention; then ``dx`` is ``(dx, None)``).
    Output: ``(batch, sequence, embed_dim)``. Params, torch's: ``{"in_proj_weight": (3E, E),
    "in_proj_bias": (3E,), "out_proj": {"weight": (E, E), "bias": (E,)}}`` (no biases with ``bias=False``),
    drawn as torch draws them: ``out_proj`` as ``nn.Linear``'s, then ``in_proj_weight`` xavier-uniform;
    the biases 0.

    ``dropout=0`` (the default) gives a :class:`~rdl_functional.Layer`. ``dropout > 0`` gives a
    :class:`~rdl_functional.StatefulLayer`, as :func:`~rdl_functional.dropout` is: in training
    (``train=True``) the attention weights ``P`` are dropped with a mask drawn from the ``generator`` passed
    (the twin's mask when torch's global RNG is in that generator's state); evaluating, nothing is dropped.

    >>> import torch, rdl_functional as rf
    >>> attention = rf.multi_head_attention(8, 2, causal=True)
    >>> params = attention.init(0)
    >>> sorted(rf.to_state_dict(params))
    ['in_proj_bias', 'in_proj_weight', 'out_proj.bias', 'out_proj.weight']
    >>> attention(params, torch.zeros(3, 5, 8)).shape
    torch.Size([3, 5, 8])

    Raises:
        ValueError: ``embed_dim`` is not divisible by ``num_heads``; ``dropout`` not in [0, 1);
            x or the mask has the wrong shape.
        TypeError: the mask is not bool.
    """
    _check_features("multi_head_attention", embed_dim=embed_dim, num_heads=num_heads)
    if embed_dim % num_heads:
        raise ValueError(f"multi_head_attention: embed_dim must be divisible by num_heads (each head gets "
                         f"embed_dim / num_heads features), got embed_dim={embed_dim}, num_heads={num_heads}")
    for flag, value in (("causal", causal), ("bias", bias)):
        if not isinstance(value, bool):
            raise TypeError(f"multi_head_attention: {flag} must be True or False, got {value!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"multi_head_attention: dropout must be a probability in [0, 1), got {dropout!r}")
    dropout = float(dropout)
    options = [f"{embed_dim}, {num_heads}"] + (["causal=True"] if causal else []) + ([] if bias else ["bias=False"])
    name = f"multi_head_attention({', '.join(options + ([f'dropout={dropout!r}'] if dropout else []))})"
    shapes, fix = _attention_shapes(embed_dim, bias), "" if bias else " (the layer was built with bias=False)"

    def init(generator: torch.Generator | int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Params:
        g = as_generator(generator, f"{name}.init")
        _check_float_dtype(f"{name}.init", dtype)
        return to_device(_drawn_params(g, embed_dim, bias, dtype), device, f"{name}.init")

    def forward(where: str, params: Params, x: Any, keep: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[Tensor, Callable[..., Any]]:
        at = f"{name}.{where}"
        check_params(at, params, shapes, fix)
        weight, in_bias = params["in_proj_weight"], params.get("in_proj_bias")
        out_weight, out_bias = params["out_proj"]["weight"], params["out_proj"].get("bias")
        x, mask = _split_input(at, x, embed_dim, weight)
        rows, q, k, v = project_in(x, weight, in_bias, num_heads)
        length = x.shape[1]
        float_mask = additive_mask(mask, causal, num_heads, length, x.dtype)
        if keep < 1.0 or x.device.type not in _FUSED_DEVICES:
            o, attention_backward = math_attention(q, k, v, float_mask, causal, keep, generator)
        else:
            is_causal = causal and float_mask is None
            o, logsumexp = _flash(q, k, v, 0.0, is_causal, attn_mask=float_mask)

            def attention_backward(do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                return _flash_backward(do, q, k, v, o, logsumexp, 0.0, is_causal, attn_mask=float_mask)

        o_rows, y = project_out(o, out_weight, out_bias)

        def backward(dy: Tensor, need_dx: bool) -> tuple[Params, Any]:
            d_out, do = project_out_backward(dy, o_rows, out_weight, num_heads, bias)
            dparams, dx = project_in_backward(*attention_backward(do), rows, weight, bias, need_dx)
            dparams["out_proj"] = d_out
            return dparams, (dx, None) if mask is not None and need_dx else dx

        return y, backward

    def pullback_of(y: Tensor, backward: Callable[..., Any]) -> Callable[..., Any]:
        shape, dtype = y.shape, y.dtype

        def pullback(dy: Tensor, *, need_dx: bool = True) -> tuple[Params, Any]:
            _check_cotangent(name, dy, shape, dtype)
            return backward(dy, need_dx)

        return pullback

    if dropout == 0:
        def apply(params: Params, x: Any) -> Tensor:
            return forward("apply", params, x)[0]

        def vjp(params: Params, x: Any) -> tuple[Tensor, Pullback]:
            y, backward = forward("vjp", params, x)
            return y, pullback_of(y, backward)

        return Layer(init=init, apply=apply, vjp=vjp, name=name, skips_dx=True)

    def stateful_forward(where: str, params: Params, state: State, x: Any, train: Any,
                         generator: Any) -> tuple[Tensor, Callable[..., Any]]:
        at = f"{name}.{where}"
        check_train(at, train)
        _check_empty(name, where, {}, state)
        if not train:
            if generator is not None:
                as_generator(generator, at)  # checked, though evaluating draws nothing
            return forward(where, params, x)
        if generator is None:
            raise ValueError(f"{at}: in training (train=True) attention dropout draws a random mask and needs a "
                             "generator: pass generator=torch.Generator().manual_seed(seed) or an int seed (the "
                             "global RNG is never used), or train=False to evaluate")
        return forward(where, params, x, 1.0 - dropout, as_generator(generator, at))

    def stateful_apply(params: Params, state: State, x: Any, *, train: bool,
                       generator: torch.Generator | int | None = None) -> tuple[Tensor, State]:
        return stateful_forward("apply", params, state, x, train, generator)[0], {}

    def stateful_vjp(params: Params, state: State, x: Any, *, train: bool,
                     generator: torch.Generator | int | None = None) -> tuple[Tensor, State, StatefulPullback]:
        y, backward = stateful_forward("vjp", params, state, x, train, generator)
        return y, {}, pullback_of(y, backward)

    return StatefulLayer(init=init, init_state=_no_state, apply=stateful_apply, vjp=stateful_vjp, name=name,
                         skips_dx=True)


def transformer_block(embed_dim: int, num_heads: int, *, mlp_ratio: int = 4, causal: bool = True,
                      dropout: float = 0.0) -> Layer | StatefulLayer:
    """A pre-LN transformer block (minGPT's): ``x + attention(layer_norm(x))``, then ``x + mlp(layer_norm(x))``.

    ``residual(compose(layer_norm(E), multi_head_attention(E, num_heads, causal=causal, dropout=dropout)))``
    then ``residual(compose(layer_norm(E), linear(E, mlp_ratio·E), gelu(), linear(mlp_ratio·E, E)))``, in a
    compose: params ``{"0": {"0": ln, "1": attention}, "1": {"0": ln, "1": linear, "3": linear}}``, which
    load into the twin of the same nn.Sequential shape (``rdl_functional.apps.torch_baseline.torch_transformer_block``).
    ``dropout`` is the attention's (on its weights), which makes the block a StatefulLayer. Input and output
    ``(batch, sequence, embed_dim)``: a plain ``x``, with no key-padding mask (the block's layer norms, which
    come first, take a tensor; only :func:`multi_head_attention` itself takes ``(x, key_padding_mask)``).

    >>> import torch, rdl_functional as rf
    >>> block = rf.transformer_block(8, 2)
    >>> block(block.init(0), torch.zeros(3, 5, 8)).shape
    torch.Size([3, 5, 8])
    """
    _check_features("transformer_block", mlp_ratio=mlp_ratio)
    attention = multi_head_attention(embed_dim, num_heads, causal=causal, dropout=dropout)
    hidden = mlp_ratio * embed_dim
    return compose(residual(compose(layer_norm(embed_dim), attention)),
                   residual(compose(layer_norm(embed_dim), linear(embed_dim, hidden), gelu(),
                                    linear(hidden, embed_dim))))
