"""Every optimizer against its torch.optim twin, and the protocol's promises: pure, state a plain tree, exact."""

from __future__ import annotations

import math

import pytest
import torch

import rdl_functional as rf
from rdl_functional.apps.torch_baseline import torch_seed_model

# name, ours, torch.optim twin (foreach), several settings each. Adding an optimizer is one line.
OPTIMIZERS = [
    ("sgd", lambda: rf.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1, foreach=True)),
    ("sgd_wd", lambda: rf.sgd(0.1, weight_decay=1e-3), lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3,
                                                                                    foreach=True)),
    ("momentum", lambda: rf.sgd(0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9,
                                                                                 foreach=True)),
    ("momentum_dampening", lambda: rf.sgd(0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, foreach=True)),
    ("nesterov", lambda: rf.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=True)),
    ("adam", lambda: rf.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True)),
    ("adam_l2_amsgrad", lambda: rf.adam(1e-2, weight_decay=1e-2, amsgrad=True),
     lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True, foreach=True)),
    ("adamw", lambda: rf.adamw(1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True)),
    ("adamw_betas_amsgrad", lambda: rf.adamw(1e-2, betas=(0.8, 0.99), eps=1e-6, amsgrad=True),
     lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, amsgrad=True, foreach=True)),
    ("rmsprop", lambda: rf.rmsprop(1e-3), lambda p: torch.optim.RMSprop(p, lr=1e-3, foreach=True)),
    ("rmsprop_centered_momentum", lambda: rf.rmsprop(1e-3, momentum=0.9, centered=True, weight_decay=1e-3),
     lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-3, foreach=True)),
    ("adagrad", lambda: rf.adagrad(0.05), lambda p: torch.optim.Adagrad(p, lr=0.05, foreach=True)),
    ("adagrad_decay", lambda: rf.adagrad(0.05, lr_decay=1e-3, weight_decay=1e-3, initial_accumulator_value=0.1),
     lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=1e-3, weight_decay=1e-3, initial_accumulator_value=0.1,
                                   foreach=True)),
    # maximize: torch negates the grads first (torch._foreach_neg), then every rule runs as above.
    ("sgd_maximize", lambda: rf.sgd(0.05, momentum=0.9, weight_decay=1e-3, maximize=True),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, maximize=True, foreach=True)),
    ("adam_maximize", lambda: rf.adam(1e-2, weight_decay=1e-2, amsgrad=True, maximize=True),
     lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=True, foreach=True)),
    ("adamw_maximize", lambda: rf.adamw(1e-2, maximize=True),
     lambda p: torch.optim.AdamW(p, lr=1e-2, maximize=True, foreach=True)),
    ("rmsprop_maximize", lambda: rf.rmsprop(1e-3, momentum=0.9, centered=True, weight_decay=1e-3, maximize=True),
     lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-3, maximize=True,
                                   foreach=True)),
    ("adagrad_maximize", lambda: rf.adagrad(0.05, weight_decay=1e-3, maximize=True),
     lambda p: torch.optim.Adagrad(p, lr=0.05, weight_decay=1e-3, maximize=True, foreach=True)),
]
IDS = [case[0] for case in OPTIMIZERS]


def _setup(dtype):
    g = torch.Generator().manual_seed(0)
    x, labels = rf.disc_dataset(300, g)
    model = rf.seed_model()
    return model, model.init(g, dtype=dtype), x.to(dtype), rf.one_hot(labels, 2, dtype=dtype)


def _batches(steps, n=300, size=30):
    g = torch.Generator().manual_seed(1)
    return [torch.randperm(n, generator=g)[:size] for _ in range(steps)]


def _torch_run(make, params, x, target, batches, dtype, clip=None):
    reference = torch_seed_model().to(dtype)
    reference.load_state_dict(rf.to_state_dict(params), strict=True)
    optimizer = make(reference.parameters())
    for rows in batches:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(reference(x[rows]), target[rows]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip, foreach=True)
        optimizer.step()
    return {k: v.detach() for k, v in reference.state_dict().items()}


