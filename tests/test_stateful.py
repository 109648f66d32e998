"""Layers with state and randomness: the contract, training against torch.nn, and the errors.

The vjp checks of dropout, batch norm and the combinators holding them are
in tests/test_layers.py's shared table (STATEFUL).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rdl_functional as rf


def _model():
    return rf.compose(
        rf.linear(2, 16), rf.batch_norm(16), rf.relu, rf.dropout(0.2),
        rf.linear(16, 16), rf.batch_norm(16, momentum=None), rf.tanh,
        rf.linear(16, 2),
    )  # fmt: skip


def _torch_model():
    return torch.nn.Sequential(
        torch.nn.Linear(2, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16, momentum=None), torch.nn.Tanh(),
        torch.nn.Linear(16, 2),
    )  # fmt: skip


def _train_torch(params, state, x, labels, *, seed, epochs, batch_size):
    """torch.nn + autograd + torch.optim, drawing shuffles and masks from the global RNG seeded with ``seed``:
    the order ``rf.fit`` draws them from its generator (each epoch's permutation, then each step's masks)."""
    module = _torch_model()
    module.load_state_dict(rf.to_state_dict(params, state), strict=True)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, foreach=True)
    module.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0])
            xs, ys = x.index_select(0, order), labels.index_select(0, order)
            for start in range(0, x.shape[0], batch_size):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(module(xs[start:start + batch_size]),
                                             ys[start:start + batch_size]).backward()
                optimizer.step()
    return module


def test_fifty_steps_with_dropout_and_batch_norm_equal_torch_nn_bit_for_bit():
    """float32, the seed task's MSE on one-hot targets (cross-entropy's pullback is the plain formula, equal
    to torch's to rounding only: see rf.cross_entropy_loss)."""
    x, labels = rf.disc_dataset(500, 0)
    target = rf.one_hot(labels, 2)
    model = _model()
    params, state = model.init(1), model.init_state()
    trained, history = rf.fit(model, rf.mse_loss, params, x, target, epochs=5, batch_size=50,
                              optimizer=rf.sgd(0.05, momentum=0.9), generator=torch.Generator().manual_seed(7))
    module = _train_torch(params, state, x, target, seed=7, epochs=5, batch_size=50)  # 5 × 10 = 50 steps
    ours = rf.to_state_dict(trained, history.model_state)
    assert ours.keys() == module.state_dict().keys()
    for key, value in module.state_dict().items():
        assert torch.equal(ours[key], value), key
    # Loaded into the torch model, running statistics included, it evaluates to the same bits.
    fresh = _torch_model().eval()
    fresh.load_state_dict(ours, strict=True)
    y, _ = model(trained, history.model_state, x, train=False)
    assert torch.equal(y, fresh(x).detach())
    assert history.model_state["1"]["num_batches_tracked"].item() == 50


def test_a_hand_written_loop_with_value_and_grad_equals_fit():
    x, labels = rf.disc_dataset(200, 0)
    model = _model()
    params, state = model.init(1), model.init_state()
    opt = rf.adam(1e-2)
    fitted, history = rf.fit(model, rf.cross_entropy_loss, params, x, labels, epochs=2, batch_size=50,
                             optimizer=opt, generator=3)
    g = torch.Generator().manual_seed(3)
    value_and_grad = rf.value_and_grad(model, rf.cross_entropy_loss)
    opt_state = opt.init(params)
    for _ in range(2):
        order = torch.randperm(200, generator=g)
        for rows in order.split(50):
            _, grads, state = value_and_grad(params, state, x[rows], labels[rows], generator=g)
            params, opt_state = opt.step(params, grads, opt_state)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params), rf.tree_leaves(fitted), strict=True))
    assert all(torch.equal(a, b) for a, b in
               zip(rf.tree_leaves(state), rf.tree_leaves(history.model_state), strict=True))
    # The history measures in evaluation mode, on the state reached.
    loss, accuracy = rf.evaluate(model, rf.cross_entropy_loss, fitted, x, labels, state=history.model_state)
    assert (loss, accuracy) == (history.train_loss[-1], history.train_accuracy[-1])


