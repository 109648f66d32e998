"""fit as a thin loop over the pure step: the same bits as a loop of train_step, batches from tensors or any
iterable, drop_last, a validation split, hooks (per step, per epoch, at the end), early stopping that keeps the
best state, and data-parallel as a transform of the step."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import rdl_functional as rf
import rdl_functional.train as train
from rdl_functional.distributed import _sharded


def _data(n=60, dtype=torch.float32):
    x, labels = rf.disc_dataset(n, 0)
    return x.to(dtype), rf.one_hot(labels, 2).to(dtype)


def _equal_trees(a, b):
    leaves_a, leaves_b = rf.tree_flatten(a), rf.tree_flatten(b)
    assert list(leaves_a) == list(leaves_b)
    return all(torch.equal(leaves_a[k], leaves_b[k]) for k in leaves_a)


def _step_loop(model, optimizer, params, x, target, *, epochs, batch_size, drop_last=False, seed=0):
    """The loop fit runs, written with train_step: each epoch's shuffle drawn from state.generator, put back, then
    the steps over slices."""
    step = rf.train_step(model, rf.mse_loss, optimizer)
    state = rf.train_state(model, optimizer, params, generator=seed)
    losses = []
    n = x.shape[0]
    stop = n - n % batch_size if drop_last else n
    for _ in range(epochs):
        g = torch.Generator()
        g.set_state(state.generator)
        order = torch.randperm(n, generator=g)
        state = attrs.evolve(state, generator=g.get_state())
        for start in range(0, stop, batch_size):
            rows = order[start:start + batch_size]
            state, metrics = step(state, x[rows], target[rows])
            losses.append(metrics["loss"])
    return state, losses


MODELS = {
    "plain, adam": (rf.compose(rf.linear(2, 6), rf.relu, rf.linear(6, 2)), lambda: rf.adam(1e-2)),
    "batch norm and dropout, momentum": (
        rf.compose(rf.linear(2, 6), rf.batch_norm(6), rf.relu, rf.dropout(0.3), rf.linear(6, 2)),
        lambda: rf.sgd(0.1, momentum=0.9)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("drop_last", [False, True])
def test_fit_over_tensors_equals_a_loop_of_train_step_bit_for_bit(name, drop_last):
    model, make = MODELS[name]
    x, target = _data(60)
    seen = []
    params, history = rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=3, batch_size=16,
                             optimizer=make(), generator=0, drop_last=drop_last,
                             on_step=lambda progress: seen.append(progress.metrics["loss"]))
    state, losses = _step_loop(model, make(), model.init(0), x, target, epochs=3, batch_size=16,
                               drop_last=drop_last)
    assert len(seen) == len(losses) == 3 * (3 if drop_last else 4)
    assert _equal_trees(params, state.params)
    assert _equal_trees(history.opt_state, state.opt_state)
    assert all(torch.equal(a, b) for a, b in zip(seen, losses, strict=True))
    if isinstance(model, rf.StatefulLayer):
        assert _equal_trees(history.model_state, state.model_state)


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_over_a_dataloader_equals_the_step_loop_over_the_same_batches(name):
    model, make = MODELS[name]
    x, target = _data(50)

    def loader():  # two loaders of one seed: the same shuffles, so the same batches
        return DataLoader(TensorDataset(x, target), batch_size=8, shuffle=True,
                          generator=torch.Generator().manual_seed(3))

    params, history = rf.fit(model, rf.mse_loss, model.init(0), loader(), epochs=2, optimizer=make(), generator=0)
    opt = make()
    step, state = rf.train_step(model, rf.mse_loss, opt), rf.train_state(model, opt, model.init(0), generator=0)
    again = loader()
    for _ in range(2):
        for xb, tb in again:
            state, _ = step(state, xb, tb)
    assert _equal_trees(params, state.params)
    assert _equal_trees(history.opt_state, state.opt_state)
    # The history measures the rows each epoch trained on (all 50, in its batches' order).
    expected = rf.evaluate(model, rf.mse_loss, params, x, target, state=history.model_state, task="classification")
    assert history.epochs == 2 and history.train_loss[-1] == pytest.approx(expected.loss, rel=1e-6)


def test_a_list_of_batches_and_a_one_pass_iterator_for_one_epoch():
    model = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2))
    x, target = _data(40)
    batches = [(x[i:i + 10], target[i:i + 10]) for i in range(0, 40, 10)]
    from_list, _ = rf.fit(model, rf.mse_loss, model.init(0), batches, epochs=1, optimizer=rf.sgd(0.1), generator=0,
                          record_history=False)
    from_iterator, _ = rf.fit(model, rf.mse_loss, model.init(0), iter(batches), epochs=1, optimizer=rf.sgd(0.1),
                              generator=0, record_history=False)
    assert _equal_trees(from_list, from_iterator)


def test_validation_holds_out_the_last_rows_and_measures_them_as_test():
    model = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2))
    x, labels = rf.disc_dataset(50, 0)
    run = dict(epochs=2, batch_size=10, optimizer=rf.sgd(0.1), generator=0)
    params, history = rf.fit(model, rf.cross_entropy_loss, model.init(0), x, labels, validation=0.2, **run)
    same, expected = rf.fit(model, rf.cross_entropy_loss, model.init(0), x[:40], labels[:40],
                            test=(x[40:], labels[40:]), **run)
    assert _equal_trees(params, same) and history == expected and len(history.test_loss) == 2
    paired, _ = rf.fit(model, rf.cross_entropy_loss, model.init(0), x[:40], labels[:40],
                       validation=(x[40:], labels[40:]), **run)
    assert _equal_trees(paired, same)


def test_early_stopping_returns_the_best_epochs_params_and_stops_after_patience():
    model = rf.compose(rf.linear(2, 8), rf.relu, rf.linear(8, 2))
    x, labels = rf.disc_dataset(120, 1)
    snapshots = {}
    params, history = rf.fit(model, rf.cross_entropy_loss, model.init(0), x, labels, epochs=60, batch_size=20,
                             optimizer=rf.sgd(4.0), generator=0, validation=0.25, patience=3,
                             callback=lambda epoch, p, h: snapshots.__setitem__(epoch, p))
    losses = history.test_loss
    best = min(range(len(losses)), key=lambda i: (losses[i], i)) + 1
    assert history.best_epoch == best
    assert history.epochs == best + 3 < 60  # stopped early, three epochs without improvement
    assert _equal_trees(params, snapshots[best])
    assert not _equal_trees(params, snapshots[history.epochs])


class _Recorder:
    """A hook of the protocol: on_step, on_epoch (stops after epoch 2), on_end (returns epoch 1's state)."""

    def __init__(self):
        self.steps, self.epochs, self.first = [], [], None

    def on_step(self, progress):
        self.steps.append((progress.epoch, progress.step_in_epoch, progress.steps, progress.rows))

    def on_epoch(self, progress):
        self.epochs.append((progress.epoch, progress.history.epochs))
        if progress.epoch == 1:
            state = progress.state
            self.first = attrs.evolve(state, params=rf.tree_map(torch.clone, state.params))
        progress.stop = progress.epoch == 2

    def on_end(self, progress):
        return self.first


def test_a_hook_sees_each_step_and_epoch_can_stop_and_choose_the_state_returned():
    model = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2))
    x, target = _data(25)
    hook = _Recorder()
    params, history = rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=5, batch_size=10,
                             optimizer=rf.adam(1e-2), generator=0, hooks=[hook])
    assert hook.steps == [(e, s, 3 * (e - 1) + s, min(10 * s, 25)) for e in (1, 2) for s in (1, 2, 3)]
    assert hook.epochs == [(1, 1), (2, 2)] and history.epochs == 2
    assert _equal_trees(params, hook.first.params)
    assert int(history.opt_state["count"]) == 3  # epoch 1's optimizer state, read out of the in-place runner