def _our_run(optimizer, params, x, target, batches):
    step = rf.value_and_grad(rf.seed_model(), rf.mse_loss)
    state = optimizer.init(params)
    for rows in batches:
        _, grads = step(params, x[rows], target[rows])
        params, state = optimizer.step(params, grads, state)
    return params, state


@pytest.mark.parametrize(("name", "ours", "theirs"), OPTIMIZERS, ids=IDS)
def test_float32_steps_are_bit_identical_to_torch_optim_foreach(name, ours, theirs):
    _model, params, x, target = _setup(torch.float32)
    batches = _batches(50)
    result, state = _our_run(ours(), params, x, target, batches)
    expected = _torch_run(theirs, params, x, target, batches, torch.float32)
    assert all(torch.equal(rf.to_state_dict(result)[k], expected[k]) for k in expected), name
    assert int(state["count"]) == 50 and state["count"].dtype == torch.int64


@pytest.mark.parametrize(("name", "ours", "theirs"), OPTIMIZERS, ids=IDS)
def test_float64_steps_equal_torch_optims_single_tensor_formulas(name, ours, theirs):
    """The other implementation torch ships (a loop over tensors): the same formulas, written apart."""
    _model, params, x, target = _setup(torch.float64)
    batches = _batches(50)
    result, _ = _our_run(ours(), params, x, target, batches)

    def single_tensor(p):
        optimizer = theirs(p)
        for group in optimizer.param_groups:
            group["foreach"] = False
        return optimizer

    expected = _torch_run(single_tensor, params, x, target, batches, torch.float64)
    for key, value in expected.items():
        torch.testing.assert_close(rf.to_state_dict(result)[key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("name", "ours", "theirs"), OPTIMIZERS, ids=IDS)
def test_fit_in_place_equals_the_pure_step_bit_for_bit(name, ours, theirs):
    model, params, x, target = _setup(torch.float32)
    g = torch.Generator().manual_seed(3)
    trained, history = rf.fit(model, rf.mse_loss, params, x, target, epochs=2, batch_size=50, generator=g,
                              optimizer=ours(), record_history=False)
    g = torch.Generator().manual_seed(3)
    batches = [order[i:i + 50] for order in (torch.randperm(300, generator=g) for _ in range(2))
               for i in range(0, 300, 50)]
    expected, state = _our_run(ours(), params, x, target, batches)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(trained), rf.tree_leaves(expected), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(history.opt_state), rf.tree_leaves(state),
                                                 strict=True))


@pytest.mark.parametrize(("name", "ours", "theirs"), OPTIMIZERS, ids=IDS)
def test_the_one_rule_fast_path_equals_the_general_path_bit_for_bit(name, ours, theirs, monkeypatch):
    """A lone rule pairs params with grads and each buffer once (optim.base._run_rule); the chain's general path
    must give the same trees, key order included."""
    import rdl_functional.optim.base as base

    model, params, x, target = _setup(torch.float32)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x[:20], target[:20])
    optimizer = ours()
    state = optimizer.init(params)
    fast = [optimizer.step(params, grads, state), optimizer.update(grads, state, params)]
    fast.append(optimizer.step(params, grads, fast[0][1]))
    monkeypatch.setattr(base, "_run_rule", lambda *args: None)
    general = [optimizer.step(params, grads, state), optimizer.update(grads, state, params)]
    general.append(optimizer.step(params, grads, general[0][1]))
    for a, b in zip(fast, general, strict=True):
        assert rf.tree_flatten(a[0]).keys() == rf.tree_flatten(b[0]).keys()
        assert list(a[1]) == list(b[1])
        for tree_a, tree_b in zip(a, b, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(rf.tree_leaves(tree_a), rf.tree_leaves(tree_b),
                                                         strict=True))


