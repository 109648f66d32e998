"""The three pictures, rendered headless to PNG: real images of a sensible size."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rdl_functional as rf

pytest.importorskip("matplotlib")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking that it is one."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND", f"{path} is not a whole PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run() -> rf.DiscResult:
    return rf.run_disc(0, rf.DiscSettings(epochs=5))


def test_dataset_plot(run, tmp_path):
    figure = rf.plot_dataset(run.data.x_train, run.data.labels_train)
    axes = figure.axes[0]
    assert axes.get_xlabel() == "x₁" and axes.get_ylabel() == "x₂"
    assert len(axes.get_legend().get_texts()) == 3  # two classes and the true boundary
    rf.save_figure(figure, tmp_path / "dataset.png")
    width, height = png_size(tmp_path / "dataset.png")
    assert 500 < width < 2000 and 500 < height < 2000
    assert (tmp_path / "dataset.png").stat().st_size > 20_000


def test_history_plot_has_loss_and_accuracy_for_train_and_test(run, tmp_path):
    figure = rf.plot_history(run.history)
    loss, accuracy = figure.axes
    assert (loss.get_ylabel(), accuracy.get_ylabel()) == ("loss", "accuracy (%)")
    assert loss.get_xlabel() == accuracy.get_xlabel() == "epoch"
    for axes in (loss, accuracy):
        assert [line.get_xdata()[-1] for line in axes.get_lines()] == [5, 5]
        assert len(axes.get_legend().get_texts()) == 2
    rf.save_figure(figure, tmp_path / "history.png")
    width, height = png_size(tmp_path / "history.png")
    assert width > 800 and height > 300


def test_decision_boundary_marks_the_misclassified_points(run, tmp_path):
    figure = rf.plot_decision_boundary(rf.seed_model(), run.params, run.data.x_test, run.data.labels_test,
                                       resolution=50)
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert f"misclassified: {run.test_errors} of 1000" in legend
    assert figure.axes[0].get_title() == (f"Learned decision boundary: {run.test_accuracy:.1%} of the "
                                          f"{len(run.data.x_test)} points shown correct")
    rf.save_figure(figure, tmp_path / "boundary.png")
    assert min(png_size(tmp_path / "boundary.png")) > 500


def test_seed_spread_shows_median_and_band_of_the_test_set(tmp_path):
    runs = rf.run_disc_together([0, 1, 2], rf.DiscSettings(epochs=4, optimizer="adam"))
    figure = rf.plot_seed_spread([r.history for r in runs], title="adam over 3 seeds")
    rf.save_figure(figure, tmp_path / "seeds.png")
    width, height = png_size(tmp_path / "seeds.png")
    assert width > 600 and height > 250
    labels = [t.get_text() for ax in figure.axes for t in ax.get_legend().get_texts()]
    assert any(label.startswith("median (last") for label in labels)
    assert "worst to best of 3 seeds" in labels
    with pytest.raises(ValueError, match=r"plot_seed_spread: expected histories with a test set"):
        rf.plot_seed_spread([rf.History(train_loss=(1.0,), train_accuracy=(0.5,))])


def test_plot_history_rejects_an_empty_history():
    with pytest.raises(ValueError, match="plot_history: the history has no epochs to plot"):
        rf.plot_history(rf.History())


def test_save_figure_to_a_missing_folder_writes_nothing(run, tmp_path):
    with pytest.raises(FileNotFoundError):
        rf.save_figure(rf.plot_history(run.history), tmp_path / "missing" / "h.png")
    assert list(tmp_path.iterdir()) == []


def test_the_core_imports_and_trains_without_matplotlib():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import rdl_functional as rf\n"
        "rf.run_disc(0, rf.DiscSettings(epochs=1))\n"
        "try:\n"
        "    rf.plot_history(rf.History(train_loss=(1.0,), train_accuracy=(0.5,)))\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "rdl_functional's plots need matplotlib: pip install 'rdl_functional[plot]'"


def test_seed_spread_plots_the_true_median_of_an_even_number_of_seeds():
    """Regression: the line labelled median was torch.median's, the lower middle value for an even count, where
    summarize's table (and rdl-train's) shows the mean of the two middle ones."""
    accuracies = [(0.50, 0.90), (0.60, 0.80), (0.70, 0.95), (0.90, 0.70)]  # per seed, two epochs
    histories = [rf.History(train_loss=(1.0, 1.0), train_accuracy=(0.5, 0.5), test_loss=(a, b),
                            test_accuracy=(a, b)) for a, b in accuracies]
    figure = rf.plot_seed_spread(histories)
    accuracy_ax, loss_ax = figure.axes
    (accuracy_line,), (loss_line,) = accuracy_ax.get_lines(), loss_ax.get_lines()
    assert list(accuracy_line.get_ydata()) == pytest.approx([65.0, 85.0])  # (60 + 70) / 2 and (80 + 90) / 2
    assert list(loss_line.get_ydata()) == pytest.approx([0.65, 0.85])
    assert accuracy_line.get_label() == "median (last 85.0%)"
    assert loss_line.get_label() == "median (last 0.8500)"


def _regression_history(seed: int) -> rf.History:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(40, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1
    model = rf.linear(3, 1)
    _, history = rf.fit(model, rf.mse_loss, model.init(seed), x[:30], y[:30], epochs=3, batch_size=10, lr=0.1,
                        generator=seed, test=(x[30:], y[30:]))
    return history


def test_plot_history_of_a_regression_shows_rmse_not_an_empty_accuracy(tmp_path):
    history = _regression_history(0)
    assert history.task == "regression" and not history.train_accuracy
    figure = rf.plot_history(history)  # raised IndexError on the empty accuracy lists
    loss, metric = figure.axes
    assert loss.get_ylabel() == "loss"
    assert metric.get_ylabel() == "RMSE"
    assert [list(line.get_ydata()) for line in metric.get_lines()] == [list(history.train_rmse),
                                                                       list(history.test_rmse)]
    assert "R²" in metric.get_legend().get_texts()[0].get_text()
    rf.save_figure(figure, tmp_path / "history.png")
    assert png_size(tmp_path / "history.png")[0] > 800


def test_seed_spread_of_regressions_shows_the_test_rmse():
    histories = [_regression_history(seed) for seed in range(3)]
    figure = rf.plot_seed_spread(histories)  # said "expected histories with a test set" of histories that had one
    metric = figure.axes[0]
    assert metric.get_ylabel() == "test RMSE"
    expected = torch.tensor([h.test_rmse for h in histories], dtype=torch.float64).quantile(0.5, dim=0)
    assert list(metric.get_lines()[0].get_ydata()) == expected.tolist()


def test_seed_spread_refuses_histories_of_different_tasks():
    classification = rf.History(train_loss=(1.0,) * 3, train_accuracy=(0.5,) * 3, test_loss=(1.0,) * 3,
                                test_accuracy=(0.5,) * 3, task="classification")
    with pytest.raises(ValueError, match=r"plot_seed_spread: the histories measure different tasks"):
        rf.plot_seed_spread([classification, _regression_history(0)])
