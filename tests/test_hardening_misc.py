"""Regressions from issue 16's user and adversary trials: each test is named after the defect it pins."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf


def _saved_for_backward(run) -> int:
    """How many tensors autograd saved for a backward pass while ``run`` ran: 0 when no graph was recorded."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        run()
    return len(saved)


@pytest.mark.parametrize("requires_grad", ["x", "target", "test"])
@pytest.mark.parametrize("optimizer", ["sgd_step", "adam"])
def test_fit_with_data_that_requires_grad_builds_no_autograd_graph(requires_grad, optimizer):
    """Regression: an x (or target, or test data) that required grad made every step record an autograd graph
    that the updates carried on (+360 MiB at 8,000 steps), and the params came back with a grad_fn."""
    x, labels = rf.disc_dataset(60, 0)
    target = rf.one_hot(labels, 2)
    data = {"x": x.clone(), "target": target.clone(), "test": x[:10].clone()}
    data[requires_grad].requires_grad_(True)
    model = rf.compose(rf.linear(2, 4), rf.tanh, rf.linear(4, 2))
    settings = dict(lr=0.1) if optimizer == "sgd_step" else dict(optimizer=rf.adam(0.01))
    result = []
    saved = _saved_for_backward(lambda: result.append(rf.fit(
        model, rf.mse_loss, model.init(0), data["x"], data["target"], epochs=2, batch_size=20, generator=0,
        test=(data["test"], target[:10]), **settings)))
    params, history = result[0]
    assert saved == 0
    assert all(p.grad_fn is None and not p.requires_grad for p in rf.tree_leaves(params))
    if optimizer == "sgd_step":  # a step function keeps no state
        assert history.opt_state is None
    else:
        assert rf.tree_leaves(history.opt_state) and all(t.grad_fn is None for t in rf.tree_leaves(history.opt_state))
    expected, _ = rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=2, batch_size=20, generator=0,
                         test=(x[:10], target[:10]), **settings)
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params), rf.tree_leaves(expected), strict=True))


STATE_DICT_MODELS = {
    "seed_model": lambda: rf.seed_model(),
    "every_activation": lambda: rf.compose(rf.sigmoid, rf.linear(2, 4), rf.leaky_relu(0.2), rf.identity,
                                           rf.linear(4, 3), rf.tanh, rf.linear(3, 2), rf.relu),
}


def _twice(step, params, x, target):
    """The step's first call of a signature (the closures, then the record) and its second (the record)."""
    step(params, x, target)
    out = step(params, x, target)
    assert step.traced.replayed
    return out


@pytest.mark.parametrize("name", STATE_DICT_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_state_dict_tree_takes_the_fast_path_with_the_bits_of_model_inits_tree(name, dtype, generator):
    """Regression: a tree read with rf.from_state_dict (no entries for relu, tanh, ...) left the generated step
    for the general plan, 1.36× slower, and torch.compile broke its graph on it. Now every tree is traced."""
    model = STATE_DICT_MODELS[name]()
    full = model.init(generator, dtype=dtype)
    sparse = rf.from_state_dict(rf.to_state_dict(full))
    assert len(sparse) < len(full)
    x = torch.randn(9, 2, generator=generator, dtype=dtype)
    target = torch.rand(9, 2, generator=generator, dtype=dtype)
    step = rf.value_and_grad(model, rf.mse_loss)
    value, grads = _twice(step, sparse, x, target)
    expected_value, expected = _twice(step, full, x, target)
    assert step.traced.signatures == 2  # the two layouts are two signatures, each with its record
    assert list(grads) == list(sparse)  # dparams has exactly the keys of params
    assert torch.equal(value, expected_value)
    assert all(torch.equal(grads[key][k], expected[key][k]) for key in grads for k in grads[key])


def test_a_torch_sequentials_state_dict_steps_on_the_fast_path():
    torch_model = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2), torch.nn.Tanh())
    model = rf.compose(rf.linear(2, 5), rf.relu, rf.linear(5, 2), rf.tanh)
    params = rf.from_state_dict(torch_model.state_dict())
    _, grads = _twice(rf.value_and_grad(model, rf.mse_loss), params, torch.rand(4, 2), torch.rand(4, 2))
    assert list(grads) == ["0", "2"]


