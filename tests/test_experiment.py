"""The seed report's experiment, as the report ran it: 1000 points, 200 epochs, plain SGD, MSE."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf


@pytest.fixture(scope="module")
def seed_run() -> rf.DiscResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as rdl-train runs it
    try:
        return rf.run_disc(0)
    finally:
        torch.set_num_threads(threads)


def test_seed_experiment_defaults_are_the_reports_setup():
    assert rf.DiscSettings().epochs == 200
    assert (rf.DiscSettings().n_train, rf.DiscSettings().n_test) == (1000, 1000)


def test_seed_experiment_learns_the_disc_well_above_chance(seed_run):
    # Chance is 50% (the disc has half the square's area); the seed report reached 96.2%.
    assert seed_run.test_accuracy > 0.95
    assert seed_run.train_accuracy > 0.95
    assert seed_run.test_errors == round((1 - seed_run.test_accuracy) * 1000)
    assert seed_run.train_loss < 0.1


def test_fit_is_pure_and_reproducible():
    model = rf.seed_model()
    x, labels = rf.disc_dataset(100, 0)
    target = rf.one_hot(labels, 2)
    params = model.init(1)
    runs = [rf.fit(model, rf.mse_loss, params, x, target, epochs=3, batch_size=16, lr=0.1, generator=2)
            for _ in range(2)]
    assert runs[0][1] == runs[1][1] and len(runs[0][1].train_loss) == 3
    leaves = [rf.tree_leaves(p) for p, _ in runs]
    assert all(torch.equal(a, b) for a, b in zip(*leaves, strict=True))
    assert torch.equal(params["0"]["weight"], model.init(1)["0"]["weight"])


def test_fit_rejects_bad_settings():
    model = rf.seed_model()
    x, labels = rf.disc_dataset(10, 0)
    with pytest.raises(ValueError, match=r"fit: batch_size must be an int ≥ 1, got 0"):
        rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2), epochs=1, batch_size=0, lr=0.1,
               generator=0)
    with pytest.raises(ValueError, match=r"fit: lr must be finite and ≥ 0, got -0.1"):
        rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2), epochs=1, batch_size=2, lr=-0.1,
               generator=0)
    with pytest.raises(ValueError, match=r"fit: x has 10 rows but target has 9"):
        rf.fit(model, rf.mse_loss, model.init(0), x, rf.one_hot(labels, 2)[:9], epochs=1, batch_size=2, lr=0.1,
               generator=0)


def test_fit_follows_a_schedule_step_by_step():
    """fit with a schedule equals the hand-written loop with the same rates."""
    model = rf.compose(rf.linear(2, 4), rf.tanh, rf.linear(4, 2))
    x, labels = rf.disc_dataset(30, 0)
    target = rf.one_hot(labels, 2)
    schedule = rf.linear_schedule(0.5, 0.0, transition_steps=6)
    params, _ = rf.fit(model, rf.mse_loss, model.init(1), x, target, epochs=2, batch_size=10, lr=schedule,
                       generator=torch.Generator().manual_seed(2))

    g = torch.Generator().manual_seed(2)
    expected, step, count = model.init(1), rf.value_and_grad(model, rf.mse_loss), 0
    for _ in range(2):
        for rows in torch.randperm(30, generator=g).split(10):
            _, grads = step(expected, x[rows], target[rows])
            expected = rf.sgd_step(expected, grads, schedule(count))
            count += 1
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params), rf.tree_leaves(expected), strict=True))


def test_disc_settings_turn_the_schedule_into_fits_lr():
    assert rf.DiscSettings(schedule="constant", lr=0.3).learning_rate() == 0.3
    # 1000 points in batches of 300: 4 steps an epoch (the last of 100 points), 8 in all.
    schedule = rf.DiscSettings(epochs=2, batch_size=300, lr=0.8).learning_rate()
    assert [schedule(k) for k in (0, 4, 8)] == [0.8, 0.4, 0.0]
    assert schedule(7) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'schedule' must be in"):
        rf.DiscSettings(schedule="step-decay")
