"""``rdl-train --task disc`` (the default): the seed report's disc experiment (:mod:`~rdl_functional.apps.disc`)
as a :class:`~rdl_functional.apps.tasks.TrainingTask`: its table's columns, pictures and torch.nn comparison.

The disc keeps flags of its own beside the task's interface (``--model``, ``--optimizer``, ``--schedule``, the
seeds trained together as one stack, ``--nproc``, ``--init-from``): ``rdl-train`` drives those itself.
"""

from __future__ import annotations

from pathlib import Path

from .disc import DEFAULTS, DiscResult, DiscSettings, run_disc, summarize
from .tasks import Column, Comparison, TrainingTask

__all__ = ["COLUMNS", "TASK", "compare_torch", "describe", "model_words", "plots"]

COLUMNS = (Column("train_accuracy", "train acc", 9, "percent"), Column("test_accuracy", "test acc", 8, "percent"),
           Column("test_errors", "test errors", 11, "count"), Column("train_loss", "train loss", 10, "loss"),
           Column("test_loss", "test loss", 9, "loss"), Column("seconds", "time", 8, "seconds"))


def model_words(description: str) -> str:
    """The model's part of a task's description: up to its first comma outside parentheses."""
    depth = 0
    for i, char in enumerate(description):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            return description[:i]
    return description


def plots(folder: Path, results: list[DiscResult], settings: DiscSettings) -> list[str]:
    """One run: dataset.png, history.png, decision-boundary.png; several: seeds.png, the spread over seeds."""
    from .plots import plot_dataset, plot_decision_boundary, plot_history, plot_seed_spread, save_figure

    if len(results) > 1:
        seeds = ("seeds " + ",".join(str(r.seed) for r in results)) if len(results) <= 5 \
            else f"{len(results)} seeds"
        figures = {"seeds.png": plot_seed_spread(
            [r.history for r in results],
            title=f"{settings.describe()}, {settings.describe_rate()}: test set, {seeds}")}
    else:
        result = results[0]
        data = result.data
        name = model_words(settings.task.description)
        figures = {
            "dataset.png": plot_dataset(data.x_train, data.labels_train,
                                        title=f"Training set of seed {result.seed}: {len(data.x_train)} points"),
            "history.png": plot_history(result.history, title=f"{name}, seed {result.seed}"),
            "decision-boundary.png": plot_decision_boundary(
                settings.task.model, result.params, data.x_test, data.labels_test, state=result.model_state,
                title=f"Learned decision boundary, seed {result.seed}'s test set: {result.test_accuracy:.1%} correct"),
        }
    for filename, figure in figures.items():
        save_figure(figure, folder / filename)
    return list(figures)


def compare_torch(seed: int, settings: DiscSettings) -> Comparison:
    """The seed MLP trained here and by torch.nn + autograd + the matching torch.optim optimizer."""
    from .torch_baseline import compare_with_torch

    c = compare_with_torch(seed, settings)
    return Comparison(
        twin=f"the same MLP trained by torch.nn + autograd + {c.torch_optimizer}",
        figures=(("train accuracy", c.train_accuracy, c.torch_train_accuracy, ".1%"),
                 ("test accuracy", c.test_accuracy, c.torch_test_accuracy, ".1%")),
        max_param_difference=c.max_param_difference, seconds=c.seconds, torch_seconds=c.torch_seconds,
    )  # fmt: skip


def describe(settings: DiscSettings) -> str:
    """The header's words: the model and loss, the optimizer, the epochs, batch size, rate and data."""
    return (f"{settings.task.description}, {settings.describe()}\n"
            f"{settings.epochs} epoch{'' if settings.epochs == 1 else 's'}, batch size {settings.batch_size}, "
            f"{settings.describe_rate()}, {settings.n_train} train / {settings.n_test} test points")


TASK = TrainingTask(
    name="disc",
    description="the seed report's experiment: which points of [0,1]² lie inside a disc (a 2-25-25-25-2 MLP)",
    defaults=DEFAULTS,
    flags=("epochs", "batch_size", "lr", "weight_decay", "dropout", "device", "dtype"),
    run=run_disc,
    summarize=summarize,
    plots=plots,
    compare_torch=compare_torch,
    describe=describe,
    columns=COLUMNS,
)  # fmt: skip
