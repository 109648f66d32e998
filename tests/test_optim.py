from __future__ import annotations

import math

import pytest
import torch

import rdl_functional as rf


def _params_and_grads(generator):
    params = rf.seed_model().init(generator)
    grads = rf.tree_map(lambda p: torch.randn(p.shape, generator=generator), params)
    return params, grads


def test_sgd_step_is_p_minus_lr_g_leaf_by_leaf(generator):
    params, grads = _params_and_grads(generator)
    new = rf.sgd_step(params, grads, lr=0.1)
    assert rf.tree_difference(params, new, leaves=True) is None
    for p, g, n in zip(rf.tree_leaves(params), rf.tree_leaves(grads), rf.tree_leaves(new), strict=True):
        torch.testing.assert_close(n, p - 0.1 * g)


def test_sgd_step_matches_torch_optim_sgd_bit_for_bit(generator):
    params, grads = _params_and_grads(generator)
    reference = [p.clone() for p in rf.tree_leaves(params)]
    for p, g in zip(reference, rf.tree_leaves(grads), strict=True):
        p.grad = g
    torch.optim.SGD(reference, lr=0.37).step()
    new = rf.sgd_step(params, grads, lr=0.37)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(new), reference, strict=True))


def test_sgd_step_with_zero_lr_returns_equal_new_tensors(generator):
    params, grads = _params_and_grads(generator)
    new = rf.sgd_step(params, grads, lr=0)
    for p, n in zip(rf.tree_leaves(params), rf.tree_leaves(new), strict=True):
        assert torch.equal(p, n) and p is not n


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1, -math.inf])
def test_sgd_step_rejects_a_bad_lr(lr, generator):
    params, grads = _params_and_grads(generator)
    with pytest.raises(ValueError, match=r"sgd_step: lr must be finite and ≥ 0, got"):
        rf.sgd_step(params, grads, lr)


def test_sgd_step_rejects_an_lr_that_is_not_a_number(generator):
    params, grads = _params_and_grads(generator)
    with pytest.raises(TypeError, match=r"sgd_step: lr must be a number, got str"):
        rf.sgd_step(params, grads, "0.1")


def test_sgd_step_names_the_first_path_where_grads_differ(generator):
    params, grads = _params_and_grads(generator)
    del grads["2"]["bias"]
    with pytest.raises(ValueError, match=r'sgd_step: grads has no entry at "2.bias" that params has'):
        rf.sgd_step(params, grads, 0.1)


def test_sgd_step_rejects_grads_of_another_shape(generator):
    params, grads = _params_and_grads(generator)
    grads["6"]["bias"] = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r'params has a float32 tensor of shape \(2,\) at "6.bias" but grads has a '
                                         r"float32 tensor of shape \(1, 2\)"):
        rf.sgd_step(params, grads, 0.1)


def test_linear_schedule_decays_to_its_end_value_and_stays():
    schedule = rf.linear_schedule(0.8, 0.0, transition_steps=2000)
    assert schedule(0) == 0.8
    assert schedule(1000) == pytest.approx(0.4)
    assert schedule(1999) == pytest.approx(0.8 / 2000)
    assert schedule(2000) == schedule(10**6) == 0.0


def test_constant_schedule_is_constant():
    assert {rf.constant_schedule(0.3)(k) for k in (0, 1, 10**9)} == {0.3}


def test_schedules_reject_bad_values():
    with pytest.raises(ValueError, match=r"linear_schedule: transition_steps must be an int ≥ 1, got 0"):
        rf.linear_schedule(0.1, 0.0, 0)
    with pytest.raises(ValueError, match=r"linear_schedule: init_value must be a finite number ≥ 0, got nan"):
        rf.linear_schedule(float("nan"), 0.0, 10)
    with pytest.raises(ValueError, match=r"constant_schedule: value must be a finite number ≥ 0, got -1"):
        rf.constant_schedule(-1)
