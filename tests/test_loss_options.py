"""Every loss option torch's functional form has: one form for losses, float64 pullbacks against torch.func.vjp,
float32 bits against F.<loss> and its autograd, and a float32 training run against torch.nn + torch.optim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rdl_functional as rf

CLASSES = 4


def _regression(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=dtype)


def _probabilities(shape, dtype, g):
    return torch.rand(shape, generator=g, dtype=dtype)


def _class_probabilities(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=dtype).softmax(-1)


def _labels(shape, dtype, g):
    return torch.randint(0, shape[-1], shape[:-1], generator=g)


def _labels_some_ignored(shape, dtype, g):
    labels = _labels(shape, dtype, g)
    return labels.masked_fill(torch.arange(labels.numel()).reshape(labels.shape) % 3 == 1, -100)


def _labels_class_two_ignored(shape, dtype, g):
    labels = _labels(shape, dtype, g)
    return labels.masked_fill(torch.arange(labels.numel()).reshape(labels.shape) % 3 == 1, 2)


def _class_weight(dtype, g):
    return torch.rand(CLASSES, generator=g, dtype=dtype) + 0.5


def _element_weight(dtype, g):
    return torch.rand(CLASSES, generator=g, dtype=dtype) + 0.5


def _full_weight(dtype, g):
    """mse's, l1's and huber's weight: one per element, of pred's shape (6, 4), as torch requires."""
    return torch.rand(6, CLASSES, generator=g, dtype=dtype) + 0.5


def _rows(reference):
    """F's class losses on our layout: the classes last, leading dimensions flattened into rows."""
    def call(pred, target, **options):
        classes = pred.shape[-1]
        flat_target = target.reshape(-1, classes) if target.is_floating_point() else target.reshape(-1)
        value = reference(pred.reshape(-1, classes), flat_target, **options)
        return value.reshape(pred.shape[:-1]) if options.get("reduction") == "none" else value
    return call


