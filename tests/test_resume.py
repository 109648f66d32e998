"""A run's identity and resuming (issue 16): a run is compared with its checkpoint by the values it trains with,
its step function must be known, and a run of a constant rate may be extended."""

from __future__ import annotations

import functools
import re

import pytest
import torch

import rdl_functional as rf
from rdl_functional.apps.cli import main
from rdl_functional.checkpoint import describe_optimizer, digest

TINY = ["--epochs", "2", "--batch-size", "500", "--quiet"]  # two steps an epoch


def _same_trees(a, b) -> bool:
    return rf.tree_difference(a, b, leaves=True) is None and all(
        torch.equal(x, y) for x, y in zip(rf.tree_leaves(a), rf.tree_leaves(b), strict=True))


def _task():
    x, labels = rf.disc_dataset(60, 0)
    model = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2))
    return model, x, rf.one_hot(labels, 2)


def _fit(path=None, **kwargs):
    model, x, target = _task()
    run = dict(epochs=2, batch_size=30, lr=0.1, generator=0)
    return rf.fit(model, rf.mse_loss, kwargs.pop("params", model.init(0)), x, target,
                  **{**run, **kwargs}, checkpoint=path)


def _refused(args, capsys) -> str:
    """``main(args)`` exits 2 with one line and no traceback, before any training; the line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert "resuming from" not in captured.out and "seed  train acc" not in captured.out
    return captured.err


# ---------------------------------------------------------------------------
# The start fingerprint


def test_start_fingerprint_does_not_depend_on_the_order_of_dict_keys(tmp_path):
    w, b = torch.arange(8.0).reshape(4, 2), torch.ones(4)
    assert digest({"weight": w, "bias": b}) == digest({"bias": b, "weight": w})
    assert digest({"0": {"weight": w}, "1": {}}) == digest({"1": {}, "0": {"weight": w}})
    assert digest({"weight": w, "bias": b}) != digest({"weight": b, "bias": w})  # the paths still count
    # A run started from the same params, built in another order, is the same run: it resumes.
    model, _, _ = _task()
    params = model.init(0)
    reordered = {key: dict(reversed(params[key].items())) for key in reversed(params)}
    path = tmp_path / "run.ckpt"
    _fit(path, params=params, epochs=1)
    _fit(path, params=reordered, epochs=1)


# ---------------------------------------------------------------------------
# Step functions whose identity a checkpoint cannot establish


def _make(scale):
    def step(params, grads, lr):
        return rf.sgd_step(params, grads, lr * scale)

    return step


class _Stepper:
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, params, grads, lr):
        return rf.sgd_step(params, grads, lr * self.scale)


def _module_level_step(params, grads, lr):
    return rf.sgd_step(params, grads, lr)


@pytest.mark.parametrize(("step", "why"), [
    (_make(1.0), r"the step function _make.<locals>.step closes over values \(scale\) that a checkpoint does not "
                 r"record.*checkpoint_info=\{'step': '_make.<locals>.step', 'scale': ...\}"),
    (lambda params, grads, lr: rf.sgd_step(params, grads, lr), r"<lambda> is a lambda"),
    (functools.partial(rf.sgd_step), r"sgd_step is a functools.partial, whose bound arguments"),
    (_Stepper(1.0), r"is a callable _Stepper object, whose fields a checkpoint does not record"),
])
def test_a_step_function_of_unknown_identity_is_refused_with_checkpoint(step, why, tmp_path):
    with pytest.raises(ValueError, match=r"fit: checkpoint='.*run.ckpt' knows a run by its settings, and .*" + why):
        _fit(tmp_path / "run.ckpt", optimizer=step)
    assert not (tmp_path / "run.ckpt").exists()
    _fit(None, optimizer=step)  # without a checkpoint there is nothing to tell apart


def test_closure_values_are_part_of_a_runs_identity_once_checkpoint_info_names_them(tmp_path):
    path = tmp_path / "run.ckpt"
    _fit(path, optimizer=_make(1.0), checkpoint_info={"step": "make", "scale": 1.0})  # the user vouches
    with pytest.raises(ValueError, match=r"records another run \(info.scale: 1.0 in the checkpoint, 3.0 now\)"):
        _fit(path, optimizer=_make(3.0), checkpoint_info={"step": "make", "scale": 3.0})
    _fit(path, optimizer=_make(1.0), checkpoint_info={"step": "make", "scale": 1.0})  # the same run resumes


def test_sgd_step_and_module_level_functions_keep_working_with_checkpoint(tmp_path):
    for step in (rf.sgd_step, _module_level_step):
        path = tmp_path / f"{step.__name__}.ckpt"
        whole, _ = _fit(None, optimizer=step)
        _fit(path, optimizer=step, epochs=1)
        resumed, _ = _fit(path, optimizer=step)
        assert _same_trees(resumed, whole)


_SOURCE = """
import rdl_functional as rf

