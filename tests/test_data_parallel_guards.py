"""Data-parallel training that never hangs and never mixes runs, checked without a whole training run.

fit's settings check runs here in one process with the exchange between the ranks stubbed (the real exchange runs in
tests/test_distributed.py); the launcher's escalation runs on plain sleeping processes; a taken MASTER_PORT is
tried rank by rank in this process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch

import rdl_functional as rf
import rdl_functional.distributed as distributed
import rdl_functional.train as train
from rdl_functional.apps import cli


class _Sent(Exception):
    """Stops fit once it has sent its settings: rank 0's half of the exchange."""


def _fit_as_rank(monkeypatch, rank, rank0_text=None, *, lr=1e-2, generator=0, dropout=0.0, info=None,
                 checkpoint=None):
    """fit on rank ``rank`` of 2, its settings exchanged with a rank 0 that sent ``rank0_text``; without it, what
    this rank sends (fit stops there)."""
    sent = []

    def gather(who, text, device):
        sent.append(text)
        if rank0_text is None:
            raise _Sent
        return [rank0_text, text]

    monkeypatch.setattr(distributed, "_gather_text", gather)
    monkeypatch.setattr(train, "world", lambda: (rank, 2))
    layers = [rf.linear(2, 4), rf.relu, *([rf.dropout(dropout)] if dropout else []), rf.linear(4, 2)]
    model = rf.compose(*layers)
    x, labels = rf.disc_dataset(100, 0)
    try:
        rf.fit(model, rf.cross_entropy_loss, model.init(rank), x, labels, epochs=1, batch_size=50,
               optimizer=rf.adam(lr), generator=generator, checkpoint=checkpoint, checkpoint_info=info)
    except _Sent:
        return sent[0]
    return None


@pytest.mark.parametrize(("change", "named"), [
    ({"lr": 1e-3}, "optimizer.rates: [{\"every step\": \""),  # by its rate, first and last, not by the probe
    ({"generator": 1}, "generator: 1 on rank 1, 0 on rank 0"),
    ({"dropout": 0.2}, 'model: "compose(linear(2, 4), relu, dropout(0.2), linear(4, 2))" on rank 1, '
                       '"compose(linear(2, 4), relu, linear(4, 2))" on rank 0'),
], ids=["lr", "seed", "dropout"])
def test_ranks_started_with_other_settings_are_refused_naming_the_first_that_differs(monkeypatch, change, named):
    """Each rank ran its own run and the result belonged to neither: now every rank raises the same error."""
    rank0 = _fit_as_rank(monkeypatch, 0)
    with pytest.raises(ValueError, match=r"fit: the 2 processes of a data-parallel run must train the same run, "
                                         r"but rank 1 differs from rank 0 in " + __import__("re").escape(named)):
        _fit_as_rank(monkeypatch, 1, rank0, **change)


def test_ranks_with_other_checkpoint_paths_are_refused(monkeypatch, tmp_path):
    """Every rank resumes from the checkpoint: one that reads another file would start from another state."""
    rank0 = _fit_as_rank(monkeypatch, 0, checkpoint=tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"rank 1 differs from rank 0 in checkpoint\.path: \".*b\.ckpt\" on rank 1"):
        _fit_as_rank(monkeypatch, 1, rank0, checkpoint=tmp_path / "b.ckpt")


def test_ranks_whose_checkpoint_files_differ_are_refused(monkeypatch, tmp_path):
    """Ranks on machines that do not share the file: rank 1 finds none where rank 0 resumes from one."""
    path = tmp_path / "run.ckpt"
    path.write_bytes(b"rank 0's file")
    rank0 = _fit_as_rank(monkeypatch, 0, checkpoint=path)
    path.unlink()
    with pytest.raises(ValueError, match=r"rank 1 differs from rank 0 in checkpoint\.file: null on rank 1, "
                                         r"\"[0-9a-f]{16}\" on rank 0"):
        _fit_as_rank(monkeypatch, 1, rank0, checkpoint=path)


def test_ranks_that_start_from_other_params_but_train_the_same_run_agree(monkeypatch):
    """Each rank's own initial params are fine (rank 0's are broadcast to all): only their shapes must agree."""
    rank0 = _fit_as_rank(monkeypatch, 0)
    assert _fit_as_rank(monkeypatch, 1, rank0) is None  # trained; the rank's params were model.init(1)


