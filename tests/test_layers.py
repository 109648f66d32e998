"""Every layer through one check: forward against torch.nn.functional, vjp against torch.func."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import rdl_functional as rf

_SEQUENTIAL = torch.nn.Sequential(
    torch.nn.Linear(3, 4), torch.nn.Tanh(),
    torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()),
    torch.nn.Linear(4, 2), torch.nn.Sigmoid(),
)  # fmt: skip


def _sequential_reference(params, x):
    """The nested compose below, as a torch.nn model fed our params (all of them: its own are never used)."""
    return torch.func.functional_call(_SEQUENTIAL, rf.to_state_dict(params), (x,))


# name, layer, in_features, torch reference(params, x). Adding a layer is one line.
LAYERS = [
    ("linear", rf.linear(3, 4), 3, lambda p, x: F.linear(x, p["weight"], p["bias"])),
    ("linear_1x1", rf.linear(1, 1), 1, lambda p, x: F.linear(x, p["weight"], p["bias"])),
    ("linear_no_bias", rf.linear(3, 4, bias=False), 3, lambda p, x: F.linear(x, p["weight"])),
    ("relu", rf.relu, 3, lambda p, x: F.relu(x)),
    ("tanh", rf.tanh, 3, lambda p, x: torch.tanh(x)),
    ("sigmoid", rf.sigmoid, 3, lambda p, x: torch.sigmoid(x)),
    ("identity", rf.identity, 3, lambda p, x: x),
    ("leaky_relu", rf.leaky_relu(), 3, lambda p, x: F.leaky_relu(x)),
    ("leaky_relu_0.2", rf.leaky_relu(0.2), 3, lambda p, x: F.leaky_relu(x, 0.2)),
    ("softmax", rf.softmax, 3, lambda p, x: F.softmax(x, dim=-1)),
    ("log_softmax", rf.log_softmax, 3, lambda p, x: F.log_softmax(x, dim=-1)),
    ("softmax_dim0", rf.softmax(dim=0), 3, lambda p, x: F.softmax(x, dim=0)),
    ("log_softmax_dim0", rf.log_softmax(dim=0), 3, lambda p, x: F.log_softmax(x, dim=0)),
    ("elu", rf.elu(), 3, lambda p, x: F.elu(x)),
    ("elu_0.5", rf.elu(0.5), 3, lambda p, x: F.elu(x, 0.5)),
    ("gelu", rf.gelu(), 3, lambda p, x: F.gelu(x)),
    ("gelu_tanh", rf.gelu("tanh"), 3, lambda p, x: F.gelu(x, approximate="tanh")),
    ("silu", rf.silu, 3, lambda p, x: F.silu(x)),
    ("softplus", rf.softplus(), 3, lambda p, x: F.softplus(x)),
    ("softplus_beta", rf.softplus(beta=2.0, threshold=1.0), 3, lambda p, x: F.softplus(x, beta=2.0, threshold=1.0)),
    ("flatten", rf.flatten(), 3, lambda p, x: torch.flatten(x, 1)),
    ("add", rf.add(rf.linear(3, 4), rf.compose(rf.linear(3, 4), rf.tanh)), 3,
     lambda p, x: F.linear(x, p["0"]["weight"], p["0"]["bias"])
     + torch.tanh(F.linear(x, p["1"]["0"]["weight"], p["1"]["0"]["bias"]))),
    ("concat", rf.concat(rf.linear(3, 2), rf.relu), 3,
     lambda p, x: torch.cat([F.linear(x, p["0"]["weight"], p["0"]["bias"]), F.relu(x)], dim=-1)),
    ("parallel", rf.parallel(rf.linear(2, 2), rf.sigmoid, sizes=(2, 1)), 3,
     lambda p, x: torch.cat([F.linear(x[:, :2], p["0"]["weight"], p["0"]["bias"]), torch.sigmoid(x[:, 2:])], dim=-1)),
    ("fan_out", rf.fan_out(rf.linear(3, 2), rf.tanh), 3,
     lambda p, x: (F.linear(x, p["0"]["weight"], p["0"]["bias"]), torch.tanh(x))),
    ("fan_out_parallel_concat", rf.compose(rf.fan_out(rf.linear(3, 2), rf.identity), rf.parallel(rf.tanh, rf.relu),
                                           rf.concat()), 3,
     lambda p, x: torch.cat([torch.tanh(F.linear(x, p["0"]["0"]["weight"], p["0"]["0"]["bias"])), F.relu(x)], -1)),
    ("fan_out_add", rf.compose(rf.fan_out(rf.linear(3, 3), rf.sigmoid), rf.add()), 3,
     lambda p, x: F.linear(x, p["0"]["0"]["weight"], p["0"]["0"]["bias"]) + torch.sigmoid(x)),
    ("residual", rf.residual(rf.compose(rf.linear(3, 3), rf.tanh)), 3,
     lambda p, x: x + torch.tanh(F.linear(x, p["0"]["weight"], p["0"]["bias"]))),
    (
        "compose_nested",
        rf.compose(rf.linear(3, 4), rf.tanh, rf.compose(rf.linear(4, 4), rf.relu), rf.linear(4, 2), rf.sigmoid),
        3,
        _sequential_reference,
    ),
    ("seed_model", rf.seed_model(), 2, None),
]
IDS = [case[0] for case in LAYERS]


def _inputs(layer, in_features, batch, generator):
    params = layer.init(generator, dtype=torch.float64)
    # Scaled so that the activations see both signs and tanh's saturated tails.
    x = 2 * torch.randn(batch, in_features, generator=generator, dtype=torch.float64)
    return params, x


@pytest.mark.parametrize(("name", "layer", "in_features", "reference"), LAYERS, ids=IDS)
def test_forward_matches_torch(name, layer, in_features, reference, generator):
    params, x = _inputs(layer, in_features, 7, generator)
    y = layer(params, x)
    assert_close(y, layer.apply(params, x), rtol=0, atol=0)
    if reference is not None:
        assert_close(y, reference(params, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("name", "layer", "in_features", "reference"), LAYERS, ids=IDS)
def test_vjp_matches_torch_func(name, layer, in_features, reference, generator):
    params, x = _inputs(layer, in_features, 7, generator)
    rf.check_vjp(layer, params, x, generator=generator)


@pytest.mark.parametrize(("name", "layer", "in_features", "reference"), LAYERS, ids=IDS)
@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_vjp_matches_torch_func_for_any_batch(name, layer, in_features, reference, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    params, x = _inputs(layer, in_features, batch, generator)
    rf.check_vjp(layer, params, x, generator=generator)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 6), fan_in=st.integers(1, 8), fan_out=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_linear_vjp_for_any_shape(batch, fan_in, fan_out, seed):
    generator = torch.Generator().manual_seed(seed)
    layer = rf.linear(fan_in, fan_out)
    params, x = _inputs(layer, fan_in, batch, generator)
    rf.check_vjp(layer, params, x, generator=generator)


# Layers that take a tuple (what fan_out returns): name, layer, the parts' widths, torch reference.
TUPLE_INPUT = [
    ("parallel_tuple", rf.parallel(rf.linear(2, 3), rf.tanh), (2, 4),
     lambda p, x: (F.linear(x[0], p["0"]["weight"], p["0"]["bias"]), torch.tanh(x[1]))),
    ("add_merge", rf.add(), (3, 3, 3), lambda p, x: x[0] + x[1] + x[2]),
    ("concat_merge", rf.concat(), (2, 1), lambda p, x: torch.cat(x, dim=-1)),
]


@pytest.mark.parametrize(("name", "layer", "widths", "reference"), TUPLE_INPUT, ids=[c[0] for c in TUPLE_INPUT])
def test_tuple_input_layers_match_torch(name, layer, widths, reference, generator):
    params = layer.init(generator, dtype=torch.float64)
    x = tuple(torch.randn(5, w, generator=generator, dtype=torch.float64) for w in widths)
    assert_close(layer(params, x), reference(params, x), rtol=1e-12, atol=1e-12)
    rf.check_vjp(layer, params, x, generator=generator)


# ---------------------------------------------------------------------------
# init


def test_linear_init_draws_what_torch_nn_linear_draws():
    with torch.random.fork_rng():
        torch.manual_seed(7)
        reference = torch.nn.Linear(25, 3)
    params = rf.linear(25, 3).init(7)
    assert torch.equal(params["weight"], reference.weight.detach())
    assert torch.equal(params["bias"], reference.bias.detach())


def test_linear_init_is_uniform_within_torch_bounds(generator):
    params = rf.linear(400, 300).init(generator)
    bound = 1 / math.sqrt(400)
    for leaf in params.values():
        assert leaf.abs().max() <= bound
        assert leaf.abs().max() > 0.95 * bound
    assert params["weight"].dtype == torch.float32


def test_init_is_deterministic_for_a_generator_state_and_an_int_seed():
    model = rf.seed_model()
    a = model.init(torch.Generator().manual_seed(3))
    b = model.init(3)
    c = model.init(4)
    assert all(torch.equal(x, y) for x, y in zip(rf.tree_leaves(a), rf.tree_leaves(b), strict=True))
    assert not torch.equal(a["0"]["weight"], c["0"]["weight"])


def test_init_advances_a_passed_generator(generator):
    layer = rf.linear(2, 2)
    first, second = layer.init(generator), layer.init(generator)
    assert not torch.equal(first["weight"], second["weight"])


def test_init_takes_a_dtype():
    params = rf.seed_model().init(0, dtype=torch.float64)
    assert {leaf.dtype for leaf in rf.tree_leaves(params)} == {torch.float64}


def test_parameterless_layers_have_empty_params():
    for layer in (rf.relu, rf.tanh, rf.sigmoid, rf.identity, rf.leaky_relu(0.3)):
        assert layer.init(0) == {}


def test_layers_print_by_name():
    assert repr(rf.linear(2, 25)) == "linear(2, 25)"
    assert repr(rf.compose(rf.linear(2, 3), rf.relu)) == "compose(linear(2, 3), relu)"


# ---------------------------------------------------------------------------
# Bad input


def test_linear_feature_mismatch_names_both_numbers():
    layer = rf.linear(3, 2)
    with pytest.raises(ValueError, match=r"linear\(3, 2\)\.apply: x has 7 features but weight expects 3"):
        layer(layer.init(0), torch.zeros(5, 7))


def test_linear_rejects_a_scalar_input_and_takes_any_leading_dimensions():
    layer = rf.linear(3, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\), got \(\)"):
        layer.vjp(layer.init(0), torch.zeros(()))
    params = layer.init(0, dtype=torch.float64)
    for shape in [(3,), (4, 3), (2, 5, 3)]:
        rf.check_vjp(layer, params, torch.randn(shape, dtype=torch.float64))


def test_linear_names_a_missing_param_key():
    layer = rf.linear(3, 2)
    with pytest.raises(ValueError, match=r"params has no 'bias' \(expected keys 'weight', 'bias'; got \['weight'\]\)"):
        layer({"weight": torch.zeros(2, 3)}, torch.zeros(1, 3))


def test_linear_names_unexpected_param_keys():
    layer = rf.linear(3, 2)
    params = {**layer.init(0), "scale": torch.ones(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['scale'\]"):
        layer(params, torch.zeros(1, 3))


def test_linear_rejects_mixed_dtypes():
    layer = rf.linear(3, 2)
    with pytest.raises(TypeError, match=r"x is torch.float64 but weight is torch.float32"):
        layer(layer.init(0), torch.zeros(1, 3, dtype=torch.float64))


def test_linear_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"linear: out_features must be a positive int, got 0"):
        rf.linear(2, 0)


def test_init_rejects_a_non_generator():
    with pytest.raises(TypeError, match=r"linear\(2, 2\)\.init: expected a torch.Generator or an int seed, got str"):
        rf.linear(2, 2).init("0")


def test_init_rejects_an_integer_dtype():
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype, got torch.int64"):
        rf.linear(2, 2).init(0, dtype=torch.int64)


def test_parameterless_layer_rejects_params():
    with pytest.raises(ValueError, match=r"relu has no parameters, so params must be \{\}, got keys \['weight'\]"):
        rf.relu({"weight": torch.zeros(1)}, torch.zeros(1, 1))


def test_pullback_rejects_a_cotangent_of_the_wrong_shape():
    _, pullback = rf.tanh.vjp({}, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"tanh pullback: dy has shape \(3, 2\) but the output y has shape \(2, 3\)"):
        pullback(torch.zeros(3, 2))


def test_leaky_relu_rejects_a_bad_slope():
    with pytest.raises(ValueError, match=r"leaky_relu: negative_slope must be finite, got nan"):
        rf.leaky_relu(float("nan"))
    with pytest.raises(TypeError, match=r"negative_slope must be a number, got str"):
        rf.leaky_relu("0.1")


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: rf.elu("1"), TypeError, r"elu: alpha must be a finite number, got '1'"),
        (lambda: rf.gelu("fast"), ValueError, r"gelu: approximate must be 'none' or 'tanh', got 'fast'"),
        (lambda: rf.softplus(beta=0), ValueError, r"softplus: beta must be > 0, got 0"),
        (lambda: rf.softplus(threshold=float("nan")), TypeError, r"softplus: threshold must be a finite number"),
        (lambda: rf.flatten(1.5), TypeError, r"flatten: start_dim must be an int, got 1.5"),
        (lambda: rf.flatten(2)({}, torch.zeros(4, 3)), ValueError,
         r"flatten\(2, -1\)\.apply: cannot join dimensions 2..-1 of an input of shape \(4, 3\)"),
        (lambda: rf.softmax({"w": torch.zeros(1)}, torch.zeros(2, 2)), ValueError,
         r"softmax.apply: softmax has no parameters"),
        (lambda: rf.huber_loss(0), ValueError, r"huber_loss: delta must be a finite number > 0, got 0"),
        (lambda: rf.l1_loss("max"), ValueError, r"l1_loss: reduction must be 'none', 'mean' or 'sum', got 'max'"),
        (lambda: rf.nll_loss()(torch.zeros(2, 3), torch.tensor([0, 3])), ValueError,
         r"nll_loss\.apply: labels must lie in \[0, 3\), got values in \[0, 3\]"),
        (lambda: rf.bce_with_logits_loss()(torch.zeros(2), torch.zeros(3)), ValueError,
         r"bce_with_logits_loss\.apply: target has shape \(3,\) but pred has \(2,\)"),
    ],
)
def test_new_layers_and_losses_say_what_is_wrong(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_flatten_takes_a_stack_of_models_and_each_new_activation_stacks(generator):
    x = torch.randn(3, 4, 2, 5, generator=generator, dtype=torch.float64)
    assert rf.stacked(rf.flatten())({}, x).shape == (3, 4, 10)
    for layer in (rf.softmax, rf.log_softmax, rf.elu(), rf.gelu(), rf.silu):
        assert torch.equal(rf.stacked(layer)({}, x), torch.stack([layer({}, xm) for xm in x]))
    # softplus runs one aten kernel on the whole stack either way, but on AVX-512 that kernel computes the last,
    # partial vector of a tensor by another path than the full ones, so the same number can round differently
    # (by 1 ulp) depending on where it lies in the tensor: torch's own softplus on x and on x[0] disagree there.
    # So the stack is compared with the kernel's own per-model results to the rounding of one float64 operation.
    stacked, one_by_one = rf.stacked(rf.softplus())({}, x), torch.stack([rf.softplus()({}, xm) for xm in x])
    torch.testing.assert_close(stacked, one_by_one, rtol=2 * torch.finfo(torch.float64).eps, atol=0)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: rf.fan_out(), ValueError, r"fan_out: expected at least one layer, got none"),
        (lambda: rf.concat(rf.linear), TypeError, r"concat: argument 0 must be a Layer, got function"),
        (lambda: rf.parallel(rf.relu, rf.tanh, sizes=(2,)), ValueError,
         r"parallel: sizes must give a positive int for each of the 2 layers, got \(2,\)"),
        (lambda: rf.parallel(rf.relu, rf.tanh, sizes=(2, 1))({}, torch.zeros(4, 5)), ValueError,
         r"parallel: x must have 3 features \(sizes \(2, 1\)\), got shape \(4, 5\)"),
        (lambda: rf.add(rf.linear(3, 2), rf.relu)(rf.add(rf.linear(3, 2), rf.relu).init(0), torch.zeros(4, 3)),
         ValueError, r"add\(linear\(3, 2\), relu\): the branches' outputs cannot be merged: \(4, 2\) "
                     r"float32, \(4, 3\) float32"),
        (lambda: rf.parallel(rf.relu, rf.tanh)({}, (torch.zeros(1),)), TypeError,
         r"parallel\(relu, tanh\): x must be a tuple of 2 tensors \(as rf.fan_out or rf.parallel return\), got a "
         r"tuple of 1: \(Tensor\)"),
        (lambda: rf.concat()({}, torch.zeros(2, 2)), TypeError,
         r"concat\(\)\.apply: x must be a tuple of tensors \(as rf.fan_out or rf.parallel return\), got Tensor"),
        (lambda: rf.add()({}, (torch.zeros(2, 2), torch.zeros(2, 3))), ValueError,
         r"add\(\): the branches' outputs cannot be merged: \(2, 2\) float32, \(2, 3\) float32"),
        (lambda: rf.fan_out(rf.relu, rf.tanh).vjp({}, torch.zeros(2, 2))[1](torch.zeros(2, 2)), ValueError,
         r"fan_out\(relu, tanh\) pullback: dy has shape \(2, 2\) but the output y has shape \(\(2, 2\), \(2, 2\)\)"),
        (lambda: rf.residual(rf.linear(3, 2))(rf.linear(3, 2).init(0), torch.zeros(4, 3)), ValueError,
         r"residual\(linear\(3, 2\)\): the layer's output has shape \(4, 2\) but x has \(4, 3\)"),
        (lambda: rf.concat(rf.linear(3, 2), rf.relu)({"0": rf.linear(3, 2).init(0), "5": {}}, torch.zeros(1, 3)),
         ValueError, r"concat.apply: params has entries \['5'\] but the model has 2 layers"),
        (lambda: rf.concat(rf.linear(3, 2), rf.relu)({"0": rf.linear(2, 2).init(0)}, torch.zeros(1, 3)),
         ValueError, r"layer 0: linear\(3, 2\)\.apply: params\['weight'\] has shape \(2, 2\) but the layer was "
                     r"built for \(2, 3\) \(out, in\)"),
    ],
)
def test_merges_say_what_is_wrong(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_merges_train_in_a_model_and_stack(generator):
    model = rf.compose(rf.concat(rf.linear(2, 8), rf.linear(2, 8)), rf.relu, rf.residual(rf.linear(16, 16)),
                       rf.tanh, rf.linear(16, 2))
    x, labels = rf.disc_dataset(200, 0)
    _params, history = rf.fit(model, rf.cross_entropy_loss, model.init(0), x, labels, epochs=3, batch_size=50,
                             optimizer=rf.adam(1e-2), generator=0)
    assert history.train_loss[-1] < history.train_loss[0]
    stacked = rf.stack_params([model.init(s, dtype=torch.float64) for s in range(2)])
    xs = torch.randn(2, 5, 2, generator=generator, dtype=torch.float64)
    together = rf.stacked(model)(stacked, xs)
    for m, tree in enumerate(rf.unstack_params(stacked)):
        torch.testing.assert_close(together[m], model(tree, xs[m]), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Layers with state and randomness: the same check, in training and in evaluation.
# name, layer, in_features, the torch.nn twin (or None). Dropout is checked with one
# fixed mask: check_vjp gives every call a generator seeded with layer_seed.

STATEFUL = [
    ("dropout", rf.dropout(0.3), 4, lambda: torch.nn.Dropout(0.3)),
    ("dropout_0", rf.dropout(0.0), 4, lambda: torch.nn.Dropout(0.0)),
    ("batch_norm", rf.batch_norm(4), 4, lambda: torch.nn.BatchNorm1d(4)),
    ("batch_norm_cumulative", rf.batch_norm(4, momentum=None), 4, lambda: torch.nn.BatchNorm1d(4, momentum=None)),
    ("batch_norm_plain", rf.batch_norm(4, eps=1e-3, affine=False), 4,
     lambda: torch.nn.BatchNorm1d(4, eps=1e-3, affine=False)),
    ("batch_norm_no_running_stats", rf.batch_norm(4, track_running_stats=False), 4,
     lambda: torch.nn.BatchNorm1d(4, track_running_stats=False)),
    ("compose_stateful", rf.compose(rf.linear(3, 4), rf.batch_norm(4), rf.relu, rf.dropout(0.5), rf.linear(4, 2)), 3,
     lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                                 torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))),
    ("residual_stateful", rf.residual(rf.compose(rf.linear(4, 4), rf.batch_norm(4), rf.tanh)), 4, None),
    ("add_stateful", rf.add(rf.batch_norm(4), rf.compose(rf.dropout(0.2), rf.linear(4, 4))), 4, None),
    ("parallel_stateful", rf.parallel(rf.batch_norm(2), rf.dropout(0.5), sizes=(2, 2)), 4, None),
]
STATEFUL_IDS = [case[0] for case in STATEFUL]


def _stateful_inputs(layer, in_features, batch, generator):
    """Params away from their init, and a state that has trained a little, so eval mode is no identity."""
    params = rf.tree_map(lambda t: t + 0.5 * torch.randn(t.shape, generator=generator, dtype=t.dtype),
                         layer.init(generator, dtype=torch.float64))
    state = layer.init_state(dtype=torch.float64)
    for _ in range(2):
        warm = 3 * torch.randn(6, in_features, generator=generator, dtype=torch.float64) + 1
        _, state = layer(params, state, warm, train=True, generator=generator)
    x = 2 * torch.randn(batch, in_features, generator=generator, dtype=torch.float64)
    return params, state, x


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "layer", "in_features", "twin"), STATEFUL, ids=STATEFUL_IDS)
def test_stateful_vjp_matches_torch_func(name, layer, in_features, twin, train, generator):
    params, state, x = _stateful_inputs(layer, in_features, 7, generator)
    rf.check_vjp(layer, params, state, x, train=train, generator=generator, layer_seed=5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "layer", "in_features", "twin"), [c for c in STATEFUL if c[3]],
                         ids=[c[0] for c in STATEFUL if c[3]])
def test_stateful_forward_and_new_state_match_the_torch_module(name, layer, in_features, twin, train, generator):
    params, state, x = _stateful_inputs(layer, in_features, 7, generator)
    module = twin().double().train(train)
    module.load_state_dict(rf.to_state_dict(params, state), strict=True)
    y, new_state = layer(params, state, x, train=train, generator=torch.Generator().manual_seed(5))
    with torch.random.fork_rng(devices=[]):  # torch's dropout draws from the global RNG: the same state
        torch.manual_seed(5)
        expected = module(x).detach()
    assert torch.equal(y, expected)
    assert rf.to_state_dict(params, new_state).keys() == module.state_dict().keys()
    for key, value in rf.to_state_dict(params, new_state).items():
        assert torch.equal(value, module.state_dict()[key]), key


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_train_vjp_matches_functional_call_of_BatchNorm1d(momentum, generator):
    """The issue's oracle: torch.func.vjp through torch.func.functional_call of BatchNorm1d in train mode."""
    layer = rf.batch_norm(5, momentum=momentum)
    params, state, x = _stateful_inputs(layer, 5, 9, generator)
    module = torch.nn.BatchNorm1d(5, momentum=momentum).double().train()
    updated = []

    def torch_bn(weight, bias, x):
        # The buffers are made inside, so that the module may update them in place (what BatchNorm1d does).
        updated.append({key: value.clone() for key, value in state.items()})
        return torch.func.functional_call(module, {"weight": weight, "bias": bias, **updated[-1]}, (x,))

    y_ref, pullback_ref = torch.func.vjp(torch_bn, params["weight"], params["bias"], x)
    y, new_state, pullback = layer.vjp(params, state, x, train=True)
    dy = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    dweight, dbias, dx = pullback_ref(dy)
    dparams, our_dx = pullback(dy)
    assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert_close(dparams, {"weight": dweight, "bias": dbias}, rtol=1e-10, atol=1e-10)
    assert_close(our_dx, dx, rtol=1e-10, atol=1e-10)
    # The module updated its buffers in place: they are our new state.
    assert_close(new_state, updated[-1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("bias", "error", "message"),
    [
        (torch.zeros(()), ValueError, r"params\['bias'\] has shape \(\) but the layer was built for \(2,\)"),
        (torch.zeros(1), ValueError, r"params\['bias'\] has shape \(1,\) but the layer was built for \(2,\)"),
        (torch.zeros(1, 2), ValueError, r"params\['bias'\] has shape \(1, 2\) but the layer was built for \(2,\)"),
        (torch.zeros(5), ValueError, r"params\['bias'\] has shape \(5,\) but the layer was built for \(2,\)"),
        (torch.zeros(2, dtype=torch.float64), TypeError,
         r"params\['bias'\] is torch.float64 but params\['weight'\] is torch.float32"),
        ([0.0, 0.0], TypeError, r"params\['bias'\] must be a torch.Tensor, got list"),
    ],
)
def test_linear_checks_its_bias_and_never_broadcasts_it(bias, error, message):
    """Regression (issue 10): a bias of shape (), (1,) or (1, out) used to broadcast, and its gradient came back
    in another shape than the param's."""
    layer = rf.linear(3, 2)
    params = {"weight": layer.init(0)["weight"], "bias": bias}
    for call in (lambda: layer(params, torch.zeros(4, 3)), lambda: layer.vjp(params, torch.zeros(4, 3)),
                 lambda: rf.value_and_grad(rf.compose(layer), rf.mse_loss)({"0": params}, torch.zeros(4, 3),
                                                                           torch.zeros(4, 2))):
        with pytest.raises(error, match=message):
            call()


def test_a_wrong_weight_is_named_as_the_param_not_blamed_on_the_input():
    layer = rf.linear(3, 2)
    with pytest.raises(ValueError, match=r"linear\(3, 2\)\.apply: params\['weight'\] has shape \(3, 2\) but the "
                                         r"layer was built for \(2, 3\) \(out, in\)"):
        layer({"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}, torch.zeros(4, 3))


def test_a_cotangent_of_another_dtype_is_refused():
    _, pullback = rf.linear(3, 2).vjp(rf.linear(3, 2).init(0), torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"linear\(3, 2\) pullback: dy is torch.float64 but the output y is "
                                        r"torch.float32"):
        pullback(torch.zeros(4, 2, dtype=torch.float64))
    _, loss_pullback = rf.mse_loss.vjp(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"the cotangent g is torch.float64 but the loss is torch.float32"):
        loss_pullback(torch.tensor(1.0, dtype=torch.float64))


# ---------------------------------------------------------------------------
# Property tests over dtypes, strides, batch sizes and magnitudes: every layer with a torch twin,
# its output and its pullback against torch.func.vjp of the twin, at the dtype's own tolerance.

@pytest.mark.parametrize(("name", "layer", "in_features", "reference"), [c for c in LAYERS if c[3]],
                         ids=[c[0] for c in LAYERS if c[3]])
@settings(max_examples=12, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float64]), batch=st.integers(1, 7),
       scale=st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e3]), strided=st.booleans(), seed=st.integers(0, 2**31))
