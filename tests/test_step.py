"""One pure training step (issue 17, item 1): rf.TrainState, rf.train_step, rf.save_state / rf.load_state."""

from __future__ import annotations

import os

import attrs
import pytest
import torch

import rdl_functional as rf
from rdl_functional.apps.torch_baseline import torch_seed_model
from rdl_functional.checkpoint import _write

OPTIMIZERS = {  # ours, and torch.optim's twin (foreach, as rf's optimizers match)
    "sgd": (lambda: rf.sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True)),
    "momentum": (lambda: rf.sgd(0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9,
                                                                                foreach=True)),
    "adam": (lambda: rf.adam(1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True)),
}


def _data(rows: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    x, labels = rf.disc_dataset(rows, 0)
    return x, rf.one_hot(labels, 2)


def _leaves_equal(a, b) -> bool:
    return rf.tree_difference(a, b, leaves=True) is None and all(
        torch.equal(p, q) for p, q in zip(rf.tree_leaves(a), rf.tree_leaves(b), strict=True))


def _states_equal(a: rf.TrainState, b: rf.TrainState) -> bool:
    return all(_leaves_equal(getattr(a, name), getattr(b, name)) for name in (
        "params", "opt_state", "model_state", "generator", "step"))


def _clone(state: rf.TrainState) -> rf.TrainState:
    return rf.TrainState(**{f.name: rf.tree_map(torch.clone, getattr(state, f.name))
                            for f in attrs.fields(rf.TrainState)})


@pytest.mark.parametrize("batch_norm", [False, True], ids=["seed", "batch_norm"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_loop_of_train_step_equals_torch_nn_and_torch_optim_bit_for_bit(name, batch_norm):
    ours, theirs = OPTIMIZERS[name]
    model = rf.seed_model(batch_norm=batch_norm)
    state = rf.train_state(model, ours(), model.init(0))
    reference = torch_seed_model(batch_norm=batch_norm)
    reference.load_state_dict(rf.to_state_dict(state.params, state.model_state or None), strict=True)
    reference.train()
    optimizer = theirs(reference.parameters())
    step = rf.train_step(model, rf.mse_loss, ours())
    x, target = _data()
    for start in range(0, 60, 20):
        state, metrics = step(state, x[start:start + 20], target[start:start + 20])
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(reference(x[start:start + 20]), target[start:start + 20])
        loss.backward()
        optimizer.step()
        assert torch.equal(metrics["loss"], loss.detach())
    expected = reference.state_dict()
    got = rf.to_state_dict(state.params, state.model_state or None)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert int(state.step) == 3


def _fit_loop(model, optimizer, params, x, target, epochs, batch_size) -> rf.TrainState:
    """What fit does, as a loop of train_step: each epoch's shuffle from the state's generator, then the steps,
    whose random layers draw from it after the shuffle."""
    state, step = rf.train_state(model, optimizer, params, generator=0), rf.train_step(model, rf.mse_loss, optimizer)
    for _ in range(epochs):
        g = torch.Generator()
        g.set_state(state.generator)
        order = torch.randperm(x.shape[0], generator=g)
        state = attrs.evolve(state, generator=g.get_state())
        for start in range(0, x.shape[0], batch_size):
            rows = order[start:start + batch_size]
            state, _ = step(state, x[rows], target[rows])
    return state


FIT_CASES = {
    "plain, sgd": (lambda: rf.seed_model(), lambda: rf.sgd(0.1)),
    "dropout and batch norm, adam": (lambda: rf.seed_model(dropout=0.2, batch_norm=True), lambda: rf.adam(1e-2)),
    "batch norm, a chain": (lambda: rf.seed_model(batch_norm=True),
                            lambda: rf.chain(rf.clip_by_global_norm(0.5), rf.sgd(0.1, momentum=0.9))),
}


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_a_loop_of_train_step_equals_fit_over_the_same_batches(case):
    make_model, make_optimizer = FIT_CASES[case]
    model, (x, target) = make_model(), _data(50)  # batches of 20: the last of each epoch holds 10 rows
    params = model.init(1)
    fitted, history = rf.fit(model, rf.mse_loss, params, x, target, epochs=2, batch_size=20,
                             optimizer=make_optimizer(), generator=0, record_history=False)
    state = _fit_loop(model, make_optimizer(), params, x, target, epochs=2, batch_size=20)
    assert _leaves_equal(state.params, fitted)
    assert _leaves_equal(state.opt_state, history.opt_state)
    assert _leaves_equal(state.model_state, history.model_state or {})
    assert int(state.step) == 6


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_train_step_is_pure(case):
    make_model, make_optimizer = FIT_CASES[case]
    model, (x, target) = make_model(), _data(20)
    state = rf.train_state(model, make_optimizer(), model.init(0), generator=3)
    before, x_before, target_before = _clone(state), x.clone(), target.clone()
    new, metrics = rf.train_step(model, rf.mse_loss, make_optimizer())(state, x, target)
    assert _states_equal(state, before)
    assert torch.equal(x, x_before) and torch.equal(target, target_before)
    assert not _leaves_equal(new.params, state.params) and int(new.step) == 1
    assert metrics["loss"].shape == ()
    # Dropout drew its masks, so the generator moved; a model without dropout draws nothing.
    assert torch.equal(new.generator, state.generator) == ("dropout" not in case)
    again, _ = rf.train_step(model, rf.mse_loss, make_optimizer())(state, x, target)
    assert _states_equal(again, new)  # the same state, the same step: the same bits


def test_train_state_reads_a_generator_without_advancing_it_and_starts_the_model_state():
    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    model = rf.seed_model(batch_norm=True)
    state = rf.train_state(model, rf.sgd(0.1), model.init(0, dtype=torch.float64), generator=g)
    assert torch.equal(g.get_state(), before) and torch.equal(state.generator, before)
    assert _leaves_equal(state.model_state, model.init_state(dtype=torch.float64))
    assert state.step.dtype == torch.int64 and state.step.dim() == 0


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_a_run_saved_and_loaded_goes_on_bit_for_bit(case, tmp_path):
    make_model, make_optimizer = FIT_CASES[case]
    model, (x, target) = make_model(), _data(20)
    step = rf.train_step(model, rf.mse_loss, make_optimizer())
    straight = half = rf.train_state(model, make_optimizer(), model.init(0), generator=7)
    for i in range(6):
        straight, _ = step(straight, x, target)
        if i == 2:
            half = straight
    rf.save_state(half, tmp_path / "run.safetensors")
    resumed = rf.load_state(tmp_path / "run.safetensors")
    assert _states_equal(resumed, half)
    for _ in range(3):
        resumed, _ = step(resumed, x, target)
    assert _states_equal(resumed, straight)


def test_load_state_takes_the_train_state_out_of_a_fit_checkpoint(tmp_path):
    model, (x, target) = rf.seed_model(dropout=0.2, batch_norm=True), _data(40)
    params, path = model.init(0), tmp_path / "fit.ckpt"
    run = dict(epochs=2, batch_size=20, optimizer=rf.adam(1e-2), generator=0, record_history=False)
    fitted, history = rf.fit(model, rf.mse_loss, params, x, target, **run, checkpoint=path)
    state = rf.load_state(path)
    assert _leaves_equal(state.params, fitted) and _leaves_equal(state.opt_state, history.opt_state)
    assert _leaves_equal(state.model_state, history.model_state) and int(state.step) == 4
    # The run goes on from Python: a third epoch as fit runs it ends where fit's three epochs end.
    three, _ = rf.fit(model, rf.mse_loss, params, x, target, **{**run, "epochs": 3})
    g = torch.Generator()
    g.set_state(state.generator)
    order = torch.randperm(40, generator=g)
    state = attrs.evolve(state, generator=g.get_state())
    step = rf.train_step(model, rf.mse_loss, rf.adam(1e-2))
    for start in (0, 20):
        state, _ = step(state, x[order[start:start + 20]], target[order[start:start + 20]])
    assert _leaves_equal(state.params, three)


def _own_step(params, grads, lr):
    return rf.sgd_step(params, grads, lr)


def test_load_state_refuses_the_checkpoint_of_a_step_function_naming_the_file(tmp_path):
    model, (x, target) = rf.seed_model(), _data(20)
    path = tmp_path / "own.ckpt"
    rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=20, optimizer=_own_step, lr=0.1,
           generator=0, record_history=False, checkpoint=path)
    with pytest.raises(ValueError, match=r"own\.ckpt' is the checkpoint of a run of rf.fit with a step function"):
        rf.load_state(path)


def test_import_rdl_functional_does_not_load_safetensors():
    import subprocess
    import sys

    code = "import sys, rdl_functional as rf; rf.train_state; print('safetensors' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


PLAIN = rf.compose(rf.linear(2, 3), rf.relu, rf.linear(3, 2))
DROPPED = rf.compose(rf.linear(2, 3), rf.dropout(0.5), rf.linear(3, 2))

TRAIN_STATE_ERRORS = [  # (kwargs of train_state, error, match)
    (dict(model="linear"), TypeError, r"train_state: model must be an rf.Layer or rf.StatefulLayer .*got str"),
    (dict(optimizer=rf.sgd_step), TypeError, r"got the step function sgd_step.*use rf.sgd\(lr\)"),
    (dict(optimizer=rf.adam), TypeError, r"optimizer rf.adam makes an optimizer: call it"),
    (dict(optimizer="adam"), TypeError, r"optimizer must be an rf.Optimizer .*got str"),
    (dict(params=rf.linear(2, 2).init(0)), ValueError, r"train_state: the params do not fit compose\(linear"),
    (dict(params=PLAIN.init(0, dtype=torch.float64), opt_state=rf.adam(1e-2).init(PLAIN.init(0))), ValueError,
     r"train_state: the optimizer state does not fit the params"),
    (dict(params=[]), TypeError, r"train_state: params must be a dict of tensors .*got list"),
    (dict(opt_state=rf.sgd(0.1).init(PLAIN.init(0))), ValueError,
     r"train_state: the optimizer state has keys \['count', 'lr'\] but adam keeps .*another optimizer"),
    (dict(model_state={"0": {"running_mean": torch.zeros(3)}}), ValueError,
     r"train_state: model_state goes with a StatefulLayer; compose\(.*\) is a plain Layer"),
    (dict(generator="seed"), TypeError, r"train_state: expected a torch.Generator or an int seed, got str"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), TRAIN_STATE_ERRORS)
def test_train_state_refuses_what_does_not_fit(kwargs, error, match):
    args = {"model": PLAIN, "optimizer": rf.adam(1e-2), "params": PLAIN.init(0), **kwargs}
    with pytest.raises(error, match=match):
        rf.train_state(args.pop("model"), args.pop("optimizer"), args.pop("params"), **args)


def test_train_state_refuses_a_model_state_of_another_model():
    model = rf.seed_model(batch_norm=True)
    with pytest.raises(ValueError, match=r"model_state does not fit compose\(.*the state of another model"):
        rf.train_state(model, rf.sgd(0.1), model.init(0), model_state={"1": {}})


def test_train_step_refuses_what_is_not_a_step():
    with pytest.raises(TypeError, match=r"train_step: optimizer must be an rf.Optimizer, got the step function "
                                        r"sgd_step.*rf.sgd\(lr\)"):
        rf.train_step(PLAIN, rf.mse_loss, rf.sgd_step)
    with pytest.raises(TypeError, match=r"train_step: model must be an rf.Layer"):
        rf.train_step(None, rf.mse_loss, rf.sgd(0.1))
    step = rf.train_step(PLAIN, rf.mse_loss, rf.sgd(0.1))
    with pytest.raises(TypeError, match=r"train_step: state must be an rf.TrainState .*got dict"):
        step(PLAIN.init(0), torch.zeros(4, 2), torch.zeros(4, 2))
    state = rf.train_state(PLAIN, rf.sgd(0.1), PLAIN.init(0))
    with pytest.raises(ValueError, match=r"train_step: compose\(.*\) is a plain Layer, which has no state"):
        step(attrs.evolve(state, model_state={"x": torch.zeros(1)}), torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"layer 0: linear\(2, 3\).*x has 7 features"):  # the layer's own check
        step(state, torch.zeros(4, 7), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"adam.step: the optimizer state"):  # the optimizer's own check
        rf.train_step(PLAIN, rf.mse_loss, rf.adam(0.1))(state, torch.zeros(4, 2), torch.zeros(4, 2))


def test_save_state_and_load_state_refuse_what_is_no_train_state(tmp_path):
    with pytest.raises(TypeError, match=r"save_state: state must be an rf.TrainState .*got dict"):
        rf.save_state({}, tmp_path / "x")
    state = rf.train_state(PLAIN, rf.sgd(0.1), PLAIN.init(0))
    with pytest.raises(ValueError, match=r"save_state: the state cannot be saved to '.*bad': the step count is "
                                         r"tensor\(1\.\), expected a 0-dim int64"):
        rf.save_state(attrs.evolve(state, step=torch.tensor(1.0)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FileNotFoundError, match=r"save_state: '.*no_folder/run': the folder '.*no_folder' does not"):
        rf.save_state(state, tmp_path / "no_folder" / "run")
    rf.save(PLAIN.init(0), tmp_path / "params.safetensors")
    with pytest.raises(ValueError, match=r"load_state: '.*params.safetensors' is neither a saved TrainState"):
        rf.load_state(tmp_path / "params.safetensors")
    with pytest.raises(FileNotFoundError, match=r"load_state: no such file: '.*missing'"):
        rf.load_state(tmp_path / "missing")


def test_load_state_refuses_a_damaged_or_inconsistent_file_naming_it(tmp_path):
    path = tmp_path / "run.safetensors"
    rf.save_state(rf.train_state(DROPPED, rf.adam(1e-2), DROPPED.init(0)), path)
    with open(path, "r+b") as f:  # one bit flipped in the last tensor's bytes
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte ^ 1]))
    with pytest.raises(ValueError, match=r"load_state: '.*run.safetensors' is corrupted: its contents do not match"):
        rf.load_state(path)
    tree = {"params": {}, "opt_state": {}, "model_state": {}, "generator": torch.zeros(3, dtype=torch.uint8),
            "step": torch.tensor(0)}
    _write(path, tree, '{"format": 1}', "save_state", "rdl_functional.train_state")  # signed, but no state
    with pytest.raises(ValueError, match=r"load_state: '.*run.safetensors' holds an inconsistent TrainState \(the "
                                         r"generator's state is torch.uint8 of shape \(3,\)"):
        rf.load_state(path)
    _write(path, tree, '{"format": 7}', "save_state", "rdl_functional.train_state")
    with pytest.raises(ValueError, match=r"is a saved TrainState of format 7, which this version"):
        rf.load_state(path)


