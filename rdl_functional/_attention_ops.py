"""The ops of self-attention, as torch.nn.MultiheadAttention's CPU path runs them (see
:mod:`rdl_functional.attention`, whose layer wires them): the mask, the two projections and their pullbacks,
and scaled_dot_product_attention's math path."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .layers import Params

_safe_softmax = torch.ops.aten._safe_softmax.default
_softmax_backward_data = torch.ops.aten._softmax_backward_data.default


def additive_mask(mask: Tensor | None, causal: bool, heads: int, length: int, dtype: torch.dtype) -> Tensor | None:
    """The additive mask torch builds for the kernel: 0 where a query sees a key, −∞ where not, per head;
    ``None`` where nothing is masked or causality alone is (the kernels' ``is_causal``)."""
    if mask is None:
        return None
    batch = mask.shape[0]
    padding = torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, -math.inf)
    padding = padding.view(batch, 1, 1, length).expand(-1, heads, -1, -1).reshape(batch * heads, 1, length)
    if causal:
        padding = torch.full((length, length), -math.inf, dtype=dtype, device=mask.device).triu(1).unsqueeze(0) + \
            padding
    return padding.view(batch, heads, -1, length)


def project_in(x: Tensor, weight: Tensor, bias: Tensor | None, heads: int) -> tuple[Tensor, ...]:
    """``(rows, q, k, v)``: ``rows`` is ``x`` as sequence-major rows ``(sequence·batch, E)``; q, k, v are
    ``(batch, heads, sequence, head_dim)`` views of ``rows Wᵢₙᵀ + bᵢₙ``, laid out as torch's."""
    batch, length, embed = x.shape
    rows = x.transpose(0, 1).reshape(length * batch, embed)
    proj = rows.mm(weight.t()).view(length, batch, 3 * embed)
    if bias is not None:
        proj = proj + bias
    qkv = proj.view(length, batch, 3, embed).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    return rows, *(part.view(length, batch * heads, -1).transpose(0, 1).view(batch, heads, length, -1)
                   for part in qkv)


def project_out(o: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(rows, y)``: the heads ``o`` ``(batch, heads, sequence, head_dim)`` as sequence-major rows, and
    ``y = rows Wₒᵤₜᵀ + bₒᵤₜ`` back in ``(batch, sequence, E)``."""
    batch, heads, length, head_dim = o.shape
    rows = o.permute(2, 0, 1, 3).reshape(length * batch, heads * head_dim)
    y = torch.addmm(bias, rows, weight.t()) if bias is not None else rows.mm(weight.t())
    return rows, y.view(length, batch, -1).transpose(0, 1)


def _heads_to_rows(d: Tensor) -> Tensor:
    """A gradient ``(batch, heads, sequence, head_dim)`` as ``(sequence, batch, E)``."""
    batch, heads, length, head_dim = d.shape
    return d.reshape(batch * heads, length, head_dim).transpose(0, 1).reshape(length, batch, heads * head_dim)


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, keep: float,
                    g: torch.Generator | None) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]]:
    """scaled_dot_product_attention's math path (with dropout where ``keep < 1``): ``O`` and ``dO -> (dQ, dK, dV)``.

    S = (Q·√s)(Kᵀ·√s) + mask, s = 1/√d, P = safe_softmax(S), P̃ = P ⊙ m, O = P̃ V;
    dV = P̃ᵀ dO, dP = (dO Vᵀ) ⊙ m, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = dS K √s·√s, dK = dSᵀ Q √s·√s.
    """
    batch, heads, length, head_dim = q.shape
    root = math.sqrt(1.0 / math.sqrt(head_dim))  # torch scales q and k by √s each
    q_s = (q * root).view(batch * heads, length, head_dim)
    k_s = (k.transpose(-2, -1) * root).reshape(batch * heads, head_dim, length)
    v_flat = v.reshape(batch * heads, length, head_dim)
    scores = q_s.bmm(k_s).view(batch, heads, length, length)
    if mask is None and causal:
        ones = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        mask = torch.where(ones, torch.zeros((), dtype=q.dtype), torch.full((), -math.inf, dtype=q.dtype))
    if mask is not None:
        scores = scores + mask
    p = _safe_softmax(scores, -1)
    drop = None
    if keep < 1.0:  # torch's op: empty_like(P).bernoulli_(1 − p).div_(1 − p), drawn where the generator is
        drop = torch.empty(p.shape, dtype=p.dtype, device=g.device).bernoulli_(keep, generator=g).div_(keep).to(
            p.device)
    p_drop = (p if drop is None else p * drop).view(batch * heads, length, length)
    o = p_drop.bmm(v_flat).view(batch, heads, length, head_dim)

    def backward(do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        do = do.reshape(batch * heads, length, head_dim)
        dv = p_drop.transpose(1, 2).bmm(do).view(batch, heads, length, head_dim)  # dV = P̃ᵀ dO
        dp = do.bmm(v_flat.transpose(1, 2)).view(batch, heads, length, length)  # dP = (dO Vᵀ) ⊙ m
        dp = dp if drop is None else dp * drop
        ds = _softmax_backward_data(dp, p, -1, p.dtype).view(batch * heads, length, length)
        dk = (q_s.transpose(1, 2).bmm(ds).view(batch, heads, head_dim, length) * root).transpose(-2, -1)
        dq = ds.bmm(k_s.transpose(1, 2)).view(batch, heads, length, head_dim) * root
        return dq, dk, dv

    return o, backward


def project_out_backward(dy: Tensor, o_rows: Tensor, weight: Tensor, heads: int,
                          bias: bool) -> tuple[Params, Tensor]:
    """The output projection's pullback, as linear's: ``dWₒᵤₜ = dyᵀ O``, ``dbₒᵤₜ = Σ dy``, ``dO = dy Wₒᵤₜ``;
    ``(dparams of out_proj, dO (batch, heads, sequence, head_dim))``."""
    batch, length, embed = dy.shape
    dy_rows = dy.transpose(0, 1).reshape(length * batch, embed)
    d_out = {"weight": dy_rows.t().mm(o_rows)}
    if bias:
        d_out["bias"] = dy_rows.sum(0, keepdim=True).view(embed)
    return d_out, dy_rows.mm(weight).view(length, batch, heads, -1).permute(1, 2, 0, 3)


def project_in_backward(dq: Tensor, dk: Tensor, dv: Tensor, rows: Tensor, weight: Tensor, bias: bool,
                         need_dx: bool) -> tuple[Params, Tensor | None]:
    """The input projection's pullback: ``dWᵢₙ = d[QKV]ᵀ x``, ``dbᵢₙ = Σ d[QKV]``, ``dx = d[QKV] Wᵢₙ``;
    ``(dparams of in_proj_weight and in_proj_bias, dx (batch, sequence, E) or None)``."""
    batch, _, length, _ = dq.shape
    embed = weight.shape[1]
    dproj = torch.stack([_heads_to_rows(dq), _heads_to_rows(dk), _heads_to_rows(dv)], dim=2).view(
        length, batch, 3 * embed)
    dparams: Params = {"in_proj_weight": dproj.view(-1, 3 * embed).t().mm(rows)}
    if bias:
        dparams["in_proj_bias"] = dproj.sum([0, 1], keepdim=True).view(3 * embed)
    if not need_dx:
        return dparams, None
    return dparams, dproj.view(-1, 3 * embed).mm(weight).view(length, batch, embed).transpose(0, 1)
