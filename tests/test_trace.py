"""The trace: a record replays the closures' kernels, so the same bits; the closures' own checks and errors."""

from __future__ import annotations

import pytest
import torch
from test_layers import LAYERS
from test_losses import LOSSES

import rdl_functional as rf
from rdl_functional._random import BatchShard
from rdl_functional.trace import trace


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _equal(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for p, q in zip(a, b, strict=True):
            _equal(p, q)
    else:
        assert a == b


def _random_like(y, generator):
    if isinstance(y, tuple):
        return tuple(_random_like(part, generator) for part in y)
    return torch.randn(y.shape, generator=generator, dtype=y.dtype)


def _layer_step(layer):
    def step(params, x, dy):
        y, pullback = layer.vjp(params, x)
        dparams, dx = pullback(dy)
        return y, dparams, dx

    return step


@pytest.mark.parametrize(("name", "layer", "in_features", "reference"), LAYERS, ids=[c[0] for c in LAYERS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_layer_replays_the_bits_of_its_closures(name, layer, in_features, reference, dtype, generator):
    step = _layer_step(layer)
    traced = trace(step)
    params = layer.init(generator, dtype=dtype)
    x = 2 * torch.randn(6, in_features, generator=generator, dtype=dtype)
    dy = _random_like(layer.apply(params, x), generator)
    traced(params, x, dy)  # the closures, then the record
    assert traced.signatures == 1 and not traced.replayed
    x2 = 2 * torch.randn(6, in_features, generator=generator, dtype=dtype)  # new values, the same signature
    got = traced(params, x2, dy)
    assert traced.replayed
    _equal(got, step(params, x2, dy))


@pytest.mark.parametrize(("name", "loss", "scale", "make_target", "reference"), LOSSES, ids=[c[0] for c in LOSSES])
def test_every_loss_replays_the_bits_of_its_closures(name, loss, scale, make_target, reference, generator):
    def step(pred, target):
        value, pullback = loss.vjp(pred, target)
        return value, pullback(torch.ones_like(value))

    traced = trace(step)
    pred = scale * torch.randn(7, 3, generator=generator)
    traced(pred, make_target(pred, generator))
    pred = scale * torch.randn(7, 3, generator=generator)
    target = make_target(pred, generator)
    got = traced(pred, target)
    assert traced.replayed
    _equal(got, step(pred, target))


def _scale(features):
    """A user's layer, three functions and nothing declared."""

    def vjp(params, x):
        return x * params["scale"], lambda dy: ({"scale": (dy * x).sum(0)}, dy * params["scale"])

    return rf.Layer(init=lambda g, *, dtype=torch.float32: {"scale": torch.rand(features, generator=g, dtype=dtype)},
                    apply=lambda params, x: x * params["scale"], vjp=vjp, name=f"scale({features})")


def _through_vjp(model, loss, params, x, target):
    pred, pullback = model.vjp(params, x)
    value, loss_pullback = loss.vjp(pred, target)
    grads, _ = pullback(loss_pullback(torch.ones_like(value)))
    return value, grads


@pytest.mark.parametrize("tree", ["model.init", "state dict"])
def test_a_user_layer_and_a_state_dicts_tree_get_the_record_with_the_closures_bits(tree, generator):
    model = rf.compose(rf.linear(2, 3), _scale(3), rf.tanh, rf.linear(3, 2), rf.relu)
    params = model.init(generator)
    if tree == "state dict":
        params = rf.from_state_dict(rf.to_state_dict(params))
        assert list(params) == ["0", "1", "3"]
    fn = rf.value_and_grad(model, rf.mse_loss)
    for _ in range(3):
        x, target = torch.randn(5, 2, generator=generator), torch.randn(5, 2, generator=generator)
        got = fn(params, x, target)
        _equal(got, _through_vjp(model, rf.mse_loss, params, x, target))
    assert fn.traced.replayed and fn.traced.signatures == 1


def test_a_new_shape_or_dtype_traces_again_and_the_records_are_bounded():
    model = rf.compose(rf.linear(2, 3), rf.tanh)
    fn = rf.value_and_grad(model, rf.mse_loss)
    params = model.init(0)
    for batch in (4, 4, 5, 5):
        fn(params, torch.ones(batch, 2), torch.zeros(batch, 3))
    assert fn.traced.signatures == 2 and fn.traced.replayed
    doubles = rf.tree_map(lambda p: p.double(), params)
    fn(doubles, torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64))
    assert fn.traced.signatures == 3 and not fn.traced.replayed
    bounded = trace(lambda x: x + 1, max_signatures=2)
    for n in (1, 2, 3, 3):
        bounded(torch.ones(n))
    assert bounded.signatures == 2 and bounded.replayed


def test_an_error_of_a_layer_is_raised_through_the_traced_path_by_name_with_its_path():
    model = rf.compose(rf.linear(2, 3), rf.compose(rf.relu, rf.linear(3, 2)))
    fn = rf.value_and_grad(model, rf.mse_loss)
    params = model.init(0)
    for _ in range(2):
        fn(params, torch.zeros(4, 2), torch.zeros(4, 2))
    assert fn.traced.replayed
    bad = {**params, "1": {**params["1"], "1": {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}}}
    with pytest.raises(ValueError, match=r"^layer 1\.1: linear\(3, 2\)\.vjp: params\['weight'\] has shape \(2, 4\)"):
        fn(bad, torch.zeros(4, 2), torch.zeros(4, 2))


@pytest.mark.parametrize(("bad", "shown"), [(7, r"\[0, 7\]"), (-100, r"\[-100, 2\]")], ids=["7", "-100"])
@pytest.mark.parametrize("loss", [rf.cross_entropy_loss(ignore_index=-1), rf.nll_loss(ignore_index=-1)],
                         ids=["cross_entropy", "nll"])
def test_a_label_out_of_range_in_a_replay_raises_the_losss_own_message(loss, bad, shown):
    # The kernels get the loss's own ignore_index: any other label out of range is refused, replayed or not
    # (the default's case, -100 left out alike, is the test below).
    model = rf.linear(2, 3)
    fn = rf.value_and_grad(model, loss)
    params = model.init(0)
    for _ in range(2):
        fn(params, torch.ones(4, 2), torch.tensor([0, 1, 2, 1]))
    assert fn.traced.replayed
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)( \(or be ignore_index=-1\))?, got values in "
                                         + shown):
        fn(params, torch.ones(4, 2), torch.tensor([0, 1, bad, 2]))


