"""What a model's outputs mean, and the metrics that fit: classes, a yes/no, or values.

A **task** names what the outputs are, and with it what :func:`~rdl_functional.fit`'s
history, :func:`~rdl_functional.evaluate`, :func:`~rdl_functional.predict` and
:func:`~rdl_functional.accuracy` measure:

- ``"classification"``: one score per class, ``(batch, classes)``, against int64
  labels ``(batch,)`` or one-hot rows ``(batch, classes)``. Predicted: the class of
  the largest score. Measured: accuracy.
- ``"binary_logit"``: each output a logit, as :func:`~rdl_functional.bce_with_logits_loss`
  takes; ``(batch,)`` or ``(batch, 1)`` (several outputs are several yes/no labels).
  Predicted: 1 where the output is above 0. Measured: accuracy.
- ``"binary_probability"``: each output a probability (a ``sigmoid`` output, under
  MSE or a BCE of your own), or a value regressed onto 0 and 1. Predicted: 1 where
  the output is above 0.5. Measured: accuracy.
- ``"regression"``: values of the target's shape. Predicted: the output itself.
  Measured: RMSE and R² (no accuracy).

A target counts as 1 where it is above 0.5. Where no task is given, it is inferred from the
loss, the target and the model's output, in this order:

1. with ``bce_with_logits_loss`` the outputs are logits: ``"binary_logit"``;
2. several outputs per row: ``"classification"`` when the target holds int labels (one
   dimension fewer than the output) or one-hot rows, else ``"regression"``;
3. one output per row (``(batch,)`` or ``(batch, 1)``): ``"binary_probability"`` when every
   target is 0 or 1, else ``"regression"``.

Pass ``task=`` where this guesses wrong: a loss of your own on logits (``"binary_logit"``),
classes with soft labels (``"classification"``), a regression onto 0 and 1, or several outputs
regressed (``predict`` has no target to look at). Without a loss to read, ``predict`` and
``accuracy`` cannot tell a logit from a probability or a value, and ask for ``task`` on a
one-output model: ``rf.fit`` returns the one it used as ``history.task``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import Tensor

__all__ = ["TASKS", "Evaluation"]

TASKS = ("classification", "binary_logit", "binary_probability", "regression")
"""The tasks a model's outputs can serve, as ``task=`` names them."""

_THRESHOLDS = {"binary_logit": 0.0, "binary_probability": 0.5}
_ASK = ("pass task='binary_logit' (a logit: class 1 above 0), task='binary_probability' (class 1 above 0.5) or "
        "task='regression' (after rf.fit: task=history.task)")


@attrs.frozen
class Evaluation:
    """What :func:`~rdl_functional.evaluate` measured: the loss and the metrics that fit the task.

    Attributes:
        loss: the loss over the whole set.
        task: one of :data:`TASKS`, given or inferred.
        accuracy: the fraction of rows predicted right (of labels, for several yes/no outputs);
            ``None`` for a regression.
        rmse: for a regression, ``√(mean((pred − target)²))`` over every output; else ``None``.
        r2: for a regression, the coefficient of determination ``1 − Σ(pred − target)² / Σ(target − mean)²``
            of each output over the rows, averaged over the outputs (scikit-learn's ``r2_score``; an output
            whose target is constant scores 1.0 if predicted exactly, else 0.0); else ``None``.

    ``loss, accuracy = rf.evaluate(...)`` (and ``[0]``, ``[1]``) read a task with an accuracy as the
    ``(loss, accuracy)`` pair ``evaluate`` returned before regressions were told apart; a regression
    refuses to, naming its fields.
    """

    loss: float
    task: str
    accuracy: float | None = None
    rmse: float | None = None
    r2: float | None = None

    def __iter__(self) -> Iterator[float]:
        if self.accuracy is None:
            raise TypeError(f"evaluate: a {self.task} has no accuracy to unpack as (loss, accuracy); read its "
                            ".loss, .rmse and .r2")
        return iter((self.loss, self.accuracy))

    def __getitem__(self, index: int) -> float:
        return tuple(self)[index]

    def _measured(self) -> dict[str, float]:
        """The metrics measured, by the names of ``History``'s fields (without ``train_``/``test_``)."""
        values = {"loss": self.loss, "accuracy": self.accuracy, "rmse": self.rmse, "r2": self.r2}
        return {name: value for name, value in values.items() if value is not None}


def check_task(where: str, task: Any) -> None:
    if task is not None and not isinstance(task, str):
        raise TypeError(f"{where}: task must be a str (one of {', '.join(map(repr, TASKS))}) or None, got "
                        f"{type(task).__name__}")
    if task is not None and task not in TASKS:
        raise ValueError(f"{where}: task must be one of {', '.join(map(repr, TASKS))} (or None, to infer it), "
                         f"got {task!r}")


def _outputs(pred: Tensor, rows: int) -> int:
    """The number of outputs per row: the output's size past its ``rows`` leading (row, or model and row) dims."""
    return math.prod(pred.shape[rows:])


def _one_hot(target: Tensor) -> bool:
    return bool((((target == 0) | (target == 1)).all() & (target.sum(dim=-1) == 1).all()).item())


