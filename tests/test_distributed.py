"""Data-parallel training: 2 processes with gloo on 127.0.0.1 against one process on the same global batches."""

from __future__ import annotations

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
    die_at = int(os.environ.get("DIE_AT_EPOCH", "0"))
    stop_at = int(os.environ.get("STOP_AT_EPOCH", "0"))
    def callback(epoch, params, history):
        if die_at and epoch == die_at and dist.get_rank() == 1:
            os._exit(9)  # a rank that dies mid-training
        if stop_at and epoch == stop_at:
            os._exit(3)  # every rank stops, as after a crash
    params, history = rf.fit(model, rf.mse_loss, model.init(dist.get_rank()), x, rf.one_hot(labels, 2),
                             epochs=int(os.environ.get("EPOCHS", "5")), batch_size=50, optimizer=rf.adam(1e-2),
                             generator=0, callback=callback, checkpoint=os.environ.get("CHECKPOINT") or None,
                             checkpoint_every=int(os.environ["EVERY"]) if "EVERY" in os.environ else None)
    if dist.get_rank() == 0:
        rf.save(params, sys.argv[1])
        print("ALL_REDUCES", calls["all_reduce"])
    dist.destroy_process_group()
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


def test_rdl_train_nproc_2_reproduces_the_single_process_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    runs = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        done = subprocess.run([sys.executable, "-m", "rdl_functional", "--epochs", "20", "--quiet", "--json",
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