@pytest.mark.parametrize("loss", [rf.nll_loss, rf.cross_entropy_loss(label_smoothing=0.1)],
                         ids=["nll", "cross_entropy_smoothing"])
def test_the_label_losses_leave_out_their_ignore_index_alike_in_a_replay_and_in_the_closures(loss):
    """The default ignore_index is torch's -100: such a row adds nothing, replayed or not."""
    model = rf.compose(rf.linear(2, 3), rf.log_softmax) if loss is rf.nll_loss else rf.linear(2, 3)
    fn = rf.value_and_grad(model, loss)
    params = model.init(0)
    for _ in range(2):
        fn(params, torch.ones(4, 2), torch.tensor([0, 1, 2, 1]))
    assert fn.traced.replayed
    labels = torch.tensor([0, -100, 2, 1])
    value, grads = fn(params, torch.ones(4, 2), labels)
    assert fn.traced.replayed
    eager_value, eager_grads = fn.traced._fn(params, torch.ones(4, 2), labels, None)
    assert torch.equal(value, eager_value)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(grads), rf.tree_leaves(eager_grads), strict=True))


def test_a_label_of_minus_5_after_the_step_replays_is_refused_by_name_and_minus_100_left_out():
    """cross_entropy_loss passes torch's ignore_index, -100, as F.cross_entropy does: left out, replayed or not."""
    model = rf.linear(2, 3)
    step = rf.train_step(model, rf.cross_entropy_loss, rf.sgd(0.1))
    state = rf.train_state(model, rf.sgd(0.1), model.init(0))
    for _ in range(2):
        state, _ = step(state, torch.ones(4, 2), torch.tensor([0, 1, 2, 1]))
    assert step._flat.replayed
    with pytest.raises(ValueError, match=r"cross_entropy_loss.vjp: labels must lie in \[0, 3\), got .*\[-5, 2\]"):
        step(state, torch.ones(4, 2), torch.tensor([0, -5, 2, 1]))
    _, metrics = step(state, torch.ones(4, 2), torch.tensor([0, -100, 2, 1]))
    assert step._flat.replayed
    assert torch.equal(metrics["loss"], rf.cross_entropy_loss(model(state.params, torch.ones(4, 2))[[0, 2, 3]],
                                                              torch.tensor([0, 2, 1])))


def test_dropout_in_a_replay_draws_the_closures_masks_and_advances_the_generator_as_they_do():
    model = rf.compose(rf.linear(2, 8), rf.relu, rf.dropout(0.5), rf.linear(8, 2))
    fn = rf.value_and_grad(model, rf.mse_loss)
    params, state = model.init(0), model.init_state()
    ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step in range(4):
        x, target = torch.randn(6, 2, generator=torch.Generator().manual_seed(step)), torch.zeros(6, 2)
        value, grads, new_state = fn(params, state, x, target, generator=ours)
        pred, expected_state, pullback = model.vjp(params, state, x, train=True, generator=theirs)
        expected_value, loss_pullback = rf.mse_loss.vjp(pred, target)
        expected, _ = pullback(loss_pullback(torch.ones_like(expected_value)))
        _equal((value, grads, new_state), (expected_value, expected, expected_state))
        assert torch.equal(ours.get_state(), theirs.get_state())
    assert fn.traced.replayed