def test_a_users_torch_generator_is_advanced_as_fit_drew_from_it():
    model = rf.compose(rf.linear(2, 4), rf.dropout(0.5), rf.linear(4, 2))
    x, target = _data(20)
    g = torch.Generator().manual_seed(5)
    rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=10, optimizer=rf.sgd(0.1),
           generator=g)
    state, _ = _step_loop(model, rf.sgd(0.1), model.init(0), x, target, epochs=1, batch_size=10, seed=5)
    assert torch.equal(g.get_state(), state.generator)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"target": "T"}, ValueError, r"fit: target goes with \(x, target\) tensors; an iterable of batches"),
    ({"batch_size": 4}, ValueError, r"fit: batch_size goes with \(x, target\) tensors"),
    ({"drop_last": True}, ValueError, r"fit: drop_last goes with \(x, target\) tensors"),
    ({"validation": 0.2}, ValueError, r"fit: validation as a fraction splits \(x, target\) tensors"),
    ({"checkpoint": "C"}, ValueError, r"fit: checkpoint= resumes a run inside an epoch of \(x, target\) tensors"),
])
def test_an_iterable_refuses_what_goes_with_tensors(kwargs, error, match, tmp_path):
    model = rf.linear(2, 2)
    x, target = _data(8)
    if kwargs.get("target") == "T":
        kwargs = {"target": target}
    if kwargs.get("checkpoint") == "C":
        kwargs = {"checkpoint": tmp_path / "run.ckpt"}
    with pytest.raises(error, match=match):
        rf.fit(model, rf.mse_loss, model.init(0), [(x, target)], epochs=1, optimizer=rf.sgd(0.1), generator=0,
               **kwargs)


