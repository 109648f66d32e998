"""The tasks ``rdl-train --task NAME`` runs, each a record of plain functions that the command line drives alike.

The interface (one :class:`TrainingTask` per task, in the task's own module as ``TASK``: ``apps/digits.py``,
``apps/adder.py``, ``apps/disc_task.py`` for the disc)::

    @attrs.frozen
    class TrainingTask:
        name: str                     "digits": the value of --task
        description: str              one line for --help
        defaults: Settings            an attrs.frozen settings record, its defaults the task's own
        flags: tuple[str, ...]        the settings fields that rdl-train's shared flags set, by their dest:
                                      of epochs, batch_size, lr, weight_decay, dropout, device, dtype (a flag
                                      not named is refused for the task, with the reason)
        run(seed, settings, *, callback=None, checkpoint=None, checkpoint_every=None, checkpoint_info=None,
            on_resume=None, check_finite=True) -> result
                                      one whole run, named by its seed: the keywords are rf.fit's and pass
                                      through to it, except that fit's checkpoint_info is
                                      checkpoint_record(name, seed, settings, checkpoint_info) (None without a
                                      checkpoint): what `rdl-train --resume` rebuilds the run from
        summarize(results) -> {figure: {"median", "mean", "std", "worst", "best"}}
                                      over several runs (:func:`summarize_runs` does it for any results)
        plots(folder, results, settings) -> [file names written]
                                      one run's pictures for one result, the spread over seeds for several
        compare_torch(seed, settings) -> Comparison
                                      the same run trained by a torch.nn twin + autograd + torch.optim from the
                                      same params and batches
        describe(settings) -> str     the header's words: model, optimizer, rate, data
        columns: tuple[Column, ...]   the table's columns after "seed", each a figure of result.summary()

    result (any record) has:
        seed: int, seconds: float, params: Params, history: rf.History, model_state: State | None
        summary() -> {"seed": ..., "test_accuracy": ..., "seconds": ..., and every column's figure}

The registry :data:`TASKS_BY_NAME` imports a task's module when the task is first asked for, so that a task's
optional dependency (scikit-learn for the digits) costs nothing to the others. (``rf.TASKS`` is something
else: what a model's outputs are, for the metrics.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

__all__ = [
    "SHARED_FLAGS",
    "TASKS_BY_NAME",
    "TASK_NAMES",
    "Column",
    "Comparison",
    "TrainingTask",
    "checkpoint_record",
    "summarize_runs",
]

SHARED_FLAGS = ("epochs", "batch_size", "lr", "weight_decay", "dropout", "device", "dtype")
"""The rdl-train flags (by dest) that a task's settings may take, each as a field of the same name."""


@attrs.frozen
class Column:
    """A column of rdl-train's table: ``result.summary()[key]`` under ``header``, ``width`` wide, shown as ``kind``:
    ``"percent"``, ``"count"`` (a whole number, a mean to one decimal), ``"loss"`` (4 decimals) or ``"seconds"``."""

    key: str
    header: str
    width: int
    kind: str = attrs.field(validator=attrs.validators.in_(("percent", "count", "loss", "seconds")))


@attrs.frozen
class Comparison:
    """One run trained here and by a torch.nn twin from the same start on the same batches.

    ``figures``: ``(label, ours, torch's, format)`` rows, e.g. ``("test accuracy", 0.99, 0.99, ".1%")``;
    ``twin``: what was trained, e.g. ``"the same CNN trained by torch.nn + autograd + torch.optim.AdamW"``.
    """

    twin: str
    figures: tuple[tuple[str, float, float, str], ...]
    max_param_difference: float
    seconds: float
    torch_seconds: float


@attrs.frozen
class TrainingTask:
    """A task of ``rdl-train --task``: its settings and the functions that run, summarize, plot and compare it
    (the module's docstring has the interface)."""

    name: str
    description: str
    defaults: Any
    flags: tuple[str, ...] = attrs.field(validator=attrs.validators.deep_iterable(attrs.validators.in_(SHARED_FLAGS)))
    run: Callable[..., Any]
    summarize: Callable[[list[Any]], dict[str, dict[str, float]]]
    plots: Callable[[Path, list[Any], Any], list[str]]
    compare_torch: Callable[[int, Any], Comparison]
    describe: Callable[[Any], str]
    columns: tuple[Column, ...]

    def settings(self, **given: Any) -> Any:
        """The task's settings: its defaults with the values ``given`` (fields of its settings record)."""
        return attrs.evolve(self.defaults, **given)


def summarize_runs(results: list[Any], keys: tuple[str, ...] | None = None) -> dict[str, dict[str, float]]:
    """Median, mean, standard deviation (n − 1; 0 for one run), worst and best of each figure over several runs.

    ``keys``: the figures of ``result.summary()`` to summarize (default: all but ``seed``). "Worst" is the lowest
    of an accuracy (a key ending in ``accuracy`` or ``correct``), the highest of anything else.
    """
    if not results:
        raise ValueError("summarize_runs: no runs to summarize")
    keys = keys or tuple(key for key in results[0].summary() if key != "seed")
    table: dict[str, dict[str, float]] = {}
    for name in keys:
        values = torch.tensor([float(result.summary()[name]) for result in results], dtype=torch.float64)
        higher_is_better = name.endswith(("accuracy", "correct"))
        table[name] = {
            "median": values.quantile(0.5).item(),
            "mean": values.mean().item(),
            "std": values.std().item() if len(values) > 1 else 0.0,
            "worst": (values.min() if higher_is_better else values.max()).item(),
            "best": (values.max() if higher_is_better else values.min()).item(),
        }
    return table


def checkpoint_record(name: str, seed: int, settings: Any, caller: Any) -> dict[str, Any] | None:
    """What a task's run gives ``fit`` as ``checkpoint_info``: the task, the seed, the settings (an attrs record,
    as JSON data, less ``epochs``, which ``fit`` records itself and a resumed run may extend) and ``caller``'s own
    (rdl-train's: its program and flags). ``None`` for ``caller=None`` with no checkpoint: pass
    ``checkpoint_record(...) if checkpoint is not None else None``."""
    fields = {key: value for key, value in attrs.asdict(settings).items() if key != "epochs"}
    return {"task": name, "seed": seed, "settings": fields, "caller": caller}


TASK_NAMES = ("disc", "digits", "adder")
_MODULES = {"disc": "disc_task", "digits": "digits", "adder": "adder"}  # where each task's TASK is


class _Registry(Mapping[str, TrainingTask]):
    """``TASKS_BY_NAME[name]``: the task, its module imported on first use (``rdl_functional.apps.<module>.TASK``:
    ``disc_task`` for the disc, else the task's name)."""

    def __getitem__(self, name: str) -> TrainingTask:
        if name not in TASK_NAMES:
            raise KeyError(name)
        module = importlib.import_module(f"{__package__}.{_MODULES[name]}")
        return module.TASK

    def __iter__(self) -> Iterator[str]:
        return iter(TASK_NAMES)

    def __len__(self) -> int:
        return len(TASK_NAMES)


TASKS_BY_NAME: Mapping[str, TrainingTask] = _Registry()
