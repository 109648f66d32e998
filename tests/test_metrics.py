"""Metrics that fit the task: fit's history, evaluate, predict and accuracy for classes, binary outputs and
regressions (issue 16, "Silent wrong metrics for one-output models")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rdl_functional as rf

N = 64


def _data(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(N, 2)`` and the target of each kind of task, from the disc data set."""
    x, labels = rf.disc_dataset(N, seed)
    value = (x[:, 0] + 2 * x[:, 1]).unsqueeze(1)  # a regression's target, (N, 1)
    return x, {
        "labels": labels,
        "one_hot": rf.one_hot(labels, 2),
        "binary": labels.to(x.dtype).unsqueeze(1),
        "binary_flat": labels.to(x.dtype),
        "value": value,
        "value_flat": value.reshape(N),
        "values": torch.cat([value, x[:, :1] - x[:, 1:]], dim=1),
    }[kind]


def _head(outputs: int | None, *tail: rf.Layer) -> rf.Layer:
    """An MLP with ``outputs`` outputs per row, or one output as ``(batch,)`` for ``None``."""
    last = rf.linear(8, outputs or 1)
    flat = () if outputs else (rf.flatten(0),)  # (batch, 1) -> (batch,)
    return rf.compose(rf.linear(2, 8), rf.tanh, last, *flat, *tail)


# Each kind of task, as a user would set it up: (id, model, loss, target, the task inferred).
KINDS = [
    ("classes, int labels", _head(2), rf.cross_entropy_loss, "labels", "classification"),
    ("classes, one-hot", _head(2, rf.tanh), rf.mse_loss, "one_hot", "classification"),
    ("binary logit (n, 1)", _head(1), rf.bce_with_logits_loss(), "binary", "binary_logit"),
    ("binary logit (n,)", _head(None), rf.bce_with_logits_loss(), "binary_flat", "binary_logit"),
    ("binary probability (n, 1)", _head(1, rf.sigmoid), rf.mse_loss, "binary", "binary_probability"),
    ("binary probability (n,)", _head(None, rf.sigmoid), rf.mse_loss, "binary_flat", "binary_probability"),
    ("regression (n, 1)", _head(1), rf.mse_loss, "value", "regression"),
    ("regression (n,)", _head(None), rf.huber_loss(), "value_flat", "regression"),
    ("regression (n, 2)", _head(2), rf.l1_loss(), "values", "regression"),
]