# ---------------------------------------------------------------------------
# The whole step traced (issue 17, item 2): one record from the params to the optimizer's rules.

TRACED_CASES = {  # (model, optimizer): a transform link, a user's own link and a stateful model among them
    **FIT_CASES,
    "a custom link in a chain": (lambda: rf.seed_model(), lambda: rf.chain(
        rf.gradient_transform(lambda params: {"n": torch.zeros((), dtype=torch.int64)},
                              lambda g, s, p: (rf.tree_map(lambda t: 0.5 * t, g), {"n": s["n"] + 1})),
        rf.adam(1e-2))),
}


def _eager(step: rf.TrainStep) -> rf.TrainStep:
    """The same step through its untraced path: a gradient function that is not train_step's own."""
    grad = step._grad
    return rf.TrainStep(step.model, step.loss, step.optimizer, grad=lambda *a, **k: grad(*a, **k))


@pytest.mark.parametrize("case", sorted(TRACED_CASES))
def test_the_traced_step_replays_and_equals_the_untraced_step_bit_for_bit(case):
    make_model, make_optimizer = TRACED_CASES[case]
    model, (x, target) = make_model(), _data(60)
    step = rf.train_step(model, rf.mse_loss, make_optimizer())
    eager = _eager(step)
    assert step._flat is not None and eager._flat is None
    ours = theirs = rf.train_state(model, step.optimizer, model.init(2), generator=5)
    for i in range(4):
        rows = slice(15 * i, 15 * i + 15)
        ours, _ = step(ours, x[rows], target[rows])
        assert step._flat.replayed == (i > 0), "the first call of a signature runs the step; the others replay it"
        theirs, _ = eager(theirs, x[rows], target[rows])
        assert _states_equal(ours, theirs)


