"""Every loss through the same vjp check, and against torch.nn.functional."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import rdl_functional as rf


def _regression_target(pred, generator):
    return torch.randn(pred.shape, generator=generator, dtype=pred.dtype)


def _labels(pred, generator):
    return torch.randint(0, pred.shape[1], (pred.shape[0],), generator=generator)


def _labels_some_ignored(pred, generator):
    labels = _labels(pred, generator)
    return torch.where(torch.arange(len(labels)) % 2 == 1, -1, labels)  # every other row ignored, never row 0


# name, loss, pred scale, target maker, torch reference. Adding a loss is one line.
def _probabilities(pred, generator):
    return torch.rand(pred.shape, generator=generator, dtype=pred.dtype)


LOSSES = [
    ("mse", rf.mse_loss, 1.0, _regression_target, F.mse_loss),
    ("huber", rf.huber_loss(), 2.0, _regression_target, F.huber_loss),
    ("huber_sum_delta", rf.huber_loss(0.5, "sum"), 2.0, _regression_target,
     lambda p, t: F.huber_loss(p, t, reduction="sum", delta=0.5)),
    ("l1", rf.l1_loss(), 1.0, _regression_target, F.l1_loss),
    ("l1_sum", rf.l1_loss("sum"), 1.0, _regression_target, lambda p, t: F.l1_loss(p, t, reduction="sum")),
    ("bce_with_logits", rf.bce_with_logits_loss(), 1.0, _probabilities, F.binary_cross_entropy_with_logits),
    ("bce_with_logits_large", rf.bce_with_logits_loss("sum"), 1e3, _probabilities,
     lambda p, t: F.binary_cross_entropy_with_logits(p, t, reduction="sum")),
    ("nll", rf.nll_loss(), 1.0, _labels, F.nll_loss),
    ("nll_sum", rf.nll_loss("sum"), 1.0, _labels, lambda p, t: F.nll_loss(p, t, reduction="sum")),
    ("nll_ignore_index", rf.nll_loss(ignore_index=-1), 1.0, _labels_some_ignored,
     lambda p, t: F.nll_loss(p, t, ignore_index=-1)),
    ("cross_entropy", rf.cross_entropy_loss, 1.0, _labels, F.cross_entropy),
    ("cross_entropy_large_logits", rf.cross_entropy_loss, 1e4, _labels, F.cross_entropy),
]
IDS = [case[0] for case in LOSSES]


@pytest.mark.parametrize(("name", "loss", "scale", "make_target", "reference"), LOSSES, ids=IDS)
@pytest.mark.parametrize("batch", [1, 6])
def test_loss_matches_torch(name, loss, scale, make_target, reference, batch, generator):
    pred = scale * torch.randn(batch, 3, generator=generator, dtype=torch.float64)
    target = make_target(pred, generator)
    value = loss(pred, target)
    assert value.shape == ()
    assert torch.isfinite(value)
    assert_close(value, reference(pred, target), rtol=1e-10, atol=1e-10)
    assert_close(loss.vjp(pred, target)[0], value, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "loss", "scale", "make_target", "reference"), LOSSES, ids=IDS)
@pytest.mark.parametrize("batch", [1, 6])
def test_loss_vjp_matches_torch_func(name, loss, scale, make_target, reference, batch, generator):
    pred = torch.randn(batch, 3, generator=generator, dtype=torch.float64)
    target = make_target(pred, generator)
    rf.check_vjp(loss, pred, target, generator=generator)


@pytest.mark.parametrize(("name", "loss", "scale", "make_target", "reference"), LOSSES, ids=IDS)
def test_loss_gradient_matches_torch_autograd(name, loss, scale, make_target, reference, generator):
    pred = scale * torch.randn(5, 3, generator=generator, dtype=torch.float64)
    target = make_target(pred, generator)
    expected = torch.func.grad(lambda p: reference(p, target))(pred)
    _, pullback = loss.vjp(pred, target)
    assert_close(pullback(torch.tensor(1.0, dtype=torch.float64)), expected, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(pullback(1.0)).all()


def test_mse_is_the_seed_reports_half_mean_squared_norm_for_two_outputs(generator):
    pred, target = torch.rand(10, 2, generator=generator), torch.rand(10, 2, generator=generator)
    seed_formula = ((pred - target) ** 2).sum(dim=1).sum() / (2 * 10)
    assert_close(rf.mse_loss(pred, target), seed_formula)


def test_mse_rejects_a_target_of_another_shape():
    with pytest.raises(ValueError, match=r"mse_loss.apply: target has shape \(4,\) but pred has \(4, 2\)"):
        rf.mse_loss(torch.zeros(4, 2), torch.zeros(4))


def test_mse_rejects_a_target_of_another_dtype():
    with pytest.raises(TypeError, match=r"mse_loss.vjp: target is torch.float64 but pred is torch.float32"):
        rf.mse_loss.vjp(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.float64))


def test_cross_entropy_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 3\]"):
        rf.cross_entropy_loss(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_cross_entropy_rejects_float_labels():
    with pytest.raises(TypeError, match=r"labels must be int64 class indices, got torch.float32"):
        rf.cross_entropy_loss(torch.zeros(2, 3), torch.zeros(2))


def test_cross_entropy_rejects_labels_of_another_length():
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\) to match the logits, got \(3,\)"):
        rf.cross_entropy_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))


def test_loss_pullback_rejects_a_non_scalar_cotangent():
    _, pullback = rf.mse_loss.vjp(torch.zeros(2, 2), torch.zeros(2, 2))
    message = r"mse_loss pullback: the cotangent g must be a 0-dim tensor or a float, got \(2,\)"
    with pytest.raises(ValueError, match=message):
        pullback(torch.ones(2))


@pytest.mark.parametrize(("name", "loss", "scale", "make_target", "reference"), LOSSES, ids=IDS)
@settings(max_examples=12, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.float64]), batch=st.integers(1, 7), classes=st.integers(1, 5),
       magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e3]), strided=st.booleans(), seed=st.integers(0, 2**31))
def test_every_loss_against_torch_func_for_any_dtype_stride_and_magnitude(name, loss, scale, make_target, reference,
                                                                          dtype, batch, classes, magnitude, strided,
                                                                          seed):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a non-contiguous view
        pred = (magnitude * torch.randn(2 * classes, batch, generator=g, dtype=dtype)).t()[:, ::2]
    else:
        pred = magnitude * torch.randn(batch, classes, generator=g, dtype=dtype)
    target = make_target(pred, g)
    value, pullback = loss.vjp(pred, target)
    value_ref, pullback_ref = torch.func.vjp(lambda p: reference(p, target), pred)
    assert_close(value, value_ref)
    seed_cotangent = torch.randn((), generator=g, dtype=dtype)
    assert_close(pullback(seed_cotangent), pullback_ref(seed_cotangent)[0])


@pytest.mark.parametrize(
    ("loss", "pred", "target", "message"),
    [
        (rf.huber_loss(), torch.zeros(5, 1), torch.zeros(5),
         r"huber_loss\.apply: target has shape \(5,\) but pred has \(5, 1\) \(the "
         r"same 5 values, one per row: pass target.unsqueeze\(-1\), that is target\[\.\.\., None\], to give it "
         r"pred's shape, or compare pred.squeeze\(-1\) with target\)$"),
        (rf.bce_with_logits_loss(), torch.zeros(5), torch.zeros(5, 1),
         r"bce_with_logits_loss\.apply: target has shape \(5, 1\) but pred has \(5,\) \(the "
         r"same 5 values, one per row: pass target.squeeze\(-1\) to give it pred's shape\)$"),
        (rf.mse_loss, torch.zeros(2, 3), torch.zeros(3, 2),
         r"mse_loss.apply: target has shape \(3, 2\) but pred has \(2, 3\)$"),
        (rf.l1_loss(), torch.zeros(1, 6), torch.zeros(6, 1),
         r"target has shape \(6, 1\) but pred has \(1, 6\) \(the same 6 values: pass target.reshape\(\(1, 6\)\)\)$"),
        (rf.mse_loss, torch.zeros(4, 3), torch.zeros(4),
         r"mse_loss.apply: target has shape \(4,\) but pred has \(4, 3\) \(for class labels, compare with "
         r"rf.one_hot\(labels, 3\), or use rf.cross_entropy_loss on the labels\)$"),
    ],
)
def test_a_column_against_a_vector_suggests_the_reshape_not_one_hot(loss, pred, target, message):
    """An (n, 1) vs (n,) mismatch in huber or BCE hinted 'for class labels, compare with rf.one_hot': the fix
    there is a reshape; one-hot stays the hint for labels against several outputs."""
    with pytest.raises(ValueError, match=message):
        loss(pred, target)


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss", "bce_with_logits_loss", "nll_loss",
                                  "cross_entropy_loss"])
def test_every_loss_is_a_loss_bare_or_called(name):
    """rf.l1_loss was a factory (rf.l1_loss for rf.l1_loss() was refused) while rf.mse_loss was a loss: one form now,
    the bare name is the loss with torch's defaults and calling it with options gives another loss."""
    bare = getattr(rf, name)
    assert isinstance(bare, rf.Loss) and isinstance(bare(), rf.Loss) and isinstance(bare(reduction="sum"), rf.Loss)
    model = rf.linear(2, 3)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2, 1, 0]) if name in ("nll_loss", "cross_entropy_loss") else torch.rand(4, 3)
    value, _ = rf.value_and_grad(model, bare)(model.init(0), x, target)
    assert torch.equal(value, rf.value_and_grad(model, bare())(model.init(0), x, target)[0])