def infer_task(where: str, loss: Any, pred: Tensor, target: Tensor, rows: int = 1) -> str:
    """The task of ``pred`` against ``target`` (the module docstring's rules); ``loss`` is ``None`` where there is none.

    Only the shapes past the ``rows`` leading dims are compared, so ``pred`` may be a probe of a row or two (the
    rows themselves are checked where the data comes in); ``target``'s values are read whole.
    """
    name = getattr(loss, "name", "")
    if name.startswith("bce_with_logits_loss"):
        return "binary_logit"
    outputs, given = tuple(pred.shape[rows:]), tuple(target.shape[rows:])
    shown = f"the model gives {outputs} per row and the target {given} ({target.dtype})"
    if _outputs(pred, rows) != 1:
        if not target.is_floating_point() and given == outputs[:-1]:
            return "classification"
        if given == outputs:
            return "classification" if _one_hot(target) else "regression"
        raise ValueError(f"{where}: {shown}, which is neither a class label (int64, {outputs[:-1]} per row) nor "
                         f"values shaped as the output")
    if _outputs(target, rows) != 1:
        raise ValueError(f"{where}: {shown}: with one output per row, the target needs one value per row")
    if loss is None:
        raise ValueError(f"{where}: the model gives one output per row, which may be a logit, a probability or a "
                         f"value, and there is no loss to tell which: {_ASK}")
    return "binary_probability" if bool(((target == 0) | (target == 1)).all().item()) else "regression"


def check_fits(where: str, task: str, pred: Tensor, target: Tensor, rows: int = 1) -> None:
    """Refuse a target, or an output, that ``task`` cannot measure, by name (shapes past the rows, as above)."""
    outputs, given = tuple(pred.shape[rows:]), tuple(target.shape[rows:])
    shown = f"the model gives {outputs} per row and the target {given} ({target.dtype})"
    if task == "classification":
        _check_classes(where, outputs)
        if (not target.is_floating_point() and given == outputs[:-1]) or given == outputs:
            return
        raise ValueError(f"{where}: task='classification' compares with int64 labels ({outputs[:-1]} per row) or "
                         f"one-hot rows ({outputs}), but {shown}")
    if _outputs(target, rows) != _outputs(pred, rows):
        raise ValueError(f"{where}: task={task!r} compares each output with a target of its own, but {shown}")


def measure(pred: Tensor, target: Tensor, task: str, rows: int = 1) -> dict[str, Tensor]:
    """The metrics of ``task``, in float64, each of shape ``pred.shape[:rows - 1]`` (one per stacked model)."""
    if task == "classification":
        labels = target.argmax(dim=-1) if target.shape == pred.shape else target
        return {"accuracy": (pred.argmax(dim=-1) == labels).double().flatten(rows - 1).mean(dim=-1)}
    by_row = (*pred.shape[:rows], _outputs(pred, rows))  # (..., rows, outputs)
    if task in _THRESHOLDS:
        right = (pred.reshape(by_row) > _THRESHOLDS[task]) == (target.reshape(by_row) > 0.5)
        return {"accuracy": right.double().flatten(rows - 1).mean(dim=-1)}
    p, t = pred.reshape(by_row).double(), target.reshape(by_row).double()
    squared = (p - t) ** 2
    residual = squared.sum(dim=rows - 1)  # Σ over rows, for each output
    total = ((t - t.mean(dim=rows - 1, keepdim=True)) ** 2).sum(dim=rows - 1)
    # R² of an output whose target is constant is 0/0 or −∞: scikit-learn's 1.0 (exact) or 0.0 (not) instead.
    r2 = torch.where(total > 0, 1 - residual / total, (residual == 0).double())
    return {"rmse": squared.flatten(rows - 1).mean(dim=-1).sqrt(), "r2": r2.mean(dim=-1)}


def predictions(pred: Tensor, task: str, rows: int = 1) -> Tensor:
    """``task``'s predictions from the model's output ``pred``."""
    if task == "classification":
        return pred.argmax(dim=-1)
    if task in _THRESHOLDS:
        one = _outputs(pred, rows) == 1  # (batch,), never (batch, 1), which would broadcast against (batch,) labels
        return (pred.reshape(pred.shape[:rows]) if one else pred).gt(_THRESHOLDS[task]).long()
    return pred


def task_of_outputs(where: str, pred: Tensor, task: str | None, rows: int = 1) -> str:
    """The task of predictions without a target: ``task``, or classes for several outputs; one output must be told."""
    if task is None:
        if _outputs(pred, rows) == 1:
            raise ValueError(f"{where}: the model gives one output per row, which may be a logit, a probability or a "
                             f"value: {_ASK}")
        return "classification"
    if task == "classification":
        _check_classes(where, tuple(pred.shape[rows:]))
    return task


def _check_classes(where: str, outputs: tuple[int, ...]) -> None:
    if not outputs or outputs[-1] < 2:
        raise ValueError(f"{where}: task='classification' takes one output per class (at least 2), but the model "
                         f"gives {outputs} per row; for one output per row, {_ASK}")