def step(params, grads, lr):
    return rf.sgd_step(params, grads, max(v for v in (lr, 0.0)))  # a generator expression: nested code

def other(params, grads, lr):
    return rf.{name}(params, grads, lr)
"""


def test_a_step_functions_fingerprint_is_its_content_not_addresses_and_counts_the_names_it_calls():
    # The same source compiled twice (as in a process that resumes): the same fingerprint, though the nested
    # code objects sit at other addresses, which their repr showed.
    first, second = {}, {}
    exec(compile(_SOURCE.format(name="sgd_step"), "steps.py", "exec"), first)
    exec(compile(_SOURCE.format(name="sgd_step"), "steps.py", "exec"), second)
    assert describe_optimizer(first["step"], 10) == describe_optimizer(second["step"], 10)
    # Functions alike but for the function they call are two step functions.
    third = {}
    exec(compile(_SOURCE.format(name="adam_step"), "steps.py", "exec"), third)
    assert describe_optimizer(first["other"], 10) != describe_optimizer(third["other"], 10)


# ---------------------------------------------------------------------------
# Extending a run: fit


def test_fit_extends_a_finished_run_of_a_constant_rate_bit_for_bit(tmp_path):
    path = tmp_path / "run.ckpt"
    whole, history = _fit(None, epochs=4)
    _fit(path, epochs=2)
    extended, extended_history = _fit(path, epochs=4)
    assert _same_trees(extended, whole) and extended_history.train_loss == history.train_loss
    assert rf.read_checkpoint(path).settings["epochs"] == 4  # the checkpoint now records the longer run
    _fit(path, epochs=4)
    # An Optimizer's constant rate, and a schedule that does not depend on the total, extend as well.
    steps = rf.piecewise_constant_schedule(0.1, {3: 0.5})
    whole, _ = _fit(None, lr=None, optimizer=rf.adam(steps), epochs=3)
    _fit(tmp_path / "adam.ckpt", lr=None, optimizer=rf.adam(steps), epochs=1)
    extended, _ = _fit(tmp_path / "adam.ckpt", lr=None, optimizer=rf.adam(steps), epochs=3)
    assert _same_trees(extended, whole)


def test_fit_refuses_to_extend_a_run_whose_schedule_is_tied_to_its_length(tmp_path):
    path = tmp_path / "run.ckpt"
    _fit(path, lr=None, optimizer=rf.sgd(rf.linear_schedule(0.1, 0.0, 4)), epochs=2)
    with pytest.raises(ValueError, match=r"fit: the checkpoint '.*run.ckpt' records a run of 2 epochs, which cannot "
                                         r"go on to 4: the optimizer or its rate would differ over the steps it has "
                                         r"taken \(optimizer.*A schedule tied to the run's length"):
        _fit(path, lr=None, optimizer=rf.sgd(rf.linear_schedule(0.1, 0.0, 8)), epochs=4)
    _fit(tmp_path / "lr.ckpt", lr=rf.linear_schedule(0.1, 0.0, 4), epochs=2)
    with pytest.raises(ValueError, match=r"lr.ckpt' records a run of 2 epochs, which cannot go on to 4: .*\(lr\."):
        _fit(tmp_path / "lr.ckpt", lr=rf.linear_schedule(0.1, 0.0, 8), epochs=4)
    with pytest.raises(ValueError, match=r"the checkpoint '.*run.ckpt' has 2 epochs done, more than epochs=1"):
        _fit(path, lr=None, optimizer=rf.sgd(rf.linear_schedule(0.1, 0.0, 4)), epochs=1)
    with pytest.raises(ValueError, match=r"records another run \(batch_size: 30 in the checkpoint, 20 now\)"):
        _fit(path, lr=None, optimizer=rf.sgd(rf.linear_schedule(0.1, 0.0, 4)), epochs=3, batch_size=20)


# ---------------------------------------------------------------------------
# rdl-train: resume by resolved settings


def test_the_same_command_again_resumes_whether_a_default_was_typed_or_not(tmp_path, capsys):
    path = str(tmp_path / "run.ckpt")
    assert main([*TINY, "--lr", "0.8", "--checkpoint", path]) == 0  # 0.8: plain SGD's default
    capsys.readouterr()
    # Left to its default, or another default typed out (mse: the MLP's own loss): the same run.
    for again in ([*TINY, "--checkpoint", path], [*TINY, "--loss", "mse", "--checkpoint", path],
                  ["--resume", path, "--quiet"], ["--resume", path, "--lr", "0.8", "--quiet"]):
        assert main(again) == 0
        out = capsys.readouterr().out
        assert f"resuming from {path}: 2 of 2 epochs done, step 4 (the run is finished)" in out


def test_resume_refuses_a_given_flag_that_differs_from_the_checkpoint_by_its_name(tmp_path, capsys):
    path = str(tmp_path / "adam.ckpt")
    assert main([*TINY, "--optimizer", "adam", "--checkpoint", path]) == 0
    capsys.readouterr()
    # sgd is the default: a comparison with the defaults let it through, and the run went on with Adam.
    err = _refused(["--resume", path, "--optimizer", "sgd"], capsys)
    assert f"--resume {path}: the checkpoint records a run of other settings (--optimizer sgd here, adam in the " \
           "run); leave those flags out" in err
    err = _refused(["--resume", path, "--lr", "0.01", "--batch-size", "100", "--threads", "2"], capsys)
    assert "(--batch-size 100 here, 500 in the run; --threads 2 here, 1 in the run)" in err
    assert "(--batch-norm on here, off in the run)" in _refused(["--resume", path, "--batch-norm"], capsys)
    assert "the checkpoint records one run, of seed 0; leave out --seeds" in _refused(
        ["--resume", path, "--seeds", "0-1"], capsys)
    # The run's own values may be given: 0.01 is Adam's tuned rate, 500 the run's batch size.
    assert main(["--resume", path, "--optimizer", "adam", "--lr", "0.01", "--batch-size", "500", "--seed", "0",
                 "--epochs", "2", "--device", "cpu", "--quiet"]) == 0
    assert f"resuming from {path}: 2 of 2 epochs done" in capsys.readouterr().out


def test_checkpoint_of_another_run_is_refused_by_flag_name_not_record_path(tmp_path, capsys):
    path = str(tmp_path / "run.ckpt")
    assert main([*TINY, "--checkpoint", path]) == 0
    capsys.readouterr()
    err = _refused([*TINY, "--lr", "0.5", "--seed", "4", "--checkpoint", path], capsys)
    assert (f"--checkpoint {path}: the checkpoint records another run (--lr 0.8 in the checkpoint, 0.5 now; --seed 0 "
            f"in the checkpoint, 4 now); give the flags it was written with (or rdl-train --resume {path}), or "
            "choose another path") in err
    assert "info." not in err and "settings." not in err


def test_resume_with_more_epochs_extends_a_run_of_a_constant_rate(tmp_path, capsys):
    constant = ["--batch-size", "500", "--quiet", "--schedule", "constant", "--optimizer", "adam"]
    reference, path = str(tmp_path / "reference.ckpt"), str(tmp_path / "run.ckpt")
    assert main([*constant, "--epochs", "3", "--checkpoint", reference]) == 0
    assert main([*constant, "--epochs", "2", "--checkpoint", path]) == 0
    capsys.readouterr()
    assert main(["--resume", path, "--epochs", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {path}: 2 of 3 epochs done, step 4\n" in out and "3 epochs, batch size 500" in out
    a, b = rf.read_checkpoint(path), rf.read_checkpoint(reference)
    assert (a.epochs_done, a.steps, a.history) == (b.epochs_done, b.steps, b.history) == (3, 6, b.history)
    assert _same_trees(a.params, b.params) and _same_trees(a.opt_state, b.opt_state)
    assert "has 3 epochs done, more than --epochs 2" in _refused(["--resume", path, "--epochs", "2"], capsys)


def test_resume_with_more_epochs_is_refused_with_the_reason_when_the_schedule_is_tied_to_the_length(tmp_path, capsys):
    path = str(tmp_path / "run.ckpt")
    assert main([*TINY, "--checkpoint", path]) == 0
    capsys.readouterr()
    for args in (["--resume", path, "--epochs", "3"], [*TINY[2:], "--epochs", "3", "--checkpoint", path]):
        err = _refused(args, capsys)  # and no "resuming from ...: 2 of 3 epochs done" before it
        assert re.search(r"--(resume|checkpoint) .*run.ckpt: the run's rate, lr 0.8 decaying linearly to 0 "
                         r"\(--schedule linear\), is tied to its 2 epochs, so it cannot go on to --epochs 3: only a "
                         r"run of --schedule constant can be extended \(or give --epochs 2\)", err), err


def test_resume_checks_the_records_settings_as_the_parser_checks_flags(tmp_path, capsys):
    settings = rf.DiscSettings(epochs=1, batch_size=500)
    caller = {"program": "rdl-train", "init_from": None, "check_finite": True, "threads": 1}
    for field, value, message in (("threads", 0, "--threads 0, which --threads refuses (must be ≥ 1, got 0)"),
                                  ("check_finite", "yes", "--no-finite-check 'yes', not true or false"),
                                  ("threads", None, "--threads none, where the flag takes a value")):
        path = tmp_path / f"{field}-{value}.ckpt"
        rf.run_disc(0, settings, checkpoint=path, checkpoint_info={**caller, field: value})
        err = _refused(["--resume", str(path)], capsys)
        assert f"--resume {path}: the checkpoint records {message}: a damaged or hand-made record" in err


# ---------------------------------------------------------------------------
# rdl-train: findings of a new user


def test_init_from_a_checkpoint_says_it_is_one_and_suggests_resume(tmp_path, capsys):
    path = str(tmp_path / "run.ckpt")
    assert main([*TINY, "--checkpoint", path]) == 0
    capsys.readouterr()
    assert (f"--init-from {path}: the file is a checkpoint (of --checkpoint or fit(..., checkpoint=)), not params "
            f"saved by --save; to continue its run, use --resume {path}") in _refused(["--init-from", path], capsys)


def test_device_auto_says_which_device_it_chose(capsys):
    assert main([*TINY, "--epochs", "1", "--device", "auto"]) == 0
    chosen = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"thread(s) on {chosen} (chosen by --device auto), torch" in capsys.readouterr().out.splitlines()[1]


def test_messages_about_a_checkpoint_name_its_file(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"checkpoint_info must be JSON data .* \(it goes into the checkpoint "
                                         r"'.*info.ckpt'\)"):
        _fit(tmp_path / "info.ckpt", checkpoint_info={"f": object()})
    _fit(tmp_path / "fit.ckpt")
    assert (f"--checkpoint {tmp_path / 'fit.ckpt'}: the checkpoint was not written by rdl-train (use rf.fit(..., "
            "checkpoint=PATH) with the same arguments to continue it, or choose another path)") in _refused(
        [*TINY, "--checkpoint", str(tmp_path / "fit.ckpt")], capsys)
    path = str(tmp_path / "run.ckpt")
    assert f"--resume {path} writes to the checkpoint it continues; leave out --checkpoint {path}2" in _refused(
        ["--resume", path, "--checkpoint", path + "2"], capsys)


def _small_run():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 2, generator=g), torch.randint(0, 2, (16,), generator=g)
    model = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2))
    return model, x, y


def test_a_checkpoint_inside_the_epoch_after_the_end_is_refused_not_returned_as_the_end(tmp_path):
    """Regression: a checkpoint written inside epoch 4 (3 epochs and 2 steps done), resumed with epochs=3, ran
    nothing and returned params 2 steps into epoch 4 under a 3-epoch history."""
    model, x, y = _small_run()
    path = tmp_path / "run.ckpt"

    class Stop(Exception):
        pass

    def stop_in_epoch_4(epoch, params, history):
        if epoch == 4:
            raise Stop

    run = dict(batch_size=4, optimizer=rf.sgd(0.1), generator=0, checkpoint=path)
    with pytest.raises(Stop):
        rf.fit(model, rf.cross_entropy_loss, model.init(0), x, y, epochs=5, checkpoint_every=3,
               callback=stop_in_epoch_4, **run)
    saved = rf.read_checkpoint(path)
    assert (saved.epochs_done, saved.position) == (3, 12)  # 4 steps an epoch, one checkpoint every 3: step 15
    with pytest.raises(ValueError, match=r"has 3 epochs and 12 rows of the next done, more than epochs=3; resume it "
                                         r"with epochs ≥ 4"):
        rf.fit(model, rf.cross_entropy_loss, model.init(0), x, y, epochs=3, checkpoint_every=3, **run)
    assert rf.read_checkpoint(path).steps == saved.steps  # untouched


def test_a_checkpoint_without_the_optimizers_state_is_refused_naming_the_file(tmp_path):
    """Regression: a whole, digest-valid checkpoint of an Adam run whose optimizer state was left out resumed
    with fresh moments: another run."""
    import attrs

    from rdl_functional.checkpoint import write_checkpoint

    model, x, y = _small_run()
    path = tmp_path / "adam.ckpt"
    run = dict(batch_size=4, optimizer=rf.adam(0.01), generator=0, checkpoint=path)
    rf.fit(model, rf.cross_entropy_loss, model.init(0), x, y, epochs=2, **run)
    saved = rf.read_checkpoint(path)
    write_checkpoint(path, attrs.evolve(saved, opt_state=None))
    with pytest.raises(ValueError, match=r"fit: the checkpoint '.*adam\.ckpt' holds no optimizer state, but "
                                         r"adam keeps one"):
        rf.fit(model, rf.cross_entropy_loss, model.init(0), x, y, epochs=4, **run)
    write_checkpoint(path, attrs.evolve(saved, opt_state=rf.sgd(0.1, momentum=0.9).init(saved.params)))
    with pytest.raises(ValueError, match=r"fit: the checkpoint '.*adam\.ckpt' holds another optimizer state than "
                                         r"adam keeps"):
        rf.fit(model, rf.cross_entropy_loss, model.init(0), x, y, epochs=4, **run)


def _signed_anew(path, **changes):
    """The checkpoint at ``path`` edited and written again with a valid digest, as an attacker (or a bug) would."""
    import attrs

    from rdl_functional.checkpoint import write_checkpoint

    saved = rf.read_checkpoint(path)
    write_checkpoint(path, attrs.evolve(saved, **{name: change(saved) for name, change in changes.items()}))


def _bn_run(tmp_path, epochs=2, **kwargs):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 2, generator=g), torch.randint(0, 2, (40,), generator=g)
    model = rf.compose(rf.linear(2, 4), rf.batch_norm(4), rf.relu, rf.linear(4, 2))
    return rf.fit(model, rf.cross_entropy_loss, model.init(0), x, y, epochs=epochs, batch_size=10,
                  optimizer=rf.adam(0.01), generator=0, test=(x[:10], y[:10]), checkpoint=tmp_path / "run.ckpt",
                  **kwargs)


def _with(tree, path, value):
    """A copy of ``tree`` with ``value`` at the dotted ``path`` (empty dicts kept, as tree_unflatten would not)."""
    head, _, rest = path.partition(".")
    return {**tree, head: _with(tree[head], rest, value) if rest else value}


@pytest.mark.parametrize(("changes", "message"), [
    ({"steps": lambda c: 5}, r"records 5 steps, where 2 epochs of 4 steps and 0 rows in batches of 10 are 8"),
    ({"epochs_done": lambda c: 3, "steps": lambda c: 12,
      "history": lambda c: {k: v + v[:1] if v else v for k, v in c.history.items()}},
     r"has 3 epochs done, more than the 2 epochs of its run"),
    ({"epochs_done": lambda c: 1, "steps": lambda c: 4, "position": lambda c: 5, "order": lambda c: torch.randperm(40),
      "history": lambda c: {k: v[:1] for k, v in c.history.items()}},
     r"records a position of 5 rows into an epoch of 40 rows in batches of 10"),
    ({"opt_state": lambda c: _with(c.opt_state, "count", torch.tensor(3))},
     r"records 3 optimizer steps at count, where 8 steps were taken from 0"),
    ({"model_state": lambda c: _with(c.model_state, "1.num_batches_tracked", torch.tensor(-4))},
     r"records -4 batches at 1.num_batches_tracked, fewer than none"),
    ({"history": lambda c: {**c.history, "train_accuracy": []}},
     r"holds 0 value\(s\) of train_accuracy, which the run records once an epoch"),
    ({"history": lambda c: {**c.history, "train_rmse": [0.5, 0.5]}},
     r"holds 2 value\(s\) of train_rmse, which the run does not record"),
    ({"params": lambda c: _with(c.params, "0.weight", torch.zeros(3, 2))},
     r"holds other params than the model's \(the model's params has a float32 tensor of shape \(4, 2\)"),
], ids=["steps", "epochs-done", "position", "adam-count", "num-batches-tracked", "history-emptied",
        "history-of-another-task", "param-shape"])
def test_a_checkpoint_edited_and_signed_anew_is_refused_when_its_record_disagrees_with_itself_or_the_run(
        tmp_path, changes, message):
    """Regression: a hand-edited checkpoint with its digest recomputed resumed into another run (steps 5 of 18
    epochs, 400 of 300 epochs done, a position between batches, Adam's count, a negative num_batches_tracked, an
    emptied history list that the run's next checkpoint then could not read back)."""
    _bn_run(tmp_path)
    _signed_anew(tmp_path / "run.ckpt", **changes)
    with pytest.raises(ValueError, match=r"fit: the checkpoint '.*run\.ckpt' " + message):
        _bn_run(tmp_path, epochs=2)


def test_on_resume_is_called_once_fit_has_accepted_the_checkpoint_and_never_for_one_it_refuses(tmp_path):
    _bn_run(tmp_path, epochs=1)
    seen = []
    _bn_run(tmp_path, epochs=2, on_resume=seen.append)
    assert [(c.epochs_done, c.steps) for c in seen] == [(1, 4)]
    _signed_anew(tmp_path / "run.ckpt", steps=lambda c: 3)
    with pytest.raises(ValueError, match=r"records 3 steps"):
        _bn_run(tmp_path, epochs=3, on_resume=seen.append)
    assert len(seen) == 1


def test_rdl_train_says_it_resumes_only_once_fit_has_accepted_the_checkpoint(tmp_path, capsys):
    """Regression: a checkpoint refused by fit's own checks (params of another shape, a bad step count) was
    announced with 'resuming from ...' first."""
    path = tmp_path / "run.ckpt"
    assert main(["--epochs", "2", "--quiet", "--checkpoint", str(path)]) == 0
    assert "resuming from" not in capsys.readouterr().out
    steps = rf.read_checkpoint(path).steps
    _signed_anew(path, steps=lambda c: 3)
    with pytest.raises(SystemExit):
        main(["--epochs", "2", "--quiet", "--checkpoint", str(path)])
    out, err = capsys.readouterr()
    assert "resuming from" not in out and "records 3 steps" in err
    _signed_anew(path, steps=lambda c: steps)  # whole again
    assert main(["--epochs", "2", "--quiet", "--checkpoint", str(path)]) == 0
    assert (f"resuming from {path}: 2 of 2 epochs done, step {steps} (the run is finished)"
            in capsys.readouterr().out)