def test_update_then_apply_updates_equals_step_to_rounding():
    model, params, x, target = _setup(torch.float64)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x[:20], target[:20])
    for optimizer in (rf.sgd(0.1, momentum=0.9), rf.adam(1e-2), rf.adamw(1e-2), rf.rmsprop(1e-3, centered=True)):
        state = optimizer.init(params)
        stepped, state_a = optimizer.step(params, grads, state)
        updates, state_b = optimizer.update(grads, state, params)
        for a, b in zip(rf.tree_leaves(rf.apply_updates(params, updates)), rf.tree_leaves(stepped), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)
        assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(state_a), rf.tree_leaves(state_b), strict=True))


def test_sgd_step_equals_rf_sgd_bit_for_bit():
    model, params, x, target = _setup(torch.float32)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x[:20], target[:20])
    optimizer = rf.sgd(0.3)
    stepped, _ = optimizer.step(params, grads, optimizer.init(params))
    plain = rf.sgd_step(params, grads, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(stepped), rf.tree_leaves(plain), strict=True))


def test_chain_of_clipping_and_sgd_matches_clip_grad_norm_and_torch_sgd():
    _model, params, x, target = _setup(torch.float32)
    batches = _batches(20)
    result, state = _our_run(rf.chain(rf.clip_by_global_norm(0.05), rf.sgd(0.1, momentum=0.9)), params, x, target,
                             batches)
    expected = _torch_run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True), params, x, target,
                          batches, torch.float32, clip=0.05)
    assert all(torch.equal(rf.to_state_dict(result)[k], expected[k]) for k in expected)
    assert list(state) == ["0", "1"] and state["0"] == {} and int(state["1"]["count"]) == 20


def test_steps_are_pure_and_state_is_a_plain_tree_that_saves_and_loads(tmp_path):
    model, params, x, target = _setup(torch.float32)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x[:20], target[:20])
    optimizer = rf.adam(1e-2, amsgrad=True)
    state = optimizer.init(params)
    before = [t.clone() for t in rf.tree_leaves((params, grads, state)[0]) + rf.tree_leaves(grads)
              + rf.tree_leaves(state)]
    new_params, new_state = optimizer.step(params, grads, state)
    after = rf.tree_leaves(params) + rf.tree_leaves(grads) + rf.tree_leaves(state)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # nothing was written
    assert sorted(new_state) == ["count", "exp_avg", "exp_avg_sq", "lr", "max_exp_avg_sq"]
    assert rf.tree_same_structure(new_state["exp_avg"], params)
    rf.save(new_state, tmp_path / "opt.safetensors")
    loaded = rf.load(tmp_path / "opt.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(loaded), rf.tree_leaves(new_state), strict=True))
    halved = rf.tree_map(lambda t: t / 2 if t.is_floating_point() else t, loaded)  # tree_map works on it
    assert torch.equal(halved["exp_avg"]["0"]["weight"], new_state["exp_avg"]["0"]["weight"] / 2)
    again, _ = optimizer.step(new_params, grads, loaded)  # the loaded state continues the run
    expected, _ = optimizer.step(new_params, grads, new_state)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(again), rf.tree_leaves(expected), strict=True))


def test_a_run_continued_from_its_saved_state_equals_one_run(tmp_path):
    model, params, x, target = _setup(torch.float32)
    schedule = rf.cosine_decay_schedule(0.01, decay_steps=24)
    settings = dict(epochs=2, batch_size=50, record_history=False)
    g = torch.Generator().manual_seed(5)
    whole, _history = rf.fit(model, rf.mse_loss, params, x, target, optimizer=rf.adam(schedule), generator=g,
                            **{**settings, "epochs": 4})
    g = torch.Generator().manual_seed(5)
    half, first = rf.fit(model, rf.mse_loss, params, x, target, optimizer=rf.adam(schedule), generator=g, **settings)
    rf.save(first.opt_state, tmp_path / "state.safetensors")
    rest, second = rf.fit(model, rf.mse_loss, half, x, target, optimizer=rf.adam(schedule), generator=g,
                          opt_state=rf.load(tmp_path / "state.safetensors"), **settings)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(rest), rf.tree_leaves(whole), strict=True))
    assert int(second.opt_state["count"]) == 24
    assert float(second.opt_state["lr"]) == schedule(23)  # the rate the last update used


