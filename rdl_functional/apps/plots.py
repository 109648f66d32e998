"""Pictures of the tasks: the disc's data and learned boundary, images with their predictions, a confusion
matrix, the training curves.

Needs matplotlib, the optional extra ``rdl_functional[plot]``; the rest of the
library imports without it. Each function returns a ``matplotlib.figure.Figure``
built without pyplot (no global figure state, no display needed);
:func:`save_figure` writes one to a PNG file, whole or not at all.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._files import atomic_write
from ..data import DISC_CENTER, DISC_RADIUS
from ..layers import Layer, Params
from ..stateful import State, StatefulLayer
from ..train import History, predict

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_confusion", "plot_dataset", "plot_decision_boundary", "plot_history", "plot_predictions",
           "plot_seed_spread", "save_figure"]

_CLASS_STYLE = {0: ("outside the disc (0)", "#9e9e9e"), 1: ("inside the disc (1)", "#111111")}


def _figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "rdl_functional's plots need matplotlib: pip install 'rdl_functional[plot]'"
        ) from None
    return Figure(layout="constrained", **kwargs)


def _square_axes(ax: Any, title: str) -> None:
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="x₁", ylabel="x₂", title=title, aspect="equal")
    # Below the square, so that the legend never hides a point.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize="small", frameon=False)


def _disc_outline(ax: Any) -> None:
    angle = torch.linspace(0, 2 * math.pi, 256)
    ax.plot(DISC_CENTER[0] + DISC_RADIUS * angle.cos(), DISC_CENTER[1] + DISC_RADIUS * angle.sin(),
            linestyle="--", color="#1f77b4", linewidth=1.5, label="true boundary, r = 1/√(2π)")


def plot_dataset(x: Tensor, labels: Tensor, *, title: str | None = None) -> Figure:
    """Scatter the points by class, with the disc's true boundary (the seed report's Fig. 3).

    Args:
        x: ``(n, 2)`` points in [0, 1]².
        labels: ``(n,)`` classes, 0 or 1.
    """
    fig = _figure(figsize=(6, 6.6))
    ax = fig.add_subplot()
    for label, (name, color) in _CLASS_STYLE.items():
        points = x[labels == label]
        ax.scatter(points[:, 0], points[:, 1], s=8, color=color, label=f"{name}: {len(points)} points")
    _disc_outline(ax)
    _square_axes(ax, title or f"The disc data set: {len(x)} points in [0, 1]²")
    return fig


def plot_history(history: History, *, title: str | None = None) -> Figure:
    """Loss per epoch and the metric that fits the task, on the training set and the test set (the seed
    report's Fig. 5): accuracy for a classification or a binary task, RMSE (with R² in the legend) for a
    regression (``history.task``)."""
    if not history.epochs:
        raise ValueError("plot_history: the history has no epochs to plot")
    regression = history.task == "regression"
    fig = _figure(figsize=(10, 4.2))
    loss_ax, metric_ax = fig.subplots(1, 2)
    epochs = range(1, history.epochs + 1)
    for name, style in (("train", "-"), ("test", "--")):
        loss = getattr(history, f"{name}_loss")
        if not loss:
            continue
        loss_ax.plot(epochs, loss, style, label=f"{name} (last {loss[-1]:.4f})")
        if regression:
            rmse, r2 = getattr(history, f"{name}_rmse"), getattr(history, f"{name}_r2")
            metric_ax.plot(epochs, rmse, style, label=f"{name} (last {rmse[-1]:.4g}, R² {r2[-1]:.3f})")
        else:
            accuracy = getattr(history, f"{name}_accuracy")
            metric_ax.plot(epochs, [100 * a for a in accuracy], style, label=f"{name} (last {accuracy[-1]:.1%})")
    loss_ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="Loss")
    if regression:
        metric_ax.set(xlabel="epoch", ylabel="RMSE", title="Root mean squared error")
    else:
        metric_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, metric_ax):
        ax.xaxis.set_major_locator(_whole_epochs())
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def plot_seed_spread(histories: list[History], *, title: str | None = None) -> Figure:
    """Test accuracy (RMSE for a regression) and loss per epoch over several runs: the median, and a band from
    the worst to the best.

    The median is :func:`~rdl_functional.summarize`'s: for an even number of
    runs, the mean of the two middle ones.

    One figure per optimizer (or setting) makes them comparable at a glance:
    the line is where a typical seed is, the band how far the seeds scatter.
    """
    if not histories or not all(h.test_loss for h in histories):
        raise ValueError("plot_seed_spread: expected histories with a test set measured each epoch (fit's test=)")
    if len({h.epochs for h in histories}) != 1:
        raise ValueError("plot_seed_spread: the histories have different numbers of epochs")
    tasks = {h.task for h in histories}
    if len(tasks) != 1:
        raise ValueError(f"plot_seed_spread: the histories measure different tasks ({', '.join(map(str, tasks))})")
    regression = tasks == {"regression"}
    fig = _figure(figsize=(10, 4.2))
    metric_ax, loss_ax = fig.subplots(1, 2)
    epochs = range(1, histories[0].epochs + 1)
    metric = ("test_rmse", None) if regression else ("test_accuracy", 100.0)
    for ax, name, scale in ((metric_ax, *metric), (loss_ax, "test_loss", None)):
        values = torch.tensor([getattr(h, name) for h in histories], dtype=torch.float64) * (scale or 1.0)
        # quantile, as summarize's table: torch's median is the lower of the two middle values for an even count
        median = values.quantile(0.5, dim=0)
        ax.fill_between(epochs, values.min(dim=0).values, values.max(dim=0).values, alpha=0.3,
                        label=f"worst to best of {len(histories)} seeds")
        last = f"{median[-1]:.1f}%" if scale else f"{median[-1]:.4f}"
        ax.plot(epochs, median, label=f"median (last {last})")
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(_whole_epochs())
    if regression:
        metric_ax.set(xlabel="epoch", ylabel="test RMSE", title="Test root mean squared error")
    else:
        metric_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="test loss", yscale="log", title="Test loss")
    if title:
        fig.suptitle(title)
    return fig


def plot_decision_boundary(
    model: Layer | StatefulLayer, params: Params, x: Tensor, labels: Tensor, *, resolution: int = 300,
    title: str | None = None, state: State | None = None,
) -> Figure:
    """The class the model predicts over [0, 1]², with the points and its mistakes marked.

    Args:
        model: the trained model.
        params: its params.
        x: ``(n, 2)`` points to show (the test set, say).
        labels: their ``(n,)`` classes.
        resolution: grid points per side.
        state: a stateful model's state (it is evaluated, ``train=False``).
    """
    grid = torch.linspace(0, 1, resolution, dtype=x.dtype)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    predicted_area = predict(model, params, torch.stack([gx.flatten(), gy.flatten()], dim=1), state=state)
    predicted = predict(model, params, x, state=state)
    wrong = predicted != labels

    fig = _figure(figsize=(6, 6.9))
    ax = fig.add_subplot()
    colors = ("#f2f2f2", "#cfe3f5")
    ax.contourf(gx, gy, predicted_area.reshape(resolution, resolution), levels=[-0.5, 0.5, 1.5], colors=colors)
    ax.fill_between([], [], color=colors[1], label="predicted inside (shaded)")
    for label, (name, color) in _CLASS_STYLE.items():
        points = x[(labels == label) & ~wrong]
        ax.scatter(points[:, 0], points[:, 1], s=6, color=color, label=name)
    ax.scatter(x[wrong, 0], x[wrong, 1], s=40, marker="x", color="#d62728", linewidths=1.5,
               label=f"misclassified: {int(wrong.sum())} of {len(x)}")
    _disc_outline(ax)
    accuracy = 1 - wrong.double().mean().item() if len(x) else float("nan")
    _square_axes(ax, title or f"Learned decision boundary: {accuracy:.1%} of the {len(x)} points shown correct")
    return fig


def plot_predictions(images: Tensor, labels: Tensor, predicted: Tensor, *, count: int = 40,
                     title: str | None = None) -> Figure:
    """A grid of images, each titled with its prediction (and, when wrong, its label, in red): the mistakes
    first, then the others in order.

    Args:
        images: ``(n, 1, H, W)`` or ``(n, H, W)`` images, greyscale.
        labels, predicted: ``(n,)`` the true and the predicted classes.
        count: how many to show, at most.
    """
    wrong = (predicted != labels).nonzero().flatten().tolist()
    right = (predicted == labels).nonzero().flatten().tolist()
    shown = (wrong + right)[:count]
    columns = 10
    rows = max(1, -(-len(shown) // columns))
    fig = _figure(figsize=(columns * 1.0, rows * 1.2 + 0.6))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, shown, strict=False):
        ax.imshow(images[i].reshape(images.shape[-2:]).cpu().numpy(), cmap="gray_r", interpolation="nearest")
        mistake = int(predicted[i]) != int(labels[i])
        ax.set_title(f"{int(predicted[i])}" + (f" (is {int(labels[i])})" if mistake else ""), fontsize=9,
                     color="#d62728" if mistake else "black")
    fig.suptitle(title or f"Predictions: {len(wrong)} of {len(labels)} wrong, shown first in red")
    return fig


def plot_confusion(labels: Tensor, predicted: Tensor, *, classes: int | None = None,
                   title: str | None = None) -> Figure:
    """The confusion matrix: how many of each true class (rows) were predicted as each class (columns).

    Args:
        labels, predicted: ``(n,)`` the true and the predicted classes, ``0..classes-1``.
        classes: the number of classes (default: the largest class seen, plus one).
    """
    classes = classes or int(max(int(labels.max()), int(predicted.max())) + 1)
    counts = torch.bincount(labels.long() * classes + predicted.long(), minlength=classes**2).reshape(classes,
                                                                                                       classes)
    fig = _figure(figsize=(6, 5.6))
    ax = fig.add_subplot()
    ax.imshow(counts.numpy(), cmap="Blues")
    for i in range(classes):
        for j in range(classes):
            if counts[i, j]:
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if counts[i, j] > counts.max() / 2 else ("#d62728" if i != j else "black"))
    ax.set(xticks=range(classes), yticks=range(classes), xlabel="predicted", ylabel="true",
           title=title or f"Confusion matrix: {int(counts.trace())} of {len(labels)} correct")
    return fig


def _whole_epochs() -> Any:
    """Ticks at whole epochs only (a short run would otherwise get epoch 2.5)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 120) -> None:
    """Write ``fig`` as a PNG at ``path``, whole or not at all."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
