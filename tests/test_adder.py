"""The adder task (issue 18): its data, encoding, loss and decoding on small cases, the model against its torch.nn
twin, and (marked slow) the goal: every held-out sum right."""

from __future__ import annotations

import importlib.util

import attrs
import pytest
import torch
import torch.nn.functional as F

import rdl_functional as rf
from rdl_functional.apps import adder
from rdl_functional.apps.adder_plots import attention_weights
from rdl_functional.apps.adder_torch import torch_adder_model, train_adder_torch
from rdl_functional.apps.cli import main


@pytest.fixture(scope="module")
def start():
    """Seed 0's problems and initial params."""
    data, params, _ = adder.draw_run(0)
    return data, params


def test_the_split_holds_every_pair_once_500_held_out_and_is_fixed_by_the_seed():
    train, test = adder.addition_split(0)
    assert (len(train), len(test)) == (9500, 500)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(10_000))
    again, _ = adder.addition_split(0)
    other, _ = adder.addition_split(1)
    assert torch.equal(train, again) and not torch.equal(train, other)
    # minGPT's split: torch.randperm(10_000) from a fresh generator, whose default seed is 67280421310721
    minGPT_order = torch.randperm(10_000, generator=torch.Generator().manual_seed(67280421310721))
    assert torch.equal(adder.addition_split(67280421310721)[1], minGPT_order[:500])


@pytest.mark.parametrize(("a", "b", "tokens"), [
    (85, 50, [8, 5, 5, 0, 5, 3, 1]),  # minGPT's example: 85 + 50 = 135 is "8550531"
    (6, 39, [0, 6, 3, 9, 5, 4, 0]),  # 6 + 39 = 45, padded: "0639540"
    (0, 0, [0, 0, 0, 0, 0, 0, 0]),
    (99, 99, [9, 9, 9, 9, 8, 9, 1]),  # 198, reversed
])
def test_a_problem_is_written_as_a_b_and_the_sum_reversed(a, b, tokens):
    assert adder.encode(torch.tensor([100 * a + b])).tolist() == [tokens]


def test_the_inputs_are_six_tokens_and_the_targets_the_answer_digits_minGPT_leaves_unmasked():
    sequences = adder.encode(torch.arange(10_000))
    x, y = adder.inputs_and_targets(sequences)
    masked = adder.masked_targets(sequences)
    assert x.shape == (10_000, 6) and y.shape == (10_000, 3)
    assert torch.equal(x, sequences[:, :6]) and torch.equal(masked[:, 3:], y)
    assert (masked[:, :3] == -1).all()
    a, b = torch.arange(10_000) // 100, torch.arange(10_000) % 100
    assert torch.equal(y[:, 0] + 10 * y[:, 1] + 100 * y[:, 2], a + b)


def test_the_loss_is_minGPTs_masked_cross_entropy(start):
    """The answer head and nll_loss equal F.cross_entropy(all logits, targets with -1, ignore_index=-1)."""
    data, params = start
    x, y = adder.inputs_and_targets(data.train[:64])
    twin = torch_adder_model()
    twin.load_state_dict(rf.to_state_dict(params), strict=True)
    with torch.no_grad():
        logits = twin[:7](x)  # the GPT before the answer head: (64, 6, 10)
    reference = F.cross_entropy(logits.flatten(0, 1), adder.masked_targets(data.train[:64]).flatten(),
                                ignore_index=-1)
    ours = adder.answer_loss(adder.MODEL.apply(params, x), y)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    on_all_positions = rf.nll_loss(ignore_index=-1)(torch.log_softmax(logits, -1), adder.masked_targets(
        data.train[:64]))
    assert torch.equal(on_all_positions, reference)


def test_the_answer_positions_layer_passes_the_vjp_check(generator):
    x = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64)
    assert rf.check_vjp(adder.answer_positions(), {}, x, generator=generator).ok