def test_nothing_is_mutated_and_the_global_rng_is_never_read(generator):
    model = _model()
    params, state = model.init(0), model.init_state()
    before = [leaf.clone() for leaf in rf.tree_leaves({"p": params, "s": state})]
    rng = torch.random.get_rng_state()
    x = torch.randn(8, 2, generator=generator)
    y1, new_state = model(params, state, x, train=True, generator=torch.Generator().manual_seed(4))
    y2, _ = model(params, state, x, train=True, generator=torch.Generator().manual_seed(4))
    y3, _ = model(params, state, x, train=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)  # one generator state, one set of masks
    assert torch.equal(torch.random.get_rng_state(), rng)
    for a, b in zip(rf.tree_leaves({"p": params, "s": state}), before, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(new_state["1"]["running_mean"], state["1"]["running_mean"])


def test_the_generator_is_advanced_and_an_int_seed_is_one_draw(generator):
    drop = rf.dropout(0.5)
    x = torch.ones(4, 8)
    first, _ = drop({}, {}, x, train=True, generator=generator)
    second, _ = drop({}, {}, x, train=True, generator=generator)
    assert not torch.equal(first, second)
    assert torch.equal(drop({}, {}, x, train=True, generator=9)[0], drop({}, {}, x, train=True, generator=9)[0])


def test_dropout_in_eval_is_the_identity_and_its_mask_scales(generator):
    drop = rf.dropout(0.25)
    x = torch.randn(50, 40, generator=generator, dtype=torch.float64)
    y, pullback = drop.vjp({}, {}, x, train=False)[::2]
    assert torch.equal(y, x) and y is not x
    y, _, pullback = drop.vjp({}, {}, x, train=True, generator=generator)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert 0.65 < kept.double().mean() < 0.85
    _, dx = pullback(torch.ones_like(x))
    assert torch.equal(dx != 0, kept)  # the same mask, scaled: dx = dy ⊙ m


def test_batch_norm_in_eval_leaves_the_state_and_cumulative_momentum_averages(generator):
    bn = rf.batch_norm(3, momentum=None, affine=False)
    state = bn.init_state(dtype=torch.float64)
    batches = [torch.randn(10, 3, generator=generator, dtype=torch.float64) for _ in range(4)]
    for batch in batches:
        _, state = bn({}, state, batch, train=True)
    torch.testing.assert_close(state["running_mean"], torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(state["running_var"], torch.stack([b.var(0) for b in batches]).mean(0))
    _, after_eval = bn({}, state, batches[0], train=False)
    assert all(torch.equal(after_eval[k], state[k]) for k in state)


def test_state_saves_and_loads_and_a_plain_layer_lifts(tmp_path, generator):
    model = _model()
    _, state = model(model.init(0), model.init_state(), torch.randn(6, 2, generator=generator), train=True,
                     generator=generator)
    rf.save(state, tmp_path / "state.safetensors")
    loaded = rf.load(tmp_path / "state.safetensors")
    assert rf.tree_flatten(loaded).keys() == rf.tree_flatten(state).keys()
    assert all(torch.equal(a, b) and a.dtype == b.dtype
               for a, b in zip(rf.tree_leaves(loaded), rf.tree_leaves(state), strict=True))
    lifted = rf.stateful(rf.tanh)
    assert lifted.init_state() == {}
    assert torch.equal(lifted({}, {}, torch.ones(1, 2), train=True)[0], torch.tanh(torch.ones(1, 2)))


def test_a_plain_compose_stays_plain_and_a_stateful_one_says_how_to_call_it():
    assert isinstance(rf.compose(rf.linear(2, 2), rf.relu), rf.Layer)
    model = rf.compose(rf.linear(2, 2), rf.dropout(0.1))
    assert isinstance(model, rf.StatefulLayer)
    with pytest.raises(TypeError, match=r"carries state or randomness: call it as layer\(params, state, x, "
                                        r"train=True or False"):
        model(model.init(0), torch.zeros(1, 2))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: rf.dropout(1.0), ValueError, r"dropout: p must be a probability in \[0, 1\).*got 1.0"),
        (lambda: rf.dropout(-0.1), ValueError, r"dropout: p must be a probability in \[0, 1\)"),
        (lambda: rf.dropout("0.5"), ValueError, r"dropout: p must be a probability in \[0, 1\)"),
        (lambda: rf.batch_norm(0), ValueError, r"batch_norm: features must be a positive int, got 0"),
        (lambda: rf.batch_norm(3, momentum=1.5), ValueError, r"batch_norm: momentum must be in \[0, 1\] or None"),
        (lambda: rf.batch_norm(3, eps=-1), ValueError, r"batch_norm: eps must be a finite number > 0"),
        (lambda: rf.batch_norm(3, eps=0), ValueError, r"batch_norm: eps must be a finite number > 0 \(it keeps "
                                                       r"1/√\(σ² \+ ε\) finite.*got 0"),
    ],
)
def test_bad_constructor_arguments_say_what_was_expected(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _bad_calls():
    model = rf.compose(rf.linear(3, 4), rf.batch_norm(4), rf.relu, rf.dropout(0.5))
    params, state, x = model.init(0), model.init_state(), torch.zeros(5, 3)
    other = rf.compose(rf.linear(3, 3), rf.batch_norm(3))
    return [
        # a batch of one in training: torch's own error, in our words, with the layer's path
        (lambda: model(params, state, x[:1], train=True, generator=0), ValueError,
         r"layer 1: batch_norm\(4\)\.apply: in training, batch norm normalizes each feature over the batch, "
         r"which needs more than one row, got a batch of 1"),
        # evaluating without state
        (lambda: model(params, {}, x, train=False), ValueError,
         r"layer 1: batch_norm\(4\)\.apply: batch norm needs its state \(running_mean, running_var, "
         r"num_batches_tracked\), got \{\} \(pass layer.init_state\(\)"),
        (lambda: model(params, None, x, train=False), TypeError,
         r"compose\.apply: state must be a dict keyed '0'..'3' \(model.init_state\(\) to start from\), got NoneType"),
        # state from another model
        (lambda: model(params, other.init_state(), x, train=False), ValueError,
         r"layer 1: batch_norm\(4\)\.apply: state\['running_mean'\] must be a floating tensor of shape \(4,\), "
         r"got torch.float32 \(3,\) \(is it another model's state\?\)"),
        (lambda: model(params, {**state, "7": {}}, x, train=False), ValueError,
         r"compose\.apply: state has entries \['7'\] but the model has 4 layers, keyed '0'..'3' "
         r"\(is it another model's state\?\)"),
        (lambda: model(params, {**state, "0": state["1"]}, x, train=False), ValueError,
         r"layer 0: linear\(3, 4\)\.apply: linear\(3, 4\) has no state, so its state must be \{\}, got keys "
         r"\['num_batches_tracked', 'running_mean', 'running_var'\]"),
        # randomness in training without a generator: never the global RNG
        (lambda: model(params, state, x, train=True), ValueError,
         r"layer 3: dropout\(0.5\)\.apply: in training \(train=True\) dropout draws a random mask and needs a "
         r"generator: pass generator=torch.Generator\(\)\.manual_seed\(seed\)"),
        (lambda: rf.value_and_grad(model, rf.mse_loss)(params, state, x, torch.zeros(5, 4)), ValueError,
         r"layer 3: dropout\(0.5\)\.vjp: in training \(train=True\) dropout draws a random mask"),
        (lambda: model(params, state, x, train=1, generator=0), TypeError,
         r"train must be True \(training\) or False \(evaluating\), got 1"),
        (lambda: model(params, state, x.double(), train=False), TypeError,
         r"layer 0: linear\(3, 4\)\.apply: x is torch.float64 but weight is torch.float32"),
        (lambda: rf.batch_norm(4)(rf.batch_norm(4).init(0), rf.batch_norm(4).init_state(), x, train=False),
         ValueError, r"batch_norm\(4\)\.apply: x must have shape \(\.\.\., 4\), features last, got \(5, 3\)"),
        (lambda: rf.batch_norm(2, affine=False)(rf.batch_norm(2).init(0), {}, x, train=False), ValueError,
         r"batch_norm\(2, affine=False\)\.apply: params must have the keys \[\], got \['bias', 'weight'\] "
         r"\(the layer was built with affine=False\)"),
        # the library's other entry points
        (lambda: rf.evaluate(model, rf.mse_loss, params, x, torch.zeros(5, 4)), ValueError,
         r"evaluate: compose\(.*\) is a StatefulLayer, which evaluates with its state: pass "
         r"state=history.model_state"),
        (lambda: rf.predict(rf.relu, {}, x, state={}), ValueError,
         r"predict: state goes with a StatefulLayer; relu is a plain Layer"),
        (lambda: rf.fit(rf.relu, rf.mse_loss, {}, x, x, epochs=1, batch_size=5, lr=0.1, generator=0,
                        model_state={}), ValueError, r"fit: model_state goes with a StatefulLayer"),
        (lambda: rf.fit(model, rf.mse_loss, params, x, torch.zeros(5, 4), epochs=1, batch_size=5, lr=0.1,
                        generator=0, compile=True), ValueError, r"fit: compile=True compiles a plain model's step"),
        (lambda: rf.stacked(model), TypeError, r"stacked: compose\(.*\) carries state or randomness"),
        (lambda: rf.to_state_dict(params, params), ValueError,
         r'to_state_dict: params and state both hold "0.weight"'),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_calls_name_the_layer_and_the_fix(case):
    call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


def test_a_torch_state_dict_splits_back_into_params_and_state(generator):
    model = _model()
    module = _torch_model()
    params, state = rf.split_state(rf.from_state_dict(module.state_dict()), model.init_state())
    assert rf.to_state_dict(params, state).keys() == module.state_dict().keys()
    x = torch.rand(5, 2, generator=generator)
    assert torch.equal(model(params, state, x, train=False)[0], module.eval()(x).detach())
    with pytest.raises(ValueError, match=r'split_state: the tree has no "1.running_mean", which the state holds'):
        rf.split_state(rf.from_state_dict({"0.weight": torch.zeros(1)}), model.init_state())


def test_review_findings_stay_fixed():
    # Merges of a tuple refuse parts of different shapes or dtypes (a broadcast would give a dx of the wrong shape).
    with pytest.raises(ValueError, match=r"add\(\): the branches' outputs cannot be merged: \(3, 1\) float64, "
                                         r"\(3, 4\) float64"):
        rf.add()({}, (torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"concat\(\): the branches' outputs cannot be merged"):
        rf.concat()({}, (torch.zeros(3, 1), torch.zeros(3, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"add\(\)\.apply: add\(\) has no parameters, so params must be \{\}, "
                                         r"got NoneType"):
        rf.add()(None, (torch.zeros(1), torch.zeros(1)))
    with pytest.raises(TypeError, match=r"relu\.apply: state must be a dict"):
        rf.stateful(rf.relu)({}, None, torch.zeros(1, 1), train=True)
    with pytest.raises(TypeError, match=r"dropout\(0.5\)\.apply: expected a torch.Generator or an int seed"):
        rf.dropout(0.5)({}, {}, torch.zeros(1, 1), train=False, generator="nonsense")
    # epochs=0 hands back new tensors, not the caller's state.
    model = _model()
    state = model.init_state()
    x, labels = rf.disc_dataset(10, 0)
    _, history = rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2), epochs=0, batch_size=5,
                        lr=0.1, model_state=state, generator=0)
    assert history.model_state is not state
    assert not set(map(id, rf.tree_leaves(history.model_state))) & set(map(id, rf.tree_leaves(state)))
    # A trailing batch of one row is named as such.
    with pytest.raises(ValueError, match=r"fit: the last batch of each epoch holds 1 row\(s\) \(11 rows in batches "
                                         r"of 5\): layer 1: batch_norm\(16\)\.vjp: in training"):
        x, labels = rf.disc_dataset(11, 0)
        rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2), epochs=1, batch_size=5, lr=0.1,
               generator=0)
    # An affine=False batch norm's buffers come in the layer's place, as torch lists them.
    plain = rf.compose(rf.linear(2, 3), rf.batch_norm(3, affine=False), rf.linear(3, 1))
    params = {"0": plain.init(0)["0"], "2": plain.init(0)["2"]}  # as from_state_dict leaves it
    assert list(rf.to_state_dict(params, plain.init_state()))[2:5] == [
        "1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_batch_norm_takes_leading_dimensions_features_last_as_batchnorm1d_on_the_transpose(generator):
    bn = rf.batch_norm(3, momentum=0.3)
    params = {"weight": torch.randn(3, generator=generator, dtype=torch.float64),
              "bias": torch.randn(3, generator=generator, dtype=torch.float64)}
    state = bn.init_state(dtype=torch.float64)
    x = torch.randn(4, 5, 3, generator=generator, dtype=torch.float64)
    twin = torch.nn.BatchNorm1d(3, momentum=0.3, dtype=torch.float64)
    for train in (True, False):
        twin.load_state_dict({**params, **state})
        twin.train(train)
        y, new_state = bn(params, state, x, train=train)
        torch.testing.assert_close(y, twin(x.transpose(1, 2)).transpose(1, 2), rtol=0, atol=1e-14)
        for key, value in twin.state_dict().items():
            if key in new_state:
                torch.testing.assert_close(new_state[key], value, rtol=0, atol=1e-15)
        rf.check_vjp(bn, params, state, x, train=train)
    one = bn(params, state, x[0, 0], train=False)[0]  # a single example, evaluating
    torch.testing.assert_close(one, bn(params, state, x[:1, 0], train=False)[0][0])
    with pytest.raises(ValueError, match=r"needs more than one row, got a batch of 1 \(1, 1, 3\);"):
        bn(params, state, x[:1, :1], train=True)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\), features last, got \(4, 3, 5\)"):
        bn(params, state, x.transpose(1, 2), train=True)


def test_a_shard_gives_dropout_its_rows_of_the_global_batchs_mask(generator):
    from rdl_functional.distributed import BatchShard

    drop = rf.dropout(0.4)
    x = torch.randn(10, 3, 4, generator=generator)
    whole, _ = drop({}, {}, x, train=True, generator=torch.Generator().manual_seed(7))
    for a, b in ((0, 6), (6, 10), (3, 3)):
        part, _ = drop({}, {}, x[a:b], train=True, generator=BatchShard(torch.Generator().manual_seed(7), a, b, 10))
        assert torch.equal(part, whole[a:b])
    with pytest.raises(ValueError, match=r"dropout\(0\.4\)\.apply: the shard is rows 0\.\.6 of 10, 6 rows, but x has "
                                         r"shape \(5, 3, 4\)"):
        drop({}, {}, x[:5], train=True, generator=BatchShard(torch.Generator(), 0, 6, 10))


def test_batch_norm_given_a_shard_outside_data_parallel_training_takes_only_the_whole_batch(generator):
    from rdl_functional.distributed import BatchShard

    bn = rf.batch_norm(3)
    params, state = bn.init(0), bn.init_state()
    x = torch.randn(8, 3, generator=generator)
    expected = bn(params, state, x, train=True)
    got = bn(params, state, x, train=True, generator=BatchShard(torch.Generator(), 0, 8, 8))
    assert torch.equal(got[0], expected[0]) and all(torch.equal(got[1][k], expected[1][k]) for k in expected[1])
    with pytest.raises(ValueError, match=r"the shard is rows 0\.\.4 of 8, but there is no process group "
                                         r"\(torch\.distributed\) to sum the other rows' statistics over"):
        bn(params, state, x[:4], train=True, generator=BatchShard(torch.Generator(), 0, 4, 8))
    bn(params, state, x[:4], train=False, generator=BatchShard(torch.Generator(), 0, 4, 8))  # evaluating needs no sums


def test_a_shard_says_what_is_wrong_with_it():
    from rdl_functional.distributed import BatchShard

    with pytest.raises(TypeError, match=r"BatchShard: generator must be a torch\.Generator, got int"):
        BatchShard(0, 0, 1, 1)
    with pytest.raises(TypeError, match=r"BatchShard: stop must be an int, got 1\.0"):
        BatchShard(torch.Generator(), 0, 1.0, 1)
    with pytest.raises(ValueError, match=r"expected 0 ≤ start ≤ stop ≤ rows and rows ≥ 1, got start=2, stop=1"):
        BatchShard(torch.Generator(), 2, 1, 4)


def _batch_norm_against_torch(x, *, train, backward=True):
    """(ours, torch.nn's): the output, the new state and (``backward``) the gradients of ``Σ y ⊙ dy``; ours on
    ``(N, [L,] C)``, BatchNorm1d (cumulative momentum) on the transpose ``(N, C, [L])``, transposed back."""
    layer, module = rf.batch_norm(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None).train(train)
    params = {"weight": torch.tensor([0.5, 2.0, -1.0]), "bias": torch.tensor([0.1, 0.2, 0.3])}
    module.load_state_dict(rf.to_state_dict(params, layer.init_state()), strict=True)
    flip = (lambda t: t.transpose(1, 2)) if x.dim() == 3 else (lambda t: t)
    y, state, pullback = layer.vjp(params, layer.init_state(), x, train=train)
    leaf = flip(x).clone().requires_grad_()
    expected = module(leaf)
    ours, theirs = [y, state], [flip(expected.detach()), module.state_dict()]
    if backward:
        dy = torch.ones_like(x)
        grads, dx = pullback(dy)
        expected.backward(flip(dy))
        ours += [grads["weight"], grads["bias"], dx]
        theirs += [module.weight.grad, module.bias.grad, flip(leaf.grad)]
    return ours, theirs


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(0, 3), (4, 0, 3)])
def test_batch_norm_on_an_empty_batch_returns_an_empty_output_as_batchnorm1d(train, shape):
    """Training, an empty batch raised aten's 'input tensor must have at least one element'. As torch.nn: an
    empty output, the running statistics unchanged (the count moves on in training), zero param gradients.
    (Evaluating, the pullback used to kill the interpreter: the next test runs it in a child process.)"""
    ours, theirs = _batch_norm_against_torch(torch.zeros(shape), train=train, backward=train)
    assert ours[0].shape == theirs[0].shape == shape
    assert torch.equal(ours[0], theirs[0])
    for key, value in ours[1].items():
        assert torch.equal(value, theirs[1][key]), key
    assert int(ours[1]["num_batches_tracked"]) == int(train)
    for got, want in zip(ours[2:], theirs[2:], strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
    if train:
        assert torch.equal(ours[2], torch.zeros(3)) and torch.equal(ours[3], torch.zeros(3))


def test_batch_norm_pullback_on_an_empty_batch_does_not_kill_the_interpreter():
    """Evaluating, the pullback on an empty batch ran aten's backward kernel, which divides by the batch's size:
    SIGFPE, the whole interpreter gone. Run in a child process, so that a regression fails this test only."""
    code = ("import torch, rdl_functional as rf\n"
            "bn = rf.batch_norm(3)\n"
            "for train in (False, True):\n"
            "    y, state, pullback = bn.vjp(bn.init(0), bn.init_state(), torch.zeros(0, 3), train=train)\n"
            "    grads, dx = pullback(torch.zeros(0, 3))\n"
            "    assert dx.shape == (0, 3) and torch.equal(grads['weight'], torch.zeros(3))\n"
            "    assert pullback(torch.zeros(0, 3), need_dx=False)[1] is None\n"
            "print('survived')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "survived"


@pytest.mark.parametrize(
    ("call", "got"),
    [
        (lambda model, p: model.apply(p, torch.zeros(4, 2)), r"\(dict, Tensor\)"),
        (lambda model, p: model.apply(p, model.init_state(), torch.zeros(4, 2)), r"\(dict, dict, Tensor\)"),
        (lambda model, p: model(p, torch.zeros(4, 2), train=False), r"\(dict, Tensor, train=False\)"),
    ],
    ids=["apply_without_state_or_train", "apply_without_train", "call_without_state"],
)
def test_a_stateful_model_called_as_a_plain_one_says_how_it_is_called(call, got):
    """stateful_model.apply(params, x) raised Python's "apply() missing 1 required positional argument: 'x'"."""
    model = rf.compose(rf.linear(2, 3), rf.dropout(0.1))
    message = (r"^compose\(linear\(2, 3\), dropout\(0.1\)\) carries state or randomness: call it as layer\(params, "
               r"state, x, train=True or False, generator=\.\.\.\) -> \(y, new_state\) \(or layer.apply\(\.\.\.\)\), "
               rf"with state = layer.init_state\(\) to start from; got {got}$")
    with pytest.raises(TypeError, match=message):
        call(model, model.init(0))


def test_fit_trains_batch_norm_without_running_statistics():
    """Regression: fit's check of the task before the first step evaluated the model on one row, which batch norm
    without running statistics (normalizing over the rows it is given, evaluating too) refuses, as torch does."""
    model = rf.compose(rf.linear(4, 8), rf.batch_norm(8, track_running_stats=False), rf.relu, rf.linear(8, 3))
    x, labels = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3
    _, history = rf.fit(model, rf.cross_entropy_loss, model.init(0), x, labels, epochs=2, batch_size=8,
                        optimizer=rf.adam(1e-2), generator=0)
    assert history.task == "classification" and len(history.train_accuracy) == 2
    assert history.model_state == {"0": {}, "1": {}, "2": {}, "3": {}}  # no running statistics anywhere