def test_stacked_models_train_with_an_optimizer_as_each_alone():
    model = rf.seed_model()
    runs = [rf.draw_run(seed, rf.DiscSettings(n_train=60, n_test=60)) for seed in (0, 1)]
    params = [rf.tree_map(lambda t: t.double(), p) for _, p, _ in runs]
    x = torch.stack([d.x_train.double() for d, _, _ in runs])
    target = torch.stack([rf.one_hot(d.labels_train, 2, dtype=torch.float64) for d, _, _ in runs])
    settings = dict(epochs=2, batch_size=20, record_history=False)
    stacked, histories = rf.fit_stacked(model, rf.mse_loss, rf.stack_params(params), x, target,
                                        optimizer=rf.adam(1e-2), generators=[torch.Generator().manual_seed(s)
                                                                              for s in (0, 1)], **settings)
    for m, seed in enumerate((0, 1)):
        alone, history = rf.fit(model, rf.mse_loss, params[m], x[m], target[m], optimizer=rf.adam(1e-2),
                                generator=seed, **settings)
        for a, b in zip(rf.tree_leaves(rf.unstack_params(stacked)[m]), rf.tree_leaves(alone), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(histories[0].opt_state["exp_avg"]["0"]["weight"][m],
                                   history.opt_state["exp_avg"]["0"]["weight"], rtol=1e-10, atol=1e-12)
    for refused in (rf.clip_by_global_norm(1.0), rf.chain(rf.add_decayed_weights(0.1), rf.sgd(0.1))):
        with pytest.raises(ValueError, match=r"fit_stacked: .* does not work on each leaf alone, so it would mix the "
                                             r"models"):
            rf.fit_stacked(model, rf.mse_loss, rf.stack_params(params), x, target, optimizer=refused,
                           generators=[torch.Generator(), torch.Generator()], **settings)


def test_add_decayed_weights_leaves_biases_alone_by_default_and_takes_a_mask():
    params = {"0": {"weight": torch.ones(2, 2), "bias": torch.ones(2)}}
    grads = rf.tree_map(torch.zeros_like, params)
    by_default, _ = rf.add_decayed_weights(0.1).update(grads, {}, params)
    assert torch.equal(by_default["0"]["weight"], torch.full((2, 2), 0.1))
    assert torch.equal(by_default["0"]["bias"], torch.zeros(2))
    everything = {"0": {"weight": True, "bias": True}}
    for mask in (everything, lambda p: everything):
        decayed, _ = rf.add_decayed_weights(0.1, mask=mask).update(grads, {}, params)
        assert torch.equal(decayed["0"]["bias"], torch.full((2,), 0.1))
    with pytest.raises(ValueError, match=r"the mask must be a tree of bools with the params' paths"):
        rf.add_decayed_weights(0.1, mask={"0": {"weight": True}}).update(grads, {}, params)


def test_clip_by_global_norm_is_clip_grad_norm_s_formula():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": {"c": torch.tensor([[4.0]])}}
    clipped, state = rf.clip_by_global_norm(1.0).update(grads, {}, grads)
    scale = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(clipped["a"], torch.tensor([3.0 * scale, 0.0]))
    assert state == {}
    unchanged, _ = rf.clip_by_global_norm(10.0).update(grads, {}, grads)
    assert torch.equal(unchanged["a"], grads["a"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: rf.sgd(-0.1), r"sgd: lr must be finite and ≥ 0, got -0.1"),
        (lambda: rf.adam(float("nan")), r"adam: lr must be finite and ≥ 0, got nan"),
        (lambda: rf.adam(1e-3, betas=(1.0, 0.999)), r"adam: betas\[0\] must lie in \[0, 1\), got 1.0"),
        (lambda: rf.adamw(1e-3, betas=(0.9, -0.1)), r"adamw: betas\[1\] must be ≥ 0.0, got -0.1"),
        (lambda: rf.adam(1e-3, eps=0.0), r"adam: eps must be > 0.0, got 0.0"),
        (lambda: rf.sgd(0.1, momentum=-0.5), r"sgd: momentum must be ≥ 0.0, got -0.5"),
        (lambda: rf.sgd(0.1, nesterov=True), r"sgd: nesterov needs momentum > 0 and dampening = 0"),
        (lambda: rf.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True), r"nesterov needs momentum > 0 and "
                                                                           r"dampening = 0"),
        (lambda: rf.rmsprop(0.1, weight_decay=-1.0), r"rmsprop: weight_decay must be ≥ 0.0, got -1.0"),
        (lambda: rf.adagrad(0.1, lr_decay=float("inf")), r"adagrad: lr_decay must be a finite number, got inf"),
        (lambda: rf.clip_by_global_norm(0.0), r"clip_by_global_norm: max_norm must be > 0.0, got 0.0"),
        (lambda: rf.chain(), r"chain: expected at least one optimizer or transform, got none"),
    ],
)
def test_bad_hyperparameters_name_the_optimizer_and_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: rf.adam(torch.tensor(1e-3)), r"adam: lr must be a number or a schedule, got a tensor; pass "
                                              r"float\(lr\)"),
        (lambda: rf.sgd(0.1, maximize=1), r"sgd: maximize must be True or False, got 1"),
        (lambda: rf.rmsprop(0.1, maximize="yes"), r"rmsprop: maximize must be True or False, got 'yes'"),
    ],
)
def test_a_tensor_lr_and_a_maximize_that_is_not_a_bool_are_refused_by_name(make, message):
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad"])
def test_maximize_through_train_step_equals_the_eager_step(name):
    """rf.train_step's replayed record and the eager opt.step agree, bit for bit, with maximize."""
    model, params, x, target = _setup(torch.float32)
    optimizer = getattr(rf, name)(1e-2, maximize=True)
    step = rf.train_step(model, rf.mse_loss, optimizer)
    state = rf.train_state(model, optimizer, params)
    eager, opt_state = params, optimizer.init(params)
    grad = rf.value_and_grad(model, rf.mse_loss)
    for rows in _batches(5):
        state, _ = step(state, x[rows], target[rows])
        _, grads = grad(eager, x[rows], target[rows])
        eager, opt_state = optimizer.step(eager, grads, opt_state)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(state.params), rf.tree_leaves(eager), strict=True))


