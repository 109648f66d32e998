"""Nothing the caller owns changes, and every result is a new tensor."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf

LAYERS = [rf.linear(3, 4), rf.relu, rf.tanh, rf.sigmoid, rf.identity, rf.leaky_relu(0.1),
          rf.compose(rf.linear(3, 4), rf.relu, rf.linear(4, 3), rf.tanh), rf.softmax, rf.log_softmax, rf.elu(),
          rf.gelu(), rf.silu, rf.softplus(), rf.flatten()]


def _clone(tree):
    return rf.tree_map(lambda t: t.clone(), tree)


def _assert_bit_identical(a, b):
    assert rf.tree_difference(a, b, leaves=True) is None
    for x, y in zip(rf.tree_leaves(a), rf.tree_leaves(b), strict=True):
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def _storages(tree):
    return {leaf.untyped_storage().data_ptr() for leaf in rf.tree_leaves(tree)}


@pytest.mark.parametrize("layer", LAYERS, ids=repr)
def test_apply_vjp_and_pullback_change_nothing_and_return_new_tensors(layer, generator):
    params = layer.init(generator)
    x = torch.randn(5, 3, generator=generator)
    dy = torch.randn(5, layer(params, x).shape[1], generator=generator)
    before = _clone({"params": params, "x": x, "dy": dy})

    y = layer.apply(params, x)
    y2, pullback = layer.vjp(params, x)
    dparams, dx = pullback(dy)

    _assert_bit_identical({"params": params, "x": x, "dy": dy}, before)
    inputs = _storages({"params": params, "x": x, "dy": dy})
    assert not (_storages({"y": y, "y2": y2, "dparams": dparams, "dx": dx}) & inputs)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layer", [rf.dropout(0.3), rf.batch_norm(3), rf.batch_norm(3, momentum=None, affine=False),
                                   rf.compose(rf.linear(3, 3), rf.batch_norm(3), rf.relu, rf.dropout(0.5))], ids=repr)
def test_stateful_layers_change_nothing_and_return_new_tensors(layer, train, generator):
    params, state = layer.init(generator), layer.init_state()
    x = torch.randn(5, 3, generator=generator)
    dy = torch.randn(5, 3, generator=generator)
    before = _clone({"params": params, "state": state, "x": x, "dy": dy})

    y, new_state = layer.apply(params, state, x, train=train, generator=1)
    y2, new_state2, pullback = layer.vjp(params, state, x, train=train, generator=1)
    dparams, dx = pullback(dy)

    _assert_bit_identical({"params": params, "state": state, "x": x, "dy": dy}, before)
    _assert_bit_identical(new_state, new_state2)
    inputs = _storages({"params": params, "state": state, "x": x, "dy": dy})
    outputs = {"y": y, "y2": y2, "new": new_state, "new2": new_state2, "dparams": dparams, "dx": dx}
    assert not (_storages(outputs) & inputs)


def test_sgd_step_and_value_and_grad_change_nothing(generator):
    model = rf.seed_model()
    params = model.init(generator)
    x, labels = rf.disc_dataset(20, generator)
    target = rf.one_hot(labels, 2)
    before = _clone({"params": params, "x": x, "target": target})
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x, target)
    grads_before = _clone(grads)
    new = rf.sgd_step(params, grads, 0.1)
    _assert_bit_identical({"params": params, "x": x, "target": target}, before)
    _assert_bit_identical(grads, grads_before)
    assert not (_storages(new) & _storages({"params": params, "grads": grads}))


@pytest.mark.parametrize("loss", [rf.mse_loss, rf.cross_entropy_loss, rf.huber_loss(), rf.l1_loss(),
                                  rf.bce_with_logits_loss(), rf.nll_loss()], ids=repr)
def test_losses_change_nothing(loss, generator):
    pred = torch.randn(4, 3, generator=generator)
    labelled = loss.name.startswith(("cross_entropy", "nll"))
    target = torch.tensor([0, 2, 1, 1]) if labelled else torch.rand(4, 3, generator=generator)
    before = _clone({"pred": pred, "target": target})
    _, pullback = loss.vjp(pred, target)
    pullback(torch.tensor(1.0))
    _assert_bit_identical({"pred": pred, "target": target}, before)