def test_a_state_dict_tree_in_another_order_still_gets_the_plans_grads_in_its_order():
    model = rf.seed_model()
    full = model.init(0)
    reordered = {key: full[key] for key in ("2", "0", "4", "6")}
    step = rf.value_and_grad(model, rf.mse_loss)
    x, target = torch.rand(4, 2), torch.rand(4, 2)
    _, grads = _twice(step, reordered, x, target)
    _, expected = _twice(step, full, x, target)
    assert list(grads) == ["2", "0", "4", "6"]
    assert all(torch.equal(grads[key][k], expected[key][k]) for key in grads for k in grads[key])


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_a_state_dict_tree_compiles_without_graph_breaks(nested):
    """Regression: fit(compile=True) broke its graph at every parameterless layer of a state-dict tree: dynamo
    (torch 2.13) takes an empty MappingProxyType, the plan's stand-in for an absent entry, for true."""
    import torch._dynamo

    if nested:
        model = rf.compose(rf.linear(2, 4), rf.compose(rf.relu, rf.linear(4, 2)), rf.tanh)
    else:
        model = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2), rf.tanh)
    sparse = rf.from_state_dict(rf.to_state_dict(model.init(0)))
    value_and_grad = rf.value_and_grad(model, rf.mse_loss)

    def sgd(params, grads, lr):  # p − lr·g, written plainly for dynamo (tree_map guards against cycles by id)
        return {key: sgd(value, grads[key], lr) if isinstance(value, dict) else value - lr * grads[key]
                for key, value in params.items()}

    def step(params, x, target, lr):  # value_and_grad inside torch.compile, as a user's compiled loop has it
        value, grads = value_and_grad(params, x, target)
        return value, sgd(params, grads, lr)

    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(step)(sparse, torch.rand(4, 2), torch.rand(4, 2), torch.tensor(0.1))
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_dir_of_the_package_lists_the_public_api_only_and_loads_no_lazy_module():
    """Regression: dir(rf) listed the package's own imports (Any, TYPE_CHECKING, importlib, annotations) and
    its submodules beside the API."""
    import json
    import subprocess
    import sys

    code = ("import json, sys, rdl_functional as rf\n"
            "names = dir(rf)\n"
            "lazy = {'rdl_functional.' + m for m in ('io', 'checkpoint', 'experiment', 'plots', 'testing', 'graphs',"
            " 'compiled')}\n"
            "assert not lazy & set(sys.modules), sorted(lazy & set(sys.modules))\n"
            "print(json.dumps(names))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names = json.loads(done.stdout)
    assert not {"Any", "TYPE_CHECKING", "importlib", "annotations", "layers", "autodiff"} & set(names)
    assert {name for name in names if not name.startswith("__")} == set(rf.__all__)
    assert "__version__" in names and names == sorted(names)


def test_the_readmes_fifteen_line_example_trains_on_one_thread(monkeypatch):
    """Regression: the README's example left torch's default threads, and ran 5-20× slower than rdl-train on a
    2-core machine; getting-started.md sets one thread, the README now too."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    example = re.search(r"^## In fifteen lines\n\n```python\n(.*?)^```", readme, re.DOTALL | re.MULTILINE).group(1)
    assert len(example.strip().splitlines()) <= 15

    class Stop(Exception):
        pass

    seen = []

    def fit(*args, **kwargs):  # the example as far as its training, which is all this test needs
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(rf, "fit", fit)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Stop):
            exec(compile(example, "README.md fifteen lines", "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
    assert seen == [1]


@pytest.mark.parametrize("requires_grad", ["params", "x", "target", "test"])
def test_fit_stacked_with_data_that_requires_grad_builds_no_autograd_graph(requires_grad):
    """Regression: as fit's, fit_stacked's steps recorded an autograd graph when the data (or params) required
    grad, and the stacked params came back with a grad_fn."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 30, 2, generator=g)
    target = torch.rand(2, 30, 2, generator=g)
    model = rf.compose(rf.linear(2, 4), rf.tanh, rf.linear(4, 2))
    params = rf.stack_params([model.init(0), model.init(1)])
    data = {"params": rf.tree_map(torch.clone, params), "x": x.clone(), "target": target.clone(),
            "test": x[:, :10].clone()}
    for leaf in rf.tree_leaves(data["params"]) if requires_grad == "params" else [data[requires_grad]]:
        leaf.requires_grad_(True)
    result = []
    saved = _saved_for_backward(lambda: result.append(rf.fit_stacked(
        model, rf.mse_loss, data["params"], data["x"], data["target"], epochs=2, batch_size=10, lr=0.1,
        generators=[torch.Generator().manual_seed(m) for m in range(2)], test=(data["test"], target[:, :10]))))
    trained, _ = result[0]
    assert saved == 0
    assert all(p.grad_fn is None and not p.requires_grad for p in rf.tree_leaves(trained))
    expected, _ = rf.fit_stacked(model, rf.mse_loss, params, x, target, epochs=2, batch_size=10, lr=0.1,
                                 generators=[torch.Generator().manual_seed(m) for m in range(2)],
                                 test=(x[:, :10], target[:, :10]))
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(trained), rf.tree_leaves(expected), strict=True))