def test_first_difference_walks_nested_settings_in_order_and_takes_nan_as_itself():
    found = distributed._first_difference({"a": 1, "b": {"c": [1], "d": float("nan")}},
                                          {"a": 1, "b": {"c": [2], "d": float("nan")}}, "")
    assert found == ("b.c", "[1]", "[2]")
    assert distributed._first_difference({"x": float("nan")}, {"x": float("nan")}, "") is None
    assert distributed._first_difference({"x": 1}, {"x": 1, "y": 2}, "") == ("y", "null", "2")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_a_bad_rdl_dist_timeout_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("RDL_DIST_TIMEOUT", value)
    with pytest.raises(ValueError, match=r"\$RDL_DIST_TIMEOUT must be a number of seconds > 0, got '"):
        distributed.group_timeout()
    with pytest.raises(ValueError, match=r"init_from_environment: timeout_s must be a number of seconds > 0, got 0"):
        distributed.group_timeout(0)


def test_the_group_timeout_comes_from_the_argument_then_the_environment_then_60(monkeypatch):
    monkeypatch.delenv("RDL_DIST_TIMEOUT", raising=False)
    assert distributed.group_timeout() == 60.0
    monkeypatch.setenv("RDL_DIST_TIMEOUT", "7.5")
    assert distributed.group_timeout() == 7.5 and distributed.group_timeout(3) == 3.0


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(("rank", "message"), [
    ("0", r"rank 0 of 2 could not join the process group at 127\.0\.0\.1:\d+: MASTER_PORT is taken by another "
          r"program \(address already in use\)"),
    ("1", r"rank 1 of 2 could not join the process group at 127\.0\.0\.1:\d+ within 1 s: nothing answered as rank "
          r"0's store \(is MASTER_PORT taken by another program"),
])
def test_a_taken_master_port_fails_each_rank_within_the_timeout(monkeypatch, rank, message):
    """Rank 0 cannot listen; rank 1 reached the program that holds the port, which never answers: torch's store
    client waited for ever (past the group's timeout). Rank by rank in this process, each must raise."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(taken.getsockname()[1]))
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        try:
            with pytest.raises(RuntimeError, match=r"init_from_environment: " + message):
                distributed.init_from_environment(timeout_s=1)
        finally:
            if torch.distributed.is_initialized():  # never left joined to a group, whatever happened
                torch.distributed.destroy_process_group()
    # The port's holder is gone: the abandoned store client sees the connection close and its thread ends.
    for thread in threading.enumerate():
        if thread.name == "rdl-rendezvous":
            thread.join(timeout=30)
            assert not thread.is_alive()


_SLEEPER = "import signal, sys, time\n{}\nprint('ready', flush=True)\ntime.sleep(120)"


def _sleepers(*setups):
    """Processes that sleep two minutes, each after its ``setup`` line; returned once each is sleeping."""
    workers = [subprocess.Popen([sys.executable, "-c", _SLEEPER.format(setup)], stdout=subprocess.PIPE, text=True)
               for setup in setups]
    for worker in workers:
        assert worker.stdout.readline() == "ready\n"
        worker.stdout.close()
    return workers


def test_stop_ends_a_stopped_worker_with_the_signal_by_sending_sigcont_after_it():
    """A stopped process acts on no signal but SIGKILL and SIGCONT: the launcher's SIGTERM alone waited for ever."""
    (worker,) = _sleepers("")
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        assert cli._stop([worker], signal.SIGTERM, grace=60) == []
        assert worker.returncode == -signal.SIGTERM
    finally:
        worker.kill()
        worker.wait()


