"""The image layers of issue 18: every one through rf.check_vjp, against its torch.nn twin bit for bit, a small CNN
trained with train_step equal to torch.nn + torch.optim, and each bad input refused by name."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import rdl_functional as rf

# name, layer, input shape (N, C, *spatial), the torch.nn twin. Adding a layer is one line.
LAYERS = [
    ("conv2d", rf.conv2d(3, 4, 3), (2, 3, 7, 6), lambda: nn.Conv2d(3, 4, 3)),
    ("conv2d_strided_padded", rf.conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2)), (2, 3, 7, 6),
     lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2))),
    ("conv2d_dilated", rf.conv2d(2, 3, 3, dilation=(2, 1), padding=1), (2, 2, 8, 5),
     lambda: nn.Conv2d(2, 3, 3, dilation=(2, 1), padding=1)),
    ("conv2d_grouped", rf.conv2d(4, 6, 3, groups=2, bias=False), (2, 4, 5, 5),
     lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False)),
    ("conv2d_same", rf.conv2d(3, 4, 3, padding="same"), (2, 3, 5, 6), lambda: nn.Conv2d(3, 4, 3, padding="same")),
    ("conv2d_same_even_kernel", rf.conv2d(3, 4, (4, 2), padding="same", dilation=(1, 3)), (2, 3, 5, 6),
     lambda: nn.Conv2d(3, 4, (4, 2), padding="same", dilation=(1, 3))),
    ("conv2d_valid", rf.conv2d(3, 2, 2, padding="valid"), (1, 3, 4, 4), lambda: nn.Conv2d(3, 2, 2, padding="valid")),
    ("conv1d", rf.conv1d(3, 4, 3), (2, 3, 9), lambda: nn.Conv1d(3, 4, 3)),
    ("conv1d_strided_grouped", rf.conv1d(4, 2, 3, stride=2, padding=1, dilation=2, groups=2), (2, 4, 11),
     lambda: nn.Conv1d(4, 2, 3, stride=2, padding=1, dilation=2, groups=2)),
    ("conv1d_same_even", rf.conv1d(2, 3, 4, padding="same"), (3, 2, 7), lambda: nn.Conv1d(2, 3, 4, padding="same")),
    ("max_pool2d", rf.max_pool2d(2), (2, 3, 6, 7), lambda: nn.MaxPool2d(2)),
    ("max_pool2d_padded", rf.max_pool2d(3, stride=2, padding=1), (2, 3, 7, 6),
     lambda: nn.MaxPool2d(3, stride=2, padding=1)),
    ("max_pool2d_dilated_ceil", rf.max_pool2d((3, 2), stride=1, padding=(1, 0), dilation=(1, 2), ceil_mode=True),
     (2, 2, 5, 6), lambda: nn.MaxPool2d((3, 2), stride=1, padding=(1, 0), dilation=(1, 2), ceil_mode=True)),
    ("avg_pool2d", rf.avg_pool2d(2), (2, 3, 6, 7), lambda: nn.AvgPool2d(2)),
    ("avg_pool2d_padded", rf.avg_pool2d(3, stride=2, padding=1), (2, 3, 7, 6),
     lambda: nn.AvgPool2d(3, stride=2, padding=1)),
    ("avg_pool2d_ceil_exclude_pad", rf.avg_pool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (2, 2, 6, 5),
     lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)),
    ("global_avg_pool2d", rf.global_avg_pool2d, (2, 3, 5, 4), lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                                                                     nn.Flatten())),
    ("group_norm", rf.group_norm(2, 4), (3, 4, 5, 5), lambda: nn.GroupNorm(2, 4)),
    ("group_norm_1d_plain", rf.group_norm(1, 4, eps=1e-3, affine=False), (3, 4, 6),
     lambda: nn.GroupNorm(1, 4, eps=1e-3, affine=False)),
    ("group_norm_features", rf.group_norm(2, 6), (4, 6), lambda: nn.GroupNorm(2, 6)),
    ("cnn", rf.compose(rf.conv2d(2, 4, 3, padding=1), rf.group_norm(2, 4), rf.relu, rf.max_pool2d(2), rf.flatten(),
                       rf.linear(16, 3)), (2, 2, 4, 4),
     lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Flatten(), nn.Linear(16, 3))),
]
IDS = [case[0] for case in LAYERS]

STATEFUL = [
    ("batch_norm2d", rf.batch_norm2d(3), (4, 3, 5, 4), lambda: nn.BatchNorm2d(3)),
    ("batch_norm2d_cumulative", rf.batch_norm2d(3, momentum=None), (2, 3, 3, 3), lambda: nn.BatchNorm2d(3,
                                                                                                        momentum=None)),
    ("batch_norm2d_plain", rf.batch_norm2d(2, eps=1e-3, affine=False), (3, 2, 4, 4),
     lambda: nn.BatchNorm2d(2, eps=1e-3, affine=False)),
]
STATEFUL_IDS = [case[0] for case in STATEFUL]


def _params(layer, generator, dtype):
    """Params away from their init (a norm's ones and zeros would hide a swapped weight and bias)."""
    return rf.tree_map(lambda t: t + 0.5 * torch.randn(t.shape, generator=generator, dtype=dtype),
                       layer.init(generator, dtype=dtype))


def _state(layer, params, shape, generator, dtype):
    """A state that has trained a little, so evaluating is no identity."""
    state = layer.init_state(dtype=dtype)
    for _ in range(2):
        _, state = layer(params, state, 2 * torch.randn(shape, generator=generator, dtype=dtype) + 1, train=True)
    return state


def _twin(make, params, state=None, train=True):
    module = make().train(train)
    module.load_state_dict(rf.to_state_dict(params, state), strict=True)
    return module


@pytest.mark.parametrize(("name", "layer", "shape", "twin"), LAYERS, ids=IDS)
def test_vjp_matches_torch_func_in_float64(name, layer, shape, twin, generator):
    params = _params(layer, generator, torch.float64)
    rf.check_vjp(layer, params, torch.randn(shape, generator=generator, dtype=torch.float64), generator=generator)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "layer", "shape", "twin"), STATEFUL, ids=STATEFUL_IDS)