# name, rf loss, F reference, options (dtype, generator) -> dict, target maker, pred shape, pred scale
CASES = [
    ("mse", rf.mse_loss, F.mse_loss, lambda d, g: {}, _regression, (6, 4), 1.0),
    ("mse_none", rf.mse_loss, F.mse_loss, lambda d, g: {"reduction": "none"}, _regression, (6, 4), 1.0),
    ("mse_sum", rf.mse_loss, F.mse_loss, lambda d, g: {"reduction": "sum"}, _regression, (6, 4), 1.0),
    ("l1", rf.l1_loss, F.l1_loss, lambda d, g: {}, _regression, (6, 4), 1.0),
    ("l1_none", rf.l1_loss, F.l1_loss, lambda d, g: {"reduction": "none"}, _regression, (6, 4), 1.0),
    ("l1_sum", rf.l1_loss, F.l1_loss, lambda d, g: {"reduction": "sum"}, _regression, (6, 4), 1.0),
    ("mse_weight", rf.mse_loss, F.mse_loss, lambda d, g: {"weight": _full_weight(d, g)}, _regression, (6, 4), 1.0),
    ("mse_weight_none", rf.mse_loss, F.mse_loss, lambda d, g: {"weight": _full_weight(d, g), "reduction": "none"},
     _regression, (6, 4), 1.0),
    ("mse_weight_sum", rf.mse_loss, F.mse_loss, lambda d, g: {"weight": _full_weight(d, g), "reduction": "sum"},
     _regression, (6, 4), 1.0),
    ("l1_weight", rf.l1_loss, F.l1_loss, lambda d, g: {"weight": _full_weight(d, g)}, _regression, (6, 4), 1.0),
    ("l1_weight_none", rf.l1_loss, F.l1_loss, lambda d, g: {"weight": _full_weight(d, g), "reduction": "none"},
     _regression, (6, 4), 1.0),
    ("l1_weight_sum", rf.l1_loss, F.l1_loss, lambda d, g: {"weight": _full_weight(d, g), "reduction": "sum"},
     _regression, (6, 4), 1.0),
    ("huber", rf.huber_loss, F.huber_loss, lambda d, g: {}, _regression, (6, 4), 2.0),
    ("huber_weight", rf.huber_loss, F.huber_loss, lambda d, g: {"weight": _full_weight(d, g), "delta": 0.5},
     _regression, (6, 4), 2.0),
    ("huber_weight_none", rf.huber_loss, F.huber_loss, lambda d, g: {"weight": _full_weight(d, g),
                                                                     "reduction": "none"}, _regression, (6, 4), 2.0),
    ("huber_weight_sum", rf.huber_loss, F.huber_loss, lambda d, g: {"weight": _full_weight(d, g),
                                                                    "reduction": "sum"}, _regression, (6, 4), 2.0),
    ("huber_none_delta", rf.huber_loss, F.huber_loss, lambda d, g: {"reduction": "none", "delta": 0.5},
     _regression, (6, 4), 2.0),
    ("huber_sum_delta", rf.huber_loss, F.huber_loss, lambda d, g: {"reduction": "sum", "delta": 2.5},
     _regression, (6, 4), 2.0),
    ("bce", rf.bce_with_logits_loss, F.binary_cross_entropy_with_logits, lambda d, g: {}, _probabilities,
     (6, 4), 2.0),
    ("bce_none", rf.bce_with_logits_loss, F.binary_cross_entropy_with_logits, lambda d, g: {"reduction": "none"},
     _probabilities, (6, 4), 2.0),
    ("bce_weight", rf.bce_with_logits_loss, F.binary_cross_entropy_with_logits,
     lambda d, g: {"weight": _element_weight(d, g)}, _probabilities, (6, 4), 2.0),
    ("bce_pos_weight_sum", rf.bce_with_logits_loss, F.binary_cross_entropy_with_logits,
     lambda d, g: {"pos_weight": _element_weight(d, g), "reduction": "sum"}, _probabilities, (6, 4), 2.0),
    ("bce_both_none", rf.bce_with_logits_loss, F.binary_cross_entropy_with_logits,
     lambda d, g: {"weight": _element_weight(d, g), "pos_weight": _element_weight(d, g), "reduction": "none"},
     _probabilities, (6, 4), 2.0),
    ("bce_both_mean", rf.bce_with_logits_loss, F.binary_cross_entropy_with_logits,
     lambda d, g: {"weight": _element_weight(d, g), "pos_weight": _element_weight(d, g)}, _probabilities,
     (6, 4), 2.0),
    ("nll", rf.nll_loss, _rows(F.nll_loss), lambda d, g: {}, _labels, (6, 4), 1.0),
    ("nll_none", rf.nll_loss, _rows(F.nll_loss), lambda d, g: {"reduction": "none"}, _labels, (2, 3, 4), 1.0),
    ("nll_weight", rf.nll_loss, _rows(F.nll_loss), lambda d, g: {"weight": _class_weight(d, g)},
     _labels_some_ignored, (6, 4), 1.0),
    ("nll_weight_none_ignore", rf.nll_loss, _rows(F.nll_loss),
     lambda d, g: {"weight": _class_weight(d, g), "reduction": "none", "ignore_index": 2},
     _labels_class_two_ignored, (6, 4), 1.0),
    ("nll_weight_sum", rf.nll_loss, _rows(F.nll_loss), lambda d, g: {"weight": _class_weight(d, g),
                                                                     "reduction": "sum"}, _labels, (6, 4), 1.0),
    ("ce", rf.cross_entropy_loss, _rows(F.cross_entropy), lambda d, g: {}, _labels, (6, 4), 1.0),
    ("ce_ignored", rf.cross_entropy_loss, _rows(F.cross_entropy), lambda d, g: {}, _labels_some_ignored,
     (2, 3, 4), 1.0),
    ("ce_none", rf.cross_entropy_loss, _rows(F.cross_entropy), lambda d, g: {"reduction": "none"},
     _labels_some_ignored, (2, 3, 4), 1.0),
    ("ce_sum", rf.cross_entropy_loss, _rows(F.cross_entropy), lambda d, g: {"reduction": "sum"}, _labels,
     (6, 4), 1.0),
    ("ce_weight", rf.cross_entropy_loss, _rows(F.cross_entropy), lambda d, g: {"weight": _class_weight(d, g)},
     _labels_some_ignored, (6, 4), 1.0),
    ("ce_ignore_index", rf.cross_entropy_loss, _rows(F.cross_entropy), lambda d, g: {"ignore_index": 2},
     _labels_class_two_ignored, (6, 4), 1.0),
    ("ce_smoothing", rf.cross_entropy_loss, _rows(F.cross_entropy), lambda d, g: {"label_smoothing": 0.1},
     _labels_some_ignored, (6, 4), 1.0),
    ("ce_smoothing_sum", rf.cross_entropy_loss, _rows(F.cross_entropy),
     lambda d, g: {"label_smoothing": 0.2, "reduction": "sum"}, _labels_some_ignored, (6, 4), 1.0),
    ("ce_smoothing_none", rf.cross_entropy_loss, _rows(F.cross_entropy),
     lambda d, g: {"label_smoothing": 0.3, "reduction": "none"}, _labels_some_ignored, (2, 3, 4), 1.0),
    ("ce_smoothing_weight", rf.cross_entropy_loss, _rows(F.cross_entropy),
     lambda d, g: {"label_smoothing": 0.1, "weight": _class_weight(d, g)}, _labels_some_ignored, (6, 4), 1.0),
    ("ce_smoothing_weight_none", rf.cross_entropy_loss, _rows(F.cross_entropy),
     lambda d, g: {"label_smoothing": 0.1, "weight": _class_weight(d, g), "reduction": "none",
                   "ignore_index": 2}, _labels_class_two_ignored, (6, 4), 1.0),
    ("ce_smoothing_weight_sum", rf.cross_entropy_loss, _rows(F.cross_entropy),
     lambda d, g: {"label_smoothing": 0.1, "weight": _class_weight(d, g), "reduction": "sum"},
     _labels_some_ignored, (6, 4), 1.0),
    ("ce_probabilities", rf.cross_entropy_loss, _rows(F.cross_entropy), lambda d, g: {}, _class_probabilities,
     (2, 3, 4), 1.0),
    ("ce_probabilities_none", rf.cross_entropy_loss, _rows(F.cross_entropy), lambda d, g: {"reduction": "none"},
     _class_probabilities, (6, 4), 1.0),
    ("ce_probabilities_sum_weight", rf.cross_entropy_loss, _rows(F.cross_entropy),
     lambda d, g: {"reduction": "sum", "weight": _class_weight(d, g)}, _class_probabilities, (6, 4), 1.0),
    ("ce_probabilities_smoothing_weight", rf.cross_entropy_loss, _rows(F.cross_entropy),
     lambda d, g: {"label_smoothing": 0.2, "weight": _class_weight(d, g)}, _class_probabilities, (6, 4), 1.0),
    ("ce_probabilities_smoothing_none", rf.cross_entropy_loss, _rows(F.cross_entropy),
     lambda d, g: {"label_smoothing": 0.2, "reduction": "none"}, _class_probabilities, (6, 4), 1.0),
]
IDS = [case[0] for case in CASES]
FIELDS = ("name", "loss", "reference", "options", "make_target", "shape", "scale")
_LOG_INPUTS = {rf.nll_loss}  # nll takes log-probabilities