def _oracle(shift: int = 0) -> rf.Layer:
    """A model that knows addition (``shift=0``) or is wrong by ``shift`` on every digit: log-probabilities
    that put everything on the next digit of the sum, at the answer positions of a sequence of 4 to 6 tokens."""

    def apply(params, x):
        a, b = x[:, 0] * 10 + x[:, 1], x[:, 2] * 10 + x[:, 3]
        digits = torch.stack([(a + b) // 10**k % 10 for k in range(3)], dim=1)  # reversed
        next_digits = (digits[:, : x.shape[1] - 3] + shift) % 10
        return torch.log(F.one_hot(next_digits, 10).double().clamp_min(1e-30))

    return rf.Layer(init=lambda g, **_: {}, apply=apply, vjp=lambda p, x: (apply(p, x), None))


def test_greedy_decoding_writes_what_the_model_predicts_and_exact_match_counts_whole_answers():
    sequences = adder.encode(torch.tensor([8550, 639, 9999, 0]))
    assert torch.equal(adder.greedy_answers(_oracle(), {}, sequences[:, :4]), sequences[:, 4:])
    assert adder.exact_match(_oracle(), {}, sequences, batch_size=3).all()
    assert not adder.exact_match(_oracle(shift=1), {}, sequences).any()


def test_exact_match_needs_every_digit(start):
    """A model right on the first digit only gets no sum right (a wrong carry is a wrong sum)."""

    def first_only(params, x):
        right = _oracle().apply(params, x)
        return torch.cat([right[:, :1], right[:, 1:].roll(1, dims=-1)], dim=1)

    wrong_later = rf.Layer(init=lambda g, **_: {}, apply=first_only, vjp=lambda p, x: (first_only(p, x), None))
    sequences = adder.encode(torch.tensor([8550, 639]))
    answers = adder.greedy_answers(wrong_later, {}, sequences[:, :4])
    assert torch.equal(answers[:, 0], sequences[:, 4]) and not adder.exact_match(wrong_later, {}, sequences).any()


def test_the_model_is_the_torch_twin_with_its_params_loaded_strictly(start):
    data, params = start
    twin = torch_adder_model()
    twin.load_state_dict(rf.to_state_dict(params), strict=True)
    x, _ = adder.inputs_and_targets(data.test[:32])
    with torch.no_grad():
        for length in (4, 5, 6):
            assert torch.equal(adder.MODEL.apply(params, x[:, :length]), twin(x[:, :length]))


def test_adamw_steps_are_the_twins_bit_for_bit_in_float32(start):
    """Four steps of 64 (rf.fit, rf.adamw) against the twin + autograd + torch.optim.AdamW, same shuffles."""
    data, params = start
    x, y = adder.inputs_and_targets(data.train[:256])
    settings = attrs.evolve(adder.DEFAULTS, epochs=1)
    ours, _ = rf.fit(adder.MODEL, adder.answer_loss, params, x, y, epochs=1, batch_size=64,
                     optimizer=settings.make_optimizer(), generator=torch.Generator().manual_seed(5),
                     record_history=False)
    theirs = train_adder_torch(params, x, y, settings, torch.Generator().manual_seed(5))
    ours_flat, theirs_flat = rf.to_state_dict(ours), rf.to_state_dict(theirs)
    assert sorted(ours_flat) == sorted(theirs_flat)
    moved = [key for key in ours_flat if not torch.equal(ours_flat[key], rf.to_state_dict(params)[key])]
    assert len(moved) == len(ours_flat)
    assert [key for key in ours_flat if not torch.equal(ours_flat[key], theirs_flat[key])] == []


@pytest.fixture(scope="module")
def short_run():
    """A smoke run: two epochs of 5 steps of 1,900 problems."""
    epochs = []
    settings = attrs.evolve(adder.DEFAULTS, epochs=2, batch_size=1900)
    result = adder.TASK.run(3, settings, callback=lambda epoch, params, history: epochs.append(epoch))
    return result, epochs


def test_a_short_run_trains_and_reports_the_tasks_columns(short_run):
    result, epochs = short_run
    summary = result.summary()
    assert epochs == [1, 2] and summary["steps"] == 10 == len(result.step_losses) == result.settings.steps
    assert result.history.epochs == 2 and len(result.test_exact) == 2
    assert 0 <= summary["test_accuracy"] <= 1 and summary["test_correct"] == round(500 * summary["test_accuracy"])
    assert result.step_losses[-1] < result.step_losses[0]
    assert {column.key for column in adder.TASK.columns} <= set(summary)
    assert set(adder.TASK.flags) <= set(attrs.asdict(adder.DEFAULTS))
    assert "gpt-nano" in adder.TASK.describe(result.settings)


def test_the_plots_are_written(short_run, tmp_path):
    pytest.importorskip("matplotlib")
    result, _ = short_run
    assert adder.TASK.plots(tmp_path, [result], result.settings) == ["curves.png", "attention.png"]
    assert adder.TASK.plots(tmp_path, [result, result], result.settings) == ["seeds.png"]
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("curves.png", "attention.png", "seeds.png"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_defaults_get_every_held_out_sum_right(seed):
    result = adder.run_adder(seed)
    assert result.test_correct == 500 and result.summary()["test_accuracy"] == 1.0


@pytest.mark.parametrize("block", [0, 2])
def test_the_attention_map_is_nn_multihead_attentions_weights(start, block):
    data, params = start
    twin = torch_adder_model()
    twin.load_state_dict(rf.to_state_dict(params), strict=True)
    x, _ = adder.inputs_and_targets(data.test[:5])
    with torch.no_grad():
        stream = twin[:2 + block](x)
        norm, attention = twin[2 + block][0]
        h = norm(stream)
        future = torch.ones(6, 6, dtype=torch.bool).triu(1)
        _, expected = torch.nn.MultiheadAttention.forward(attention, h, h, h, attn_mask=future, need_weights=True,
                                                          average_attn_weights=False)
    weights = attention_weights(params, x, block)
    assert weights.shape == (5, 3, 6, 6)
    torch.testing.assert_close(weights, expected)
    assert not weights.triu(1).any()


class _Stop(Exception):
    pass


def test_a_run_resumed_from_its_checkpoint_ends_as_the_whole_run_and_still_plots(short_run, tmp_path):
    whole, _ = short_run
    settings = whole.settings

    def stop_after_the_first_epoch(epoch, params, history):
        if epoch == 1:
            raise _Stop

    path = tmp_path / "adder.ckpt"
    with pytest.raises(_Stop):
        adder.run_adder(3, settings, checkpoint=path, callback=stop_after_the_first_epoch)
    assert rf.read_checkpoint(path).settings["info"]["task"] == "adder"
    resumed = adder.run_adder(3, settings, checkpoint=path)
    assert [key for key, value in rf.to_state_dict(whole.params).items()
            if not torch.equal(value, rf.to_state_dict(resumed.params)[key])] == []
    assert len(resumed.step_losses) == 5 and resumed.step_losses == whole.step_losses[5:]
    assert resumed.history.test_loss == whole.history.test_loss and resumed.summary()["steps"] == 10
    if importlib.util.find_spec("matplotlib"):
        assert adder.TASK.plots(tmp_path, [resumed], settings) == ["curves.png", "attention.png"]


def test_dropout_is_refused_by_saying_the_adder_does_not_take_it_and_why(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "adder", "--dropout", "0.1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("--task adder does not take --dropout (its model has no dropout); it takes --epochs, --batch-size, --lr, "
            "--weight-decay, --device, --dtype and the output flags") in err
    assert "a setting its runs do not have" not in err