def test_stateful_vjp_matches_torch_func_in_float64(name, layer, shape, twin, train, generator):
    params = _params(layer, generator, torch.float64)
    state = _state(layer, params, shape, generator, torch.float64)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    rf.check_vjp(layer, params, state, x, train=train, generator=generator)


def _assert_equal_trees(ours, theirs):
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def _torch_vjp(module, params, buffers, x, dy_from):
    """The module's output, ``dy = dy_from(y)``, and its backward by autograd (``loss.backward()``'s kernels):
    ``(y, dparams, dx)``. Not torch.func.vjp: it builds a differentiable backward, for which GroupNorm takes
    the composite, double-differentiable formula instead of ``native_group_norm_backward``."""
    params = {key: value.clone().requires_grad_() for key, value in rf.to_state_dict(params).items()}
    x = x.clone().requires_grad_()
    y = torch.func.functional_call(module, (params, buffers), (x,))
    dy = dy_from(y)
    *dparams, dx = torch.autograd.grad(y, [*params.values(), x], dy)
    return y.detach(), dy, dict(zip(params, dparams, strict=True)), dx


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's twin's, not ours
@pytest.mark.parametrize(("name", "layer", "shape", "twin"), LAYERS, ids=IDS)
def test_forward_and_cotangents_equal_the_torch_module_bit_for_bit(name, layer, shape, twin, generator):
    params = _params(layer, generator, torch.float32)
    x = torch.randn(shape, generator=generator)
    y_ref, dy, dparams_ref, dx_ref = _torch_vjp(_twin(twin, params), params, {}, x,
                                                lambda y: torch.randn(y.shape, generator=generator))
    y, pullback = layer.vjp(params, x)
    dparams, dx = pullback(dy)
    assert torch.equal(y, y_ref) and torch.equal(layer(params, x), y)
    assert torch.equal(dx, dx_ref)
    _assert_equal_trees(rf.to_state_dict(dparams), dparams_ref)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "layer", "shape", "twin"), STATEFUL, ids=STATEFUL_IDS)
