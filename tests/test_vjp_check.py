"""rf.check_vjp, the one vjp check every layer and loss goes through, must fail on a wrong pullback."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf


def _with_pullback(layer, bug):
    def vjp(params, x):
        y, pullback = layer.vjp(params, x)
        return y, lambda dy: bug(*pullback(dy))

    return rf.Layer(init=layer.init, apply=layer.apply, vjp=vjp, name=f"buggy {layer.name}")


@pytest.mark.parametrize(
    ("bug", "row"),
    [
        (lambda dparams, dx: ({"weight": dparams["weight"], "bias": 2 * dparams["bias"]}, dx), "dparams.bias"),
        (lambda dparams, dx: (dparams, dx.flip(0)), "dx"),
        (lambda dparams, dx: ({"bias": dparams["bias"], "weight": dparams["weight"]}, dx), "dparams keys"),
    ],
    ids=["wrong_bias_grad", "rows_swapped", "key_order_changed"],
)
def test_check_vjp_catches_a_wrong_pullback_and_names_it(bug, row, generator):
    layer = _with_pullback(rf.linear(3, 2), bug)
    params = layer.init(generator, dtype=torch.float64)
    x = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    with pytest.raises(rf.VjpMismatch, match=rf"{row}.*FAIL") as raised:
        rf.check_vjp(layer, params, x, generator=generator)
    assert not raised.value.report.ok
    assert str(raised.value).startswith("check_vjp(buggy linear(3, 2)) in float64: MISMATCH")


def test_finite_differences_catch_what_autograd_of_the_same_forward_cannot(generator):
    """A forward whose own autograd agrees with a wrong pullback is caught by finite differences."""
    layer = rf.linear(3, 3)

    def wrong_vjp(params, x):
        y, pullback = layer.vjp(params, x)
        return y, lambda dy: (pullback(dy)[0], dy.mm(params["weight"].t()))  # dx transposed

    def consistent_apply(params, x):  # the wrong dx is exactly right for this forward's autograd
        return torch.addmm(params["bias"], x.detach(), params["weight"].t()) + (x - x.detach()) @ params["weight"]

    wrong = rf.Layer(init=layer.init, apply=consistent_apply, vjp=wrong_vjp, name="transposed")
    retried_and_failed = r"finite differences \(relative, retried with a 1000× smaller step\).*FAIL"
    with pytest.raises(rf.VjpMismatch, match=retried_and_failed):
        rf.check_vjp(wrong, layer.init(generator), torch.randn(4, 3, generator=generator), generator=generator)


def test_check_vjp_returns_a_readable_report_and_converts_to_float64(generator):
    report = rf.check_vjp(rf.seed_model(), rf.seed_model().init(generator), torch.rand(5, 2, generator=generator))
    assert report.ok
    text = str(report)
    assert text.startswith("check_vjp(compose(linear(2, 25), relu,")
    for row in ("y (vjp vs torch.func)", "dparams.0.weight", "dparams.6.bias", "dx", "finite differences"):
        assert row in text


def test_check_vjp_takes_a_loss_with_its_target(generator):
    report = rf.check_vjp(rf.cross_entropy_loss, torch.randn(4, 3, generator=generator), torch.tensor([0, 2, 1, 0]))
    assert [row[0] for row in report.rows][-2:] == ["dpred", "<v, Jᵀu> vs finite differences (relative)"]


def test_check_vjp_rejects_what_it_cannot_check():
    with pytest.raises(TypeError, match=r"check_vjp: expected a Layer, a StatefulLayer or a Loss, got function"):
        rf.check_vjp(lambda params, x: x, {}, torch.zeros(1))
    with pytest.raises(TypeError, match=r"check_vjp: a Layer takes \(params, x\), got 1 arguments"):
        rf.check_vjp(rf.relu, torch.zeros(1, 1))


def test_check_vjp_holds_a_layer_to_its_skips_dx_declaration(generator):
    layer = rf.linear(3, 2)

    def vjp(params, x):
        y, pullback = layer.vjp(params, x)

        def lying(dy, *, need_dx=True):  # skipping dx also (wrongly) halves the weight gradient
            dparams, dx = pullback(dy, need_dx=need_dx)
            return (dparams if need_dx else {**dparams, "weight": dparams["weight"] / 2}), dx

        return y, lying

    liar = rf.Layer(init=layer.init, apply=layer.apply, vjp=vjp, name="liar", skips_dx=True)
    params = layer.init(generator, dtype=torch.float64)
    with pytest.raises(rf.VjpMismatch, match=r"dparams with need_dx=False"):
        rf.check_vjp(liar, params, torch.randn(4, 3, generator=generator, dtype=torch.float64))
    assert rf.check_vjp(layer, params, torch.randn(4, 3, generator=generator, dtype=torch.float64)).ok


def _embedding(num, dim, *, bug=False):
    """A small embedding: integer ids (...) in, rows of weight (num, dim) out; a gradient for the weight only.
    ``bug``: the pullback adds each row's cotangent at the next id (a wrong index the check must catch)."""

    def init(generator, *, dtype=torch.float32):
        return {"weight": torch.randn(num, dim, generator=generator, dtype=dtype)}

    def vjp(params, ids):
        weight = params["weight"]

        def pullback(dy):
            # dweight[i] = Σ over positions with ids == i of dy; ids have no cotangent
            at = (ids.reshape(-1) + 1) % num if bug else ids.reshape(-1)
            return {"weight": torch.zeros_like(weight).index_add(0, at, dy.reshape(-1, dim))}, None

        return weight[ids], pullback

    return rf.Layer(init=init, apply=lambda params, ids: params["weight"][ids], vjp=vjp, name="embedding")


def test_check_vjp_compares_only_the_float_parts_of_a_layer_with_integer_inputs(generator):
    """An embedding (integer ids in) failed with torch's 'only Tensors of floating point dtype can require
    gradients': the ids have no cotangent, so only the weight's gradient is compared (and differenced)."""
    layer = _embedding(5, 3)
    params, ids = layer.init(generator), torch.tensor([[0, 2], [2, 4]])
    report = rf.check_vjp(layer, params, ids, generator=generator)
    assert [row[0] for row in report.rows] == ["y (vjp vs torch.func)", "y (vjp vs apply)", "dparams.weight",
                                               "<v, Jᵀu> vs finite differences (relative)"]
    with pytest.raises(rf.VjpMismatch, match=r"dparams.weight .*FAIL"):
        rf.check_vjp(_embedding(5, 3, bug=True), params, ids, generator=generator)


def test_check_vjp_skips_a_bool_mask_beside_a_float_input(generator):
    """A tuple input of a float tensor and a bool mask: dx is compared for the float part only."""

    def vjp(params, x):
        values, mask = x
        return values * mask, lambda dy: ({}, (dy * mask, None))  # dvalues = dy ⊙ mask

    masked = rf.Layer(init=lambda g, **_: {}, apply=lambda params, x: x[0] * x[1], vjp=vjp, name="masked")
    x = (torch.randn(3, 4, generator=generator), torch.rand(3, 4, generator=generator) > 0.5)
    report = rf.check_vjp(masked, {}, x, generator=generator)
    assert "dx.0" in str(report) and "dx.1" not in str(report)