def _inputs(loss, make_target, shape, scale, dtype, g):
    pred = scale * torch.randn(shape, generator=g, dtype=dtype)
    if any(loss is log_loss for log_loss in _LOG_INPUTS):
        pred = pred.log_softmax(-1)
    return pred, make_target(shape, dtype, g)


@pytest.mark.parametrize(FIELDS, CASES, ids=IDS)
def test_every_option_through_the_shared_vjp_check_in_float64(name, loss, reference, options, make_target, shape,
                                                               scale):
    g = torch.Generator().manual_seed(0)
    pred, target = _inputs(loss, make_target, shape, scale, torch.float64, g)
    ours = loss(**options(torch.float64, g))
    rf.check_vjp(ours, pred, target, generator=g)
    if "none" in name:
        assert ours(pred, target).shape == ours.vjp(pred, target)[0].shape == pred.shape[:len(
            ours(pred, target).shape)]


@pytest.mark.parametrize(FIELDS, CASES, ids=IDS)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_every_option_gives_torchs_bits_in_float32_value_and_gradient(name, loss, reference, options, make_target,
                                                                      shape, scale, strided):
    g = torch.Generator().manual_seed(1)
    pred, target = _inputs(loss, make_target, shape, scale, torch.float32, g)
    if strided:  # the same values in a transposed layout: a non-contiguous view
        pred = pred.transpose(0, -1).contiguous().transpose(0, -1)
    kwargs = options(torch.float32, g)
    leaf = pred.clone().requires_grad_()
    expected = reference(leaf, target, **kwargs)
    cotangent = torch.randn(expected.shape, generator=g)
    (expected_grad,) = torch.autograd.grad(expected, leaf, cotangent)
    value, pullback = loss(**kwargs).vjp(pred, target)
    assert torch.equal(value, expected.detach())
    assert torch.equal(loss(**kwargs)(pred, target), expected.detach())
    assert torch.equal(pullback(cotangent), expected_grad)