def test_batch_norm2d_equals_the_torch_module_bit_for_bit(name, layer, shape, twin, train, generator):
    params = _params(layer, generator, torch.float32)
    state = _state(layer, params, shape, generator, torch.float32)
    buffers = {key: value.clone() for key, value in state.items()}  # the module updates them in place
    x = torch.randn(shape, generator=generator)
    y_ref, dy, dparams_ref, dx_ref = _torch_vjp(_twin(twin, params, state, train), params, buffers, x,
                                                lambda y: torch.randn(y.shape, generator=generator))
    y, new_state, pullback = layer.vjp(params, state, x, train=train)
    dparams, dx = pullback(dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    _assert_equal_trees(dparams, dparams_ref)
    _assert_equal_trees(new_state, buffers)


def _storages(tree):
    return {leaf.untyped_storage().data_ptr() for leaf in rf.tree_leaves(tree)}


@pytest.mark.parametrize(("name", "layer", "shape", "twin"), LAYERS + STATEFUL, ids=IDS + STATEFUL_IDS)
def test_apply_vjp_and_pullback_change_nothing_and_return_new_tensors(name, layer, shape, twin, generator):
    params, x = _params(layer, generator, torch.float32), torch.randn(shape, generator=generator)
    state = layer.init_state() if isinstance(layer, rf.StatefulLayer) else None
    given = {"params": params, "state": state or {}, "x": x}
    before = rf.tree_map(torch.clone, given)  # cloned before apply and vjp run: they must change nothing either
    call = (lambda f: f(params, state, x, train=True)) if state is not None else (lambda f: f(params, x))
    y, *new_state = (*call(layer.apply),) if state is not None else (call(layer.apply),)
    *_, pullback = call(layer.vjp)
    dy = torch.randn(y.shape, generator=generator)
    given["dy"], before["dy"] = dy, dy.clone()
    dparams, dx = pullback(dy)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(given), rf.tree_leaves(before), strict=True))
    assert not _storages({"y": y, "new_state": new_state[0] if new_state else {}, "dparams": dparams, "dx": dx}) & \
        _storages(given)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 4), groups=st.sampled_from([1, 2]),
       size=st.integers(3, 7), kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1),
       dilation=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_conv2d_vjp_for_any_shape(batch, channels, groups, size, kernel, stride, padding, dilation, seed):
    assume(size + 2 * padding >= dilation * (kernel - 1) + 1)  # a kernel wider than the padded input is refused
    generator = torch.Generator().manual_seed(seed)
    layer = rf.conv2d(channels * groups, 2 * groups, kernel, stride, padding, dilation, groups)
    x = torch.randn(batch, channels * groups, size, size + 1, generator=generator, dtype=torch.float64)
    rf.check_vjp(layer, layer.init(generator, dtype=torch.float64), x, generator=generator)


@pytest.mark.parametrize(("layer", "twin"), [
    (lambda: rf.conv2d(3, 8, 3), lambda: nn.Conv2d(3, 8, 3)),
    (lambda: rf.conv2d(4, 6, (3, 2), groups=2, bias=False), lambda: nn.Conv2d(4, 6, (3, 2), groups=2, bias=False)),
    (lambda: rf.conv1d(5, 2, 4), lambda: nn.Conv1d(5, 2, 4)),
], ids=["conv2d", "conv2d_grouped_no_bias", "conv1d"])
def test_conv_init_draws_what_torch_nn_conv_draws(layer, twin):
    with torch.random.fork_rng():
        torch.manual_seed(7)
        reference = twin()
    _assert_equal_trees(layer().init(7), {key: value.detach() for key, value in reference.state_dict().items()})


