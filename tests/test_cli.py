from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rdl_functional.cli import main


def test_rdl_train_prints_accuracy_errors_loss_and_time(capsys):
    assert main(["--epochs", "3", "--batch-size", "100", "--lr", "0.5", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 epochs, batch size 100, lr 0.5 decaying linearly to 0" in out
    header, row = out.strip().splitlines()[-2:]
    assert header.split() == ["seed", "train", "acc", "test", "acc", "test", "errors", "train", "loss", "test",
                              "loss", "time"]
    seed, train_acc, test_acc, errors, train_loss, test_loss, seconds, unit = row.split()
    assert seed == "2" and train_acc.endswith("%") and test_acc.endswith("%") and unit == "s"
    assert 0 <= int(errors) <= 1000
    assert float(test_acc.rstrip("%")) == pytest.approx(100 - int(errors) / 10, abs=0.051)
    assert float(train_loss) > 0 and float(test_loss) > 0 and float(seconds) > 0


def test_rdl_train_is_deterministic_for_a_seed(capsys):
    outputs = []
    for _ in range(2):
        main(["--epochs", "2", "--batch-size", "50", "--seed", "5"])
        outputs.append(capsys.readouterr().out.strip().splitlines()[-1].rsplit(None, 2)[0])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "-1"], "argument --epochs: must be ≥ 0, got -1"),
        (["--batch-size", "0"], "argument --batch-size: must be ≥ 1, got 0"),
        (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["--lr", "-0.1"], "argument --lr: must be a finite number > 0, got -0.1"),
        (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
        (["--seed", "x"], "argument --seed: expected a whole number, got 'x'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--schedule", "cosine"], "argument --schedule: invalid choice: 'cosine'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("rdl-train: error:")


def test_python_dash_m_runs_it_in_a_fresh_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "rdl_functional", "--epochs", "1", "--batch-size", "500"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "test acc" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "rdl_functional", "--epochs", "x"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
