"""Data-parallel training: 2 processes with gloo on 127.0.0.1 against one process on the same global batches."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import rdl_functional as rf

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import rdl_functional as rf
    from rdl_functional.distributed import init_from_environment
    torch.set_num_threads(1)
    init_from_environment(timeout_s=float(os.environ.get("TIMEOUT", "60")))
    calls = {"all_reduce": 0}
    real = dist.all_reduce
    def counted(*args, **kwargs):
        calls["all_reduce"] += 1
        return real(*args, **kwargs)
    dist.all_reduce = counted
    x, labels = rf.disc_dataset(500, 0)
    model = rf.seed_model()
    noisy = os.environ.get("MODEL") == "stateful"
    dtype = getattr(torch, os.environ.get("DTYPE", "float32"))
    x = x.to(dtype)
    if noisy:  # batch norm and dropout: the global batch's statistics and mask, from each rank's shard
        model = rf.compose(rf.linear(2, 16), rf.batch_norm(16), rf.relu, rf.dropout(0.2), rf.linear(16, 2))
    die_at = int(os.environ.get("DIE_AT_EPOCH", "0"))
    stop_at = int(os.environ.get("STOP_AT_EPOCH", "0"))
    def callback(epoch, params, history):
        if die_at and epoch == die_at and dist.get_rank() == 1:
            os._exit(9)  # a rank that dies mid-training
        if stop_at and epoch == stop_at:
            os._exit(3)  # every rank stops, as after a crash
    loss = rf.l1_loss("sum") if os.environ.get("LOSS") == "sum" else rf.mse_loss
    try:
        params, history = rf.fit(model, loss, model.init(dist.get_rank(), dtype=dtype), x,
                                 rf.one_hot(labels, 2, dtype=dtype),
                                 epochs=int(os.environ.get("EPOCHS", "5")),
                                 optimizer=rf.sgd(0.1, momentum=0.9) if noisy else rf.adam(1e-2),
                                 generator=0, callback=callback, checkpoint=os.environ.get("CHECKPOINT") or None,
                                 checkpoint_every=int(os.environ["EVERY"]) if "EVERY" in os.environ else None,
                                 batch_size=int(os.environ.get("BATCH", "50")))
    except Exception:  # the group torn down, then out at once: the interpreter's teardown aborted a rank now and
        import traceback  # then (exit -6, "terminate called without an active exception"), as rdl-train's ranks
        traceback.print_exc()
        dist.destroy_process_group()
        sys.stderr.flush()
        os._exit(1)
    if dist.get_rank() == 0:
        rf.save({"params": params, "state": history.model_state} if noisy else params, sys.argv[1])
        print("ALL_REDUCES", calls["all_reduce"])
    elif noisy:
        rf.save({"params": params, "state": history.model_state}, sys.argv[1] + ".rank1")
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # not the interpreter's teardown, which aborted a rank now and then (see above)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # the OS chooses a free port
        return s.getsockname()[1]


def _spawn(tmp_path, **env_extra):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2", **env_extra}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "params.safetensors")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_two_processes_equal_one_on_the_same_global_batches_with_one_all_reduce_per_step(tmp_path):
    procs = _spawn(tmp_path, EPOCHS="5")
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    x, labels = rf.disc_dataset(500, 0)
    model = rf.seed_model()
    alone, _ = rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2), epochs=5, batch_size=50,
                      optimizer=rf.adam(1e-2), generator=0)  # 5 epochs of 10 global batches: 50 steps
    together = rf.load(tmp_path / "params.safetensors")
    for a, b in zip(rf.tree_leaves(alone), rf.tree_leaves(together), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the all-reduce adds in another order
    # rank 1 started from other params (init(1)): the broadcast from rank 0 made them one.
    assert "ALL_REDUCES 50" in outputs[0][0]  # one per step: grads and loss in one float32 bucket


def test_a_rank_that_dies_makes_the_other_exit_with_a_message_not_hang(tmp_path):
    start = time.monotonic()
    procs = _spawn(tmp_path, EPOCHS="50", DIE_AT_EPOCH="2", TIMEOUT="20")
    outputs = [p.communicate(timeout=120) for p in procs]
    assert procs[1].returncode == 9
    assert procs[0].returncode != 0
    assert "rank 0 of 2 lost a peer during the collective" in outputs[0][1]
    assert time.monotonic() - start < 100


@pytest.mark.parametrize("flags", [["--epochs", "20"], ["--epochs", "10", "--batch-norm", "--dropout", "0.1"]],
                         ids=["seed-model", "batch-norm-dropout"])
def test_rdl_train_nproc_2_reproduces_the_single_process_run(tmp_path, flags):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    runs = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        done = subprocess.run([sys.executable, "-m", "rdl_functional", *flags, "--quiet", "--json",
                               str(tmp_path / f"{name}.json"), *extra], env=env, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr
        runs[name] = __import__("json").loads((tmp_path / f"{name}.json").read_text())["runs"][0]
        if name == "two":
            assert done.stdout.count("seed  train acc") == 1  # only rank 0 prints
    for key in ("train_accuracy", "test_accuracy", "test_errors"):
        assert runs["one"][key] == runs["two"][key], key
    for key in ("train_loss", "test_loss"):
        assert abs(runs["one"][key] - runs["two"][key]) < 1e-5, key


def test_nproc_refuses_what_it_does_not_take_yet():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "rdl_functional", "--nproc", "2", "--seeds", "0-1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--nproc 2 trains one run data-parallel; use --seed N" in done.stderr


def test_a_data_parallel_run_stopped_and_resumed_from_its_checkpoint_ends_as_the_run_never_stopped(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    procs = _spawn(whole, EPOCHS="4")
    assert [p.communicate(timeout=240) and p.returncode for p in procs] == [0, 0]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    checkpoint = str(resumed / "run.ckpt")
    procs = _spawn(resumed, EPOCHS="4", CHECKPOINT=checkpoint, EVERY="7", STOP_AT_EPOCH="2")
    assert [p.communicate(timeout=240) and p.returncode for p in procs] == [3, 3]
    saved = rf.read_checkpoint(checkpoint)
    assert saved.steps == 14 and saved.position == 200  # written by rank 0, inside epoch 2 (10 steps an epoch)
    procs = _spawn(resumed, EPOCHS="4", CHECKPOINT=checkpoint, EVERY="7")
    assert [p.communicate(timeout=240) and p.returncode for p in procs] == [0, 0]
    for a, b in zip(rf.tree_leaves(rf.load(whole / "params.safetensors")),
                    rf.tree_leaves(rf.load(resumed / "params.safetensors")), strict=True):
        assert torch.equal(a, b)


def test_rdl_train_nproc_killed_whole_then_resume_nproc_ends_as_the_run_never_killed(tmp_path):
    """SIGKILL to the launcher and its workers mid-run, then ``--resume PATH --nproc 2``: the final params are the
    uninterrupted ``--nproc 2`` run's, bit for bit."""
    import signal

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    common = [sys.executable, "-m", "rdl_functional", "--nproc", "2", "--quiet"]
    settings = ["--epochs", "12", "--optimizer", "adam", "--batch-size", "50"]
    done = subprocess.run([*common, *settings, "--save", str(tmp_path / "whole.safetensors")], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    checkpoint = tmp_path / "run.ckpt"
    run = subprocess.Popen([*common, *settings, "--checkpoint", str(checkpoint), "--checkpoint-every", "3"],
                           env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and run.poll() is None:
        if checkpoint.exists() and rf.read_checkpoint(checkpoint).steps >= 30:
            break
        time.sleep(0.01)
    assert run.poll() is None, f"the run ended before it could be killed: {run.communicate()[1]}"
    os.killpg(run.pid, signal.SIGKILL)  # the launcher and both workers
    run.communicate()
    saved = rf.read_checkpoint(checkpoint)
    assert 0 < saved.epochs_done < 12
    done = subprocess.run([*common, "--resume", str(checkpoint), "--save", str(tmp_path / "resumed.safetensors")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {checkpoint}: {saved.epochs_done} of 12 epochs done, step {saved.steps}" in done.stdout
    for a, b in zip(rf.tree_leaves(rf.load(tmp_path / "whole.safetensors")),
                    rf.tree_leaves(rf.load(tmp_path / "resumed.safetensors")), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float64", 1e-12), ("float32", 1e-5)])
def test_batch_norm_and_dropout_in_two_processes_equal_one_process_on_the_same_global_batches(tmp_path, dtype,
                                                                                              tolerance):
    """Each rank gets its rows of the global batch's dropout mask, and batch norm the global batch's statistics:
    the params and running statistics equal one process's, on every rank. Batches of 45 split 23 + 22 rows.
    (SGD, not Adam: the bias of the linear layer before batch norm has a gradient of 0 up to rounding, which
    Adam's normalization would blow up to steps of lr in both runs, differently.)"""
    procs = _spawn(tmp_path, EPOCHS="3", MODEL="stateful", BATCH="45", DTYPE=dtype)
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    x, labels = rf.disc_dataset(500, 0)
    model = rf.compose(rf.linear(2, 16), rf.batch_norm(16), rf.relu, rf.dropout(0.2), rf.linear(16, 2))
    kind = getattr(torch, dtype)
    params, history = rf.fit(model, rf.mse_loss, model.init(0, dtype=kind), x.to(kind),
                             rf.one_hot(labels, 2, dtype=kind), epochs=3, batch_size=45,
                             optimizer=rf.sgd(0.1, momentum=0.9), generator=0)
    alone = rf.tree_flatten({"params": params, "state": history.model_state})
    rank0 = rf.tree_flatten(rf.load(tmp_path / "params.safetensors"))
    rank1 = rf.tree_flatten(rf.load(str(tmp_path / "params.safetensors") + ".rank1"))
    assert list(rank0) == list(alone) and int(rank0["state.1.num_batches_tracked"]) == 3 * 12
    for key, value in alone.items():
        # One process runs torch's batch norm kernel, the shards the same formula written out with their sums
        # all-reduced: equal to rounding, which 36 float32 steps grow to about 2e-6.
        torch.testing.assert_close(rank0[key], value, rtol=tolerance * 10, atol=tolerance * 10)
        assert torch.equal(rank0[key], rank1[key]), key  # every rank holds the same bits


def test_a_sigint_to_the_nproc_launcher_stops_every_worker_with_one_message(tmp_path):
    import signal

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    checkpoint = tmp_path / "run.ckpt"
    run = subprocess.Popen([sys.executable, "-m", "rdl_functional", "--nproc", "2", "--epochs", "200", "--quiet",
                            "--checkpoint", str(checkpoint)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not checkpoint.exists():
        time.sleep(0.05)
    assert checkpoint.exists(), run.communicate(timeout=60)
    run.send_signal(signal.SIGINT)  # to the launcher alone: it passes the signal on
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert err.count("rdl-train: interrupted") == 1 and "Traceback" not in err, err
    assert f"rdl-train --resume {checkpoint} --nproc 2 goes on" in err
    with pytest.raises(ProcessLookupError):  # no worker left behind in the session
        os.killpg(run.pid, 0)


def test_nproc_with_dropout_refuses_batches_that_leave_a_process_without_rows():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "rdl_functional", "--nproc", "3", "--batch-size", "2", "--dropout",
                           "0.1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("error") == 1, done.stderr
    assert ("--nproc 3: with --dropout or --batch-norm every process needs rows of every batch, but batches of 2 "
            "over 1000 points leave 2 row(s) in each for 3 processes") in done.stderr


def test_a_summed_loss_is_refused_in_data_parallel_training(tmp_path):
    procs = _spawn(tmp_path, EPOCHS="1", LOSS="sum")
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outputs
    assert ("fit: data-parallel training weighs each process's loss by its share of the rows, which is right for a "
            "mean over rows; l1_loss(reduction='sum') sums (use reduction='mean')") in outputs[0][1]


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux's /proc), in the order it started them."""
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return sorted(int(child) for child in file.read().split())


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="needs Linux's /proc/PID/task/PID/children to find the workers")
def test_a_stopped_worker_makes_the_nproc_launcher_end_every_worker_and_exit_1_instead_of_waiting_for_ever(tmp_path):
    """SIGSTOP to one worker: the launcher's SIGTERM stayed pending on it and the launcher waited with no limit.
    Now, the worker stopped for the group's timeout ($RDL_DIST_TIMEOUT, here 5 s), every worker is ended and the
    launcher says which was stopped."""
    import signal

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "RDL_DIST_TIMEOUT": "5"}
    checkpoint = tmp_path / "run.ckpt"
    run = subprocess.Popen([sys.executable, "-m", "rdl_functional", "--nproc", "2", "--epochs", "5000", "--quiet",
                            "--checkpoint", str(checkpoint)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not checkpoint.exists():  # both ranks are training
            time.sleep(0.05)
        assert checkpoint.exists() and run.poll() is None, run.communicate(timeout=60)
        os.kill(_children(run.pid)[1], signal.SIGSTOP)
        _, err = run.communicate(timeout=60)  # it waited for ever
        with pytest.raises(ProcessLookupError):  # no worker left behind in the session, stopped or not
            os.killpg(run.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):  # SIGKILL ends stopped processes too, whatever failed
            os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
    assert run.returncode == 1, err
    # The launcher names the stopped worker, whether it saw the stop first or rank 0 first gave up waiting for it
    # (both take the group's 5 s): "worker 0 of 2 exited with 1, worker 1 of 2 was stopped by SIGSTOP for 5 s".
    (line,) = [line for line in err.splitlines() if "was stopped by" in line]
    assert line.startswith("rdl-train: error: worker ") and "worker 1 of 2 was stopped by SIGSTOP" in line, err
    assert "; ended the others" in line, err


def test_ranks_started_with_other_flags_all_exit_with_one_message_naming_the_flag(tmp_path):
    """Two processes of one torchrun-style group, one with --dropout 0.1: each trained and exited 0, with a result
    that belonged to neither run. Now every rank says which flag differs, and exits 2."""
    port = _free_port()
    procs = []
    for rank, dropout in enumerate(["0.0", "0.1"]):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2", "RDL_DIST_TIMEOUT": "30"}
        procs.append(subprocess.Popen([sys.executable, "-m", "rdl_functional", "--epochs", "1", "--quiet",
                                       "--dropout", dropout], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    for _, err in outputs:
        assert err == ("rdl-train: error: the 2 processes of a data-parallel run must train the same run, but rank 1 "
                       "was started with --dropout 0.1, rank 0 with --dropout 0.0 (start every process with the same "
                       "flags)\n")