def test_torchs_loss_function_and_a_hand_written_loss_called_bare_say_what_to_pass():
    with pytest.raises(TypeError, match=r"^value_and_grad: loss must be a Loss, got function "
                                        r"torch.nn.functional.binary_cross_entropy_with_logits \(a plain function has "
                                        r"no pullback: use rf.bce_with_logits_loss\)$"):
        rf.value_and_grad(rf.linear(2, 1), torch.nn.functional.binary_cross_entropy_with_logits)
    mine = rf.Loss(apply=rf.mse_loss.apply, vjp=rf.mse_loss.vjp, name="mine")
    with pytest.raises(TypeError, match=r"^mine: a Loss is called as loss\(pred, target\), got 0 arguments "
                                        r"\(mine takes no options: pass it without calling it\)$"):
        mine()


def test_log_softmax_then_nll_with_ignore_index_is_torchs_cross_entropy_bit_for_bit(generator):
    """A loss on some positions of a sequence only (the adder's answer digits): minGPT's
    F.cross_entropy(logits, targets, ignore_index=-1), value and gradient, in float32."""
    logits = torch.randn(8, 6, 10, generator=generator)
    labels = torch.randint(0, 10, (8, 6), generator=generator)
    labels[:, :3] = -1
    loss = rf.nll_loss(ignore_index=-1)
    leaf = logits.clone().requires_grad_()
    reference = F.cross_entropy(leaf.flatten(0, 1), labels.flatten(), ignore_index=-1)
    log_p = rf.log_softmax({}, logits)
    value, pullback = loss.vjp(log_p, labels)
    assert torch.equal(value, reference)
    _, log_softmax_pullback = rf.log_softmax.vjp({}, logits)
    dlogits = log_softmax_pullback(pullback(1.0))[1]
    (expected,) = torch.autograd.grad(reference, leaf)
    assert torch.equal(dlogits, expected)
    assert not dlogits[:, :3].any()