def _oracle(task: str, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The metrics computed plainly from their definitions, in float64."""
    if task == "classification":
        labels = target.argmax(dim=1) if target.is_floating_point() else target
        return {"accuracy": (pred.argmax(dim=1) == labels).double().mean().item()}
    if task.startswith("binary"):
        threshold = 0.0 if task == "binary_logit" else 0.5
        return {"accuracy": ((pred.reshape(-1) > threshold) == (target.reshape(-1) > 0.5)).double().mean().item()}
    p, t = pred.double().reshape(N, -1), target.double().reshape(N, -1)
    r2 = [1 - ((p[:, j] - t[:, j]) ** 2).sum() / ((t[:, j] - t[:, j].mean()) ** 2).sum() for j in range(p.shape[1])]
    return {"rmse": F.mse_loss(p, t).sqrt().item(), "r2": torch.stack(r2).mean().item()}


@pytest.mark.parametrize(("model", "loss", "kind", "task"), [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_every_kind_of_task_measures_what_fits_it_in_fit_evaluate_predict_and_accuracy(model, loss, kind, task):
    x, target = _data(kind, 0)
    test = _data(kind, 1)
    params, history = rf.fit(model, loss, model.init(0), x, target, epochs=2, batch_size=16, lr=0.1, generator=0,
                             test=test)
    assert history.task == task
    measured, unmeasured = (("accuracy",), ("rmse", "r2")) if task != "regression" else (("rmse", "r2"), ("accuracy",))
    for name in measured:
        assert len(getattr(history, f"train_{name}")) == len(getattr(history, f"test_{name}")) == 2
    for name in unmeasured:
        assert getattr(history, f"train_{name}") == getattr(history, f"test_{name}") == ()
    for (xs, ts), prefix in (((x, target), "train"), (test, "test")):
        result = rf.evaluate(model, loss, params, xs, ts)
        pred = model.apply(params, xs)
        assert result.task == task and result.loss == loss(pred, ts).item()
        assert result.loss == getattr(history, f"{prefix}_loss")[-1]
        for name, value in _oracle(task, pred, ts).items():
            assert getattr(result, name) == pytest.approx(value, rel=1e-12, abs=1e-12)
            assert getattr(history, f"{prefix}_{name}")[-1] == getattr(result, name)
        for name in unmeasured:
            assert getattr(result, name) is None
    predicted = rf.predict(model, params, x, task=history.task)
    pred = model.apply(params, x)
    if task == "regression":
        assert torch.equal(predicted, pred)
        with pytest.raises(ValueError, match=r"accuracy: a regression has no accuracy; rf.evaluate measures its RMSE"):
            rf.accuracy(model, params, x, target, task=task)
        return
    threshold = 0.5 if task == "binary_probability" else 0.0
    expected = pred.argmax(dim=1) if task == "classification" else pred.reshape(N) > threshold
    assert predicted.dtype == torch.int64 and predicted.shape == (N,) and torch.equal(predicted, expected.long())
    accuracy = rf.accuracy(model, params, x, target, task=history.task)
    assert accuracy == rf.evaluate(model, loss, params, x, target).accuracy
    labels = target.argmax(dim=1) if kind == "one_hot" else target.reshape(N)
    assert accuracy == (predicted == labels).double().mean().item()


# ---------------------------------------------------------------------------
# One test per defect of the issue, each failing before the fix


def test_regression_history_records_rmse_and_r2_not_an_accuracy_of_one_every_epoch():
    x, target = _data("value", 0)
    model = _head(1)
    _, history = rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=3, batch_size=16, lr=0.1, generator=0)
    # Before: train_accuracy was (1.0, 1.0, 1.0), the argmax of one column against the argmax of one column.
    assert history.train_accuracy == ()
    assert len(history.train_rmse) == len(history.train_r2) == 3
    assert history.train_rmse[-1] < history.train_rmse[0] and history.train_r2[-1] > history.train_r2[0]


def test_evaluate_of_a_regression_gives_rmse_and_r2_not_an_accuracy_of_one():
    x = torch.linspace(0, 1, 10, dtype=torch.float64).reshape(10, 1)
    params = {"weight": torch.ones(1, 1, dtype=torch.float64), "bias": torch.zeros(1, dtype=torch.float64)}
    result = rf.evaluate(rf.linear(1, 1), rf.mse_loss, params, x, 2 * x)  # predicts x for 2x
    assert result.task == "regression" and result.accuracy is None
    assert result.rmse == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-12)
    assert result.r2 == pytest.approx(1 - (x ** 2).sum().item() / ((2 * x - x.mean() * 2) ** 2).sum().item(), rel=1e-12)
    with pytest.raises(TypeError, match=r"evaluate: a regression has no accuracy to unpack as \(loss, accuracy\); "
                                        r"read its .loss, .rmse and .r2"):
        _, _ = result


def test_r2_of_a_constant_target_is_one_if_exact_else_zero_as_scikit_learn_has_it():
    x = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    flat = {"weight": torch.zeros(1, 1, dtype=torch.float64), "bias": torch.full((1,), 3.0, dtype=torch.float64)}
    exact = rf.evaluate(rf.linear(1, 1), rf.mse_loss, flat, x, torch.full((3, 1), 3.0, dtype=torch.float64))
    off = rf.evaluate(rf.linear(1, 1), rf.mse_loss, flat, x, torch.full((3, 1), 4.0, dtype=torch.float64))
    assert (exact.task, exact.r2, exact.rmse) == ("regression", 1.0, 0.0)
    assert (off.r2, off.rmse) == (0.0, 1.0)  # not 0/0 nor -inf


def test_predict_of_a_one_output_model_is_never_always_zero():
    model, x = rf.linear(2, 1), torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.2, 0.0]])
    params = {"weight": torch.tensor([[1.0, 0.0]]), "bias": torch.zeros(1)}
    # Before: argmax over one column, always 0, whatever the outputs (1.0, -1.0, 0.2).
    assert rf.predict(model, params, x, task="binary_logit").tolist() == [1, 0, 1]
    assert rf.predict(model, params, x, task="binary_probability").tolist() == [1, 0, 0]
    assert torch.equal(rf.predict(model, params, x, task="regression"), model.apply(params, x))
    with pytest.raises(ValueError, match=r"predict: the model gives one output per row, which may be a logit, a "
                                         r"probability or a value: pass task='binary_logit'"):
        rf.predict(model, params, x)


def test_accuracy_with_binary_labels_is_never_the_share_of_label_zero():
    model, x = rf.linear(2, 1), torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.2, 0.0], [-3.0, 0.0]])
    params = {"weight": torch.tensor([[1.0, 0.0]]), "bias": torch.zeros(1)}
    labels = torch.tensor([1, 1, 0, 0])  # right, wrong, wrong, right at 0; right, wrong, right, right at 0.5
    assert rf.accuracy(model, params, x, labels, task="binary_logit") == 0.5
    assert rf.accuracy(model, params, x, labels.reshape(4, 1).float(), task="binary_probability") == 0.75
    # Before: 0.5 here too, by chance: the share of label 0, whatever the model.
    with pytest.raises(ValueError, match=r"accuracy: the model gives one output per row, which may be a logit, a "
                                         r"probability or a value, and there is no loss to tell which"):
        rf.accuracy(model, params, x, labels)


def test_a_model_with_an_n_output_never_dies_in_evaluate_after_a_trained_epoch():
    x, target = _data("binary_flat", 0)
    model, seen = _head(None), []
    # Before: a whole epoch trained, then IndexError in evaluate's argmax(dim=1).
    _, history = rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=2, batch_size=16, lr=0.1, generator=0,
                        test=_data("binary_flat", 1), callback=lambda epoch, *_: seen.append(epoch))
    assert seen == [1, 2] and history.task == "binary_probability" and len(history.test_accuracy) == 2


def test_fit_refuses_a_test_set_the_loss_cannot_take_before_the_first_step():
    x, target = _data("one_hot", 0)
    x_test, labels_test = rf.disc_dataset(10, 1)
    model, steps = _head(2), []

    def counting(params, grads, lr):
        steps.append(lr)
        return rf.sgd_step(params, grads, lr)

    # Before: an epoch of training, then mse_loss's error from the first evaluation of the test set.
    with pytest.raises(ValueError, match=r"fit: test: mse_loss.apply: target has shape \(2,\) but pred has \(2, 2\).* "
                                         r"\(on the test set's first rows\)"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=16, lr=0.1, generator=0,
               optimizer=counting, test=(x_test, labels_test))
    assert steps == []


def test_fit_refuses_a_task_the_model_cannot_serve_before_the_first_step():
    x, target = _data("binary", 0)
    model, steps = _head(1), []

    def counting(params, grads, lr):
        steps.append(lr)
        return rf.sgd_step(params, grads, lr)

    with pytest.raises(ValueError, match=r"fit: task='classification' takes one output per class \(at least 2\), but "
                                         r"the model gives \(1,\) per row; for one output per row, pass task="):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=16, lr=0.1, generator=0,
               optimizer=counting, task="classification")
    assert steps == []


# ---------------------------------------------------------------------------
# The task: inferred, overridden, checked


def test_an_explicit_task_overrides_the_inference():
    x, target = _data("binary", 0)
    model = _head(1)
    _, inferred = rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=16, lr=0.1, generator=0)
    _, told = rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=16, lr=0.1, generator=0,
                     task="regression")
    assert (inferred.task, told.task) == ("binary_probability", "regression")
    assert told.train_accuracy == () and len(told.train_rmse) == 1 and told.train_loss == inferred.train_loss
    soft = rf.one_hot(_data("labels", 0)[1], 2) * 0.8 + 0.1  # label smoothing: no longer one-hot rows
    params = _head(2).init(0)
    assert rf.evaluate(_head(2), rf.mse_loss, params, x, soft).task == "regression"
    assert rf.evaluate(_head(2), rf.mse_loss, params, x, soft, task="classification").accuracy == rf.accuracy(
        _head(2), params, x, soft.argmax(dim=1))


def test_without_recording_there_is_no_task_and_no_probe():
    x, target = _data("value", 0)
    calls = []
    model = _head(1)
    counted = rf.Layer(init=model.init, apply=lambda p, xs: calls.append(len(xs)) or model.apply(p, xs),
                       vjp=model.vjp, name="counted")
    _, history = rf.fit(counted, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=16, lr=0.1, generator=0,
                        record_history=False)
    assert history == rf.History() and history.task is None and calls == []


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda m, p, x, t: rf.evaluate(m, rf.mse_loss, p, x, t, task="binary"), ValueError,
     r"evaluate: task must be one of 'classification', 'binary_logit', 'binary_probability', 'regression' \(or None, "
     r"to infer it\), got 'binary'"),
    (lambda m, p, x, t: rf.predict(m, p, x, task=1), TypeError, r"predict: task must be a str \(one of "),
    (lambda m, p, x, t: rf.evaluate(m, rf.mse_loss, p, x, t[:, :1]), ValueError,
     r"evaluate: the model gives \(2,\) per row and the target \(1,\) \(torch.float32\), which is neither a class "
     r"label \(int64, \(\) per row\) nor values shaped as the output"),
    (lambda m, p, x, t: rf.evaluate(m, rf.cross_entropy_loss, p, x, t.argmax(dim=1), task="regression"), ValueError,
     r"evaluate: task='regression' compares each output with a target of its own, but the model gives \(2,\) per "
     r"row and the target \(\) \(torch.int64\)"),
    (lambda m, p, x, t: rf.accuracy(m, p, x, t[:, :1].long(), task="classification"), ValueError,
     r"accuracy: task='classification' compares with int64 labels \(\(\) per row\) or one-hot rows \(\(2,\)\), but "
     r"the model gives \(2,\) per row and the target \(1,\) \(torch.int64\)"),
    (lambda m, p, x, t: rf.predict(_head(1), _head(1).init(0), x, task="classification"), ValueError,
     r"predict: task='classification' takes one output per class \(at least 2\), but the model gives \(1,\) per "
     r"row; for one output per row, pass task='binary_logit'"),
    (lambda m, p, x, t: rf.fit(_head(1), rf.mse_loss, _head(1).init(0), x, t, epochs=1, batch_size=8, lr=0.1,
                               generator=0), ValueError,
     r"fit: the model gives \(1,\) per row and the target \(2,\) \(torch.float32\): with one output per row, the "
     r"target needs one value per row"),
])
def test_metric_errors_say_what_arrived_and_what_to_pass(call, error, match):
    x, target = _data("one_hot", 0)
    model = _head(2, rf.tanh)
    with pytest.raises(error, match=match):
        call(model, model.init(0), x, target)


def test_a_regression_history_survives_a_checkpoint_by_name(tmp_path):
    x, target = _data("value", 0)
    model, path = _head(1), tmp_path / "run.ckpt"
    run = dict(epochs=3, batch_size=16, lr=0.1, generator=0, test=_data("value", 1))
    _, whole = rf.fit(model, rf.mse_loss, model.init(0), x, target, **run)
    rf.fit(model, rf.mse_loss, model.init(0), x, target, **{**run, "epochs": 3}, checkpoint=path,
           callback=lambda epoch, *_: None)
    saved = rf.read_checkpoint(path).history
    assert saved["train_rmse"] == list(whole.train_rmse) and saved["test_r2"] == list(whole.test_r2)
    assert saved["train_accuracy"] == []
    _, resumed = rf.fit(model, rf.mse_loss, model.init(0), x, target, **run, checkpoint=path)  # all done: read back
    assert resumed == whole and resumed.task == "regression"
    with pytest.raises(ValueError, match=r"records another run \(task: \"regression\" in the checkpoint, "
                                         r"\"binary_probability\" now\)"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, **run, checkpoint=path, task="binary_probability")


def test_fit_stacked_measures_each_model_as_fit_does():
    data = [_data("value", seed) for seed in (0, 1)]
    x, target = torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data])
    model = _head(None)
    target = target.reshape(2, N)  # (models, n): one output per row, as the model gives
    params = rf.stack_params([model.init(seed) for seed in (0, 1)])
    trained, histories = rf.fit_stacked(model, rf.mse_loss, params, x, target, epochs=2, batch_size=16, lr=0.1,
                                        generators=[torch.Generator().manual_seed(s) for s in (0, 1)],
                                        test=(x, target))
    for m, history in enumerate(histories):
        alone = rf.evaluate(model, rf.mse_loss, rf.unstack_params(trained)[m], x[m], target[m])
        assert history.task == "regression" and history.train_accuracy == ()
        assert history.train_rmse[-1] == pytest.approx(alone.rmse, rel=1e-6)
        assert history.test_r2[-1] == pytest.approx(alone.r2, rel=1e-6)