def test_stop_kills_a_worker_that_ignores_the_signal_after_the_grace_period():
    workers = _sleepers("signal.signal(signal.SIGTERM, signal.SIG_IGN)", "")
    try:
        # The grace ends once the worker that obeys SIGTERM is gone (not after a guess at how long that takes on a
        # loaded machine); the one that ignores it is then killed.
        assert cli._stop(workers, signal.SIGTERM, grace=60, hurry=lambda: workers[1].poll() is not None) == [0]
        assert [worker.returncode for worker in workers] == [-signal.SIGKILL, -signal.SIGTERM]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def test_watch_ends_every_worker_when_one_stays_stopped_and_says_which(capsys):
    workers = _sleepers("", "")
    try:
        os.kill(workers[1].pid, signal.SIGSTOP)
        assert cli._watch(workers, 2, [], stopped_limit=0.3) == 1
        assert [worker.returncode for worker in workers] == [-signal.SIGTERM, -signal.SIGTERM]
        assert capsys.readouterr().err == ("rdl-train: error: worker 1 of 2 was stopped by SIGSTOP for 0.3 s; ended "
                                           "the others\n")
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def test_watch_names_a_failed_worker_and_a_stopped_one_and_kills_what_a_sigterm_does_not_end(capsys, monkeypatch):
    workers = [*_sleepers("signal.signal(signal.SIGTERM, signal.SIG_IGN)", ""),
               subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])]
    stop = cli._stop  # its grace ends once the stopped worker has obeyed its SIGTERM, not after a guessed time
    monkeypatch.setattr(cli, "_stop", lambda *args: stop(*args, hurry=lambda: workers[1].poll() is not None))
    try:
        os.kill(workers[1].pid, signal.SIGSTOP)
        assert cli._watch(workers, 3, [], stopped_limit=60) == 1
        assert capsys.readouterr().err == ("rdl-train: error: worker 2 of 3 exited with 3, worker 1 of 3 was stopped "
                                           "by SIGSTOP; ended the others (SIGKILL to worker 0 of 3, not ended 10 s "
                                           "after the signal)\n")
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def test_rdl_train_nproc_refuses_a_bad_rdl_dist_timeout_before_starting_workers(monkeypatch, capsys):
    monkeypatch.setenv("RDL_DIST_TIMEOUT", "soon")
    monkeypatch.setattr(cli, "_spawn_workers", lambda *args: pytest.fail("workers were started"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--nproc", "2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("rdl-train: error: $RDL_DIST_TIMEOUT must be a number of seconds > 0, got "
                                       "'soon' (it bounds how long a process waits for the others; 60 by default)\n")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_rdl_train_under_torchrun_on_a_taken_port_exits_1_with_one_line(monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(taken.getsockname()[1])),
                            ("RANK", "1"), ("WORLD_SIZE", "2"), ("RDL_DIST_TIMEOUT", "1")):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
        try:
            with pytest.raises(SystemExit) as exit_:
                cli.main(["--epochs", "1"])
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rdl-train: error: init_from_environment: rank 1 of 2 could not "
                                                   "join the process group at 127.0.0.1:"), err


def _flags_sent(monkeypatch, argv):
    """What ``rdl-train ARGV`` under torchrun sends the other ranks to compare (the group and exchange stubbed)."""
    sent = []
    monkeypatch.setattr(distributed, "init_from_environment", lambda timeout_s: None)
    monkeypatch.setattr(distributed, "_disagreement", lambda who, flags, device: sent.append(flags))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    parser = cli._parser()
    cli._join_group(parser, parser.parse_args(argv))
    return sent[0]


def test_a_flag_typed_at_its_default_on_one_rank_only_is_not_taken_for_another_run(monkeypatch):
    """--lr 0.8 typed (plain SGD's tuned rate) and --lr left out train the same run: fit compares the resolved
    rate; the flags compared by name are those with a default of their own."""
    assert _flags_sent(monkeypatch, ["--lr", "0.8", "--loss", "mse"]) == _flags_sent(monkeypatch, [])
    sent = _flags_sent(monkeypatch, ["--dropout", "0.1", "--threads", "2", "--checkpoint", "run.ckpt"])
    assert (sent["--dropout"], sent["--threads"], sent["--checkpoint"], sent["--seed"]) == (0.1, 2, "run.ckpt", 0)
    assert "--nproc" not in sent and "--lr" not in sent


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_rdl_train_rank_whose_peer_dies_ends_with_one_line_not_a_traceback(tmp_path):
    """Regression: under torchrun, a rank whose peer died mid-run ended with a RuntimeError traceback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "RDL_DIST_TIMEOUT": "20"}
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "rdl_functional", "--epochs", "500", "--threads", "1",
                                       "--checkpoint", str(tmp_path / "run.ckpt"), "--checkpoint-every", "1"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=os.path.dirname(os.path.dirname(__file__))))
    try:
        for line in iter(procs[0].stderr.readline, ""):  # the first progress line: the run is on, a checkpoint
            if "epoch" in line:                              # written at every step
                break
        procs[1].kill()
        _, err = procs[0].communicate(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 1, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("seed 0  epoch")]
    assert len(lines) == 1 and lines[0].startswith("rdl-train: error: ") and "lost a peer" in lines[0], err
    assert "run.ckpt holds the run up to its last checkpoint" in lines[0]
