"""Devices: params drawn on the CPU and moved, layers that say when devices differ, and steps without host syncs.

The meta device has shapes but no data, so any read of a value (``.item()``,
``bool(tensor)``, a data-dependent branch) fails there: a whole training step
that runs on it makes no host sync. On a GPU the same step runs under
``torch.cuda.set_sync_debug_mode("error")`` (skipped without one).
"""

from __future__ import annotations

import pytest
import torch
from test_layers import LAYERS, STATEFUL
from test_losses import LOSSES

import rdl_functional as rf

OPTIMIZERS = [
    rf.sgd(0.1), rf.sgd(rf.linear_schedule(0.1, 0.0, 10), momentum=0.9, nesterov=True), rf.adam(1e-3),
    rf.adamw(1e-3, amsgrad=True), rf.rmsprop(1e-2, centered=True, momentum=0.5), rf.adagrad(0.1),
    rf.chain(rf.clip_by_global_norm(1.0), rf.adam(1e-3)), rf.chain(rf.add_decayed_weights(1e-4), rf.sgd(0.1)),
]


def _like(y, device):
    return torch.ones(y.shape, device=device) if isinstance(y, torch.Tensor) else tuple(
        torch.ones(t.shape, device=device) for t in y)


@pytest.mark.parametrize(("name", "layer", "in_features", "reference"), LAYERS, ids=[c[0] for c in LAYERS])
def test_every_layer_steps_on_the_meta_device(name, layer, in_features, reference):
    params = layer.init(0, device="meta")
    assert all(leaf.device.type == "meta" for leaf in rf.tree_leaves(params))
    y, pullback = layer.vjp(params, torch.empty(4, in_features, device="meta"))
    dparams, dx = pullback(_like(y, "meta"))
    assert dx.device.type == "meta" and rf.tree_difference(dparams, params, leaves=True) is None


@pytest.mark.parametrize(("name", "layer", "in_features", "twin"),
                         [c for c in STATEFUL if "cumulative" not in c[0]],  # momentum=None reads the count
                         ids=[c[0] for c in STATEFUL if "cumulative" not in c[0]])
@pytest.mark.parametrize("train", [True, False])
def test_every_stateful_layer_steps_on_the_meta_device(name, layer, in_features, twin, train):
    params, state = layer.init(0, device="meta"), layer.init_state(device="meta")
    # A CPU generator: dropout draws its mask on the CPU, the same bits on every device, and moves it.
    y, new_state, pullback = layer.vjp(params, state, torch.empty(4, in_features, device="meta"), train=train,
                                       generator=torch.Generator())
    assert all(leaf.device.type == "meta" for leaf in rf.tree_leaves(new_state))
    pullback(_like(y, "meta"))


@pytest.mark.parametrize(("name", "loss", "scale", "make_target", "reference"), LOSSES, ids=[c[0] for c in LOSSES])
def test_every_loss_steps_on_the_meta_device(name, loss, scale, make_target, reference):
    target = make_target(torch.zeros(4, 3), torch.Generator().manual_seed(0)).to("meta")
    _, pullback = loss.vjp(torch.empty(4, 3, device="meta"), target)
    assert pullback(torch.ones((), device="meta")).shape == (4, 3)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
def test_every_optimizer_steps_on_the_meta_device(optimizer):
    model = rf.seed_model()
    params = model.init(0, device="meta")
    state = optimizer.init(params)
    _, grads = rf.value_and_grad(model, rf.mse_loss)(params, torch.empty(8, 2, device="meta"),
                                                      torch.empty(8, 2, device="meta"))
    new_params, state = optimizer.step(params, grads, state)
    updates, _ = optimizer.update(grads, state, params)
    assert all(leaf.device.type == "meta" for leaf in rf.tree_leaves(rf.apply_updates(new_params, updates)))


def test_params_are_drawn_on_the_cpu_and_moved():
    model = rf.compose(rf.linear(2, 3), rf.batch_norm(3), rf.residual(rf.linear(3, 3)))
    on_cpu, moved = model.init(7), model.init(7, device="meta")
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(on_cpu), rf.tree_leaves(model.init(7, device="cpu")),
                                                 strict=True))
    assert [t.shape for t in rf.tree_leaves(moved)] == [t.shape for t in rf.tree_leaves(on_cpu)]
    assert all(t.device.type == "meta" for t in rf.tree_leaves(moved))
    assert all(t.device.type == "meta" for t in rf.tree_leaves(model.init_state(device="meta")))