def test_batch_norm_replays_its_running_statistics(generator):
    model = rf.compose(rf.linear(2, 4), rf.batch_norm(4), rf.tanh, rf.linear(4, 2))
    fn = rf.value_and_grad(model, rf.mse_loss)
    params, state = model.init(generator), model.init_state()
    for _ in range(3):
        x, target = torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)
        got = fn(params, state, x, target)
        pred, new_state, pullback = model.vjp(params, state, x, train=True)
        value, loss_pullback = rf.mse_loss.vjp(pred, target)
        grads, _ = pullback(loss_pullback(torch.ones_like(value)))
        _equal(got, (value, grads, new_state))
        state = new_state
    assert fn.traced.replayed


def test_a_batch_shard_runs_the_closures():
    from rdl_functional.autodiff import _stateful_gradient_fn

    model = rf.compose(rf.linear(2, 4), rf.dropout(0.5))
    run = _stateful_gradient_fn(model, rf.mse_loss)
    params = model.init(0)
    for _ in range(2):
        shard = BatchShard(generator=torch.Generator().manual_seed(0), start=0, stop=4, rows=4)
        run(params, {}, torch.ones(4, 2), torch.zeros(4, 4), shard, True, None)
    assert not run.traced.replayed and run.traced.signatures == 0


def test_a_branch_on_data_is_never_recorded():
    def sign_layer_vjp(params, x):
        flip = bool(x.sum() > 0)  # a value read from the data: a record would keep one branch
        return (x if flip else -x), lambda dy: ({}, dy if flip else -dy)

    layer = rf.Layer(init=lambda g, *, dtype=torch.float32: {}, apply=lambda p, x: x, vjp=sign_layer_vjp)
    model = rf.compose(rf.linear(2, 2), layer)
    fn = rf.value_and_grad(model, rf.mse_loss)
    params = model.init(0)
    for sign in (1.0, 1.0, -1.0, 1.0, -1.0):
        x = sign * torch.full((3, 2), 100.0)
        _equal(fn(params, x, torch.zeros(3, 2)), _through_vjp(model, rf.mse_loss, params, x, torch.zeros(3, 2)))
    assert fn.traced.signatures == 0 and not fn.traced.replayed


def test_a_generator_made_inside_the_function_is_never_replayed():
    traced = trace(lambda x: x + torch.rand(x.shape, generator=torch.Generator().manual_seed(0)))
    first = traced(torch.zeros(3))
    assert torch.equal(traced(torch.zeros(3)), first) and traced.signatures == 0


def test_a_record_calls_torchs_bindings_that_reach_the_recorded_overloads():
    fn = rf.value_and_grad(rf.seed_model(), rf.mse_loss)
    params = rf.seed_model().init(0)
    fn(params, torch.rand(4, 2), torch.rand(4, 2))
    source = fn.traced.source(0)
    assert "_linear_default(" in source and "_mm_default(" in source  # bindings, proven by tracing the record
    assert "_threshold_backward_default_op(" in source  # no binding of that name: the overload
    from rdl_functional.trace import _binding

    assert _binding(torch.ops.aten.addmm.default) is torch.addmm
    assert _binding(torch.ops.aten.sum.dim_IntList) is torch.sum


def _eager_step(model, loss, optimizer, state, x, target):
    """The step by hand from the closures: the model's pullback, the loss's, the optimizer's rule."""
    generator = torch.Generator()
    generator.set_state(state.generator)
    pred, model_state, pullback = model.vjp(state.params, state.model_state, x, train=True, generator=generator)
    value, loss_pullback = loss.vjp(pred, target)
    grads, _ = pullback(loss_pullback(torch.ones_like(value)))
    params, opt_state = optimizer.step(state.params, grads, state.opt_state)
    return params, opt_state, model_state, value


@pytest.mark.parametrize("pool", [rf.avg_pool2d(2), rf.avg_pool2d(2, divisor_override=3), rf.max_pool2d(2)],
                         ids=["avg", "avg_divisor", "max"])
def test_a_cnn_with_avg_pool2d_replays_its_record_with_the_closures_bits(pool):
    # avg_pool2d_backward's divisor_override=None has no default in the schema: left out, the record raised at
    # every call and the step ran the closures for ever.
    model = rf.compose(rf.conv2d(1, 4, 3, padding=1), rf.relu, pool, rf.dropout(0.5), rf.global_avg_pool2d,
                       rf.linear(4, 3))
    optimizer = rf.adam(1e-2)
    step = rf.train_step(model, rf.mse_loss, optimizer)
    state = rf.train_state(model, optimizer, model.init(0))
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        x, target = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 3, generator=g)
        expected = _eager_step(model, rf.mse_loss, optimizer, state, x, target)
        state, metrics = step(state, x, target)
        assert step._flat.replayed == (i > 0)
        _equal((state.params, state.opt_state, state.model_state, metrics["loss"]), expected)


def test_a_record_that_fails_on_its_own_arguments_is_not_kept(monkeypatch):
    import rdl_functional.trace as trace_module

    monkeypatch.setattr(trace_module, "_other_calls", lambda *args: None)  # as if every written record raised
    fn = trace(lambda a: a * 2)
    for _ in range(2):
        assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))
    assert fn.signatures == 0 and not fn.replayed and fn._last is None