def test_a_state_from_another_model_or_optimizer_names_the_difference():
    model, params, x, target = _setup(torch.float32)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x[:20], target[:20])
    other = rf.compose(rf.linear(2, 3), rf.relu, rf.linear(3, 25), rf.relu, rf.linear(25, 25), rf.relu,
                       rf.linear(25, 2), rf.tanh)
    with pytest.raises(ValueError, match=r'adam.step: the optimizer state does not fit the params: params has a '
                                         r'float32 tensor of shape \(25, 2\) at "0.weight" but exp_avg has a '
                                         r'float32 tensor of shape \(3, 2\)'):
        rf.adam().step(params, grads, rf.adam().init(other.init(0)))
    with pytest.raises(ValueError, match=r"adam.step: the optimizer state has keys \['count', 'lr', "
                                         r"'momentum_buffer'\] but adam keeps \['count', 'lr', 'exp_avg', "
                                         r"'exp_avg_sq'\] \(is it the state of another optimizer\?\)"):
        rf.adam().step(params, grads, rf.sgd(0.1, momentum=0.9).init(params))
    with pytest.raises(ValueError, match=r"fit: the optimizer state does not fit the params"):
        rf.fit(model, rf.mse_loss, params, x, target, epochs=1, batch_size=50, generator=0, optimizer=rf.adam(),
               opt_state=rf.adam().init(other.init(0)))


def test_fit_says_which_lr_it_needs():
    model, params, x, target = _setup(torch.float32)
    with pytest.raises(ValueError, match=r"fit: adam carries its own lr; leave lr out"):
        rf.fit(model, rf.mse_loss, params, x, target, epochs=1, batch_size=50, generator=0, lr=0.1,
               optimizer=rf.adam())
    with pytest.raises(ValueError, match=r"fit: lr is required with a step function such as sgd_step"):
        rf.fit(model, rf.mse_loss, params, x, target, epochs=1, batch_size=50, generator=0)


