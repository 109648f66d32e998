"""rdl-train's tasks beside the disc (--task digits; the adder's own tests are tests/test_adder.py): the task
interface, the flags each takes and refuses, the table, --json, --plots, --compare-torch, checkpoints, and the
digits goal (slow)."""

from __future__ import annotations

import json
import statistics
import sys

import attrs
import pytest
import torch

import rdl_functional as rf
from rdl_functional.apps.cli import main
from rdl_functional.apps.tasks import TASK_NAMES, TASKS_BY_NAME, TrainingTask, summarize_runs

pytest.importorskip("sklearn")
from rdl_functional.apps import digits

SMALL = attrs.evolve(digits.DEFAULTS, width=4)  # a CNN of 4, 4 and 8 channels: an epoch in well under a second


@pytest.fixture
def small_digits(monkeypatch):
    """--task digits with a narrow CNN, so that the default suite stays fast."""
    monkeypatch.setattr(digits, "TASK", attrs.evolve(digits.TASK, defaults=SMALL))


def _rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["seed", "train"])
    return [line.split() for line in lines[start + 1:] if line.strip() and not line.startswith("-")]


def test_the_registry_names_every_task_and_disc_and_digits_are_tasks():
    assert tuple(TASKS_BY_NAME) == TASK_NAMES == ("disc", "digits", "adder")
    for name in ("disc", "digits"):
        task = TASKS_BY_NAME[name]
        assert isinstance(task, TrainingTask) and task.name == name


def test_summarize_runs_gives_the_median_worst_and_best_of_each_figure():
    runs = [attrs.make_class("R", [])() for _ in range(3)]
    figures = [{"seed": i, "test_accuracy": a, "seconds": s} for i, (a, s) in enumerate([(0.9, 3), (0.8, 1), (1, 2)])]
    for run, summary in zip(runs, figures, strict=True):
        run.summary = lambda summary=summary: summary
    table = summarize_runs(runs)
    assert set(table) == {"test_accuracy", "seconds"}
    assert table["test_accuracy"] == pytest.approx({"median": 0.9, "mean": 0.9, "std": 0.1, "worst": 0.8, "best": 1})
    assert table["seconds"]["worst"] == 3 and table["seconds"]["best"] == 1