def _cnn(norm: str):
    ours = rf.compose(rf.conv2d(1, 4, 3, padding=1), rf.batch_norm2d(4) if norm == "batch_norm2d" else
                      rf.group_norm(2, 4), rf.relu, rf.max_pool2d(2), rf.flatten(), rf.linear(4 * 4 * 4, 3))
    theirs = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4) if norm == "batch_norm2d" else
                           nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))
    return ours, theirs


OPTIMIZERS = {  # ours, and torch.optim's twin (foreach, as rf's optimizers match)
    "sgd_momentum": (lambda: rf.sgd(0.1, momentum=0.9),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True)),
    "adam": (lambda: rf.adam(1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True)),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("norm", ["batch_norm2d", "group_norm"])
def test_twenty_steps_of_a_cnn_equal_torch_nn_and_torch_optim_bit_for_bit_and_replay(norm, optimizer):
    ours, theirs = OPTIMIZERS[optimizer]
    model, reference = _cnn(norm)
    state = rf.train_state(model, ours(), model.init(0))
    reference.load_state_dict(rf.to_state_dict(state.params, state.model_state or None), strict=True)
    torch_optimizer = theirs(reference.train().parameters())
    step = rf.train_step(model, rf.mse_loss, ours())
    g = torch.Generator().manual_seed(0)
    for i in range(20):
        x, target = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 3, generator=g)
        state, metrics = step(state, x, target)
        assert step._flat.replayed == (i > 0), "the first step traces the CNN's pullbacks, the others replay them"
        torch_optimizer.zero_grad()
        loss = nn.functional.mse_loss(reference(x), target)
        loss.backward()
        torch_optimizer.step()
        assert torch.equal(metrics["loss"], loss.detach()), i
    _assert_equal_trees(rf.to_state_dict(state.params, state.model_state or None), reference.state_dict())


# ---------------------------------------------------------------------------
# Refusals: each bad argument and input by name.

REFUSED_AT_CONSTRUCTION = [
    (lambda: rf.conv2d(3, 8, 0), ValueError, r"conv2d: kernel_size must be an int or a tuple of 2 ints ≥ 1, got 0"),
    (lambda: rf.conv2d(3, 8, (3, 3, 3)), ValueError, r"kernel_size must be an int or a tuple of 2 ints"),
    (lambda: rf.conv1d(3, 8, 3, stride=0), ValueError, r"conv1d: stride must be an int ≥ 1, got 0"),
    (lambda: rf.conv2d(3, 8, 3, padding=-1), ValueError, r"padding must be an int or a tuple of 2 ints ≥ 0"),
    (lambda: rf.conv2d(3, 8, 3, padding="full"), ValueError, r"padding must be an int, a tuple, 'valid' or 'same'"),
    (lambda: rf.conv2d(3, 8, 3, stride=2, padding="same"), ValueError,
     r"padding='same' is not supported for strided convolutions"),
    (lambda: rf.conv2d(3, 8, 3, groups=2), ValueError, r"groups=2 must divide in_channels=3 and out_channels=8"),
    (lambda: rf.conv2d(0, 8, 3), ValueError, r"conv2d: in_channels must be a positive int, got 0"),
    (lambda: rf.conv2d(3, 8, 3, bias=1), TypeError, r"conv2d: bias must be True or False, got 1"),
    (lambda: rf.conv2d(3, 8, 3, init="nope"), ValueError, r"conv2d: init must be one of"),
    (lambda: rf.max_pool2d(2, padding=2), ValueError, r"max_pool2d: padding must be at most half the kernel size"),
    (lambda: rf.max_pool2d(2, ceil_mode=1), TypeError, r"max_pool2d: ceil_mode must be True or False"),
    (lambda: rf.avg_pool2d(2, divisor_override=0), ValueError, r"avg_pool2d: divisor_override must be a positive"),
    (lambda: rf.group_norm(3, 4), ValueError, r"group_norm: num_groups=3 must divide num_channels=4"),
    (lambda: rf.group_norm(2, 4, eps=0), ValueError, r"group_norm: eps must be a finite number > 0"),
    (lambda: rf.batch_norm2d(4, momentum=2), ValueError, r"batch_norm2d: momentum must be in \[0, 1\] or None"),
    (lambda: rf.batch_norm2d(0), ValueError, r"batch_norm2d: features must be a positive int"),
]