def test_every_layer_against_torch_func_for_any_dtype_stride_and_magnitude(name, layer, in_features, reference,
                                                                           dtype, batch, scale, strided, seed):
    g = torch.Generator().manual_seed(seed)
    params = layer.init(g, dtype=dtype)
    if strided:  # a non-contiguous view: every other column of a wider tensor, transposed storage
        x = (scale * torch.randn(2 * in_features, batch, generator=g, dtype=dtype)).t()[:, ::2]
    else:
        x = scale * torch.randn(batch, in_features, generator=g, dtype=dtype)
    y, pullback = layer.vjp(params, x)
    y_ref, pullback_ref = torch.func.vjp(reference, params, x)
    assert_close(y, y_ref)
    dy = (torch.randn(y.shape, generator=g, dtype=dtype) if isinstance(y, torch.Tensor)
          else tuple(torch.randn(t.shape, generator=g, dtype=dtype) for t in y))
    dparams, dx = pullback(dy)
    dparams_ref, dx_ref = pullback_ref(dy)
    assert_close(dx, dx_ref)
    assert rf.tree_difference(dparams, {k: v for k, v in dparams_ref.items() if k in dparams} if dparams else {},
                              leaves=True) is None
    for got, want in zip(rf.tree_leaves(dparams), rf.tree_leaves({k: dparams_ref[k] for k in dparams}), strict=True):
        assert_close(got, want)


