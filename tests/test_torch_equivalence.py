"""Training here and training with torch.nn + autograd + torch.optim.SGD give the same numbers."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf
from rdl_functional.apps.torch_baseline import torch_seed_model


def _train_both(dtype, steps, batch_size=10, lr=0.1):
    """Yield (our params, torch's params as a tree) after each of the same minibatch steps."""
    g = torch.Generator().manual_seed(0)
    x, labels = rf.disc_dataset(200, g)
    x, target = x.to(dtype), rf.one_hot(labels, 2, dtype=dtype)
    model = rf.seed_model()
    params = model.init(g, dtype=dtype)
    reference = torch_seed_model().to(dtype)
    reference.load_state_dict(rf.to_state_dict(params), strict=True)
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    step = rf.value_and_grad(model, rf.mse_loss)
    order = torch.randperm(200, generator=g)
    for i in range(steps):
        rows = order[(i * batch_size) % 200 :][:batch_size]
        value, grads = step(params, x[rows], target[rows])
        params = rf.sgd_step(params, grads, lr)

        optimizer.zero_grad()
        reference_value = torch.nn.functional.mse_loss(reference(x[rows]), target[rows])
        reference_value.backward()
        optimizer.step()
        yield value, params, reference_value.detach(), rf.from_state_dict(reference.state_dict())


def test_float64_training_stays_equal_to_torch_step_by_step():
    for value, params, reference_value, reference_params in _train_both(torch.float64, steps=100):
        torch.testing.assert_close(value, reference_value, rtol=1e-10, atol=1e-12)
        for ours, theirs in zip(rf.tree_leaves(params), rf.tree_leaves(reference_params), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 10, 100])
def test_float32_training_is_bit_identical_to_torch(batch_size):
    """Each pullback runs the kernels torch's autograd runs, in the same order, so no bit differs."""
    for value, params, reference_value, reference_params in _train_both(torch.float32, 60, batch_size):
        assert torch.equal(value, reference_value)
        for ours, theirs in zip(rf.tree_leaves(params), rf.tree_leaves(reference_params), strict=True):
            assert torch.equal(ours, theirs)


def test_value_and_grad_works_under_inference_mode():
    model = rf.seed_model()
    x, labels = rf.disc_dataset(16, 0)
    target = rf.one_hot(labels, 2)
    expected_value, expected_grads = rf.value_and_grad(model, rf.mse_loss)(model.init(0), x, target)
    with torch.inference_mode():
        params = model.init(0)
        value, grads = rf.value_and_grad(model, rf.mse_loss)(params, x, target)
        params = rf.sgd_step(params, grads, 0.1)
    assert torch.equal(value, expected_value)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(grads), rf.tree_leaves(expected_grads), strict=True))


def test_value_and_grad_rejects_what_is_not_a_model_or_loss():
    with pytest.raises(TypeError, match=r"value_and_grad: loss must be a Loss, got function"):
        rf.value_and_grad(rf.seed_model(), torch.nn.functional.mse_loss)