def test_digits_trains_prints_the_table_and_writes_json_of_the_disc_shape(small_digits, capsys, tmp_path):
    path = tmp_path / "runs.json"
    assert main(["--task", "digits", "--epochs", "1", "--seeds", "0-1", "--quiet", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "--task digits: scikit-learn's 8×8 digits, a stratified 80%/20% split per seed" in out
    rows = _rows(out)
    assert [row[0] for row in rows[:6]] == ["0", "1", "median", "mean", "std", "worst"]
    document = json.loads(path.read_text())
    accuracies = [run["test_accuracy"] for run in document["runs"]]
    assert document["task"] == "digits" and document["settings"]["epochs"] == 1
    assert document["settings"]["width"] == 4
    assert document["summary"]["test_accuracy"]["median"] == pytest.approx(statistics.median(accuracies))
    assert all(0.2 < accuracy <= 1 for accuracy in accuracies)  # one epoch of a tiny CNN: above chance (0.1)
    assert [run["test_errors"] for run in document["runs"]] == [round((1 - a) * 360) for a in accuracies]


def test_digits_takes_the_shared_flags_with_its_own_defaults(small_digits, capsys, tmp_path):
    path = tmp_path / "run.json"
    assert main(["--task", "digits", "--epochs", "1", "--lr", "0.02", "--batch-size", "128", "--dropout", "0.1",
                 "--quiet", "--json", str(path)]) == 0
    settings = json.loads(path.read_text())["settings"]
    assert (settings["lr"], settings["batch_size"], settings["dropout"]) == (0.02, 128, 0.1)
    assert settings["weight_decay"] == digits.DEFAULTS.weight_decay  # not the disc's default
    assert "1 epoch, batch size 128, a one-cycle rate peaking at lr 0.02" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "tetris"], "argument --task: invalid choice: 'tetris'"),
        (["--task", "digits", "--model", "logistic"], "--model chooses the disc's model; --task digits does not "
                                                       "take it (it takes --epochs, --batch-size"),
        (["--task", "digits", "--optimizer", "adam"], "--optimizer chooses the disc's optimizer; --task digits"),
        (["--task", "digits", "--schedule", "cosine"], "--schedule chooses the disc's rate schedule"),
        (["--task", "digits", "--init-from", "p.safetensors"], "--init-from starts the disc from saved params"),
        (["--task", "digits", "--compile"], "--compile compiles the disc's step; --task digits does not take it"),
        (["--task", "digits", "--nproc", "2"], "--nproc trains the disc data-parallel; --task digits trains in one"),
        (["--task", "digits", "--seeds", "0-1", "--compare-torch"], "--compare-torch describes one run"),
        (["--task", "digits", "--seeds", "0-1", "--checkpoint", "c.ckpt"], "--checkpoint describes one run"),
        (["--task", "digits", "--checkpoint-every", "3"], "--checkpoint-every goes with --checkpoint PATH"),
        (["--task", "digits", "--dtype", "float64", "--compare-torch"], "--compare-torch compares on the CPU in "
                                                                         "float32"),
        (["--task", "digits", "--lr", "-1"], "argument --lr: must be a number > 0"),
    ],
)
def test_flags_a_task_does_not_take_are_refused_with_the_reason(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_plots_of_one_digits_run_and_of_several(small_digits, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    one, several = tmp_path / "one", tmp_path / "several"
    assert main(["--task", "digits", "--epochs", "1", "--plots", str(one), "--quiet"]) == 0
    assert main(["--task", "digits", "--epochs", "1", "--seeds", "0-1", "--plots", str(several), "--quiet"]) == 0
    assert sorted(p.name for p in one.iterdir()) == ["confusion.png", "history.png", "predictions.png"]
    assert [p.name for p in several.iterdir()] == ["seeds.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in [*one.iterdir(), *several.iterdir()])
    assert "wrote predictions.png, confusion.png, history.png to" in capsys.readouterr().out


def test_compare_torch_trains_the_torch_nn_twin_on_the_same_batches_shifts_and_masks(small_digits, capsys):
    assert main(["--task", "digits", "--epochs", "1", "--compare-torch", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "the same CNN trained by torch.nn + autograd + torch.optim.AdamW, from the same params and batches" in out
    difference = float(out.split("max |parameter difference|: ")[1].split()[0])
    # Rounding only (the convolutions' backward sums in another order than autograd's): a shift or mask drawn out
    # of step, or a layer that differs, moves params by a good part of the rate, 1e-3 and more.
    assert difference < 1e-5


def test_a_digits_run_resumed_from_its_checkpoint_ends_bit_for_bit_as_the_run_never_interrupted(
        small_digits, capsys, tmp_path):
    checkpoint, resumed, whole = tmp_path / "run.ckpt", tmp_path / "resumed.safetensors", tmp_path / "whole.safetensors"

    def interrupt(epoch, params, history):
        if epoch == 1:
            raise KeyboardInterrupt

    settings = attrs.evolve(SMALL, epochs=2)
    caller = {"program": "rdl-train", "check_finite": True, "threads": torch.get_num_threads()}
    with pytest.raises(KeyboardInterrupt):  # killed after the first epoch's checkpoint
        digits.run_digits(3, settings, checkpoint=checkpoint, checkpoint_info=caller, callback=interrupt)
    assert main(["--resume", str(checkpoint), "--save", str(resumed), "--threads", str(torch.get_num_threads()),
                 "--quiet"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert main(["--task", "digits", "--seed", "3", "--epochs", "2", "--save", str(whole),
                 "--threads", str(torch.get_num_threads()), "--quiet"]) == 0
    for name in (resumed, whole):
        assert name.with_name(f"{name.stem}-state.safetensors").exists()  # batch norm's running statistics
    for ours, theirs in ((resumed, whole), *[(p.with_name(f"{p.stem}-state.safetensors"),
                                              whole.with_name("whole-state.safetensors")) for p in (resumed,)]):
        a, b = rf.tree_flatten(rf.load(ours)), rf.tree_flatten(rf.load(theirs))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_digits_checkpoint_refuses_another_setting_by_name(small_digits, capsys, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    assert main(["--task", "digits", "--epochs", "1", "--checkpoint", str(checkpoint), "--quiet"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--resume", str(checkpoint), "--lr", "0.5"])
    assert "the checkpoint records a run of other settings (--lr 0.5 here, 0.01 in the run)" in capsys.readouterr().err


def _block_sklearn(monkeypatch) -> None:
    """Every ``import sklearn...`` raises ImportError from now on, as where scikit-learn is not installed."""
    for name in [name for name in sys.modules if name == "sklearn" or name.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_json_of_one_digits_seed_has_the_summary_of_that_run_not_null(small_digits, capsys, tmp_path):
    path = tmp_path / "run.json"
    assert main(["--task", "digits", "--epochs", "1", "--seed", "2", "--quiet", "--json", str(path)]) == 0
    assert "median" not in capsys.readouterr().out
    document = json.loads(path.read_text())
    assert document["summary"]["test_accuracy"]["median"] == pytest.approx(document["runs"][0]["test_accuracy"])
    assert document["summary"]["test_accuracy"]["std"] == 0.0


def test_a_missing_scikit_learn_names_the_extra_to_install(monkeypatch, capsys):
    _block_sklearn(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "digits", "--epochs", "1", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the digits task needs scikit-learn" in err and "pip install 'rdl_functional[tasks]'" in err
    assert "No module named" not in err
    for load in (digits.load_digits, lambda: digits.split(0)):
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'rdl_functional\[tasks\]'"):
            load()


def test_split_without_scikit_learn_names_the_extra_not_sklearn_model_selection(small_digits, monkeypatch, capsys,
                                                                                 tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    assert main(["--task", "digits", "--epochs", "1", "--checkpoint", str(checkpoint), "--quiet"]) == 0
    capsys.readouterr()
    _block_sklearn(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(checkpoint), "--epochs", "2", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the digits task needs scikit-learn" in err and "No module named" not in err


def test_random_shift_moves_each_image_and_its_pullback_moves_the_cotangent_back():
    x = torch.arange(2 * 9, dtype=torch.float64).reshape(2, 1, 3, 3)
    layer = digits.random_shift(1)
    y, _ = layer({}, {}, x, train=False)
    assert torch.equal(y, x)
    offsets = torch.tensor([[0, 2], [1, 1]])  # the first image moved down one and left one, the second not at all
    moved = digits.shift_images(x, offsets, 1)
    assert torch.equal(moved[1], x[1])
    assert torch.equal(moved[0, 0], torch.tensor([[0.0, 0, 0], [1, 2, 0], [4, 5, 0]]))
    report = rf.check_vjp(layer, {}, {}, x)  # the pullback against torch.func.vjp and finite differences
    assert report.ok, report


@pytest.mark.slow
def test_digits_reaches_its_goal_over_five_seeds(capsys, tmp_path):
    path = tmp_path / "runs.json"
    assert main(["--task", "digits", "--seeds", "0-4", "--quiet", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["summary"]["test_accuracy"]["median"] >= 0.99


def test_resume_of_a_disc_checkpoint_with_task_digits_or_adder_names_the_disc_not_key_error(capsys, tmp_path):
    checkpoint = tmp_path / "disc.ckpt"
    assert main(["--epochs", "1", "--checkpoint", str(checkpoint), "--quiet"]) == 0
    capsys.readouterr()
    for task in ("digits", "adder"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--resume", str(checkpoint), "--task", task])
        assert exit_info.value.code == 2
        assert (f"--resume {checkpoint}: the checkpoint records a run of --task disc; leave out --task"
                in capsys.readouterr().err)


def test_resume_of_a_digits_checkpoint_with_task_adder_is_refused_by_name(small_digits, capsys, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    assert main(["--task", "digits", "--epochs", "1", "--checkpoint", str(checkpoint), "--quiet"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--resume", str(checkpoint), "--task", "adder"])
    assert "the checkpoint records a run of --task digits; leave out --task" in capsys.readouterr().err


def test_checkpoint_of_another_task_is_named_as_that_tasks_not_by_a_settings_key(small_digits, capsys, tmp_path):
    disc, mine = tmp_path / "disc.ckpt", tmp_path / "digits.ckpt"
    assert main(["--epochs", "1", "--checkpoint", str(disc), "--quiet"]) == 0
    assert main(["--task", "digits", "--epochs", "1", "--checkpoint", str(mine), "--quiet"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--task", "digits", "--epochs", "1", "--checkpoint", str(disc), "--quiet"])
    err = capsys.readouterr().err
    assert f"--checkpoint {disc} is a checkpoint of --task disc, not of this --task digits run" in err
    assert "info.settings" not in err
    with pytest.raises(SystemExit):
        main(["--epochs", "1", "--checkpoint", str(mine), "--quiet"])
    assert f"--checkpoint {mine} is a checkpoint of --task digits, not of this --task disc run" in \
        capsys.readouterr().err


def test_a_finished_run_extended_by_epochs_is_refused_in_one_line_of_cli_terms(small_digits, capsys, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    assert main(["--task", "digits", "--epochs", "1", "--checkpoint", str(checkpoint), "--quiet"]) == 0
    capsys.readouterr()
    for argv, flag, fix in ((["--task", "digits", "--checkpoint", str(checkpoint)], "--checkpoint", "--epochs 1, or"),
                            (["--resume", str(checkpoint)], "--resume", "--epochs 1 (or leave it out), or")):
        with pytest.raises(SystemExit):
            main([*argv, "--epochs", "2", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"rdl-train: error: {flag} {checkpoint}: the run it records has 1 epochs and --task "
                              "digits's rate schedule is tied to the run's length, so it cannot be extended to "
                              "--epochs 2; give ")
        assert fix in err and "epochs=" not in err and "every step" not in err
        assert len(err.replace(str(checkpoint), "PATH")) < 250


def test_digits_model_of_equal_settings_is_one_model_so_seeds_and_compare_torch_reuse_its_traced_step():
    # fit keeps a step's traced records per model: a model built anew per seed was traced anew per seed, and
    # --compare-torch's run of a 2-epoch seed timed mostly tracing (3.2× the twin's time; now about 1×).
    assert digits.digits_model(4, 0.4, 1) is digits.digits_model(4, 0.4, 1)
    assert digits.digits_model(4, 0.4, 1) is not digits.digits_model(4, 0.25, 1)