def test_nll_loss_ignore_index_is_refused_unless_an_int_and_other_labels_still_checked():
    with pytest.raises(TypeError, match=r"^nll_loss: ignore_index must be an int \(a label to leave out\), got 1.0$"):
        rf.nll_loss(ignore_index=1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) \(or be ignore_index=-1\), got values in "
                                         r"\[-2, 0\]$"):
        rf.nll_loss(ignore_index=-1)(torch.zeros(3, 3), torch.tensor([-1, -2, 0]))


@pytest.mark.parametrize(("loss", "reference", "logs"), [
    (rf.cross_entropy_loss, F.cross_entropy, False),
    (rf.nll_loss(), F.nll_loss, True),
    (rf.nll_loss("sum"), lambda p, t: F.nll_loss(p, t, reduction="sum"), True),
], ids=["cross_entropy", "nll", "nll_sum"])
def test_the_label_losses_keep_torchs_bits_with_their_own_ignore_index(loss, reference, logs, generator):
    # cross_entropy passes the nll kernels an ignore_index no label can take (nll_loss its own): the bits stay.
    pred = torch.randn(7, 5, generator=generator)
    pred = pred.log_softmax(-1) if logs else pred
    labels = torch.randint(0, 5, (7,), generator=generator)
    leaf = pred.clone().requires_grad_()
    expected = reference(leaf, labels)
    (grad,) = torch.autograd.grad(expected, leaf)
    value, pullback = loss.vjp(pred, labels)
    assert torch.equal(value, expected.detach()) and torch.equal(pullback(torch.tensor(1.0)), grad)
