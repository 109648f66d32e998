"""rf.compiled: the training step compiled as one graph, equal to the eager step to float rounding.

The flat step that the compilers trace (the rules run with the step count and the rate as tensor inputs) is
checked against the eager step for every optimizer without compiling anything; compiling (inductor,
AOTInductor, the cache on disk) takes tens of seconds on a CPU, so those tests are marked slow.
"""

from __future__ import annotations

import json

import attrs
import pytest
import torch

import rdl_functional as rf
from rdl_functional._compilers import _digest
from rdl_functional.transforms import _Flat

TINY = rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2), rf.tanh)

OPTIMIZERS = {
    "sgd with a schedule": lambda: rf.sgd(rf.linear_schedule(0.8, 0.0, 4)),
    "momentum": lambda: rf.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "nesterov": lambda: rf.sgd(0.1, momentum=0.9, nesterov=True),
    "adam with a schedule": lambda: rf.adam(rf.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6)),
    "adamw amsgrad": lambda: rf.adamw(1e-2, amsgrad=True),
    "rmsprop": lambda: rf.rmsprop(1e-2, momentum=0.5, centered=True, weight_decay=1e-3),
    "adagrad": lambda: rf.adagrad(1e-1, lr_decay=0.1),
    "chain": lambda: rf.chain(rf.clip_by_global_norm(0.1), rf.add_decayed_weights(1e-2), rf.adam(1e-2)),
    "transforms only": lambda: rf.chain(rf.clip_by_global_norm(0.1)),
}


def batches(n, rows=10):
    x, labels = rf.disc_dataset(n * rows, 0)
    return [(x[i:i + rows], rf.one_hot(labels[i:i + rows], 2)) for i in range(0, n * rows, rows)]


def assert_states_close(ours, theirs):
    """Params and optimizer state to float rounding; counts, rates and the step exactly."""
    assert rf.tree_difference(ours.opt_state, theirs.opt_state, leaves=True) is None
    for a, b in zip(rf.tree_leaves({"p": ours.params, "o": ours.opt_state}),
                    rf.tree_leaves({"p": theirs.params, "o": theirs.opt_state}), strict=True):
        if a.is_floating_point() and a.dim():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
    assert torch.equal(ours.step, theirs.step) and torch.equal(ours.generator, theirs.generator)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_flat_step_the_compilers_trace_equals_the_eager_step(name):
    optimizer = OPTIMIZERS[name]()
    step = rf.train_step(TINY, rf.mse_loss, optimizer)
    flat = _Flat(step, "test")
    ours = theirs = rf.train_state(TINY, optimizer, TINY.init(0))
    for x, target in batches(6):
        _, leaves, layout = flat.prepare(ours, x, target)
        out = flat.function(layout, len(rf.tree_leaves(ours.params)))(*leaves)
        ours, metrics = flat.finish(ours, layout, list(out))
        theirs, expected = step(theirs, x, target)
        torch.testing.assert_close(metrics["loss"], expected["loss"])
        assert_states_close(ours, theirs)


def test_the_rate_and_the_count_are_inputs_of_the_flat_step_not_constants():
    step = rf.train_step(TINY, rf.mse_loss, rf.adam(rf.linear_schedule(1e-2, 0.0, 10)))
    flat = _Flat(step, "test")
    state = rf.train_state(TINY, step.optimizer, TINY.init(0))
    (x, target), = batches(1)
    key, leaves, _ = flat.prepare(state, x, target)
    count, rate = leaves[len(rf.tree_leaves(state.params)) + 2:][:2]
    assert (count.dtype, rate.dtype, count.dim(), rate.dim()) == (torch.int64, torch.float64, 0, 0)
    assert (int(count), float(rate)) == (0, 1e-2)
    later, _ = step(step(state, x, target)[0], x, target)
    assert flat.prepare(later, x, target)[0] == key  # another step and rate: the same signature, the same graph