def test_a_layer_says_when_params_and_input_are_on_different_devices():
    layer = rf.linear(2, 3)
    with pytest.raises(ValueError, match=r"linear\(2, 3\)\.apply: x is on meta but params\['weight'\] is on cpu "
                                         r"\(move them to one device"):
        layer(layer.init(0), torch.empty(4, 2, device="meta"))
    with pytest.raises(ValueError, match=r"layer 0: linear\(2, 3\)\.vjp: x is on cpu but params\['weight'\] is on "
                                         r"meta"):
        model = rf.compose(layer, rf.relu)
        rf.value_and_grad(model, rf.mse_loss)(model.init(0, device="meta"), torch.zeros(4, 2), torch.zeros(4, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_says_so():
    with pytest.raises(ValueError, match=r"CUDA was asked for \(device='cuda'\) but torch sees no CUDA device"):
        rf.seed_model().init(0, device="cuda")
    with pytest.raises(ValueError, match=r"device must be a torch.device or a name such as 'cpu' or 'cuda', got "
                                         r"'gpu'"):
        rf.seed_model().init(0, device="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_training_step_makes_no_host_sync():
    model = rf.seed_model()
    x, labels = rf.disc_dataset(200, 0)
    x, target = x.cuda(), rf.one_hot(labels, 2).cuda()
    for optimizer in OPTIMIZERS:
        params = model.init(0, device="cuda")
        state = optimizer.init(params)
        step = rf.value_and_grad(model, rf.mse_loss)
        step(params, x[:50], target[:50])  # warm: the first call may load kernels
        torch.cuda.set_sync_debug_mode("error")
        try:
            _, grads = step(params, x[:50], target[:50])
            params, state = optimizer.step(params, grads, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")


VMAP_LOSSES = [
    (rf.mse_loss, "one_hot"), (rf.cross_entropy_loss, "labels"), (rf.huber_loss(), "one_hot"),
    (rf.l1_loss("sum"), "one_hot"), (rf.bce_with_logits_loss(), "one_hot"), (rf.nll_loss(), "labels"),
]


@pytest.mark.parametrize(("loss", "kind"), VMAP_LOSSES, ids=[loss.name for loss, _ in VMAP_LOSSES])
def test_vmap_of_value_and_grad_gives_per_example_gradients_equal_to_a_loop(loss, kind):
    model = rf.compose(rf.linear(2, 8), rf.tanh, rf.linear(8, 2), *([rf.log_softmax] if loss.name.startswith("nll")
                                                                   else []))
    params = model.init(0, dtype=torch.float64)
    x, labels = rf.disc_dataset(6, 0)
    x = x.double()
    target = labels if kind == "labels" else rf.one_hot(labels, 2, dtype=torch.float64)
    value_and_grad = rf.value_and_grad(model, loss)
    values, grads = torch.func.vmap(value_and_grad, in_dims=(None, 0, 0))(params, x, target)
    for i in range(6):  # each example alone, as a batch of one
        value, alone = value_and_grad(params, x[i:i + 1], target[i:i + 1])
        torch.testing.assert_close(values[i], value, rtol=1e-12, atol=1e-12)
        for stacked, one in zip(rf.tree_leaves(grads), rf.tree_leaves(alone), strict=True):
            torch.testing.assert_close(stacked[i], one, rtol=1e-10, atol=1e-12)


def test_layers_and_losses_take_leading_dimensions(generator):
    for layer in (rf.linear(3, 2), rf.compose(rf.linear(3, 4), rf.relu, rf.linear(4, 2)), rf.softmax, rf.gelu()):
        params = layer.init(0, dtype=torch.float64)
        rf.check_vjp(layer, params, torch.randn(2, 5, 3, generator=generator, dtype=torch.float64))
    logits = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 5), generator=generator)
    rf.check_vjp(rf.cross_entropy_loss, logits, labels)
    rf.check_vjp(rf.nll_loss(), torch.log_softmax(logits, -1), labels)
    torch.testing.assert_close(rf.nll_loss()(torch.log_softmax(logits, -1), labels),
                               torch.nn.functional.nll_loss(torch.log_softmax(logits, -1).reshape(-1, 3),
                                                            labels.reshape(-1)))


def test_autocast_bfloat16_runs_the_seed_models_forward_and_step_as_torch_nn_does():
    """Under torch.autocast on the CPU the forward pass runs in bfloat16 (autocast's rules), the loss in float32,
    and each gradient comes back in its param's dtype; the numbers are torch.nn + autograd's, bit for bit."""
    model = rf.seed_model()
    params = model.init(0)
    x, labels = rf.disc_dataset(64, 0)
    target = rf.one_hot(labels, 2)
    net = torch.nn.Sequential(*(m for m in [
        torch.nn.Linear(2, 25), torch.nn.ReLU(), torch.nn.Linear(25, 25), torch.nn.ReLU(),
        torch.nn.Linear(25, 25), torch.nn.ReLU(), torch.nn.Linear(25, 2), torch.nn.Tanh()]))
    net.load_state_dict(rf.to_state_dict(params), strict=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(params, x)
        value, grads = rf.value_and_grad(model, rf.mse_loss)(params, x, target)
        expected = torch.nn.functional.mse_loss(net(x), target)
    expected.backward()
    assert y.dtype == torch.bfloat16 and value.dtype == torch.float32
    assert torch.equal(value, expected.detach())
    ours = rf.to_state_dict(grads)
    for name, param in net.named_parameters():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], param.grad), name
    stepped = rf.sgd_step(params, grads, 0.1)
    assert all(leaf.dtype == torch.float32 for leaf in rf.tree_leaves(stepped))


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_under_cpu_autocast_follows_batchnorm1d(train, generator):
    """Under torch.autocast (bfloat16 on the CPU) batch norm refused 'x is torch.bfloat16 but weight is
    torch.float32'. As BatchNorm1d: the output in x's dtype, the statistics and param gradients in float32,
    torch's kernels both ways, so the very bits."""
    x = torch.randn(6, 3, generator=generator).to(torch.bfloat16)
    dy = torch.randn(6, 3, generator=generator).to(torch.bfloat16)
    layer, module = rf.batch_norm(3), torch.nn.BatchNorm1d(3).train(train)
    params = {"weight": torch.tensor([0.5, 2.0, -1.0]), "bias": torch.tensor([0.1, 0.2, 0.3])}
    state = {"running_mean": torch.tensor([0.1, -0.2, 0.3]), "running_var": torch.tensor([1.5, 0.5, 2.0]),
             "num_batches_tracked": torch.tensor(3)}
    module.load_state_dict(rf.to_state_dict(params, state), strict=True)
    leaf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, new_state = layer(params, state, x, train=train)
        y_vjp, _, pullback = layer.vjp(params, state, x, train=train)
        expected = module(leaf)
    expected.backward(dy)
    grads, dx = pullback(dy)
    assert y.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(y, expected.detach()) and torch.equal(y_vjp, y)
    for key, value in new_state.items():
        assert torch.equal(value, module.state_dict()[key]), key
    assert grads["weight"].dtype == torch.float32 and dx.dtype == torch.bfloat16
    assert torch.equal(grads["weight"], module.weight.grad) and torch.equal(grads["bias"], module.bias.grad)
    assert torch.equal(dx, leaf.grad)


def test_batch_norm_in_a_model_trains_under_cpu_autocast(generator):
    """A linear's bfloat16 output into batch norm's float32 params: the stateful step runs, float32 gradients."""
    model = rf.compose(rf.linear(2, 4), rf.batch_norm(4), rf.relu, rf.linear(4, 2))
    params, state = model.init(0), model.init_state()
    x, target = torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, grads, new_state = rf.value_and_grad(model, rf.mse_loss)(params, state, x, target)
    assert all(leaf.dtype == torch.float32 for leaf in rf.tree_leaves(grads))
    assert new_state["1"]["running_mean"].dtype == torch.float32 and torch.isfinite(value)
    norm = rf.batch_norm(4)
    with pytest.raises(TypeError, match=r"batch_norm\(4\)\.apply: x is torch.bfloat16 but weight is torch.float32"):
        norm(norm.init(0), norm.init_state(), x.new_ones(2, 4, dtype=torch.bfloat16), train=False)  # outside autocast
