"""Many models trained together equal each trained alone, to float rounding."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf


def _runs(seeds, dtype=torch.float64, n=120, model="mlp"):
    settings = rf.DiscSettings(n_train=n, n_test=n, model=model)
    runs = [rf.draw_run(seed, settings) for seed in seeds]
    cast = (lambda t: t.to(dtype)) if dtype != torch.float32 else (lambda t: t)
    params = [rf.tree_map(cast, p) for _, p, _ in runs]
    x = torch.stack([cast(d.x_train) for d, _, _ in runs])
    target = torch.stack([rf.one_hot(d.labels_train, 2, dtype=dtype) for d, _, _ in runs])
    return runs, params, x, target


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_stacked_training_equals_training_each_alone(dtype, tolerance):
    model = rf.seed_model()
    seeds = [0, 1, 2]
    runs, params, x, target = _runs(seeds, dtype)
    settings = dict(epochs=3, batch_size=32, lr=rf.linear_schedule(0.5, 0.0, 12))
    stacked, histories = rf.fit_stacked(model, rf.mse_loss, rf.stack_params(params), x, target,
                                        generators=[g for *_, g in runs], **settings)
    again = _runs(seeds, dtype)[0]
    for m, (_, _, g) in enumerate(again):
        alone, history = rf.fit(model, rf.mse_loss, params[m], x[m], target[m], generator=g, **settings)
        ours = rf.unstack_params(stacked)[m]
        for a, b in zip(rf.tree_leaves(ours), rf.tree_leaves(alone), strict=True):
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
        assert histories[m].train_accuracy == pytest.approx(history.train_accuracy, abs=1 / 120 + 1e-12)
        assert histories[m].train_loss == pytest.approx(history.train_loss, rel=tolerance, abs=tolerance)


def test_stacked_cross_entropy_equals_each_alone():
    model = rf.logistic_model()
    runs, params, x, _ = _runs([3, 4], model="logistic")
    labels = torch.stack([d.labels_train for d, _, _ in runs])
    stacked, _ = rf.fit_stacked(model, rf.cross_entropy_loss, rf.stack_params(params), x, labels, epochs=2,
                                batch_size=50, lr=0.3, generators=[g for *_, g in runs])
    for m, (_, _, g) in enumerate(_runs([3, 4], model="logistic")[0]):
        alone, _ = rf.fit(model, rf.cross_entropy_loss, params[m], x[m], labels[m], epochs=2, batch_size=50,
                          lr=0.3, generator=g)
        for a, b in zip(rf.tree_leaves(rf.unstack_params(stacked)[m]), rf.tree_leaves(alone), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_stacked_linear_matches_each_model_and_checks_its_vjp(generator):
    layer = rf.linear(3, 2)
    trees = [layer.init(generator, dtype=torch.float64) for _ in range(4)]
    x = torch.randn(4, 5, 3, generator=generator, dtype=torch.float64)
    y = rf.stacked(layer)(rf.stack_params(trees), x)
    for m, tree in enumerate(trees):
        torch.testing.assert_close(y[m], layer(tree, x[m]), rtol=1e-12, atol=1e-12)
    rf.check_vjp(rf.stacked(layer), rf.stack_params(trees), x, generator=generator)
    rf.check_vjp(rf.stacked(rf.seed_model()), rf.stack_params([rf.seed_model().init(s) for s in range(3)]),
                 torch.rand(3, 6, 2, generator=generator), generator=generator)


def test_stack_and_unstack_round_trip_and_reject_mismatches():
    trees = [rf.seed_model().init(seed) for seed in range(3)]
    again = rf.unstack_params(rf.stack_params(trees))
    for a, b in zip(trees, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(rf.tree_leaves(a), rf.tree_leaves(b), strict=True))
    with pytest.raises(ValueError, match=r'stack_params: trees\[0\] has a float32 tensor of shape \(25, 2\) at '
                                         r'"0.weight" but trees\[1\] has a float32 tensor of shape \(3, 2\)'):
        rf.stack_params([trees[0], {**trees[0], "0": rf.linear(2, 3).init(0)}])
    with pytest.raises(ValueError, match=r"stack_params: expected at least one tree, got none"):
        rf.stack_params([])


def test_stacked_linear_rejects_inputs_for_another_number_of_models():
    layer = rf.stacked(rf.linear(3, 2))
    params = rf.stack_params([layer.init(s) for s in range(4)])
    with pytest.raises(ValueError, match=r"x holds 2 models' inputs but the params stack 4"):
        layer(params, torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(models=4, batch, 3\), got \(5, 3\)"):
        layer(params, torch.zeros(5, 3))


def test_a_stack_given_to_the_plain_layer_points_to_rf_stacked():
    layer = rf.linear(3, 2)
    params = rf.stack_params([layer.init(s) for s in range(4)])
    with pytest.raises(ValueError, match=r"weight \(4, 2, 3\) holds a stack of 4 models; run a stack through "
                                         r"rf.stacked\(layer\)"):
        layer(params, torch.zeros(4, 5, 3))
    with pytest.raises(ValueError, match=r"a stack of models needs \(models, out, in\)"):
        rf.stacked(layer)(layer.init(0), torch.zeros(2, 5, 3))


def test_fit_stacked_rejects_data_that_does_not_match_the_generators():
    model = rf.seed_model()
    params = rf.stack_params([model.init(s) for s in range(2)])
    with pytest.raises(ValueError, match=r"fit_stacked: expected x \(models=3, n, features\)"):
        rf.fit_stacked(model, rf.mse_loss, params, torch.zeros(2, 10, 2), torch.zeros(2, 10, 2), epochs=1,
                       batch_size=5, lr=0.1, generators=[torch.Generator() for _ in range(3)])
