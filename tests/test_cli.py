from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rdl_functional as rf
from rdl_functional.apps.cli import _progress, main

FAST = ["--epochs", "3", "--batch-size", "200"]


def _table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["seed", "train"])
    return [line.split() for line in lines[start + 1:] if line.strip() and not line.startswith("-")]


def test_rdl_train_prints_accuracy_errors_loss_and_time(capsys):
    assert main(["--epochs", "3", "--batch-size", "100", "--lr", "0.5", "--seed", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 epochs, batch size 100, lr 0.5 decaying linearly to 0" in out
    assert out.splitlines()[-2].split() == ["seed", "train", "acc", "test", "acc", "test", "errors", "train", "loss",
                                            "test", "loss", "time"]
    seed, train_acc, test_acc, errors, train_loss, test_loss, seconds, unit = out.splitlines()[-1].split()
    assert seed == "2" and train_acc.endswith("%") and test_acc.endswith("%") and unit == "s"
    assert 0 <= int(errors) <= 1000
    assert float(test_acc.rstrip("%")) == pytest.approx(100 - int(errors) / 10, abs=0.051)
    assert float(train_loss) > 0 and float(test_loss) > 0 and float(seconds) > 0


def test_rdl_train_is_deterministic_for_a_seed(capsys):
    outputs = []
    for _ in range(2):
        main([*FAST, "--seed", "5", "--quiet"])
        outputs.append(capsys.readouterr().out.strip().splitlines()[-1].rsplit(None, 2)[0])
    assert outputs[0] == outputs[1]


def test_seeds_print_one_row_each_and_the_summary(capsys, tmp_path):
    assert main([*FAST, "--seeds", "0-2,7", "--quiet", "--json", str(tmp_path / "runs.json")]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert [row[0] for row in rows[:4]] == ["0", "1", "2", "7"]
    assert [row[0] for row in rows[4:8]] == ["median", "mean", "std", "worst"]
    document = json.loads((tmp_path / "runs.json").read_text())
    accuracies = [run["test_accuracy"] for run in document["runs"]]
    assert [run["seed"] for run in document["runs"]] == [0, 1, 2, 7]
    assert document["summary"]["test_accuracy"]["worst"] == min(accuracies)
    assert document["settings"]["epochs"] == 3 and document["settings"]["model"] == "mlp"
    median = sum(sorted(accuracies)[1:3]) / 2
    assert document["summary"]["test_accuracy"]["median"] == pytest.approx(median)
    assert f"test accuracy over 4 seeds: median {median:.2%}" in out


def test_json_of_one_seed_has_the_summary_of_that_run_not_null(capsys, tmp_path):
    assert main([*FAST, "--seed", "4", "--quiet", "--json", str(tmp_path / "run.json")]) == 0
    assert "median" not in capsys.readouterr().out  # the table's statistics rows are for several seeds
    document = json.loads((tmp_path / "run.json").read_text())
    accuracy = document["runs"][0]["test_accuracy"]
    assert document["summary"]["test_accuracy"] == {"median": pytest.approx(accuracy), "mean": pytest.approx(accuracy),
                                                    "std": 0.0, "worst": accuracy, "best": accuracy}


def test_save_then_init_from_continues_from_the_saved_params(capsys, tmp_path):
    path = tmp_path / "params.safetensors"
    main([*FAST, "--seed", "3", "--save", str(path), "--quiet"])
    trained = capsys.readouterr().out
    saved = rf.load(path)
    assert rf.tree_same_structure(saved, rf.seed_model().init(0))
    # One epoch at a rate so small that no float32 weight moves: the saved params, evaluated (--epochs 0 is refused).
    main(["--epochs", "1", "--lr", "1e-30", "--schedule", "constant", "--seed", "3", "--init-from", str(path),
          "--quiet"])
    again = capsys.readouterr().out
    assert _table_rows(again)[0][1:4] == _table_rows(trained)[0][1:4]  # same accuracies and errors


def test_plots_writes_three_pngs(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "plots" / "new"
    assert main([*FAST, "--plots", str(folder), "--quiet"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.png", "decision-boundary.png", "history.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in folder.iterdir())


def test_logistic_baseline_runs_on_cross_entropy(capsys):
    assert main([*FAST, "--model", "logistic", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "logistic regression (one linear layer), cross-entropy on labels" in out


def test_compare_torch_shows_identical_params(capsys):
    assert main([*FAST, "--compare-torch", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "torch.nn + autograd + torch.optim.SGD" in out
    assert "max |parameter difference|: 0 " in out


@pytest.mark.parametrize(
    ("flags", "header", "torch_class"),
    [
        (["--optimizer", "adam"], "Adam\n3 epochs, batch size 200, lr 0.01 decaying linearly to 0", "Adam"),
        (["--optimizer", "nesterov", "--schedule", "cosine"], "SGD with Nesterov momentum 0.9\n3 epochs, batch "
         "size 200, lr 0.08 with cosine decay to 0", "SGD"),
        (["--optimizer", "adamw", "--schedule", "warmup-cosine", "--lr", "0.02"], "AdamW, weight decay 0.01\n3 "
         "epochs, batch size 200, lr 0.02 after a 5% linear warm-up", "AdamW"),
        (["--optimizer", "rmsprop", "--momentum", "0.5", "--weight-decay", "1e-4"], "RMSprop, momentum 0.5, weight "
         "decay 0.0001", "RMSprop"),
        (["--optimizer", "adagrad", "--schedule", "constant"], "Adagrad\n3 epochs, batch size 200, lr 0.1 "
         "(constant)", "Adagrad"),
    ],
)
def test_each_optimizer_trains_says_what_it_ran_and_equals_its_torch_optim_twin(flags, header, torch_class, capsys):
    assert main([*FAST, *flags, "--compare-torch", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert header in out
    assert f"torch.nn + autograd + torch.optim.{torch_class}," in out
    assert "max |parameter difference|: 0 " in out


def test_init_and_loss_choose_the_weights_and_what_is_minimized(capsys, tmp_path):
    assert main([*FAST, "--init", "kaiming_normal", "--loss", "cross-entropy", "--seeds", "0-1", "--quiet",
                 "--json", str(tmp_path / "runs.json")]) == 0
    out = capsys.readouterr().out
    assert "2-25-25-25-2 MLP (ReLU, Tanh output), cross-entropy on labels, kaiming_normal init, plain SGD" in out
    settings = json.loads((tmp_path / "runs.json").read_text())["settings"]
    assert (settings["init"], settings["loss"]) == ("kaiming_normal", "cross-entropy")
    task = rf.DiscSettings(init="kaiming_normal", loss="cross-entropy").task
    assert task.loss is rf.cross_entropy_loss and "kaiming_normal" in task.model.name


def test_dropout_and_batch_norm_train_save_their_state_and_equal_torch_nn(capsys, tmp_path):
    assert main([*FAST, "--dropout", "0.1", "--batch-norm", "--compare-torch", "--quiet",
                 "--save", str(tmp_path / "p.safetensors"), "--json", str(tmp_path / "run.json")]) == 0
    out = capsys.readouterr().out
    assert "2-25-25-25-2 MLP (ReLU, Tanh output), batch norm, dropout 0.1, MSE on one-hot targets" in out
    assert "max |parameter difference|: 0 " in out  # params and running statistics, same masks
    state = rf.load(tmp_path / "p-state.safetensors")
    assert sorted(state["1"]) == ["num_batches_tracked", "running_mean", "running_var"]
    assert int(state["1"]["num_batches_tracked"]) == 3 * 5  # 3 epochs of 5 steps
    settings = json.loads((tmp_path / "run.json").read_text())["settings"]
    assert (settings["dropout"], settings["batch_norm"]) == (0.1, True)
    model = rf.seed_model(dropout=0.1, batch_norm=True)
    reference = torch.nn.Sequential(*(m for m in [
        torch.nn.Linear(2, 25), torch.nn.BatchNorm1d(25), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(25, 25), torch.nn.BatchNorm1d(25), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(25, 25), torch.nn.BatchNorm1d(25), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(25, 2), torch.nn.Tanh()]))
    params = rf.load(tmp_path / "p.safetensors")
    reference.load_state_dict(rf.to_state_dict(params, state), strict=True)
    x = torch.rand(10, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(reference.eval()(x).detach(), model(params, state, x, train=False)[0])


def test_seeds_with_dropout_train_one_after_another(capsys):
    assert main([*FAST, "--dropout", "0.2", "--seeds", "0-1", "--quiet"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows[:2]] == ["0", "1"]
    assert main([*FAST, "--dropout", "0.2", "--seed", "1", "--quiet"]) == 0
    alone = _table_rows(capsys.readouterr().out)[0]
    assert alone[:6] == rows[1][:6]  # the same run as --seed 1


def test_seeds_with_plots_draw_the_spread_over_seeds(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    assert main([*FAST, "--seeds", "0-2", "--optimizer", "momentum", "--plots", str(tmp_path), "--quiet",
                 "--json", str(tmp_path / "runs.json")]) == 0
    assert (tmp_path / "seeds.png").stat().st_size > 10_000
    settings = json.loads((tmp_path / "runs.json").read_text())["settings"]
    assert (settings["optimizer"], settings["lr"], settings["momentum"]) == ("momentum", 0.08, 0.9)


def test_progress_lines_go_to_stderr_when_it_is_not_a_terminal(capsys):
    main(["--epochs", "20", "--batch-size", "500", "--seed", "1"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 10 and err[0].startswith("seed 1  epoch  2/20  loss ") and "test acc" in err[-1]
    main(["--epochs", "20", "--batch-size", "500", "--quiet"])
    assert capsys.readouterr().err == ""


def test_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    callback, close = _progress("seed 4", 3, quiet=False, stream=stream)
    history = rf.History()
    for epoch in range(1, 4):
        history = rf.History(train_loss=(0.1,) * epoch, train_accuracy=(0.9,) * epoch,
                             test_loss=(0.1,) * epoch, test_accuracy=(0.8,) * epoch)
        callback(epoch, {}, history)
    close()
    shown = stream.getvalue()
    assert "seed 4" in shown and "3/3" in shown and "test 80.0%" in shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "argument --epochs: must be ≥ 1, got 0"),  # it trained nothing, and printed nan losses
        (["--batch-size", "0"], "argument --batch-size: must be ≥ 1, got 0"),
        (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["--lr", "-0.1"], "argument --lr: must be a number > 0 and ≤ 3.403e+38 (float32's largest), got -0.1"),
        (["--lr", "inf"], "argument --lr: must be a number > 0 and ≤ 3.403e+38 (float32's largest), got inf"),
        (["--lr", "1e308"], "argument --lr: must be a number > 0 and ≤ 3.403e+38 (float32's largest), got 1e308"),
        (["--seed", "x"], "argument --seed: expected a whole number, got 'x'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--schedule", "step-decay"], "argument --schedule: invalid choice: 'step-decay'"),
        (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (["--seeds", "5-2"], "argument --seeds: the seed range 5-2 is empty or negative (did you mean 2-5?)"),
        (["--seeds", "1,1"], "argument --seeds: '1,1' names a seed twice"),
        (["--seeds", "a-b"], "argument --seeds: expected seeds like 0-9 or 1,4,7, got 'a-b'"),
        (["--seed", "1", "--seeds", "0-3"], "argument --seeds: not allowed with argument --seed"),
        (["--seeds", "0-1", "--save", "p.safetensors"], "--save describes one run; use --seed N rather than --seeds"),
        (["--checkpoint-every", "5"], "--checkpoint-every goes with --checkpoint PATH"),
        (["--threads", "0"], "argument --threads: must be ≥ 1, got 0"),
        (["--model", "logistic", "--compare-torch"], "--compare-torch trains the seed MLP"),
        (["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion'"),
        (["--init", "he"], "argument --init: invalid choice: 'he'"),
        (["--loss", "hinge"], "argument --loss: invalid choice: 'hinge'"),
        (["--loss", "cross-entropy", "--compare-torch"], "--compare-torch trains with MSE"),
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum applies to momentum, nesterov and rmsprop"),
        (["--optimizer", "nesterov", "--momentum", "0"], "--optimizer nesterov needs --momentum > 0"),
        (["--weight-decay", "-1"], "argument --weight-decay: must be a finite number ≥ 0, got -1"),
        (["--optimizer", "adam", "--compile"], "--compile trains with plain SGD"),
        (["--batch-norm", "--batch-size", "333"], "--batch-norm: batches of 333 leave the last batch of an epoch"),
        (["--batch-norm", "--batch-size", "1"], "--batch-norm: batches of 1 leave every batch"),
        (["--dropout", "1"], "argument --dropout: must be a probability in [0, 1), got 1"),
        (["--dropout", "-0.1"], "argument --dropout: must be a probability in [0, 1), got -0.1"),
        (["--model", "logistic", "--batch-norm"], "--dropout and --batch-norm go into the seed MLP"),
        (["--batch-norm", "--compile"], "--compile compiles a plain model's step"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("rdl-train: error:")


def _fails(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert "seed  train acc" not in captured.out  # failed before training
    return captured.err


def test_unwritable_outputs_fail_before_training_and_write_nothing(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "--plots" in _fails(["--plots", str(blocker / "plots")], capsys)
    assert "the folder" in _fails(["--save", str(tmp_path / "missing" / "p.safetensors")], capsys)
    assert "is a folder" in _fails(["--json", str(tmp_path)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_init_from_a_missing_or_foreign_file_fails_clearly(capsys, tmp_path):
    missing = _fails(["--init-from", str(tmp_path / "none.safetensors")], capsys)
    assert "--init-from: load: no such file:" in missing and "none.safetensors" in missing
    (tmp_path / "notes.txt").write_text("hello")
    assert "notes.txt' is not a readable safetensors file" in _fails(["--init-from", str(tmp_path / "notes.txt")],
                                                                      capsys)


def test_init_from_params_of_another_model_fails_before_training(capsys, tmp_path):
    rf.save(rf.logistic_model().init(0), tmp_path / "logistic.safetensors")
    err = _fails(["--init-from", str(tmp_path / "logistic.safetensors")], capsys)
    assert "the params do not fit compose(linear(2, 25)" in err
    rf.save(rf.tree_map(torch.Tensor.double, rf.seed_model().init(0)), tmp_path / "f64.safetensors")
    err = _fails(["--init-from", str(tmp_path / "f64.safetensors")], capsys)
    assert 'has a float32 tensor of shape (25, 2) at "0.weight" but the params has a float64 tensor' in err
    rf.save(rf.seed_model().init(0), tmp_path / "plain.safetensors")  # the plain MLP's into one with dropout
    err = _fails(["--dropout", "0.1", "--init-from", str(tmp_path / "plain.safetensors")], capsys)
    assert ("(the params hold the layers 0, 2, 4, 6, the model has params in its layers 0, 3, 6, 9: params of "
            "another arrangement of layers, such as the model with or without dropout or batch norm, do not fit "
            "it)") in err


def test_the_reliability_defects_of_issue_10_stay_fixed(capsys, tmp_path):
    # Paths and numbers are checked before training, and every failure says what is wrong.
    assert "cannot create a file in '/proc'" in _fails(["--save", "/proc/x"], capsys)
    (tmp_path / "notes.txt").write_text("keep me")
    assert "the file exists and is not a safetensors file of params; refusing to replace it" in _fails(
        ["--save", str(tmp_path / "notes.txt")], capsys)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert "is a folder, not a file" in _fails(["--init-from", str(tmp_path)], capsys)
    assert "argument --seed: must be ≤ 9223372036854775807, got 99999999999999999999" in _fails(
        ["--seed", "99999999999999999999"], capsys)
    assert "names more than 1000 seeds: each is a whole run" in _fails(["--seeds", "0-100000"], capsys)
    assert "--checkpoint records one run" in _fails(["--seeds", "0-1", "--checkpoint", str(tmp_path / "c")], capsys)
    assert "--resume: read_checkpoint: no such file" in _fails(["--resume", str(tmp_path / "c")], capsys)
    rf.save(rf.seed_model().init(0), tmp_path / "params.safetensors")
    assert "params.safetensors' is not a checkpoint of rdl_functional" in _fails(
        ["--resume", str(tmp_path / "params.safetensors")], capsys)
    model = rf.seed_model()
    rf.fit(model, rf.mse_loss, model.init(0), torch.zeros(4, 2), torch.zeros(4, 2), epochs=1, batch_size=4, lr=0.1,
           generator=0, checkpoint=tmp_path / "fit.ckpt")
    assert "the checkpoint was not written by rdl-train (use rf.fit(..., checkpoint=PATH)" in _fails(
        ["--resume", str(tmp_path / "fit.ckpt")], capsys)
    rf.save(rf.seed_model().init(0), tmp_path / "f32.safetensors")
    assert "the params do not fit" in _fails(["--dtype", "float64", "--init-from", str(tmp_path / "f32.safetensors")],
                                             capsys)
    (tmp_path / "a-file.png").write_text("")
    assert "is a file; --plots takes a folder" in _fails(["--plots", str(tmp_path / "a-file.png")], capsys)
    # A NaN in the initial params stops the run with the epoch and step, exit 1.
    poisoned = rf.seed_model().init(0)
    poisoned["0"]["weight"][0, 0] = float("nan")
    rf.save(poisoned, tmp_path / "nan.safetensors")
    assert main([*FAST, "--quiet", "--init-from", str(tmp_path / "nan.safetensors")]) == 1
    assert "rdl-train: fit: the loss is nan at epoch 1, step 1: training stopped" in capsys.readouterr().err
    # Trained on regardless, it writes JSON with null where there is no number.
    assert main([*FAST, "--quiet", "--no-finite-check", "--init-from", str(tmp_path / "nan.safetensors"),
                 "--json", str(tmp_path / "run.json")]) == 0
    capsys.readouterr()
    text = (tmp_path / "run.json").read_text()
    assert "NaN" not in text and json.loads(text)["runs"][0]["train_loss"] is None


def test_python_dash_m_runs_it_in_a_fresh_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "rdl_functional", "--epochs", "1", "--batch-size", "500"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "test acc" in done.stdout and "epoch 1/1" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "rdl_functional", "--epochs", "x"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_compile_trains_through_torch_compile(capsys):
    assert main(["--epochs", "2", "--batch-size", "500", "--compile", "--quiet"]) == 0
    compiled = _table_rows(capsys.readouterr().out)[0]
    main(["--epochs", "2", "--batch-size", "500", "--quiet"])
    eager = _table_rows(capsys.readouterr().out)[0]
    assert compiled[0] == eager[0] and abs(int(compiled[3]) - int(eager[3])) <= 2  # the same run, to rounding


@pytest.mark.parametrize("flag", ["--save", "--json"])
def test_an_output_write_that_fails_after_training_ends_with_one_line_naming_the_file_and_exit_1(tmp_path, flag):
    """Regression: a full disk at --save or --json (after training) ended with exit 2 and 'cannot write the
    output', where a failed checkpoint write ends with exit 1 and the file's name."""
    import textwrap

    path = tmp_path / ("params.safetensors" if flag == "--save" else "run.json")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
        from rdl_functional.apps.cli import main
        sys.exit(main(["--epochs", "1", "--quiet", "--threads", "1", {flag!r}, {str(path)!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("rdl-train: error: ") and repr(str(path)) in line and "File too large" in line
    assert not path.exists()