def test_the_cache_key_follows_the_hyperparameters_not_the_rate():
    key = ("a signature",)

    def digest(step, key=key):
        name, reusable = _digest(step, key)
        assert reusable  # the library's own layers, losses and optimizers: every value read
        return name

    adam = digest(rf.train_step(TINY, rf.mse_loss, rf.adam(1e-3)))
    assert adam == digest(rf.train_step(TINY, rf.mse_loss, rf.adam(rf.linear_schedule(1.0, 0.0, 5))))
    assert adam != digest(rf.train_step(TINY, rf.mse_loss, rf.adam(1e-3, betas=(0.8, 0.999))))
    assert adam != digest(rf.train_step(TINY, rf.l1_loss(), rf.adam(1e-3)))
    assert adam != digest(rf.train_step(rf.compose(rf.linear(2, 4), rf.relu, rf.linear(4, 2)), rf.mse_loss,
                                        rf.adam(1e-3)))
    assert adam != digest(rf.train_step(TINY, rf.mse_loss, rf.adam(1e-3)), ("another signature",))


def _scaled(k, wrap=lambda f: f):
    """A layer of one's own that multiplies by ``k``, held as ``wrap(functools.partial(torch.mul, other=k))``."""
    import functools

    f = wrap(functools.partial(torch.mul, other=k))
    return rf.Layer(init=lambda g, *, dtype=torch.float32: {}, apply=lambda p, x: f(x),
                    vjp=lambda p, x: (f(x), lambda dy: ({}, f(dy))), name="scaled")


def test_the_cache_never_serves_a_package_for_another_step():
    """Regression: a functools.partial's values, and the gradient function rf.data_parallel puts in the step, were
    not in the cache's name, so another step (without the all-reduce, or scaling by another number) could load the
    package compiled for the first."""
    key = ("a signature",)
    two, three = (_digest(rf.train_step(rf.compose(rf.linear(2, 1), _scaled(k)), rf.mse_loss, rf.sgd(0.1)), key)
                  for k in (2.0, 3.0))
    assert two[1] and three[1] and two[0] != three[0]
    step = rf.train_step(TINY, rf.mse_loss, rf.sgd(0.1))
    sharded = attrs.evolve(step, grad=lambda params, x, target: step._grad(params, x, target))
    assert _digest(sharded, key)[0] != _digest(step, key)[0] and not _digest(sharded, key)[1]

    class Times:  # a callable object: its fields are not read, so its package is kept for this process only
        def __init__(self, f):
            self.f = f

        def __call__(self, x):
            return self.f(x)

    opaque = rf.train_step(rf.compose(rf.linear(2, 1), _scaled(2.0, Times)), rf.mse_loss, rf.sgd(0.1))
    assert not _digest(opaque, key)[1]


def test_what_cannot_be_compiled_is_refused_by_name():
    step = rf.train_step(TINY, rf.mse_loss, rf.sgd(0.1))
    with pytest.raises(TypeError, match=r"compiled: expected an rf.TrainStep \(rf.train_step\(model, loss, "
                                        r"optimizer\)\), got my_step: a function of your own is not traced"):
        rf.compiled(_named(lambda state, x, target: (state, {}), "my_step"))
    with pytest.raises(TypeError, match=r"compiled: <compiled\(.*\)> is compiled already"):
        rf.compiled(rf.compiled(step))
    with pytest.raises(TypeError, match=r"compiled: <capture of the step of .*> is a captured step .* compile "
                                        r"first, then capture: rf.capture\(rf.compiled\(step\)\)"):
        rf.compiled(rf.capture(step))
    noisy = rf.compose(rf.linear(2, 4), rf.dropout(0.5), rf.linear(4, 2))
    with pytest.raises(ValueError, match=r"compiled: compose\(linear\(2, 4\), dropout\(0.5\), linear\(4, 2\)\) "
                                         r"carries state or randomness .*inductor draws with its own RNG"):
        rf.compiled(rf.train_step(noisy, rf.mse_loss, rf.sgd(0.1)))
    sign = rf.gradient_transform(lambda params: {}, lambda g, state, params: (g, state), name="sign")
    with pytest.raises(ValueError, match=r"compiled: the optimizer's link sign is a transform of your own"):
        rf.compiled(rf.train_step(TINY, rf.mse_loss, rf.chain(sign, rf.sgd(0.1))))
    with pytest.raises(ValueError, match=r"compiled: backend must be one of 'auto', 'inductor', 'aoti', got 'xla'"):
        rf.compiled(step, backend="xla")
    with pytest.raises(TypeError, match=r"capture: <capture of the step of .*> is captured already"):
        rf.capture(rf.capture(step))