def test_bad_batches_and_data_are_refused_by_name():
    model = rf.linear(2, 2)
    x, target = _data(8)
    fit = dict(epochs=2, optimizer=rf.sgd(0.1), generator=0)
    with pytest.raises(ValueError, match=r"fit: x is a one-pass iterator \(list_iterator\), used up by the first of "
                                         r"2 epochs; pass a list of batches or a DataLoader"):
        rf.fit(model, rf.mse_loss, model.init(0), iter([(x, target)]), **fit)
    with pytest.raises(TypeError, match=r"fit: batch 1 of x is 3 items; an iterable of batches yields \(x, target\)"):
        rf.fit(model, rf.mse_loss, model.init(0), [(x, target), (x, target, x)], **fit)
    with pytest.raises(TypeError, match=r"fit: x must be a torch.Tensor \(with target\) or an iterable of \(x, "
                                        r"target\) batches such as a DataLoader, got int"):
        rf.fit(model, rf.mse_loss, model.init(0), 3, **fit)
    with pytest.raises(ValueError, match=r"fit: target is missing"):
        rf.fit(model, rf.mse_loss, model.init(0), x, batch_size=4, **fit)
    with pytest.raises(ValueError, match=r"fit: validation=0\.01 holds out 0 of 8 rows; expected a fraction in "
                                         r"\(0, 1\)"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, batch_size=4, validation=0.01, **fit)
    with pytest.raises(ValueError, match=r"fit: test= and validation= both give held-out data"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, batch_size=4, validation=0.5, test=(x, target), **fit)
    with pytest.raises(ValueError, match=r"fit: drop_last=True with 8 rows in batches of 9 leaves no batch"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, batch_size=9, drop_last=True, **fit)
    with pytest.raises(TypeError, match=r"fit: drop_last must be True or False, got int"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, batch_size=4, drop_last=1, **fit)


def test_patience_and_early_stopping_refuse_what_they_cannot_do(tmp_path):
    model = rf.linear(2, 2)
    x, target = _data(8)
    fit = dict(epochs=2, batch_size=4, optimizer=rf.sgd(0.1), generator=0)
    with pytest.raises(ValueError, match=r"fit: patience watches the loss the history records after each epoch; "
                                         r"it needs record_history=True"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, patience=2, record_history=False, **fit)
    with pytest.raises(ValueError, match=r"fit: patience keeps the best epoch's state in memory, which a checkpoint "
                                         r"does not hold"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, patience=2, checkpoint=tmp_path / "c", **fit)
    with pytest.raises(ValueError, match=r"early_stopping: patience must be an int ≥ 1"):
        rf.early_stopping(0)
    with pytest.raises(ValueError, match=r"early_stopping: min_delta must be a number ≥ 0, got -1"):
        rf.early_stopping(2, min_delta=-1)
    with pytest.raises(ValueError, match=r"early_stopping: monitor must name a loss of the history"):
        rf.early_stopping(2, monitor="test_accuracy")
    with pytest.raises(ValueError, match=r"early_stopping: the history holds no test_loss to watch"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, hooks=[rf.early_stopping(1, monitor="test_loss")],
               **fit)


def test_data_parallel_shards_sum_to_the_whole_batch_step():
    """Two ranks simulated in one process (outside a group the all-reduce is the identity): each rank's update
    comes from its shard's share of the gradient, so the two updates add up to the whole batch's."""
    model = rf.compose(rf.linear(2, 5), rf.tanh, rf.linear(5, 2))
    x, target = _data(11, torch.float64)
    params = model.init(0, dtype=torch.float64)
    step = rf.train_step(model, rf.mse_loss, rf.sgd(0.5))
    state = rf.train_state(model, rf.sgd(0.5), params)
    whole, metrics = step(state, x, target)
    shards = [_sharded(step, rank, 2, "test")(state, x, target) for rank in (0, 1)]
    for path, p in rf.tree_flatten(params).items():
        summed = rf.tree_flatten(shards[0][0].params)[path] + rf.tree_flatten(shards[1][0].params)[path] - p
        torch.testing.assert_close(summed, rf.tree_flatten(whole.params)[path])
    torch.testing.assert_close(shards[0][1]["loss"] + shards[1][1]["loss"], metrics["loss"])


