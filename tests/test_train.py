"""fit: the training loop, its history and its hooks."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf


@pytest.fixture
def task():
    x, labels = rf.disc_dataset(120, 0)
    x_test, labels_test = rf.disc_dataset(60, 1)
    model = rf.compose(rf.linear(2, 8), rf.relu, rf.linear(8, 2), rf.tanh)
    return model, x, rf.one_hot(labels, 2), (x_test, rf.one_hot(labels_test, 2))


def _fit(task, **overrides):
    model, x, target, test = task
    settings = dict(epochs=4, batch_size=32, lr=0.3, generator=torch.Generator().manual_seed(5), test=test)
    return rf.fit(model, rf.mse_loss, model.init(1), x, target, **{**settings, **overrides})


def test_history_records_every_epoch_on_train_and_test(task):
    model, x, target, test = task
    params, history = _fit(task)
    assert history.epochs == 4
    for series in (history.train_loss, history.train_accuracy, history.test_loss, history.test_accuracy):
        assert len(series) == 4 and all(isinstance(v, float) for v in series)
    # The last entries are the final params measured on the whole sets.
    assert (history.train_loss[-1], history.train_accuracy[-1]) == tuple(rf.evaluate(model, rf.mse_loss, params, x,
                                                                                     target))
    assert (history.test_loss[-1], history.test_accuracy[-1]) == tuple(rf.evaluate(model, rf.mse_loss, params, *test))
    assert history.task == "classification" and history.train_rmse == history.test_r2 == ()


def test_without_test_data_the_test_history_is_empty(task):
    _, history = _fit(task, test=None)
    assert history.test_loss == () and history.test_accuracy == () and history.epochs == 4


def test_same_generator_seed_gives_bit_identical_params_and_history(task):
    (params_a, history_a), (params_b, history_b) = _fit(task), _fit(task)
    assert history_a == history_b
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params_a), rf.tree_leaves(params_b), strict=True))
    params_c, _ = _fit(task, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(params_a["0"]["weight"], params_c["0"]["weight"])


def test_fit_reads_no_global_random_state(task):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = _fit(task)[1]
        torch.manual_seed(123)
        assert _fit(task)[1] == first


def test_callback_sees_each_epoch_with_the_history_so_far(task):
    seen = []
    params, _ = _fit(task, callback=lambda epoch, p, h: seen.append((epoch, h.epochs, p, rf.tree_map(torch.clone, p))))
    assert [(epoch, epochs) for epoch, epochs, *_ in seen] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    same = [torch.equal(a, b) for a, b in zip(rf.tree_leaves(seen[-1][2]), rf.tree_leaves(params), strict=True)]
    assert all(same)
    # What a callback was given stays as it was, though training went on.
    for _, _, given, snapshot in seen:
        assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(given), rf.tree_leaves(snapshot), strict=True))
    assert not torch.equal(seen[0][2]["0"]["weight"], params["0"]["weight"])


def test_optimizer_is_pluggable(task):
    calls = []

    def half_step(params, grads, lr):
        calls.append(lr)
        return rf.sgd_step(params, grads, lr / 2)

    halved, _ = _fit(task, optimizer=half_step, lr=0.3)
    assert len(calls) == 4 * 4 and set(calls) == {0.3}  # 120 rows in batches of 32: 4 steps an epoch
    expected, _ = _fit(task, lr=0.15)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(halved), rf.tree_leaves(expected), strict=True))


def test_accuracy_uses_labels_or_one_hot_targets_alike(task):
    model, x, target, _ = task
    params = model.init(0)
    labels = target.argmax(dim=1)
    assert rf.evaluate(model, rf.mse_loss, params, x, target)[1] == rf.accuracy(model, params, x, labels)
    logistic = rf.logistic_model()
    p = logistic.init(0)
    assert rf.evaluate(logistic, rf.cross_entropy_loss, p, x, labels)[1] == rf.accuracy(logistic, p, x, labels)


def test_fit_never_changes_the_callers_params(task):
    model, x, target, _ = task
    params = model.init(1)
    before = rf.tree_map(torch.clone, params)
    new, _ = rf.fit(model, rf.mse_loss, params, x, target, epochs=2, batch_size=16, lr=0.5, generator=0)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params), rf.tree_leaves(before), strict=True))
    assert not (set(map(torch.Tensor.data_ptr, rf.tree_leaves(new))) & set(map(torch.Tensor.data_ptr,
                                                                             rf.tree_leaves(params))))


def test_without_recording_the_history_is_empty_and_the_params_the_same(task):
    recorded, history = _fit(task)
    alone, empty = _fit(task, record_history=False)
    assert empty == rf.History() and history.epochs == 4
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(recorded), rf.tree_leaves(alone), strict=True))


def test_zero_epochs_returns_the_params_unchanged_but_never_the_callers_own_tensors(task):
    model, x, target, _ = task
    params = model.init(1)
    new, history = rf.fit(model, rf.mse_loss, params, x, target, epochs=0, batch_size=8, lr=0.1, generator=0)
    assert history == rf.History()
    assert all(torch.equal(a, b) and a is not b
               for a, b in zip(rf.tree_leaves(new), rf.tree_leaves(params), strict=True))


def test_fit_rejects_test_data_of_mismatched_rows(task):
    model, x, target, (x_test, target_test) = task
    with pytest.raises(ValueError, match=r"fit: test: x has 60 rows but target has 59"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=8, lr=0.1, generator=0,
               test=(x_test, target_test[:59]))