@pytest.mark.parametrize(("name", "layer", "in_features", "twin"), [c for c in STATEFUL if c[3]],
                         ids=[c[0] for c in STATEFUL if c[3]])
@settings(max_examples=8, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float64]), batch=st.integers(2, 7), train=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), strided=st.booleans(), seed=st.integers(0, 2**31))
@example(dtype=torch.float32, batch=7, train=False, scale=1e3, strided=False, seed=1980941)  # found by CI
def test_every_stateful_layer_against_its_torch_module_for_any_dtype_and_stride(name, layer, in_features, twin,
                                                                               dtype, batch, train, scale, strided,
                                                                               seed):
    g = torch.Generator().manual_seed(seed)
    params, state = layer.init(g, dtype=dtype), layer.init_state(dtype=dtype)
    x = scale * torch.randn(2 * in_features, batch, generator=g, dtype=dtype)
    x = x.t()[:, ::2] if strided else x.t().contiguous()[:, :in_features]
    module = twin().to(dtype).train(train)
    module.load_state_dict(rf.to_state_dict(params, state), strict=True)
    # The oracle is torch's autograd on the module itself: under torch.func's transforms, torch's dropout
    # takes another kernel path, which draws another mask from the same RNG state.
    # x itself, not a clone: clone() makes a strided x contiguous, and batch norm's float32 sums then run in
    # another order (6e-5 apart at scale 1e3); the same layout gives the same bits.
    x_ref = x.detach().requires_grad_()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        y_ref = module(x_ref)
    y, _, pullback = layer.vjp(params, state, x, train=train, generator=torch.Generator().manual_seed(seed))
    assert_close(y, y_ref.detach())
    dy = torch.randn(y.shape, generator=g, dtype=dtype)
    names, weights = zip(*module.named_parameters(), strict=True) if list(module.parameters()) else ((), ())
    grads = torch.autograd.grad(y_ref, [*weights, x_ref], dy)
    dparams, dx = pullback(dy)
    assert_close(dx, grads[-1])
    ours = rf.to_state_dict(dparams)
    for n, want in zip(names, grads[:-1], strict=True):
        assert_close(ours[n], want)


