"""The opt-in compiled step gives the eager numbers (to float rounding) and compiles once."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf


def test_compiled_training_equals_eager_training_and_compiles_once():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    data, params, _ = rf.draw_run(0)
    x, target = data.x_train[:300], rf.one_hot(data.labels_train[:300], 2)
    model = rf.seed_model()
    settings = dict(epochs=3, batch_size=100, lr=rf.linear_schedule(0.8, 0.0, 9))
    eager, eager_history = rf.fit(model, rf.mse_loss, params, x, target, generator=1, **settings)
    compiled, compiled_history = rf.fit(model, rf.mse_loss, params, x, target, generator=1, compile=True, **settings)
    again, _ = rf.fit(model, rf.mse_loss, params, x, target, generator=1, compile=True, **settings)
    for a, b, c in zip(rf.tree_leaves(compiled), rf.tree_leaves(eager), rf.tree_leaves(again), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert torch.equal(a, c)
    assert compiled_history.train_accuracy == pytest.approx(eager_history.train_accuracy, abs=2 / 300)
    # Nine steps at nine learning rates, and a second fit: one graph, never recompiled.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_takes_an_optimizer_or_sgd_step_not_a_step_function_of_ones_own():
    model = rf.seed_model()
    x, labels = rf.disc_dataset(10, 0)
    with pytest.raises(ValueError, match=r"fit: compile=True compiles the step of an rf.Optimizer .* a step function "
                                         r"of your own is not compiled"):
        rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2), epochs=1, batch_size=5, lr=0.1,
               generator=0, compile=True, optimizer=lambda p, g, lr: rf.sgd_step(p, g, lr))


def test_compile_trains_with_any_optimizer_of_the_library_as_its_eager_step_does():
    """fit(compile=True) runs rf.compiled of the model's train_step: Adam and a chain too, not only plain SGD."""
    data, params, _ = rf.draw_run(0)
    x, target = data.x_train[:200], rf.one_hot(data.labels_train[:200], 2)
    model = rf.seed_model()
    for make in (lambda: rf.adam(1e-2), lambda: rf.chain(rf.clip_by_global_norm(1.0), rf.sgd(0.1, momentum=0.9))):
        settings = dict(epochs=2, batch_size=50, generator=3)
        eager, eager_history = rf.fit(model, rf.mse_loss, params, x, target, optimizer=make(), **settings)
        fast, fast_history = rf.fit(model, rf.mse_loss, params, x, target, optimizer=make(), compile=True, **settings)
        for a, b in zip(rf.tree_leaves(fast), rf.tree_leaves(eager), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(rf.tree_leaves(fast_history.opt_state), rf.tree_leaves(eager_history.opt_state), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


V, T, E = 7, 4, 8
# The cross-entropy's label check and the embedding's id check read values. The GPT trains with SGD: the key
# projection's bias has a gradient of zero but for rounding, which Adam would scale up to ±lr in either step.
MODELS_WITH_VALUE_CHECKS = {
    "classifier": (lambda: rf.linear(4, 3), lambda g: torch.randn(6, 4, generator=g),
                   lambda g: torch.randint(0, 3, (6,), generator=g), lambda: rf.adam(1e-2)),
    "gpt": (lambda: rf.compose(rf.embedding(V, E), rf.positional_embedding(T, E), rf.transformer_block(E, 2),
                               rf.layer_norm(E), rf.linear(E, V)),
            lambda g: torch.randint(0, V, (2, T), generator=g), lambda g: torch.randint(0, V, (2, T), generator=g),
            lambda: rf.sgd(0.1)),
}


@pytest.mark.parametrize("name", sorted(MODELS_WITH_VALUE_CHECKS))
def test_a_model_whose_checks_read_values_compiles_and_equals_the_eager_step(name):
    # The checks called ids.min() and is_functorch_wrapped_tensor under dynamo, which cannot trace them.
    make, draw_x, draw_target, optimizer = MODELS_WITH_VALUE_CHECKS[name]
    model = make()
    step = rf.train_step(model, rf.cross_entropy_loss, optimizer())
    fast = rf.compiled(rf.train_step(model, rf.cross_entropy_loss, optimizer()), backend="inductor")
    eager_state = fast_state = rf.train_state(model, optimizer(), model.init(0))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, target = draw_x(g), draw_target(g)
        eager_state, eager_metrics = step(eager_state, x, target)
        fast_state, fast_metrics = fast(fast_state, x, target)
        torch.testing.assert_close(fast_metrics["loss"], eager_metrics["loss"])
        for a, b in zip(rf.tree_leaves(fast_state.params), rf.tree_leaves(eager_state.params), strict=True):
            torch.testing.assert_close(a, b)


def test_compile_trains_with_maximize_as_its_eager_step_does():
    """maximize negates the grads inside the rule, so the traced ops rf.compiled runs take it too (issue 19)."""
    data, params, _ = rf.draw_run(0)
    x, target = data.x_train[:200], rf.one_hot(data.labels_train[:200], 2)
    model = rf.seed_model()
    # One compile (the traced ops of all five rules are checked without compiling in test_optimizers.py).
    for make in (lambda: rf.adam(1e-3, weight_decay=1e-2, maximize=True),):
        settings = dict(epochs=1, batch_size=50, generator=3)
        eager, _ = rf.fit(model, rf.mse_loss, params, x, target, optimizer=make(), **settings)
        fast, _ = rf.fit(model, rf.mse_loss, params, x, target, optimizer=make(), compile=True, **settings)
        for a, b in zip(rf.tree_leaves(fast), rf.tree_leaves(eager), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert not all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(eager), rf.tree_leaves(params), strict=True))
