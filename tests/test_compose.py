from __future__ import annotations

import weakref

import pytest
import torch

import rdl_functional as rf


def test_params_have_one_entry_per_layer_in_order():
    params = rf.seed_model().init(0)
    assert list(params) == [str(i) for i in range(8)]
    assert params["1"] == {} and params["7"] == {}
    assert {k: tuple(v.shape) for k, v in params["6"].items()} == {"weight": (2, 25), "bias": (2,)}


def test_composes_nest():
    inner = rf.compose(rf.linear(3, 3), rf.relu)
    model = rf.compose(inner, rf.compose(inner, rf.linear(3, 1)))
    params = model.init(0)
    assert rf.to_state_dict(params).keys() == {"0.0.weight", "0.0.bias", "1.0.0.weight", "1.0.0.bias",
                                               "1.1.weight", "1.1.bias"}
    assert model(params, torch.zeros(2, 3)).shape == (2, 1)


def test_entries_of_parameterless_layers_may_be_left_out():
    model = rf.seed_model()
    params = model.init(0)
    sparse = {k: v for k, v in params.items() if v}
    x = torch.rand(5, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(sparse, x), model(params, x))
    _, pullback = model.vjp(sparse, x)
    dparams, _ = pullback(torch.ones(5, 2))
    assert list(dparams) == list(sparse)


def test_compose_names_the_layer_of_a_nested_error():
    model = rf.compose(rf.linear(2, 3), rf.compose(rf.relu, rf.linear(3, 1)))
    params = model.init(0)
    del params["1"]["1"]["bias"]
    with pytest.raises(ValueError, match=r"^layer 1\.1: linear\(3, 1\)\.apply: params has no 'bias'"):
        model(params, torch.zeros(2, 2))


def test_compose_reports_a_feature_mismatch_with_the_layer_path():
    model = rf.seed_model()
    with pytest.raises(ValueError, match=r"^layer 0: linear\(2, 25\)\.vjp: x has 3 features but weight expects 2"):
        model.vjp(model.init(0), torch.zeros(4, 3))


def test_compose_rejects_unknown_entries():
    model = rf.compose(rf.linear(2, 2), rf.relu)
    params = {**model.init(0), "2": {}}
    with pytest.raises(ValueError, match=r"params has entries \['2'\] but the model has 2 layers, keyed '0'..'1'"):
        model(params, torch.zeros(1, 2))


def test_compose_rejects_a_layer_that_is_not_a_layer():
    with pytest.raises(TypeError, match=r"compose: argument 1 must be a Layer, got function"):
        rf.compose(rf.relu, rf.linear)
    with pytest.raises(ValueError, match=r"compose: expected at least one layer, got none"):
        rf.compose()


def _recording(saved):
    """tanh, recording a weak reference to the tensor its pullback keeps."""

    def vjp(params, x):
        y, pullback = rf.tanh.vjp(params, x)
        saved.append(weakref.ref(y))
        return y, pullback

    return rf.Layer(init=rf.tanh.init, apply=rf.tanh.apply, vjp=vjp, name="recording tanh")


def test_a_pullback_can_be_called_again_unless_it_released_its_tensors():
    saved = []
    model = rf.compose(rf.linear(2, 3), _recording(saved), rf.compose(rf.linear(3, 3), _recording(saved)))
    params, x = model.init(0), torch.rand(4, 2, generator=torch.Generator().manual_seed(0))
    y, pullback = model.vjp(params, x)
    dy = torch.ones_like(y)
    first, second = pullback(dy), pullback(dy)
    released = pullback(dy, release=True)
    del y
    trees = [{"dparams": dparams, "dx": dx} for dparams, dx in (first, second, released)]
    for a, b, c in zip(*map(rf.tree_leaves, trees), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(ref() is None for ref in saved)  # the nested compose released too


def test_value_and_grad_frees_activations_as_it_goes():
    saved = []
    model = rf.compose(rf.linear(2, 3), _recording(saved), rf.linear(3, 2))
    rf.value_and_grad(model, rf.mse_loss)(model.init(0), torch.rand(4, 2), torch.zeros(4, 2))
    assert saved and all(ref() is None for ref in saved)


def test_a_released_pullback_says_so_when_called_again():
    model = rf.compose(rf.linear(2, 3), rf.tanh)
    y, pullback = model.vjp(model.init(0), torch.rand(4, 2))
    pullback(torch.ones_like(y), release=True)
    with pytest.raises(RuntimeError, match=r"compose\(linear\(2, 3\), tanh\) pullback: it ran with release=True"):
        pullback(torch.ones_like(y))


def test_need_dx_false_skips_the_input_gradient_and_changes_no_other():
    model = rf.compose(rf.linear(2, 3), rf.relu, rf.compose(rf.linear(3, 3), rf.tanh))
    params, x = model.init(0), torch.rand(4, 2, generator=torch.Generator().manual_seed(1))
    y, pullback = model.vjp(params, x)
    dparams, dx = pullback(torch.ones_like(y))
    lean, none = pullback(torch.ones_like(y), need_dx=False)
    assert none is None and dx.shape == x.shape
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(dparams), rf.tree_leaves(lean), strict=True))