def test_a_custom_layers_init_gets_a_generator_for_an_int_seed_as_compose_passes_one():
    """init(0) handed the raw int to a layer's own init function, where compose hands it a torch.Generator."""
    seen = []

    def init(generator, *, dtype=torch.float32):
        seen.append(type(generator))
        return {"weight": torch.randn(2, 3, generator=generator, dtype=dtype)}

    layer = rf.Layer(init=init, apply=lambda params, x: x @ params["weight"].t(), vjp=None, name="custom")
    alone, by_keyword = layer.init(0), layer.init(generator=0)
    in_compose = rf.compose(layer).init(0)["0"]
    assert seen == [torch.Generator] * 3
    assert torch.equal(alone["weight"], in_compose["weight"]) and torch.equal(by_keyword["weight"], alone["weight"])
    assert torch.equal(alone["weight"], layer.init(torch.Generator().manual_seed(0))["weight"])
    mine = rf.StatefulLayer(init=init, init_state=lambda **_: {}, apply=None, vjp=None, name="custom stateful")
    assert torch.equal(mine.init(0)["weight"], alone["weight"]) and seen[-1] is torch.Generator
    with pytest.raises(TypeError, match=r"linear\(2, 3\)\.init: expected a torch.Generator or an int seed, got str"):
        rf.linear(2, 3).init("0")  # the library's own checks are as they were


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda model, p: model(p, {}, torch.zeros(4, 2), train=True),
         r"^compose\(linear\(2, 3\), relu\): a Layer is called as layer\(params, x\) -> y \(or layer.apply\(params, "
         r"x\)\); got \(dict, dict, Tensor, train=True\); it has no state and takes no train= or generator=: call "
         r"layer\(params, x\), or lift it with rf.stateful\(layer\) to call it as layer\(params, \{\}, x, "
         r"train=\.\.\.\)$"),
        (lambda model, p: model.apply(p, torch.zeros(4, 2), generator=0),
         r"^compose\(.*\): a Layer is called as layer\(params, x\).*; got \(dict, Tensor, generator=0\); it has no "
         r"state"),
        (lambda model, p: model(p), r"^compose\(.*\): a Layer is called as layer\(params, x\) -> y \(or "
                                    r"layer.apply\(params, x\)\); got \(dict\)$"),
    ],
    ids=["train_flag", "generator", "no_x"],
)
def test_a_plain_layer_called_as_a_stateful_one_says_how_it_is_called(call, message):
    """plain(p, {}, x, train=True) raised Python's 'got an unexpected keyword argument' from a closure."""
    model = rf.compose(rf.linear(2, 3), rf.relu)
    with pytest.raises(TypeError, match=message):
        call(model, model.init(0))