def test_a_schedule_returning_a_bad_value_names_the_step():
    model, params, x, target = _setup(torch.float32)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x[:20], target[:20])
    optimizer = rf.adam(lambda count: 1e-3 if count < 1 else float("nan"))
    params, state = optimizer.step(params, grads, optimizer.init(params))
    with pytest.raises(ValueError, match=r"adam.step: the lr schedule at step 1: lr must be finite and ≥ 0, got nan"):
        optimizer.step(params, grads, state)


def test_schedules_follow_optax_formulas():
    cosine = rf.cosine_decay_schedule(2.0, decay_steps=10, alpha=0.1)
    assert cosine(0) == 2.0 and cosine(10) == cosine(50) == pytest.approx(0.2)
    assert cosine(5) == pytest.approx(2.0 * (0.9 * 0.5 + 0.1))
    warm = rf.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110, end_value=0.1)
    assert warm(0) == 0.0 and warm(5) == pytest.approx(0.5) and warm(10) == pytest.approx(1.0)
    assert warm(60) == pytest.approx(0.1 + 0.9 * 0.5) and warm(500) == pytest.approx(0.1)
    decay = rf.exponential_decay(1.0, transition_steps=10, decay_rate=0.5, transition_begin=5, end_value=0.3)
    assert decay(0) == decay(5) == 1.0 and decay(15) == pytest.approx(0.5) and decay(100) == 0.3
    assert rf.exponential_decay(1.0, 10, 0.5, staircase=True)(19) == 0.5
    piecewise = rf.piecewise_constant_schedule(0.1, {30: 0.1, 10: 0.5})
    assert [piecewise(k) for k in (0, 10, 29, 30)] == pytest.approx([0.1, 0.05, 0.05, 0.005])
    with pytest.raises(ValueError, match=r"warmup_cosine_decay_schedule: decay_steps must be an int ≥ 11"):
        rf.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=10)
    assert math.isclose(rf.cosine_decay_schedule(1.0, 4, exponent=2.0)(1), ((1 + math.cos(math.pi / 4)) / 2) ** 2)


def test_a_users_own_transform_chains_keeps_its_state_and_runs_in_fit():
    def init(params):
        return {"seen": torch.zeros((), dtype=torch.int64)}

    def update(updates, state, params):  # halves the grads and counts its calls
        return rf.tree_map(lambda u: u / 2, updates), {"seen": state["seen"] + 1}

    halve = rf.gradient_transform(init, update, name="halve")
    model, params, x, target = _setup(torch.float32)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x[:20], target[:20])
    opt = rf.chain(halve, rf.sgd(0.2))
    stepped, state = opt.step(params, grads, opt.init(params))
    expected = rf.sgd_step(params, rf.tree_map(lambda g: g / 2, grads), 0.2)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(stepped), rf.tree_leaves(expected), strict=True))
    assert int(state["0"]["seen"]) == 1 and int(state["1"]["count"]) == 1
    _, history = rf.fit(model, rf.mse_loss, params, x, target, epochs=2, batch_size=100, generator=0, optimizer=opt,
                        record_history=False)
    assert int(history.opt_state["0"]["seen"]) == 6
    wrong = rf.gradient_transform(init, lambda u, s, p: ({"w": torch.zeros(1)}, s), name="wrong")
    with pytest.raises(ValueError, match=r"the updates of wrong has no entry at \"0\" that params has"):
        rf.chain(wrong, rf.sgd(0.1)).step(params, grads, rf.chain(wrong, rf.sgd(0.1)).init(params))


def test_a_model_without_params_steps_through_every_optimizer():
    model = rf.compose(rf.relu, rf.tanh)
    x, target = torch.rand(6, 2), torch.rand(6, 2)
    for opt in (rf.sgd(0.1, momentum=0.9), rf.adam(), rf.chain(rf.clip_by_global_norm(1.0), rf.adagrad()),
                rf.add_decayed_weights(0.1)):
        params, state = opt.step({}, {}, opt.init({}))
        assert params == {} and rf.tree_same_structure(state, opt.init({}))
        updates, _ = opt.update({}, opt.init({}), {})
        assert updates == {}
        trained, history = rf.fit(model, rf.mse_loss, {}, x, target, epochs=2, batch_size=3, generator=0,
                                  optimizer=opt, record_history=False)
        assert trained == {}
        if opt.name.startswith("chain"):
            assert int(history.opt_state["1"]["count"]) == 4


