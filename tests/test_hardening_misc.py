"""Regressions from issue 16's user and adversary trials: each test is named after the defect it pins."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf


def _saved_for_backward(run) -> int:
    """How many tensors autograd saved for a backward pass while ``run`` ran: 0 when no graph was recorded."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        run()
    return len(saved)


@pytest.mark.parametrize("requires_grad", ["x", "target", "test"])
@pytest.mark.parametrize("optimizer", ["sgd_step", "adam"])
def test_fit_with_data_that_requires_grad_builds_no_autograd_graph(requires_grad, optimizer):
    """Regression: an x (or target, or test data) that required grad made every step record an autograd graph
    that the updates carried on (+360 MiB at 8,000 steps), and the params came back with a grad_fn."""
    x, labels = rf.disc_dataset(60, 0)
    target = rf.one_hot(labels, 2)
    data = {"x": x.clone(), "target": target.clone(), "test": x[:10].clone()}
    data[requires_grad].requires_grad_(True)
    model = rf.compose(rf.linear(2, 4), rf.tanh, rf.linear(4, 2))
    settings = dict(lr=0.1) if optimizer == "sgd_step" else dict(optimizer=rf.adam(0.01))
    result = []
    saved = _saved_for_backward(lambda: result.append(rf.fit(
        model, rf.mse_loss, model.init(0), data["x"], data["target"], epochs=2, batch_size=20, generator=0,
        test=(data["test"], target[:10]), **settings)))
    params, history = result[0]
    assert saved == 0
    assert all(p.grad_fn is None and not p.requires_grad for p in rf.tree_leaves(params))
    assert all(t.grad_fn is None for t in rf.tree_leaves(history.opt_state or {}))
    expected, _ = rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=2, batch_size=20, generator=0,
                         test=(x[:10], target[:10]), **settings)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params), rf.tree_leaves(expected), strict=True))