def test_a_type_error_from_inside_a_layer_is_its_own():
    """Only a call the function cannot take is reworded; a TypeError the layer raises keeps its message."""
    with pytest.raises(TypeError, match=r"^linear\(2, 3\)\.apply: x must be a torch.Tensor, got list$"):
        rf.linear(2, 3).apply(rf.linear(2, 3).init(0), [1.0, 2.0])


def test_a_1d_x_is_not_reported_as_one_row_of_n_features():
    """fit with a 1-D x of 50 rows said 'x has 50 features but weight expects 1 (was the layer built as
    linear(50, ...)?)': the batch read as features. Now the shape is named and the reshape suggested."""
    model = rf.compose(rf.linear(1, 4), rf.relu, rf.linear(4, 1))
    x, target = torch.linspace(-1, 1, 50), torch.zeros(50, 1)
    with pytest.raises(ValueError, match=r"^layer 0: linear\(1, 4\)\.vjp: x is 1-D with 50 entries, which reads as "
                                         r"one example of 50 features, but weight expects 1 \(for 50 rows of one "
                                         r"feature, pass x\[:, None\] or x.reshape\(-1, 1\)\)$"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=50, lr=0.1, generator=0)
    with pytest.raises(ValueError, match=r"^linear\(3, 2\)\.apply: x is 1-D with 5 entries, which reads as one "
                                         r"example of 5 features, but weight expects 3 \(a batch is \(batch, 3\), "
                                         r"one example \(3,\)\)$"):
        rf.linear(3, 2)(rf.linear(3, 2).init(0), torch.zeros(5))
    norm = rf.batch_norm(1)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 1\), features last, got \(50,\) \(x is 1-D "
                                         r"with 50 entries, read as one row of 50 features; for 50 rows of one "
                                         r"feature pass x\[:, None\] or x.reshape\(-1, 1\)\)$"):
        norm(norm.init(0), norm.init_state(), x, train=True)
    assert rf.linear(3, 2)(rf.linear(3, 2).init(0), torch.zeros(3)).shape == (2,)  # one example still runs


