"""The one vjp check every layer and loss goes through.

In float64, a function's output and pullback must equal ``torch.func.vjp`` of
its own ``apply`` (the oracle: torch's autograd), and ``<J v, u> = <v, Jᵀ u>``
must hold against central finite differences (which catches a transpose that
autograd, differentiating the same wrong forward, would not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.testing import assert_close

import rdl_functional as rf

EXACT = {"rtol": 1e-10, "atol": 1e-10}
FINITE_DIFFERENCE_RTOL = 1e-6


def _random_like(tree, generator):
    return rf.tree_map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype), tree)


def _dot(a, b) -> torch.Tensor:
    leaves = zip(rf.tree_leaves(a), rf.tree_leaves(b), strict=True)
    return sum((x * y).sum() for x, y in leaves)


def assert_trees_close(actual, expected, **tolerance) -> None:
    """Same structure, key order included (as torch.func's pytrees compare), then leaf by leaf."""
    assert list(rf.tree_flatten(actual)) == list(rf.tree_flatten(expected)), (
        f"structure differs: {list(rf.tree_flatten(actual))} vs {list(rf.tree_flatten(expected))}"
    )
    assert rf.tree_difference(expected, actual, names=("expected", "actual")) is None
    for path, leaf in rf.tree_flatten(expected).items():
        assert_close(rf.tree_flatten(actual)[path], leaf, **tolerance, msg=lambda m, p=path: f"at {p}: {m}")


def check_vjp(
    vjp: Callable,
    apply: Callable,
    primals: tuple,
    generator: torch.Generator,
) -> None:
    """Check ``vjp(*primals) -> (y, pullback)`` against ``torch.func.vjp(apply, *primals)``.

    ``primals`` are float64 trees (params, x) or tensors (pred); the pullback
    returns one cotangent per primal (a tuple when there are several).
    """
    y, pullback = vjp(*primals)
    y_ref, pullback_ref = torch.func.vjp(apply, *primals)
    assert y.dtype == torch.float64
    assert_close(y, y_ref, **EXACT)

    u = torch.randn(y.shape, generator=generator, dtype=y.dtype)
    cotangents = pullback(u)
    cotangents = cotangents if isinstance(cotangents, tuple) else (cotangents,)
    expected = pullback_ref(u)
    assert len(cotangents) == len(primals)
    for got, want, primal in zip(cotangents, expected, primals, strict=True):
        assert_trees_close(got, want, **EXACT)
        assert rf.tree_difference(primal, got, names=("primal", "cotangent"), leaves=True) is None

    # <J v, u> by central differences against <v, Jᵀ u> from the pullback.
    v = tuple(_random_like(p, generator) for p in primals)
    vjp_dot = sum(_dot(d, c) for d, c in zip(v, cotangents, strict=True))
    # A step that straddles a ReLU kink averages two slopes; a 1000× smaller
    # step tells such a near-kink point from a wrong pullback (which fails both).
    for eps, rtol in ((1e-6, FINITE_DIFFERENCE_RTOL), (1e-9, 1e-4)):
        jvp = _central_difference(apply, primals, v, u, eps)
        if torch.isclose(vjp_dot, jvp, rtol=rtol, atol=1e-8):
            return
    assert_close(vjp_dot, jvp, rtol=rtol, atol=1e-8, msg=lambda m: f"finite differences disagree: {m}")


def _central_difference(apply, primals, v, u, eps) -> torch.Tensor:
    def shifted(sign: float):
        return tuple(rf.tree_map(lambda p, d: p + sign * eps * d, p, d) for p, d in zip(primals, v, strict=True))

    return ((apply(*shifted(+1)) - apply(*shifted(-1))) / (2 * eps) * u).sum()