@pytest.mark.parametrize(("build", "error", "match"), REFUSED_AT_CONSTRUCTION)
def test_bad_arguments_are_refused_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


_INIT = object()  # _call's default: the layer's own params (None is a value a test passes)


def _call(layer, x, params=_INIT):
    params = layer.init(0) if params is _INIT else params
    if isinstance(layer, rf.StatefulLayer):
        return layer(params, layer.init_state(), x, train=True)
    return layer(params, x)


REFUSED_INPUTS = [
    (rf.conv2d(3, 8, 3), torch.zeros(2, 32, 32, 3), ValueError,
     r"conv2d\(3, 8, 3\)\.apply: x has 32 channels at dim 1 but the layer takes 3; it looks channels-last "
     r"\(N, H, W, C\) — this layer takes channels first \(N, C, H, W\): x\.permute\(0, 3, 1, 2\)"),
    (rf.conv1d(3, 8, 3), torch.zeros(2, 10, 3), ValueError,
     r"it looks channels-last \(N, L, C\) — this layer takes channels first \(N, C, L\): x\.permute\(0, 2, 1\)"),
    (rf.batch_norm2d(3), torch.zeros(2, 5, 5, 3), ValueError, r"batch_norm2d\(3\)\.apply: .* it looks channels-last"),
    (rf.group_norm(2, 4), torch.zeros(2, 5, 5, 4), ValueError, r"group_norm\(2, 4\)\.apply: .* it looks channels-last"),
    (rf.conv2d(3, 8, 3), torch.zeros(2, 4, 8, 8), ValueError,
     r"x has 4 channels at dim 1 but the layer takes 3 \(x is \(2, 4, 8, 8\), channels first \(N, C, H, W\)\)"),
    (rf.conv2d(3, 8, 3), torch.zeros(3, 8, 8), ValueError,
     r"reads as one example without its batch dimension; this layer takes a batch \(N, C, H, W\): x\.unsqueeze\(0\)"),
    (rf.conv2d(3, 8, 3), torch.zeros(2, 3, 8), ValueError, r"x must have 4 dimensions \(N, C, H, W\), channels first"),
    (rf.max_pool2d(2), torch.zeros(2, 3), ValueError, r"max_pool2d\(2\)\.apply: x must have 4 dimensions"),
    (rf.global_avg_pool2d, torch.zeros(2, 3, 4), ValueError, r"global_avg_pool2d\.apply: .*x\.unsqueeze\(0\)"),
    (rf.group_norm(2, 4), torch.zeros(4), ValueError, r"x must have at least 2 dimensions \(N, C, \*\)"),
    (rf.conv2d(3, 8, 5), torch.zeros(2, 3, 3, 9), ValueError,
     r"the kernel spans 5 along H \(dilation·\(kernel − 1\) \+ 1\) but the padded input is 3"),
    (rf.conv2d(3, 8, 3, dilation=3, padding=1), torch.zeros(2, 3, 9, 4), ValueError,
     r"the kernel spans 7 along W .* but the padded input is 6 \(W = 4 \+ 2·padding 1\)"),
    (rf.max_pool2d(3), torch.zeros(2, 3, 2, 2), ValueError, r"max_pool2d\(3\)\.apply: the kernel spans 3 along H"),
    (rf.avg_pool2d(4, padding=1), torch.zeros(1, 1, 1, 8), ValueError, r"the kernel spans 4 along H"),
    (rf.max_pool2d((1, 2), stride=2, padding=(0, 1), dilation=2, ceil_mode=True), torch.zeros(1, 2, 3, 1),
     ValueError, r"output 0 along W has a window that covers no input position \(it reads \[-1, 1\], x has 1"),
    (rf.max_pool2d(2, padding=1, dilation=2), torch.zeros(1, 1, 1, 4), ValueError,
     r"output 0 along H has a window that covers no input position"),
    (rf.max_pool2d(3, 2, ceil_mode=True), torch.zeros(1, 1, 1, 2), ValueError, r"the kernel spans 3 along H"),
    (rf.conv2d(3, 8, 3), torch.zeros(2, 3, 8, 8, dtype=torch.float64), TypeError,
     r"x is torch.float64 but weight is torch.float32"),
    (rf.conv2d(3, 8, 3), [[1.0]], TypeError, r"conv2d\(3, 8, 3\)\.apply: x must be a torch.Tensor, got list"),
    (rf.batch_norm2d(3), torch.zeros(1, 3, 1, 1), ValueError, r"more than one value per channel \(N·H·W > 1\)"),
    (rf.max_pool2d(2), torch.zeros(1, 1, 4, 4, dtype=torch.int64), TypeError,
     r"max_pool2d\(2\)\.apply: a floating x is needed, got torch.int64"),
    (rf.avg_pool2d(2), torch.zeros(1, 1, 4, 4, dtype=torch.bool), TypeError,
     r"avg_pool2d\(2\)\.apply: a floating x is needed, got torch.bool"),
    (rf.global_avg_pool2d, torch.zeros(1, 1, 4, 4, dtype=torch.int64), TypeError,
     r"global_avg_pool2d\.apply: a floating x is needed, got torch.int64"),
    (rf.group_norm(2, 4), torch.zeros(1, 4, 2, 2, dtype=torch.int64), TypeError,
     r"group_norm\(2, 4\)\.apply: a floating x is needed, got torch.int64"),
]