# ---------------------------------------------------------------------------
# Issue 19: torch.nn's options on the layers we have, bit for bit in float32 against the module.


def _bits_against_module(ours, module, x, *, state=None, train=True):
    """Forward and backward of ``ours`` and of ``module`` (its params loaded from ours), torch.equal each."""
    params = ours.init(0)
    module.load_state_dict(rf.to_state_dict(params, state) if state is not None else params, strict=True)
    module.train(train)
    x_ref = x.clone().requires_grad_()
    y_ref = module(x_ref)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1))
    y_ref.backward(dy)
    if state is None:
        y, pullback = ours.vjp(params, x)
        new_state = None
    else:
        y, new_state, pullback = ours.vjp(params, state, x, train=train)
    dparams, dx = pullback(dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, x_ref.grad)
    assert dparams.keys() == dict(module.named_parameters()).keys()
    assert all(torch.equal(dparams[name], p.grad) for name, p in module.named_parameters())
    return new_state


@pytest.mark.parametrize("shape", [(7, 5), (2, 7, 5), (5,)])
def test_linear_without_bias_is_nn_linear_without_bias_bit_for_bit(shape):
    layer = rf.linear(5, 3, bias=False)
    assert list(layer.init(0)) == ["weight"] and repr(layer) == "linear(5, 3, bias=False)"
    _bits_against_module(layer, torch.nn.Linear(5, 3, bias=False), torch.randn(*shape))
    assert torch.equal(layer.init(0)["weight"], rf.linear(5, 3).init(0)["weight"])  # the same draw of the weight