def test_the_bare_loss_is_the_loss_with_torchs_defaults_and_old_calls_still_work(generator):
    pred, target = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    for loss in (rf.mse_loss, rf.l1_loss, rf.huber_loss, rf.bce_with_logits_loss):
        assert isinstance(loss(), rf.Loss) and torch.equal(loss()(pred, target), loss(pred, target))
    assert torch.equal(rf.huber_loss(0.5, "sum")(pred, target), F.huber_loss(pred, target, reduction="sum",
                                                                             delta=0.5))
    assert torch.equal(rf.l1_loss("sum")(pred, target), F.l1_loss(pred, target, reduction="sum"))
    labels = torch.tensor([0, -1, 2, 1, -1])
    log_p = pred.log_softmax(-1)
    assert torch.equal(rf.nll_loss("sum", -1)(log_p, labels), F.nll_loss(log_p, labels, reduction="sum",
                                                                         ignore_index=-1))
    assert repr(rf.cross_entropy_loss(reduction="sum", label_smoothing=0.1)) == \
        "cross_entropy_loss(reduction='sum', label_smoothing=0.1)"


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: rf.mse_loss(reduction="avg"), ValueError, r"^mse_loss: reduction must be 'none', 'mean' or 'sum', "
                                                       r"got 'avg'$"),
    (lambda: rf.cross_entropy_loss(reduction=None), ValueError, r"^cross_entropy_loss: reduction must be"),
    (lambda: rf.huber_loss(delta=-1.0), ValueError, r"^huber_loss: delta must be a finite number > 0, got -1.0$"),
    (lambda: rf.cross_entropy_loss(label_smoothing=1.5), ValueError,
     r"^cross_entropy_loss: label_smoothing must be a number in \[0, 1\], got 1.5$"),
    (lambda: rf.cross_entropy_loss(weight=[1.0, 2.0]), TypeError,
     r"^cross_entropy_loss: weight must be a torch.Tensor or None, got list$"),
    (lambda: rf.nll_loss(weight=torch.ones(3, dtype=torch.int64)), TypeError,
     r"^nll_loss: weight must be a floating tensor, got torch.int64$"),
    (lambda: rf.nll_loss(weight=torch.ones(3, 1)), ValueError,
     r"^nll_loss: weight must be 1-d, one entry per class, got shape \(3, 1\)$"),
    (lambda: rf.cross_entropy_loss(ignore_index=0.5), TypeError,
     r"^cross_entropy_loss: ignore_index must be an int \(a label to leave out\), got 0.5$"),
    (lambda: rf.bce_with_logits_loss(pos_weight="3"), TypeError,
     r"^bce_with_logits_loss: pos_weight must be a torch.Tensor or None, got str$"),
    (lambda: rf.l1_loss(reduction="elementwise_mean"), ValueError, r"^l1_loss: reduction must be"),
])
def test_bad_options_are_refused_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize(("loss", "pred", "target", "error", "message"), [
    (rf.cross_entropy_loss(weight=torch.ones(3)), torch.zeros(2, 4), torch.tensor([0, 1]), ValueError,
     r"weight must have shape \(4,\), one entry per class, got \(3,\)$"),
    (rf.nll_loss(weight=torch.ones(4, dtype=torch.float64)), torch.zeros(2, 4), torch.tensor([0, 1]), TypeError,
     r"weight is torch.float64 but pred is torch.float32 \(pass weight.to\(torch.float32\)\)$"),
    (rf.bce_with_logits_loss(pos_weight=torch.ones(3)), torch.zeros(2, 4), torch.zeros(2, 4), ValueError,
     r"pos_weight of shape \(3,\) must broadcast to pred's \(2, 4\)$"),
    (rf.cross_entropy_loss(weight=torch.ones(4)), torch.zeros(2, 4, device="meta"),
     torch.zeros(2, dtype=torch.int64, device="meta"), ValueError,
     r"weight is on cpu but pred is on meta \(build the loss with weight.to\('meta'\)\)$"),
    (rf.l1_loss(weight=torch.ones(4)), torch.zeros(2, 4), torch.zeros(2, 4), ValueError,
     r"weight must have pred's shape \(2, 4\) \(one weight per element, as torch requires\), got \(4,\)$"),
    (rf.cross_entropy_loss, torch.zeros(2, 4), torch.zeros(2, 3), ValueError,
     r"probability targets must have the logits' shape \(2, 4\), got \(2, 3\)"),
    (rf.cross_entropy_loss(ignore_index=-1), torch.zeros(2, 4), torch.tensor([-1, -100]), ValueError,
     r"labels must lie in \[0, 4\) \(or be ignore_index=-1\), got values in \[-100, -100\]$"),
])
def test_options_that_do_not_fit_the_inputs_are_refused_by_name(loss, pred, target, error, message):
    with pytest.raises(error, match=message):
        loss(pred, target)