@pytest.mark.parametrize(("layer", "x", "error", "match"), REFUSED_INPUTS)
def test_bad_inputs_are_refused_by_name(layer, x, error, match):
    with pytest.raises(error, match=match):
        _call(layer, x)


REFUSED_PARAMS = [
    (rf.conv2d(3, 8, 3), {"weight": torch.zeros(8, 3, 3, 3)}, ValueError,
     r"params must have the keys \['weight', 'bias'\], got \['weight'\]"),
    (rf.conv2d(3, 8, 3, bias=False), {"weight": torch.zeros(8, 3, 3, 3), "bias": torch.zeros(8)}, ValueError,
     r"got \['bias', 'weight'\] \(the layer was built with bias=False\)"),
    (rf.conv2d(3, 8, 3), {"weight": torch.zeros(8, 3, 5, 5), "bias": torch.zeros(8)}, ValueError,
     r"params\['weight'\] has shape \(8, 3, 5, 5\) but the layer was built for \(8, 3, 3, 3\)"),
    (rf.conv2d(3, 8, 3), [1], TypeError, r"params must be a dict with \['weight', 'bias'\], got list"),
    (rf.group_norm(2, 4), {"weight": torch.ones(3), "bias": torch.zeros(4)}, ValueError,
     r"params\['weight'\] has shape \(3,\) but the layer was built for \(4,\)"),
    (rf.max_pool2d(2), {"weight": torch.ones(1)}, ValueError, r"max_pool2d\(2\) has no parameters"),
    (rf.max_pool2d(2), None, TypeError, r"max_pool2d\(2\) has no parameters, so params must be \{\}, got NoneType"),
    (rf.conv2d(3, 8, 3), {"weight": torch.zeros(8, 3, 3, 3, dtype=torch.int64), "bias": torch.zeros(8)}, TypeError,
     r"params\['weight'\] is torch.int64, but params must be floating tensors"),
    # The params disagree among themselves: the message names them, and does not tell the user to convert x.
    (rf.conv2d(3, 8, 3), {"weight": torch.zeros(8, 3, 3, 3), "bias": torch.zeros(8, dtype=torch.float64)}, TypeError,
     r"conv2d\(3, 8, 3\)\.apply: params\['bias'\] is torch.float64 but params\['weight'\] is torch.float32 \(a "
     r"layer's params share one dtype"),
    (rf.group_norm(2, 4), [1], TypeError,
     r"group_norm\(2, 4\)\.apply: params must be a dict with \['weight', 'bias'\], got list"),
]