def test_regressions_found_in_review(generator):
    """Each of these once went wrong; see the git log."""
    model, params, x, target = _setup(torch.float32)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x[:20], target[:20])
    # update never hands back the caller's own grad tensors (add_decayed_weights leaves biases alone)
    updates, _ = rf.add_decayed_weights(0.1).update(grads, {}, params)
    assert all(u is not g for u, g in zip(rf.tree_leaves(updates), rf.tree_leaves(grads), strict=True))
    # a user's transform that keeps the params it was given sees them unchanged by fit's in-place updates
    remember = rf.gradient_transform(lambda p: {"prev": rf.tree_map(torch.clone, p)},
                                     lambda g, s, p: (rf.tree_map(lambda gi, a, b: gi + 0.5 * (b - a), g, s["prev"], p),
                                                      {"prev": p}), name="remember")
    opt = rf.chain(remember, rf.sgd(0.1))
    trained, history = rf.fit(model, rf.mse_loss, params, x, target, epochs=1, batch_size=100, generator=0,
                              optimizer=opt, record_history=False)
    g = torch.Generator().manual_seed(0)
    batches = [order for order in torch.randperm(300, generator=g).split(100)]
    by_hand, _state = _our_run(opt, params, x, target, batches)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(trained), rf.tree_leaves(by_hand), strict=True))
    # a user's state need not be all tensors
    plain = rf.chain(rf.gradient_transform(lambda p: {"calls": 0}, lambda g, s, p: (g, {"calls": s["calls"] + 1})),
                     rf.sgd(0.1))
    _, history = rf.fit(model, rf.mse_loss, params, x, target, epochs=1, batch_size=100, generator=0,
                        optimizer=plain, record_history=False)
    assert history.opt_state["0"] == {"calls": 3}
    # fit with an optimizer takes params in any Mapping, as it does with sgd_step
    from collections import OrderedDict

    ordered = OrderedDict((k, OrderedDict(v)) for k, v in params.items())
    rf.fit(model, rf.mse_loss, ordered, x, target, epochs=1, batch_size=100, generator=0, optimizer=rf.adam(),
           record_history=False)
    # the default step function keeps no state, so the history has none
    _, history = rf.fit(model, rf.mse_loss, params, x, target, epochs=1, batch_size=100, generator=0, lr=0.1)
    assert history.opt_state is None
    # a growing exponential rate is capped by end_value instead of overflowing
    assert rf.exponential_decay(1e-4, transition_steps=1, decay_rate=1.1, end_value=1.0)(8000) == 1.0


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad"])
def test_maximize_through_the_traced_ops_of_rf_compiled_equals_the_eager_step_to_rounding(name):
    """rf.compiled runs the rules through base._Traced with the count and the rate as tensors: maximize too."""
    from rdl_functional.optim.base import _traced_run

    model, params, x, target = _setup(torch.float64)
    optimizer = getattr(rf, name)(1e-2, momentum=0.9, maximize=True) if name == "sgd" else \
        getattr(rf, name)(1e-2, maximize=True)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, x[:30], target[:30])
    state = optimizer.init(params)
    expected, _ = optimizer.step(params, grads, state)
    p, g = rf.tree_leaves(params), rf.tree_leaves(grads)
    buffers = [{n: rf.tree_leaves(state[n]) for n, _ in optimizer.links[0].buffers}]
    one, rate = torch.tensor(1.0, dtype=torch.float64), torch.tensor(1e-2, dtype=torch.float64)
    traced, _ = _traced_run(optimizer, p, g, params, buffers, [one], [rate], "test")
    for a, b in zip(traced, rf.tree_leaves(expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