def test_options_passed_beside_the_tensors_are_told_where_they_go():
    with pytest.raises(TypeError, match=r"^mse_loss: options go to the loss, the tensors to the loss it returns: "
                                        r"mse_loss\(reduction=\.\.\.\)\(pred, target\), not "
                                        r"mse_loss\(pred, target, reduction=\.\.\.\)$"):
        rf.mse_loss(torch.zeros(2), torch.zeros(2), reduction="sum")
    with pytest.raises(TypeError, match=r"^l1_loss: a Loss is called as loss\(pred, target\), got 1 arguments$"):
        rf.l1_loss(torch.zeros(2))


def test_a_reduction_none_pullback_takes_a_cotangent_of_the_values_shape():
    loss = rf.cross_entropy_loss(reduction="none")
    _, pullback = loss.vjp(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.int64))
    assert pullback(1.0).shape == (2, 3, 4)
    with pytest.raises(ValueError, match=r"the cotangent g must be of shape \(2, 3\) \(the loss's\), got \(\)$"):
        pullback(torch.tensor(1.0))


# name, rf loss, torch loss, target maker: 10 steps of a small model, both ways, bit for bit in float32
TRAINING = [
    ("mse", rf.mse_loss(reduction="sum"), lambda y, t: F.mse_loss(y, t, reduction="sum"), _regression),
    ("l1", rf.l1_loss, F.l1_loss, _regression),
    ("mse_weight", rf.mse_loss(weight=torch.linspace(0.5, 2.0, 8 * CLASSES).reshape(8, CLASSES)),
     lambda y, t: F.mse_loss(y, t, weight=torch.linspace(0.5, 2.0, 8 * CLASSES).reshape(8, CLASSES)), _regression),
    ("huber", rf.huber_loss(delta=0.5), lambda y, t: F.huber_loss(y, t, delta=0.5), _regression),
    ("bce", rf.bce_with_logits_loss(pos_weight=torch.full((CLASSES,), 2.0)),
     lambda y, t: F.binary_cross_entropy_with_logits(y, t, pos_weight=torch.full((CLASSES,), 2.0)), _probabilities),
    ("nll", rf.nll_loss(weight=torch.linspace(0.5, 2.0, CLASSES)),
     lambda y, t: F.nll_loss(y, t, weight=torch.linspace(0.5, 2.0, CLASSES)), _labels_some_ignored),
    ("cross_entropy", rf.cross_entropy_loss, F.cross_entropy, _labels),
    ("cross_entropy_options", rf.cross_entropy_loss(weight=torch.linspace(0.5, 2.0, CLASSES), label_smoothing=0.1),
     lambda y, t: F.cross_entropy(y, t, weight=torch.linspace(0.5, 2.0, CLASSES), label_smoothing=0.1),
     _labels_some_ignored),
    ("cross_entropy_probabilities", rf.cross_entropy_loss(label_smoothing=0.2),
     lambda y, t: F.cross_entropy(y, t, label_smoothing=0.2), _class_probabilities),
]