def test_a_loop_of_your_own_with_x_that_requires_grad_records_no_autograd_graph():
    """Regression: the README's loop (value_and_grad, then sgd_step) with an x that required grad made every step
    record an autograd graph, which the grads and then the params carried on (+175 MB over 6,000 steps)."""
    x, labels = rf.disc_dataset(40, 0)
    x = x.clone().requires_grad_(True)
    model = rf.compose(rf.linear(2, 4), rf.tanh, rf.linear(4, 2))
    params = model.init(0)
    step = rf.value_and_grad(model, rf.cross_entropy_loss)

    def loop():
        nonlocal params
        for start in range(0, 40, 10):
            value, grads = step(params, x[start:start + 10], labels[start:start + 10])
            assert value.grad_fn is None and all(g.grad_fn is None for g in rf.tree_leaves(grads))
            params = rf.sgd_step(params, grads, lr=0.1)

    assert _saved_for_backward(loop) == 0
    assert all(p.grad_fn is None and not p.requires_grad for p in rf.tree_leaves(params))
    assert torch.is_grad_enabled()  # the step turned recording off for itself only


def test_a_1d_x_in_fit_says_its_rows_are_numbers_and_how_to_make_them_rows_of_one_feature():
    """Regression: fit's first look at the model ran it on x[:1], so linear said 'x is 1-D with 1 entries'."""
    x, labels = rf.disc_dataset(50, 0)
    model = rf.compose(rf.linear(2, 8), rf.relu, rf.linear(8, 2))
    with pytest.raises(ValueError, match=r"fit: x has shape \(50,\), so each of its 50 rows is one number; for rows "
                                         r"of one feature, pass x\[:, None\]"):
        rf.fit(model, rf.cross_entropy_loss, model.init(0), x[:, 0], labels, epochs=1, batch_size=10, lr=0.1,
               generator=0)


def test_bare_losses_work_and_unmade_optimizers_are_told_to_be_called_wherever_they_go():
    """Regression: rf.evaluate(model, rf.l1_loss, ...) gave an AttributeError (rf.l1_loss was a factory; every loss
    is a Loss now, bare or called), and fit(optimizer=rf.adam, lr=0.1) 'adam: lr must be a number or a schedule,
    got dict'."""
    x, labels = rf.disc_dataset(20, 0)
    target = rf.one_hot(labels, 2)
    model = rf.linear(2, 2)
    params = model.init(0)
    assert rf.evaluate(model, rf.l1_loss, params, x, target) == rf.evaluate(model, rf.l1_loss(), params, x, target)
    with pytest.raises(TypeError, match=r"fit: optimizer rf.adam makes an optimizer: call it, e.g. "
                                        r"optimizer=rf.adam\(...\)"):
        rf.fit(model, rf.mse_loss, model.init(0), x, target, epochs=1, batch_size=10, optimizer=rf.adam, lr=0.1,
               generator=0)


@pytest.mark.parametrize("where", ["x", "test"])
def test_fit_and_evaluate_refuse_data_without_rows_instead_of_recording_nan(where):
    """Regression: fit on 0 rows returned train_loss (nan,) with check_finite on; an empty test set recorded a
    test loss of nan and an R² of 1."""
    x, labels = rf.disc_dataset(20, 0)
    model = rf.linear(2, 2)
    data = {"x": (x, labels), "test": (x, labels)}
    data[where] = (x[:0], labels[:0])
    with pytest.raises(ValueError, match=r"x has no rows \(shape \(0, 2\)\); expected \(rows, ...\) with rows ≥ 1"):
        rf.fit(model, rf.cross_entropy_loss, model.init(0), *data["x"], epochs=1, batch_size=10, lr=0.1,
               generator=0, test=data["test"])
    with pytest.raises(ValueError, match=r"evaluate: x has no rows"):
        rf.evaluate(model, rf.cross_entropy_loss, model.init(0), x[:0], labels[:0])


@pytest.mark.parametrize("seed", [1.5, True, None])
def test_a_custom_layers_init_refuses_what_is_neither_a_generator_nor_an_int_naming_the_layer(seed):
    """Regression: a custom layer's init(1.5) or init(True) reached torch.rand with a raw TypeError."""
    layer = rf.Layer(init=lambda g, *, dtype=torch.float32: {"w": torch.rand(2, generator=g, dtype=dtype)},
                     apply=lambda p, x: x, vjp=lambda p, x: (x, lambda dy: ({"w": torch.zeros(2)}, dy)), name="mine")
    with pytest.raises(TypeError, match=rf"mine.init: expected a torch.Generator or an int seed, got "
                                        rf"{type(seed).__name__}"):
        layer.init(seed)