def test_a_new_optimizer_of_the_same_kind_reuses_the_record_and_its_own_rate():
    model, (x, target) = rf.seed_model(), _data(20)
    first, second = (rf.train_step(model, rf.mse_loss, rf.sgd(lr)) for lr in (0.1, 0.2))
    assert first._flat is second._flat  # one record for sgd(0.1) and sgd(0.2): the rates are not in it
    state = rf.train_state(model, rf.sgd(0.1), model.init(0))
    a, _ = first(state, x, target)
    b, _ = second(state, x, target)
    assert second._flat.replayed
    assert float(a.opt_state["lr"]) == 0.1 and float(b.opt_state["lr"]) == 0.2
    for key in ("weight", "bias"):
        step_a = state.params["0"][key] - a.params["0"][key]
        assert torch.allclose(2 * step_a, state.params["0"][key] - b.params["0"][key], atol=1e-6)


BAD_STATES = {  # what an opt_state may be that the optimizer refuses, on a replay as on the first call
    "a float count": (lambda s: {**s, "count": s["count"].double()}, "count must be a 0-dim int64 tensor"),
    "a buffer of another shape": (lambda s: {**s, "exp_avg": {**s["exp_avg"], "0": {
        "weight": torch.zeros(3, 3), "bias": s["exp_avg"]["0"]["bias"]}}}, "exp_avg"),
    "a missing buffer": (lambda s: {k: v for k, v in s.items() if k != "exp_avg_sq"}, "keeps"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_an_opt_state_that_does_not_fit_is_refused_after_the_step_has_replayed(case):
    edit, match = BAD_STATES[case]
    model, (x, target) = rf.seed_model(), _data(20)
    step = rf.train_step(model, rf.mse_loss, rf.adam(1e-2))
    state = rf.train_state(model, step.optimizer, model.init(0))
    for _ in range(2):
        state, _ = step(state, x, target)
    assert step._flat.replayed
    bad = attrs.evolve(state, opt_state=edit(state.opt_state))
    with pytest.raises(ValueError, match=match):
        step(bad, x, target)


def test_the_traced_step_records_no_autograd_graph_for_params_that_require_grad():
    model, (x, target) = rf.seed_model(), _data(20)
    params = rf.tree_map(lambda t: t.requires_grad_(), model.init(0))
    step = rf.train_step(model, rf.mse_loss, rf.sgd(0.1))
    state = rf.train_state(model, step.optimizer, params)
    for _ in range(3):
        state, metrics = step(state, x, target)
    assert all(leaf.grad_fn is None for leaf in rf.tree_leaves(state.params)) and metrics["loss"].grad_fn is None
    assert torch.is_grad_enabled()