def test_linear_without_bias_says_which_keys_it_takes():
    with pytest.raises(ValueError, match=r"linear\(5, 3, bias=False\).apply: params has unexpected keys \['bias'\] "
                                         r"\(expected 'weight'\) \(a layer built with bias=False takes no 'bias'\)"):
        rf.linear(5, 3, bias=False)(rf.linear(5, 3).init(0), torch.zeros(2, 5))
    with pytest.raises(TypeError, match=r"linear: bias must be True or False, got 0"):
        rf.linear(5, 3, bias=0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("ours", "twin", "shape"), [
    (lambda **k: rf.batch_norm(4, **k), lambda **k: torch.nn.BatchNorm1d(4, **k), (8, 4)),
    (lambda **k: rf.batch_norm2d(4, **k), lambda **k: torch.nn.BatchNorm2d(4, **k), (3, 4, 5, 5)),
], ids=["batch_norm", "batch_norm2d"])
def test_batch_norm_without_running_stats_is_torch_nn_s_bit_for_bit_in_both_modes(ours, twin, shape, affine, train):
    layer = ours(affine=affine, track_running_stats=False)
    assert layer.init_state() == {}
    new_state = _bits_against_module(layer, twin(affine=affine, track_running_stats=False), torch.randn(*shape),
                                     state={}, train=train)
    assert new_state == {}