def test_data_parallel_is_the_step_itself_in_one_process_and_refuses_what_it_cannot_shard():
    model = rf.linear(2, 2)
    step = rf.train_step(model, rf.mse_loss, rf.sgd(0.1))
    assert rf.data_parallel(step) is step
    with pytest.raises(TypeError, match=r"data_parallel: expected an rf.TrainStep \(rf.train_step\(model, loss, "
                                        r"optimizer\)\), got function"):
        rf.data_parallel(lambda state, x, target: (state, {}))
    summing = rf.train_step(model, rf.l1_loss(reduction="sum"), rf.sgd(0.1))
    with pytest.raises(ValueError, match=r"test: data-parallel training weighs each process's loss by its share"):
        _sharded(summing, 0, 2, "test")


def test_data_parallel_fit_takes_tensors(monkeypatch):
    monkeypatch.setattr(train, "world", lambda: (0, 2))
    model = rf.linear(2, 2)
    x, target = _data(8)
    with pytest.raises(ValueError, match=r"fit: data-parallel training takes \(x, target\) tensors"):
        rf.fit(model, rf.mse_loss, model.init(0), [(x, target)], epochs=1, optimizer=rf.sgd(0.1), generator=0)


def test_hooks_that_are_not_hooks_are_refused_by_name():
    model = rf.linear(2, 2)
    x, target = _data(8)
    fit = dict(epochs=1, batch_size=4, optimizer=rf.sgd(0.1), generator=0)

    class Misspelt:
        def on_epoch_end(self, progress):
            pass

    with pytest.raises(TypeError, match=r"fit: hooks\[1\] \(Misspelt\) has none of the methods on_step\(progress\), "
                                        r"on_epoch\(progress\), on_end\(progress\)"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, hooks=[_Recorder(), Misspelt()], **fit)
    with pytest.raises(TypeError, match=r"fit: hooks must be a list of hooks, got Misspelt"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, hooks=Misspelt(), **fit)
    with pytest.raises(TypeError, match=r"fit: on_step must be a function on_step\(progress\), got int"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, on_step=3, **fit)


def test_an_early_stopping_hook_used_again_starts_afresh_not_from_the_last_runs_best():
    """Regression: a reused rf.early_stopping hook kept the last run's best loss and state, and handed that run's
    params back from a run that never beat it."""
    model = rf.compose(rf.linear(2, 8), rf.relu, rf.linear(8, 2))
    x, labels = rf.disc_dataset(120, 1)
    stop = rf.early_stopping(3)
    run = dict(epochs=12, batch_size=20, optimizer=rf.sgd(0.5), generator=0, validation=0.25)
    first, _ = rf.fit(model, rf.cross_entropy_loss, model.init(0), x, labels, hooks=[stop], **run)
    second, history = rf.fit(model, rf.cross_entropy_loss, model.init(1), x, labels, hooks=[stop], **run)
    alone, alone_history = rf.fit(model, rf.cross_entropy_loss, model.init(1), x, labels,
                                  hooks=[rf.early_stopping(3)], **run)
    assert history.best_epoch == alone_history.best_epoch and _equal_trees(second, alone)
    assert not _equal_trees(second, first)


def test_an_early_stopping_hook_is_refused_with_a_checkpoint_as_patience_is(tmp_path):
    """Regression: patience= with checkpoint= was refused, hooks=[rf.early_stopping(n)] with checkpoint= was not; a
    resumed run loses the best state the hook keeps in memory."""
    model = rf.linear(2, 2)
    x, target = _data(40)
    with pytest.raises(ValueError, match=r"fit: hooks\[0\] \(early stopping\) keeps the best epoch's state in memory, "
                                         r"which a checkpoint does not hold"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=2, batch_size=10, optimizer=rf.sgd(0.1),
               generator=0, validation=0.25, hooks=[rf.early_stopping(2)], checkpoint=tmp_path / "run.ckpt")
    assert not (tmp_path / "run.ckpt").exists()


def test_data_parallel_of_a_compiled_step_names_the_order_that_composes():
    step = rf.train_step(rf.linear(2, 1), rf.mse_loss, rf.sgd(0.1))
    with pytest.raises(TypeError, match=r"got CompiledStep \(data_parallel shards the eager step; compile or capture "
                                        r"the sharded one: rf.compiled\(rf.data_parallel\(step\)\)\)"):
        rf.data_parallel(rf.compiled(step))
