"""Checkpoints: a run killed at any moment and resumed ends bit for bit as the run never interrupted."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rdl_functional as rf
from rdl_functional.checkpoint import _HISTORY, _KEY, _write
from rdl_functional.io import _load, _save

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--epochs", "20", "--batch-norm", "--dropout", "0.1", "--optimizer", "adam", "--checkpoint-every", "1",
       "--quiet", "--seed", "3"]


def _cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.Popen([sys.executable, "-m", "rdl_functional", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **kwargs)


def _steps(path) -> int:
    """Steps done by the checkpoint at ``path`` (0 when none); it is always whole, so it can be read any time."""
    return rf.read_checkpoint(path).steps if path.exists() else 0


def _same_trees(a, b):
    return rf.tree_difference(a, b, leaves=True) is None and all(
        torch.equal(x, y) for x, y in zip(rf.tree_leaves(a), rf.tree_leaves(b), strict=True))


def _assert_same_run(path_a, path_b):
    a, b = rf.read_checkpoint(path_a), rf.read_checkpoint(path_b)
    assert (a.epochs_done, a.position, a.steps) == (b.epochs_done, b.position, b.steps) == (20, 0, 200)
    assert a.history == b.history and len(a.history["train_loss"]) == 20
    for name in ("params", "opt_state", "model_state"):
        assert _same_trees(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.generator_state, b.generator_state)


def test_a_run_killed_again_and_again_ends_bit_for_bit_as_the_run_never_interrupted(tmp_path):
    reference = _cli([*RUN, "--checkpoint", str(tmp_path / "reference.ckpt")])
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    path = tmp_path / "killed.ckpt"
    rng = random.Random(20261128)
    kills, during_a_write, steps_seen = 0, 0, [0]
    process = _cli([*RUN, "--checkpoint", str(path)])
    while kills < 12 or (not during_a_write and kills < 40):  # on a loaded machine a write may slip by: retry
        # Wait until this run has written a checkpoint beyond the last one (it is training), then kill it at a
        # random moment soon after; every other time, at the moment a checkpoint's temporary file appears.
        deadline = time.monotonic() + 120
        while process.poll() is None and _steps(path) <= steps_seen[-1] and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.poll() is not None:
            break
        if kills % 2:
            time.sleep(rng.uniform(0.0, 0.05))
        else:  # watch the folder without sleeping: the temporary file lives for a millisecond or two
            watch_until = time.monotonic() + 2
            while time.monotonic() < watch_until and not any(name.endswith(".tmp") for name in os.listdir(tmp_path)):
                pass
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        kills += 1
        during_a_write += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # its temporary file is left
        steps_seen.append(_steps(path))
        # The same command, as after a crash: it resumes from the checkpoint (or --resume PATH does).
        again = [*RUN, "--checkpoint", str(path)] if kills % 2 else ["--resume", str(path), "--quiet",
                                                                     "--checkpoint-every", "1"]
        process = _cli(again)
    _, err = process.communicate()
    assert process.returncode == 0, err
    assert kills >= 10, f"only {kills} kills landed before the run finished"
    assert during_a_write >= 1, "no kill landed during a checkpoint write"
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] < 200  # each resumed run went on from the last
    _assert_same_run(path, tmp_path / "reference.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.ckpt", "reference.ckpt"]  # no leftovers


def _task():
    x, labels = rf.disc_dataset(200, 0)
    model = rf.seed_model(batch_norm=True, dropout=0.1)
    return model, model.init(0), x, rf.one_hot(labels, 2)


def test_fit_resumes_inside_an_epoch_and_refuses_another_runs_checkpoint(tmp_path):
    model, params, x, target = _task()

    def run(**kwargs):
        return rf.fit(model, rf.mse_loss, params, x, target, epochs=4, batch_size=30,
                      optimizer=rf.adam(rf.linear_schedule(0.01, 0.0, 28)), generator=5, **kwargs)

    whole, history = run()
    path = tmp_path / "run.ckpt"

    def stop(epoch, params, history):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=path, checkpoint_every=5, callback=stop)
    saved = rf.read_checkpoint(path)
    assert (saved.epochs_done, saved.steps) == (1, 10) and saved.position == 90  # inside epoch 2
    resumed, resumed_history = run(checkpoint=path, checkpoint_every=5)
    assert _same_trees(resumed, whole)
    assert resumed_history.train_loss == history.train_loss
    assert _same_trees(resumed_history.model_state, history.model_state)
    assert _same_trees(resumed_history.opt_state, history.opt_state)
    with pytest.raises(ValueError, match=r"fit: the checkpoint .*run.ckpt' records another run \(batch_size: 30 in "
                                         r"the checkpoint, 20 now\)"):
        rf.fit(model, rf.mse_loss, params, x, target, epochs=4, batch_size=20,
               optimizer=rf.adam(rf.linear_schedule(0.01, 0.0, 28)), generator=5, checkpoint=path)
    with pytest.raises(FileNotFoundError, match=r"fit: checkpoint: .*: the folder .*nowhere' does not exist"):
        run(checkpoint=tmp_path / "nowhere" / "run.ckpt")


def test_nan_stops_training_naming_the_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model, params, x, target = _task()
    x = x.clone()
    path = tmp_path / "run.ckpt"
    rf.fit(model, rf.mse_loss, params, x, target, epochs=1, batch_size=40, lr=0.1, generator=0)  # finite: fine
    poisoned = rf.tree_map(lambda t: t.clone(), params)
    with pytest.raises(rf.NonFiniteLoss, match=r"fit: the loss is nan at epoch 3, step \d+: training stopped; the "
                                               r"checkpoint .* holds the last good state") as caught:
        def poison(epoch, p, history):
            if epoch == 2:
                x[70] = float("nan")  # the data turns bad after epoch 2 (as a stream might)

        rf.fit(model, rf.mse_loss, poisoned, x, target, epochs=5, batch_size=40, lr=0.1, generator=0,
               checkpoint=path, callback=poison)
    assert (caught.value.epoch, caught.value.step) >= (3, 1)
    good = rf.read_checkpoint(path)
    assert good.epochs_done == 2 and all(torch.isfinite(t).all() for t in rf.tree_leaves(good.params))
    # check_finite=False trains on regardless.
    _, history = rf.fit(model, rf.mse_loss, params, x, target, epochs=1, batch_size=40, lr=0.1, generator=0,
                        check_finite=False)
    assert history.epochs == 1


def test_params_that_require_grad_are_detached_not_leaked():
    model = rf.seed_model()
    params = rf.tree_map(lambda t: t.clone().requires_grad_(), model.init(0))
    x, labels = rf.disc_dataset(100, 0)
    for optimizer in (rf.sgd_step, rf.adam(1e-2), lambda p, g, lr: rf.sgd_step(p, g, lr)):
        kwargs = {"lr": 0.1} if optimizer is not rf.adam else {}
        trained, _ = rf.fit(model, rf.mse_loss, params, x, rf.one_hot(labels, 2), epochs=2, batch_size=50,
                            optimizer=optimizer, generator=0, **({} if isinstance(optimizer, rf.Optimizer)
                                                                 else kwargs))
        assert all(leaf.grad_fn is None for leaf in rf.tree_leaves(trained))
    before, _ = rf.fit(model, rf.mse_loss, params, x, rf.one_hot(labels, 2), epochs=0, batch_size=50,
                       optimizer=lambda p, g, lr: p, lr=0.1, generator=0)
    assert all(a is not b for a, b in zip(rf.tree_leaves(before), rf.tree_leaves(params), strict=True))


@pytest.mark.slow
def test_soak_twenty_thousand_steps_with_params_that_require_grad_grow_rss_under_20_mb():
    """Not in the default run (``pytest -m slow``): 20,000 steps of fit, the resident memory measured."""
    def rss_mb() -> float:
        with open(f"/proc/{os.getpid()}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    model = rf.seed_model()
    params = rf.tree_map(lambda t: t.clone().requires_grad_(), model.init(0))
    x, labels = rf.disc_dataset(1000, 0)
    target = rf.one_hot(labels, 2)
    rf.fit(model, rf.mse_loss, params, x, target, epochs=20, batch_size=100, lr=0.1, generator=0)  # warm
    start, clock = rss_mb(), time.perf_counter()
    rf.fit(model, rf.mse_loss, params, x, target, epochs=2000, batch_size=100, lr=0.1, generator=0,
           record_history=False)
    assert rss_mb() - start < 20, f"RSS grew {rss_mb() - start:.1f} MB over 20,000 steps"
    assert time.perf_counter() > clock


def test_small_defects_of_issue_10_stay_fixed(tmp_path):
    import numpy as np

    from rdl_functional.apps.disc_task import model_words as _model_words

    # A stack of models stops at a NaN too (rdl-train --seeds trains one).
    x, labels = rf.disc_dataset(40, 0)
    xs = torch.stack([x, x.clone()])
    xs[1, 3] = float("nan")
    model = rf.seed_model()
    params = rf.stack_params([model.init(0), model.init(1)])
    with pytest.raises(rf.NonFiniteLoss, match=r"fit_stacked \(the loss of all models\): the loss is nan at epoch "
                                               r"1, step \d"):
        rf.fit_stacked(model, rf.mse_loss, params, xs, torch.stack([rf.one_hot(labels, 2)] * 2), epochs=1,
                       batch_size=20, lr=0.1, generators=[torch.Generator().manual_seed(i) for i in range(2)])
    # Rates: a numpy float is a number; one beyond float32 is refused up front, not inside torch.
    p = rf.linear(2, 2).init(0)
    g = rf.tree_map(torch.ones_like, p)
    assert torch.equal(rf.sgd_step(p, g, np.float32(0.5))["bias"], rf.sgd_step(p, g, 0.5)["bias"])
    with pytest.raises(ValueError, match=r"sgd_step: lr must be at most 3.403e\+38 \(float32's largest number\)"):
        rf.sgd_step(p, g, 1e308)
    with pytest.raises(TypeError, match=r"sgd_step: lr must be a number, got function: a schedule goes to "
                                        r"rf.sgd\(schedule\)"):
        rf.sgd_step(p, g, rf.linear_schedule(0.1, 0.0, 10))
    with pytest.raises(ValueError, match=r"sgd: lr must be at most"):
        rf.sgd(1e39)
    # The history plot's title keeps the model's name whole.
    assert _model_words(rf.DiscSettings().task.description) == "2-25-25-25-2 MLP (ReLU, Tanh output)"


def test_review_findings_of_issue_10_stay_fixed(tmp_path):
    import numpy as np

    _, _, x, target = _task()
    plain = rf.seed_model()
    # A numpy rate goes into the checkpoint's JSON; info that is not JSON is refused before any work.
    rf.fit(plain, rf.mse_loss, plain.init(0), x, target, epochs=1, batch_size=50, lr=np.float32(0.1), generator=0,
           checkpoint=tmp_path / "np.ckpt")
    with pytest.raises(ValueError, match=r"fit: checkpoint_info must be JSON data"):
        rf.fit(plain, rf.mse_loss, plain.init(0), x, target, epochs=1, batch_size=50, lr=0.1, generator=0,
               checkpoint=tmp_path / "info.ckpt", checkpoint_info={"f": os.path})
    assert not (tmp_path / "info.ckpt").exists()
    # Another momentum, or another schedule, is another run.
    run = dict(epochs=1, batch_size=50, generator=0, checkpoint=tmp_path / "opt.ckpt")
    rf.fit(plain, rf.mse_loss, plain.init(0), x, target, optimizer=rf.sgd(0.1, momentum=0.9), **run)
    with pytest.raises(ValueError, match=r"records another run \(optimizer.probe"):
        rf.fit(plain, rf.mse_loss, plain.init(0), x, target, optimizer=rf.sgd(0.1, momentum=0.5), **run)
    run["checkpoint"] = tmp_path / "sched.ckpt"
    rf.fit(plain, rf.mse_loss, plain.init(0), x, target, lr=rf.piecewise_constant_schedule(0.1, {2: 0.5}), **run)
    with pytest.raises(ValueError, match=r"records another run \(lr.every step"):
        rf.fit(plain, rf.mse_loss, plain.init(0), x, target, lr=rf.piecewise_constant_schedule(0.1, {3: 0.5}), **run)
    # The NaN's step is counted from the epoch's start even after a checkpoint inside the epoch; and
    # check_finite=False trains on with a checkpoint too.
    bad = x.clone()
    bad[150:] = float("nan")  # rows 150.. of the unshuffled data: which steps they fall in depends on the shuffle
    with pytest.raises(rf.NonFiniteLoss) as caught:
        rf.fit(plain, rf.mse_loss, plain.init(0), bad, target, epochs=1, batch_size=10, lr=0.1, generator=0,
               checkpoint=tmp_path / "nan.ckpt", checkpoint_every=2)
    with pytest.raises(rf.NonFiniteLoss) as alone:
        rf.fit(plain, rf.mse_loss, plain.init(0), bad, target, epochs=1, batch_size=10, lr=0.1, generator=0)
    assert caught.value.step == alone.value.step
    rf.fit(plain, rf.mse_loss, plain.init(0), bad, target, epochs=1, batch_size=10, lr=0.1, generator=0,
           checkpoint=tmp_path / "nocheck.ckpt", check_finite=False)
    # A dict that holds itself is refused, not walked forever.
    cyclic = {"w": torch.zeros(1)}
    cyclic["self"] = cyclic
    with pytest.raises(ValueError, match=r'tree_flatten: the tree contains itself at "self"'):
        rf.tree_flatten(cyclic)


def test_a_signal_that_does_not_end_the_process_leaves_the_write_alone(tmp_path):
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal
        from rdl_functional._files import atomic_write
        signal.signal(signal.SIGHUP, signal.SIG_IGN)            # as under nohup
        flag = []
        signal.signal(signal.SIGUSR1, lambda *_: flag.append(1))  # a graceful-shutdown flag
        def write(tmp):
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGUSR1)
            open(tmp, "w").write("whole")
        atomic_write({str(tmp_path / "out.txt")!r}, write)
        assert flag == [1]
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.txt").read_text() == "whole"


def test_a_checkpoint_write_that_fails_ends_rdl_train_with_one_line_naming_the_file_and_keeps_the_last(tmp_path):
    # The disk "fills" after the first checkpoint: a file-size limit (EFBIG, SIGXFSZ ignored) from then on.
    import textwrap

    path = tmp_path / "run.ckpt"
    script = textwrap.dedent(f"""
        import os, resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        import rdl_functional.checkpoint as checkpoint
        from rdl_functional.apps.cli import main
        write = checkpoint.write_checkpoint
        def write_then_fill_the_disk(path, state):
            write(path, state)
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) // 2, resource.RLIM_INFINITY))
        checkpoint.write_checkpoint = write_then_fill_the_disk
        sys.exit(main(["--epochs", "3", "--quiet", "--threads", "1", "--checkpoint", {str(path)!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"rdl-train: error: checkpoint: cannot write {str(path)!r}: File too large; "
                                        "the file there is left as it was"]
    assert rf.read_checkpoint(path).epochs_done == 1  # the last good checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


# ---------------------------------------------------------------------------
# Records proved whole and consistent before fit uses them


def _interrupted_run(tmp_path):
    """A checkpoint inside epoch 2 (position 90 of 200 rows) of an Adam run of a batch-norm model, and ``run``,
    which resumes from a checkpoint path."""
    model, params, x, target = _task()

    def run(path, **kwargs):
        return rf.fit(model, rf.mse_loss, params, x, target, epochs=3, batch_size=30, optimizer=rf.adam(0.01),
                      generator=5, checkpoint=path, checkpoint_every=5, **kwargs)

    def stop(epoch, params, history):
        if epoch == 2:
            raise KeyboardInterrupt

    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(path, callback=stop)
    return path, run


def _resigned(path, out, change):
    """A copy of the checkpoint at ``path``, changed by ``change(tree, record)`` and signed with a digest that
    matches: what only a writer with another idea of a checkpoint (or an editor) makes."""
    tree, metadata = _load(path, "test")
    record = json.loads(metadata[_KEY])
    change(tree, record)
    _write(out, tree, json.dumps(record))
    return out


def _set(tree, *keys, value):
    for key in keys[:-1]:
        tree = tree[key]
    tree[keys[-1]] = value


_INCONSISTENT = {  # was: AttributeError, IndexError, RuntimeError, ZeroDivisionError, accepted, accepted, ...
    "order_missing": (lambda t, r: t.pop("order"), r"position is 90 \(inside an epoch\), but it holds no shuffle"),
    "order_out_of_range": (lambda t, r: _set(t, "order", value=t["order"].clone().fill_(0).add_(
        torch.arange(200)).add_(1)), r"the shuffle \(order\) is not a permutation of 0..199"),
    "order_repeats_a_row": (lambda t, r: t["order"].__setitem__(0, t["order"][1].item()),
                            r"the shuffle \(order\) is not a permutation"),
    "position_past_the_order": (lambda t, r: r.update(position=200), r"position is 200, not inside an epoch of 200"),
    "generator_short": (lambda t, r: _set(t, "generator", value=t["generator"][:100].clone()),
                        r"the generator's state is torch.uint8 of shape \(100,\), expected uint8 of shape \(5056,\)"),
    "generator_refused": (lambda t, r: t["generator"].fill_(255),
                          r"a CPU generator refuses its state \(Invalid mt19937 state\)"),
    "count_negative": (lambda t, r: _set(t, "opt_state", "count", value=torch.tensor(-1)),
                       r'step count at "opt_state.count" is tensor\(-1\), expected a 0-dim integer tensor'),
    "history_longer_than_the_epochs": (lambda t, r: r["history"]["train_loss"].append(0.5),
                                       r"history.train_loss holds 2 values for 1 epoch\(s\) done"),
    "history_a_huge_integer": (lambda t, r: r["history"].update(train_loss=[10**400]),
                               r"history.train_loss must be a list of numbers, but holds '1000000000"),
    "steps_a_float": (lambda t, r: r.update(steps=10.0), r"steps is 10.0, expected an integer ≥ 0"),
    "flag_a_number": (lambda t, r: r.update(has_opt_state=1), r"has_opt_state is 1, expected true or false"),
    "opt_state_without_its_flag": (lambda t, r: r.update(has_opt_state=False),
                                   r"has_opt_state is false, but opt_state holds 30 tensor\(s\)"),
}


@pytest.mark.parametrize("case", list(_INCONSISTENT))
def test_an_inconsistent_record_is_refused_by_read_checkpoint_and_fit_naming_the_file(tmp_path, case):
    path, run = _interrupted_run(tmp_path)
    change, reason = _INCONSISTENT[case]
    bad = _resigned(path, tmp_path / f"{case}.ckpt", change)
    expected = rf"read_checkpoint: {re.escape(repr(str(bad)))} holds an inconsistent checkpoint \(.*{reason}"
    with pytest.raises(ValueError, match=expected):
        rf.read_checkpoint(bad)
    with pytest.raises(ValueError, match=expected):  # fit's resume never sees it
        run(bad)


def test_a_checkpoint_of_format_1_is_refused_saying_why_and_what_to_do(tmp_path):
    path, run = _interrupted_run(tmp_path)
    tree, metadata = _load(path, "test")
    record = json.loads(metadata[_KEY])
    record["format"] = 1
    old = tmp_path / "old.ckpt"
    _save(tree, old, "checkpoint", {_KEY: json.dumps(record)})  # as the version before digests wrote it
    expected = (rf"read_checkpoint: {re.escape(repr(str(old)))} is a checkpoint of format 1, written by an older "
                r"version of rdl_functional: it holds no digest to prove it whole, so it is not resumed. Start the run "
                r"afresh \(remove the file, or give another checkpoint path\), or finish it with the version that "
                r"wrote it")
    with pytest.raises(ValueError, match=expected):
        rf.read_checkpoint(old)
    with pytest.raises(ValueError, match=expected):
        run(old)
    with pytest.raises(ValueError, match=r"read_checkpoint: '.*run.ckpt' is not a checkpoint of rdl_functional \("
                                         r"its metadata holds no rdl_functional.checkpoint record; rf.load reads"):
        rf.save(rf.seed_model().init(0), path)
        rf.read_checkpoint(path)


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-2, 2), st.text(max_size=2),
                  st.lists(st.integers(0, 2), max_size=2))
_STATE = torch.Generator().manual_seed(0).get_state()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_record_is_read_as_written_when_consistent_and_refused_naming_the_file_otherwise(tmp_path, data):
    n = data.draw(st.integers(1, 5), label="rows")
    epochs = data.draw(st.one_of(st.integers(0, 3), _JUNK), label="epochs_done")
    position = data.draw(st.one_of(st.integers(0, n), _JUNK), label="position")
    steps = data.draw(st.one_of(st.integers(0, 9), _JUNK), label="steps")
    flags = [data.draw(st.one_of(st.booleans(), _JUNK), label=name) for name in ("has_opt_state", "has_model_state")]
    lengths = [data.draw(st.sampled_from([0, epochs if type(epochs) is int and epochs >= 0 else 0, 1, 4]),
                         label=f"len {name}") for name in _HISTORY]
    history = {name: [0.5] * length for name, length in zip(_HISTORY, lengths, strict=True)}
    if data.draw(st.booleans(), label="history junk"):
        history[data.draw(st.sampled_from(_HISTORY))] = data.draw(_JUNK)
    kinds = ["none", "permutation", "repeat", "int32"]
    order_kind = data.draw(st.sampled_from(kinds), label="order")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    order = {"none": None, "permutation": perm, "int32": perm.int(),
             "repeat": torch.zeros(n, dtype=torch.int64) if n > 1 else torch.tensor([1])}[order_kind]
    generator_kind = data.draw(st.sampled_from(["good", "short", "refused", "float"]), label="generator")
    generator = {"good": _STATE, "short": _STATE[:-1], "refused": torch.full_like(_STATE, 255),
                 "float": _STATE.double()}[generator_kind]
    count = data.draw(st.one_of(st.integers(-2, 3), st.just(1.5)), label="count")
    opt_state = {"count": torch.tensor(count), "lr": torch.tensor(0.1, dtype=torch.float64)}
    has_opt = flags[0] if flags[0] is not False else data.draw(st.sampled_from([False, "empty"]), label="opt")
    tree = {"params": {"w": torch.zeros(2)}, "opt_state": {} if has_opt == "empty" else opt_state,
            "model_state": {"s": {"m": torch.ones(1)}} if flags[1] is True else {}, "generator": generator}
    if has_opt == "empty":
        has_opt = False
    if order is not None:
        tree["order"] = order
    record = {"format": 2, "epochs_done": epochs, "position": position, "steps": steps, "history": history,
              "settings": {"epochs": 3}, "has_opt_state": has_opt, "has_model_state": flags[1]}
    path = tmp_path / "any.ckpt"
    _write(path, tree, json.dumps(record))

    def natural(v):
        return type(v) is int and v >= 0

    consistent = (
        natural(epochs) and natural(position) and natural(steps)
        and all(type(f) is bool for f in (has_opt, flags[1]))
        and all(isinstance(v, list) and len(v) in (0, epochs) for v in history.values())
        and (order_kind == "none" if position == 0 else order_kind == "permutation" and natural(position)
             and position < n)
        and generator_kind == "good"
        and (not tree["opt_state"] or (has_opt is True and isinstance(count, int) and count >= 0))
    )
    if not consistent:
        with pytest.raises(ValueError, match=rf"read_checkpoint: {re.escape(repr(str(path)))} holds an inconsistent "
                                             r"checkpoint \(.+\); it cannot be resumed: remove it to start afresh"):
            rf.read_checkpoint(path)
        return
    read = rf.read_checkpoint(path)
    assert (read.epochs_done, read.position, read.steps, read.history) == (epochs, position, steps, history)
    assert (read.opt_state is not None, read.model_state is not None) == (has_opt, flags[1])
    assert torch.equal(read.generator_state, _STATE)
    assert (read.order is None) == (position == 0) and (read.order is None or torch.equal(read.order, perm))