def test_batch_norm_without_running_stats_refuses_a_state_and_a_batch_of_one_by_name():
    layer = rf.batch_norm(3, track_running_stats=False)
    with pytest.raises(ValueError, match=r"built with track_running_stats=False, so its state is \{\}, got keys "
                                         r"\['num_batches_tracked', 'running_mean', 'running_var'\]"):
        layer(layer.init(0), rf.batch_norm(3).init_state(), torch.randn(4, 3), train=True)
    with pytest.raises(ValueError, match=r"without running statistics, batch norm normalizes each feature over the "
                                         r"batch, which needs more than one row"):
        layer(layer.init(0), {}, torch.randn(1, 3), train=False)
    with pytest.raises(TypeError, match=r"batch_norm: track_running_stats must be True or False, got 1"):
        rf.batch_norm(3, track_running_stats=1)


def test_batch_norm_refuses_eps_torch_refuses_in_training():
    with pytest.raises(ValueError, match="eps must be positive"):  # torch: at the first training call
        torch.nn.BatchNorm1d(3, eps=0.0)(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"batch_norm: eps must be a finite number > 0"):  # ours: at construction
        rf.batch_norm(3, eps=0.0)


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
@pytest.mark.parametrize(("ours", "twin"), [(rf.softmax, torch.nn.Softmax), (rf.log_softmax, torch.nn.LogSoftmax)],
                         ids=["softmax", "log_softmax"])
def test_softmax_on_a_chosen_dim_is_the_torch_module_bit_for_bit(ours, twin, dim):
    layer = ours(dim=dim)
    assert repr(layer) == (repr(ours) if dim == -1 else f"{ours!r}(dim={dim})")
    _bits_against_module(layer, twin(dim=dim), torch.randn(4, 5, 6))
    rf.check_vjp(layer, {}, torch.randn(4, 5, 6, dtype=torch.float64))
    assert torch.equal(ours({}, torch.ones(2, 3)), ours()({}, torch.ones(2, 3)))  # ours() is the bare layer


def test_softmax_on_a_dim_stacks_counting_after_the_model_dimension():
    x = torch.randn(2, 3, 4)
    assert torch.equal(rf.stacked(rf.softmax(dim=1))({}, x), torch.softmax(x, 2))


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: rf.softmax(dim=1.0), TypeError, r"softmax: dim must be an int, got 1.0"),
    (lambda: rf.log_softmax(dim=True), TypeError, r"log_softmax: dim must be an int, got True"),
    (lambda: rf.log_softmax(dim=3)({}, torch.zeros(2, 3, 4)), ValueError,
     r"log_softmax\(dim=3\): dim=3 is out of range for an input of shape \(2, 3, 4\)"),
])
def test_softmax_refuses_a_bad_dim_by_name(make, error, message):
    with pytest.raises(error, match=message):
        make()