def test_a_bad_state_is_refused_by_the_eager_steps_own_checks_before_anything_compiles():
    fast = rf.compiled(rf.train_step(TINY, rf.mse_loss, rf.sgd(0.1)), backend="inductor")
    (x, target), = batches(1)
    with pytest.raises(TypeError, match=r"train_step: state must be an rf.TrainState .* got dict"):
        fast({}, x, target)
    state = rf.train_state(TINY, rf.sgd(0.1), TINY.init(0))
    with pytest.raises(ValueError, match=r"layer 0: linear\(2, 4\).vjp: x has 3 features"):
        fast(state, torch.zeros(10, 3), target)
    assert fast.chosen == {}


def _named(fn, name):
    fn.__name__ = name
    return fn


# ---------------------------------------------------------------------------
# Compiling: tens of seconds each on a CPU.


def run_both(fast, step, optimizer, n=5):
    ours = theirs = rf.train_state(TINY, optimizer, TINY.init(0))
    kept = rf.tree_map(torch.clone, ours.params)
    for i, (x, target) in enumerate(batches(n)):
        new, metrics = fast(ours, x, target)
        if i == 0:  # the state passed in is not changed
            assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(ours.params), rf.tree_leaves(kept),
                                                         strict=True))
        ours = new
        theirs, expected = step(theirs, x, target)
        torch.testing.assert_close(metrics["loss"], expected["loss"])
        assert_states_close(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd with a schedule", "momentum", "adam with a schedule"])
def test_the_inductor_step_equals_the_eager_step_over_several_steps(name, tmp_path):
    optimizer = OPTIMIZERS[name]()
    step = rf.train_step(TINY, rf.mse_loss, optimizer)
    fast = rf.compiled(step, backend="inductor", cache_dir=tmp_path)
    run_both(fast, step, optimizer)
    assert [info["backend"] for info in fast.chosen.values()] == ["inductor"]  # one signature, compiled once


@pytest.mark.slow
def test_an_aoti_package_is_cached_on_disk_and_a_second_step_loads_it(tmp_path):
    optimizer = rf.adam(rf.linear_schedule(1e-2, 0.0, 4))
    step = rf.train_step(TINY, rf.mse_loss, optimizer)
    cold = rf.compiled(step, backend="aoti", cache_dir=tmp_path)
    run_both(cold, step, optimizer)
    warm = rf.compiled(rf.train_step(TINY, rf.mse_loss, rf.adam(rf.linear_schedule(1e-2, 0.0, 4))),
                       backend="aoti", cache_dir=tmp_path)
    run_both(warm, step, optimizer)
    assert [info["loaded"] for info in cold.chosen.values()] == [False]
    assert [info["loaded"] for info in warm.chosen.values()] == [True]
    assert len(list((tmp_path / "aoti").glob("*.pt2"))) == 1


@pytest.mark.slow
def test_auto_measures_both_backends_keeps_the_faster_and_remembers_its_choice(tmp_path):
    optimizer = rf.sgd(0.1)
    step = rf.train_step(TINY, rf.mse_loss, optimizer)
    fast = rf.compiled(step, cache_dir=tmp_path)
    run_both(fast, step, optimizer, n=2)
    (digest, info), = fast.chosen.items()
    assert set(info["us"]) == {"inductor", "aoti"} and info["backend"] == min(info["us"], key=info["us"].get)
    assert json.loads((tmp_path / "aoti" / f"{digest}.json").read_text())["backend"] == info["backend"]
    again = rf.compiled(step, cache_dir=tmp_path)
    run_both(again, step, optimizer, n=2)
    assert "us" not in again.chosen[digest] and again.chosen[digest]["backend"] == info["backend"]


def test_rf_compiled_is_the_function_of_the_transforms_module():
    """Regression: a submodule rdl_functional.compiled (fit(compile=True)'s) once took the package's attribute
    `compiled` when imported, so rf.compiled(step) raised "'module' object is not callable". No module is named
    like a name the package loads on first use (a module imported later would take its place)."""
    import pkgutil

    from rdl_functional import transforms

    assert rf.compiled is transforms.compiled and not hasattr(rf, "compiled_step")
    modules = {info.name for info in pkgutil.iter_modules(rf.__path__)}
    assert not modules & set(rf._LAZY)