@pytest.mark.parametrize(("layer", "params", "error", "match"), REFUSED_PARAMS)
def test_params_of_another_layer_are_refused_by_name(layer, params, error, match):
    with pytest.raises(error, match=match):
        _call(layer, torch.zeros(2, 3 if "conv" in layer.name else 4, 6, 6), params)


def test_batch_norm2d_on_a_shard_takes_the_synced_statistics_path_as_batch_norm_does(monkeypatch, generator):
    """Data-parallel (here one process standing in for all, the sums over processes its own): batch_norm2d's
    synced path is batch_norm's on the channels-last rows, moved back, and its gradients agree with the kernel's."""
    from rdl_functional._random import BatchShard

    stateful_module = importlib.import_module("rdl_functional.stateful")  # rf.stateful is the function
    x = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    dy = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    norm2d, norm = rf.batch_norm2d(3), rf.batch_norm(3)
    params = _params(norm2d, generator, torch.float64)
    state = norm2d.init_state(dtype=torch.float64)
    alone = norm2d.vjp(params, state, x, train=True)
    monkeypatch.setattr(stateful_module, "is_data_parallel", lambda: True)
    shard = BatchShard(torch.Generator(), 0, 4, 4)
    y, new_state, pullback = norm2d.vjp(params, state, x, train=True, generator=shard)
    y_rows, rows_state, rows_pullback = norm.vjp(params, state, x.permute(0, 2, 3, 1), train=True, generator=shard)
    assert torch.equal(y, y_rows.permute(0, 3, 1, 2))
    _assert_equal_trees(new_state, rows_state)
    (dparams, dx), (rows_dparams, rows_dx) = pullback(dy), rows_pullback(dy.permute(0, 2, 3, 1))
    assert torch.equal(dx, rows_dx.permute(0, 3, 1, 2))
    _assert_equal_trees(dparams, rows_dparams)
    torch.testing.assert_close((y, new_state, pullback(dy)), (alone[0], alone[1], alone[2](dy)), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("pool", [rf.max_pool2d(3, 2, ceil_mode=True), rf.avg_pool2d(3, 2, ceil_mode=True)],
                         ids=["max", "avg"])
def test_a_ceil_mode_pool_larger_than_its_input_gives_torchs_one_output(pool, generator):
    twin = (torch.nn.MaxPool2d if "max" in pool.name else torch.nn.AvgPool2d)(3, 2, ceil_mode=True)
    x = torch.randn(1, 2, 2, 2, generator=generator)
    y_ref, dy, _, dx_ref = _torch_vjp(twin, {}, {}, x, lambda y: torch.randn(y.shape, generator=generator))
    y, pullback = pool.vjp({}, x)
    assert y.shape == (1, 2, 1, 1) and torch.equal(y, y_ref) and torch.equal(pullback(dy)[1], dx_ref)


@pytest.mark.parametrize("make_x", [
    lambda g: torch.randn(3, 4, 5, 6, generator=g).to(memory_format=torch.channels_last),
    lambda g: torch.randn(3, 5, 6, 4, generator=g).permute(0, 3, 1, 2),
], ids=["channels_last", "permuted"])
def test_group_norm_of_a_channels_last_x_equals_the_torch_module_bit_for_bit(make_x, generator):
    # The layer made x contiguous in (N, C, H, W) order; torch keeps its layout, and the kernels' sums follow it.
    layer = rf.group_norm(2, 4)
    params = _params(layer, generator, torch.float32)
    x = make_x(generator)
    y_ref, dy, dparams_ref, dx_ref = _torch_vjp(torch.nn.GroupNorm(2, 4), params, {}, x,
                                                lambda y: torch.randn(y.shape, generator=generator))
    y, pullback = layer.vjp(params, x)
    dparams, dx = pullback(dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    _assert_equal_trees(dparams, dparams_ref)
