"""The shared check itself must fail on a wrong pullback, or it proves nothing."""

from __future__ import annotations

import pytest
import torch
from vjp_check import check_vjp

import rdl_functional as rf


def _linear_with(pullback_bug):
    layer = rf.linear(3, 2)

    def vjp(params, x):
        y, pullback = layer.vjp(params, x)
        return y, lambda dy: pullback_bug(*pullback(dy))

    return layer, vjp


@pytest.mark.parametrize(
    "bug",
    [
        lambda dparams, dx: ({"weight": dparams["weight"], "bias": 2 * dparams["bias"]}, dx),
        lambda dparams, dx: (dparams, dx.flip(0)),
        lambda dparams, dx: ({"bias": dparams["bias"], "weight": dparams["weight"]}, dx),
    ],
    ids=["wrong_bias_grad", "rows_swapped", "key_order_changed"],
)
def test_check_vjp_catches_a_wrong_pullback(bug, generator):
    layer, vjp = _linear_with(bug)
    params = layer.init(generator, dtype=torch.float64)
    x = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    with pytest.raises(AssertionError):
        check_vjp(vjp, layer.apply, (params, x), generator)


def test_finite_differences_catch_what_autograd_of_the_same_forward_cannot(generator):
    """A forward whose own autograd agrees with a wrong pullback is caught by finite differences."""
    layer = rf.linear(3, 3)
    params = layer.init(generator, dtype=torch.float64)
    x = torch.randn(4, 3, generator=generator, dtype=torch.float64)

    def wrong_vjp(params, x):
        y, pullback = layer.vjp(params, x)
        return y, lambda dy: (pullback(dy)[0], dy.mm(params["weight"].t()))  # dx transposed

    def consistent_apply(params, x):  # the wrong dx is exactly right for this (different) forward
        return torch.addmm(params["bias"], x.detach(), params["weight"].t()) + (x - x.detach()) @ params["weight"]

    with pytest.raises(AssertionError, match="finite differences disagree"):
        check_vjp(wrong_vjp, consistent_apply, (params, x), generator)