@pytest.mark.parametrize(("name", "loss", "reference", "make_target"), TRAINING, ids=[c[0] for c in TRAINING])
def test_ten_training_steps_match_torch_nn_and_torch_optim_bit_for_bit(name, loss, reference, make_target):
    g = torch.Generator().manual_seed(2)
    logs = name == "nll"
    model = rf.compose(rf.linear(5, CLASSES), rf.log_softmax) if logs else rf.linear(5, CLASSES)
    params = model.init(g)
    torch_model = torch.nn.Linear(5, CLASSES)
    torch_model.load_state_dict(rf.to_state_dict(params["0"] if logs else params), strict=True)
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.1, foreach=True)
    step = rf.train_step(model, loss, rf.sgd(0.1))
    state = rf.train_state(model, rf.sgd(0.1), params)
    for _ in range(10):
        x, target = torch.randn(8, 5, generator=g), make_target((8, CLASSES), torch.float32, g)
        state, metrics = step(state, x, target)
        optimizer.zero_grad()
        y = torch_model(x)
        value = reference(y.log_softmax(-1) if logs else y, target)
        value.backward()
        optimizer.step()
        assert torch.equal(metrics["loss"], value.detach())
    ours = state.params["0"] if logs else state.params
    for key, theirs in torch_model.state_dict().items():
        assert torch.equal(ours[key], theirs), key


@pytest.mark.parametrize(FIELDS, CASES, ids=IDS)
def test_every_option_set_changes_nothing_it_is_given(name, loss, reference, options, make_target, shape, scale):
    g = torch.Generator().manual_seed(3)
    pred, target = _inputs(loss, make_target, shape, scale, torch.float32, g)
    kwargs = options(torch.float32, g)
    given = {"pred": pred, "target": target, **{k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}}
    before = {key: value.clone() for key, value in given.items()}
    value, pullback = loss(**kwargs).vjp(pred, target)
    pullback(torch.ones_like(value))
    for key, value in given.items():
        assert torch.equal(value, before[key]), key


def test_fit_refuses_a_loss_of_one_value_per_element_by_name():
    model = rf.linear(2, 1)
    with pytest.raises(ValueError, match=r"^fit: mse_loss\(reduction='none'\) gives one value per element"):
        rf.fit(model, rf.mse_loss(reduction="none"), model.init(0), torch.ones(8, 2), torch.zeros(8, 1), epochs=1,
               batch_size=4, optimizer=rf.sgd(0.1), generator=0)
