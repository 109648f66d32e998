"""``rdl-train --task adder``: a small GPT learns two-digit addition, minGPT's ``projects/adder``.

The problem, as minGPT's ``AdditionDataset`` with ``ndigit=2`` poses it:

- every pair ``(a, b)`` of numbers 0..99 is one problem, 10,000 in all, numbered ``i = 100 a + b``; a fixed
  permutation (``torch.randperm`` from a generator seeded with the run's seed; minGPT seeds it with nothing, so
  its split is that of seed 0's default generator) holds out its first 500 for the test, the other 9,500 train;
- a problem is written as 7 digit tokens (vocabulary 10): the 2 digits of ``a``, the 2 of ``b``, then the 3 of
  ``c = a + b`` reversed (least significant first, the order in which a carry is worked out):
  ``85 + 50 = 135`` is ``8 5 5 0 5 3 1``;
- the GPT reads the first 6 tokens (its block size) and predicts each next one; the loss counts the predictions
  of the answer digits only: the targets are the tokens shifted by one, of which minGPT masks the first
  ``2·ndigit − 1 = 3`` (``-1``, ``F.cross_entropy(..., ignore_index=-1)``). Here the model's head keeps the
  logits of positions 3..5 (:func:`answer_positions`) and the loss is the mean cross-entropy of those three
  against ``c``'s digits: the same value (the tests check it against minGPT's masked loss), and a model output
  whose per-digit accuracy :func:`~rdl_functional.fit`'s history can measure;
- a problem is solved when greedy decoding (the most likely digit, appended, three times) from ``a``'s and
  ``b``'s 4 digits writes all three digits of ``c``: ``test_accuracy`` is the share of the 500 held-out sums
  written right.

The model is minGPT's ``gpt-nano``: token embedding and learned positions of 48 features, 3 pre-LN transformer
blocks of 3 heads (causal attention, an MLP of 4·48 with GELU), a final layer norm and a linear head to the 10
digits, without dropout; trained by AdamW on minibatches of 64 (minGPT: lr 5e-4, betas (0.9, 0.95), decay 0.1
off the biases, norms and embeddings, gradient clipping at 1, dropout 0.1; plain AdamW reaches every sum here).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor

from .. import (
    History,
    Layer,
    Optimizer,
    Schedule,
    adamw,
    compose,
    cosine_decay_schedule,
    embedding,
    fit,
    layer_norm,
    linear,
    log_softmax,
    nll_loss,
    positional_embedding,
    transformer_block,
)
from ..layers import Params
from .tasks import Column, Comparison, TrainingTask, checkpoint_record, summarize_runs

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

__all__ = [
    "ANSWER_START",
    "BLOCKS",
    "BLOCK_SIZE",
    "COLUMNS",
    "DEFAULTS",
    "FEATURES",
    "HEADS",
    "LAYERS",
    "MODEL",
    "NDIGIT",
    "N_TEST",
    "TASK",
    "VOCAB",
    "AdderData",
    "AdderResult",
    "AdderSettings",
    "adder_model",
    "addition_split",
    "answer_loss",
    "answer_positions",
    "describe",
    "draw_run",
    "encode",
    "exact_match",
    "greedy_answers",
    "inputs_and_targets",
    "masked_targets",
    "run_adder",
]

NDIGIT = 2
"""Digits of each operand."""
VOCAB = 10
"""The tokens: the digits 0..9."""
BLOCK_SIZE = 3 * NDIGIT
"""Tokens the GPT reads: a problem's 3·ndigit + 1 digits but the last, which it only predicts."""
ANSWER_START = 2 * NDIGIT - 1
"""The first position whose prediction is an answer digit (position 3 reads ``b``'s last digit, predicts ``c``'s
first); minGPT masks the targets before it."""
N_TEST = 500
"""Problems held out: minGPT's ``min(20% of 10,000, 500)``."""

answer_loss = nll_loss()
"""The loss on the answer digits: the mean of −log p over the three answer positions of every row (the model ends
in :data:`~rdl_functional.log_softmax`), so cross-entropy, ``F.cross_entropy``'s kernels both ways."""


def addition_split(seed: int) -> tuple[Tensor, Tensor]:
    """The problems' numbers ``100 a + b`` for training ``(9500,)`` and test ``(500,)``, int64: a permutation of all
    10,000 drawn from a generator seeded with ``seed`` (the first 500 held out, as minGPT does).

    >>> train, test = addition_split(0)
    >>> len(train), len(test), sorted(torch.cat([train, test]).tolist()) == list(range(10_000))
    (9500, 500, True)
    """
    order = torch.randperm((10**NDIGIT) ** 2, generator=torch.Generator().manual_seed(seed))
    return order[N_TEST:], order[:N_TEST]


def encode(problems: Tensor) -> Tensor:
    """The 7 tokens of each problem ``100 a + b``, ``(n,)`` int64 to ``(n, 7)`` int64: ``a``'s 2 digits, ``b``'s 2
    and ``a + b``'s 3 reversed.

    >>> encode(torch.tensor([8550, 639])).tolist()
    [[8, 5, 5, 0, 5, 3, 1], [0, 6, 3, 9, 5, 4, 0]]
    """
    base = 10**NDIGIT
    a, b = problems // base, problems % base
    return torch.cat([_digits(a, NDIGIT), _digits(b, NDIGIT), _digits(a + b, NDIGIT + 1).flip(-1)], dim=-1)


def _digits(numbers: Tensor, count: int) -> Tensor:
    """Each number's ``count`` decimal digits, most significant first: ``(n,)`` to ``(n, count)``."""
    powers = 10 ** torch.arange(count - 1, -1, -1, device=numbers.device)
    return numbers.unsqueeze(-1) // powers % 10


def inputs_and_targets(sequences: Tensor) -> tuple[Tensor, Tensor]:
    """What the model is trained on: its input, a problem's first 6 tokens ``(n, 6)``, and the answer digits it
    must predict there, ``(n, 3)`` (the targets of positions 3..5).

    >>> x, y = inputs_and_targets(encode(torch.tensor([8550])))
    >>> x.tolist(), y.tolist()
    ([[8, 5, 5, 0, 5, 3]], [[5, 3, 1]])
    """
    return sequences[:, :-1], sequences[:, ANSWER_START + 1:]


def masked_targets(sequences: Tensor) -> Tensor:
    """minGPT's targets ``(n, 6)``: the tokens shifted by one, the first 3 masked with -1 (for a loss with
    ``ignore_index=-1``); the targets :func:`inputs_and_targets` keeps are their unmasked part.

    >>> masked_targets(encode(torch.tensor([8550]))).tolist()
    [[-1, -1, -1, 5, 3, 1]]
    """
    targets = sequences[:, 1:].clone()
    targets[:, :ANSWER_START] = -1
    return targets


def answer_positions(start: int = ANSWER_START) -> Layer:
    """The positions from ``start`` on of a sequence of features: ``(batch, seq, features)`` to ``(batch,
    seq − start, features)``, ``x[:, start:]``; ``dx`` is ``dy`` at those positions, 0 elsewhere (torch's
    ``slice_backward``). On 4 tokens, one position (the first answer digit's prediction); on 6, three.

    >>> answer_positions(3)({}, torch.zeros(2, 6, 10)).shape
    torch.Size([2, 3, 10])
    """

    def init(generator: Any, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Params:
        return {}

    def check(where: str, params: Params, x: Tensor) -> None:
        if params:
            raise ValueError(f"answer_positions.{where}: it has no parameters, so params must be {{}}, got keys "
                             f"{sorted(params)}")
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] <= start:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"answer_positions.{where}: expected x of shape (batch, seq, features) with seq > "
                             f"{start}, got {shape}")

    def apply(params: Params, x: Tensor) -> Tensor:
        check("apply", params, x)
        return x[:, start:].clone()

    def vjp(params: Params, x: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Params, Tensor]]]:
        check("vjp", params, x)
        shape = x.shape

        def pullback(dy: Tensor) -> tuple[Params, Tensor]:
            return {}, torch.ops.aten.slice_backward(dy, shape, 1, start, shape[1], 1)  # dx[:, start:] = dy

        return x[:, start:].clone(), pullback

    return Layer(init=init, apply=apply, vjp=vjp, name=f"answer_positions({start})")


def greedy_answers(model: Layer, params: Params, questions: Tensor) -> Tensor:
    """The digits the model writes after each question: ``questions`` ``(n, 4)`` int64 (``a``'s and ``b``'s
    digits), ``(n, 3)`` int64 out. Greedy: three forward passes (``model.apply``, no gradient) on the growing
    sequence, each appending the most likely digit at the last position. ``model`` ends in
    :func:`answer_positions`, so its last position is the next digit's prediction."""
    sequence = questions
    for _ in range(NDIGIT + 1):
        next_digit = model.apply(params, sequence)[:, -1].argmax(dim=-1)
        sequence = torch.cat([sequence, next_digit.unsqueeze(-1)], dim=-1)
    return sequence[:, 2 * NDIGIT:]


def exact_match(model: Layer, params: Params, sequences: Tensor, *, batch_size: int = 2000) -> Tensor:
    """For each problem ``(n, 7)``, whether greedy decoding writes its whole answer: ``(n,)`` bool."""
    right = [(greedy_answers(model, params, chunk[:, :2 * NDIGIT]) == chunk[:, 2 * NDIGIT:]).all(dim=-1)
             for chunk in sequences.split(batch_size)]
    return torch.cat(right)


# ---------------------------------------------------------------------------
# The model and the run


FEATURES, HEADS, LAYERS = 48, 3, 3
"""gpt-nano's width, heads per block and blocks."""


def adder_model(blocks: int = LAYERS, heads: int = HEADS, features: int = FEATURES) -> Layer:
    """minGPT's ``gpt-nano`` with the answer head: tokens ``(batch, seq ≤ 6)`` int64 in, the log-probabilities of
    the digits at positions 3.. out, ``(batch, seq − 3, 10)``.

    ``compose`` of, by key: ``0`` the token embedding, ``1`` the learned positions, ``2``.. the pre-LN causal
    transformer blocks, then the final layer norm, the linear head to the 10 digits, :func:`answer_positions`
    and :data:`~rdl_functional.log_softmax`. Params in torch's layout and names (``rf.to_state_dict`` loads into
    the torch.nn twin, :func:`rdl_functional.apps.adder_torch.torch_adder_model`, strictly).
    """
    return compose(
        embedding(VOCAB, features), positional_embedding(BLOCK_SIZE, features),
        *(transformer_block(features, heads, causal=True) for _ in range(blocks)),
        layer_norm(features), linear(features, VOCAB), answer_positions(), log_softmax,
    )  # fmt: skip


MODEL = adder_model()
"""The model of every run (a layer is a value: one object lets each run reuse its traced step)."""
BLOCKS = tuple(str(key) for key in range(2, 2 + LAYERS))
"""The keys of :data:`MODEL`'s transformer blocks in its params."""


@attrs.frozen
class AdderSettings:
    """How :func:`run_adder` trains: AdamW on shuffled minibatches, ``epochs`` passes over the 9,500 training
    problems (149 steps each at batch 64), the rate ``lr`` decaying to 0 along a cosine over the run
    (``schedule="cosine"``) or held (``"constant"``, minGPT's).

    ``device``, ``dtype``: where the params and data live and the params' floating dtype; everything is drawn on
    the CPU first, so a seed names the same run on every device.
    """

    epochs: int = 7
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    schedule: str = attrs.field(default="cosine", validator=attrs.validators.in_(("cosine", "constant")))
    device: str = "cpu"
    dtype: str = attrs.field(default="float32", validator=attrs.validators.in_(("float32", "float64")))

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one pass over the 9,500 training problems (the last batch may be shorter)."""
        return -(-((10**NDIGIT) ** 2 - N_TEST) // self.batch_size)

    @property
    def steps(self) -> int:
        """Steps of the whole run."""
        return self.epochs * self.steps_per_epoch

    def learning_rate(self) -> float | Schedule:
        """The rate: ``lr``, or a function of the step count decaying from it."""
        return cosine_decay_schedule(self.lr, self.steps) if self.schedule == "cosine" else self.lr

    def make_optimizer(self) -> Optimizer:
        """AdamW at :meth:`learning_rate` with ``weight_decay`` on every param (torch's defaults otherwise)."""
        return adamw(self.learning_rate(), weight_decay=self.weight_decay)


DEFAULTS = AdderSettings()


@attrs.frozen
class AdderData:
    """One seed's problems, encoded (``(n, 7)`` int64): 9,500 to train on, 500 held out."""

    train: Tensor
    test: Tensor


def draw_run(seed: int, settings: AdderSettings = DEFAULTS) -> tuple[AdderData, Params, torch.Generator]:
    """What a seed draws before training: the split (:func:`addition_split`), the initial params, and the
    generator to shuffle with (seeded with ``seed``, after drawing the params)."""
    train, test = addition_split(seed)
    g = torch.Generator().manual_seed(seed)
    params = MODEL.init(g, dtype=getattr(torch, settings.dtype), device=settings.device)
    return AdderData(encode(train).to(settings.device), encode(test).to(settings.device)), params, g


@attrs.frozen
class AdderResult:
    """One run: the figures, the trained params, ``fit``'s per-epoch history, and the curves of the run.

    ``step_losses``: the loss of every step's batch; ``test_exact``: the test set's exact-match accuracy after
    each epoch. A run resumed from a checkpoint holds those of the steps and epochs it ran: the last ones.
    """

    seed: int
    settings: AdderSettings
    test_accuracy: float
    test_correct: int
    train_accuracy: float
    seconds: float
    params: Params = attrs.field(repr=False)
    history: History = attrs.field(repr=False)
    data: AdderData = attrs.field(repr=False)
    step_losses: tuple[float, ...] = attrs.field(repr=False, default=())
    test_exact: tuple[float, ...] = attrs.field(repr=False, default=())
    model_state: None = None

    def summary(self) -> dict[str, float | int]:
        """The run's figures as plain numbers, for tables and JSON."""
        last = lambda values: values[-1] if values else float("nan")  # noqa: E731
        return {"seed": self.seed, "test_accuracy": self.test_accuracy, "test_correct": self.test_correct,
                "train_accuracy": self.train_accuracy, "train_loss": last(self.history.train_loss),
                "test_loss": last(self.history.test_loss), "steps": self.settings.steps, "seconds": self.seconds}


def run_adder(
    seed: int,
    settings: AdderSettings = DEFAULTS,
    *,
    callback: Callable[[int, Params, History], None] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_info: Any = None,
    on_resume: Callable[[Checkpoint], None] | None = None,
    check_finite: bool = True,
) -> AdderResult:
    """Train :data:`MODEL` on one seed's 9,500 problems and count the held-out sums it writes right.

    ``rf.fit`` runs the epochs (its history: the answer loss and per-digit accuracy, under teacher forcing, on
    both sets); after each epoch the test set is decoded greedily (:func:`exact_match`) for the curve. The
    keywords pass through to ``fit``; the checkpoint records the task, the seed and the settings besides
    ``checkpoint_info`` (a resumed run ends as the whole run would; its curves hold the steps run since).
    """
    start = time.perf_counter()
    data, params, g = draw_run(seed, settings)
    x, y = inputs_and_targets(data.train)
    x_test, y_test = inputs_and_targets(data.test)
    step_losses: list[Tensor] = []
    test_exact: list[float] = []

    def each_epoch(epoch: int, params: Params, history: History) -> None:
        test_exact.append(exact_match(MODEL, params, data.test).double().mean().item())
        if callback is not None:
            callback(epoch, params, history)

    params, history = fit(
        MODEL, answer_loss, params, x, y, epochs=settings.epochs, batch_size=settings.batch_size,
        optimizer=settings.make_optimizer(), generator=g, test=(x_test, y_test), callback=each_epoch,
        on_step=lambda progress: step_losses.append(progress.metrics["loss"]), checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, on_resume=on_resume, check_finite=check_finite,
        checkpoint_info=None if checkpoint is None else checkpoint_record("adder", seed, settings, checkpoint_info),
    )  # fmt: skip
    right = exact_match(MODEL, params, data.test)
    return AdderResult(
        seed=seed, settings=settings, test_accuracy=right.double().mean().item(), test_correct=int(right.sum()),
        train_accuracy=exact_match(MODEL, params, data.train).double().mean().item(),
        seconds=time.perf_counter() - start, params=params, history=history, data=data,
        step_losses=tuple(torch.stack(step_losses).tolist()) if step_losses else (), test_exact=tuple(test_exact),
    )  # fmt: skip


# ---------------------------------------------------------------------------
# The task rdl-train runs


def describe(settings: AdderSettings) -> str:
    """The header's words: the problem, the model, the optimizer and the run's length."""
    rate = "with cosine decay to 0" if settings.schedule == "cosine" else "(constant)"
    return (f"minGPT's adder: all 10,000 pairs of 2-digit numbers, 500 held out per seed, the sum written reversed; "
            f"gpt-nano ({LAYERS} pre-LN blocks, {HEADS} heads, {FEATURES} features), loss on the answer digits\n"
            f"AdamW, lr {settings.lr:g} {rate}, weight decay {settings.weight_decay:g}; {settings.epochs} "
            f"epoch{'' if settings.epochs == 1 else 's'} of batch {settings.batch_size} ({settings.steps} steps)")


def _plots(folder: Path, results: list[AdderResult], settings: AdderSettings) -> list[str]:
    """One run: curves.png and attention.png; several: seeds.png."""
    from .adder_plots import plot_adder_curves, plot_adder_seeds, plot_attention
    from .plots import save_figure

    if len(results) > 1:
        figures = {"seeds.png": plot_adder_seeds(results)}
    else:
        figures = {"curves.png": plot_adder_curves(results[0]), "attention.png": plot_attention(results[0])}
    for filename, figure in figures.items():
        save_figure(figure, folder / filename)
    return list(figures)


def _compare_torch(seed: int, settings: AdderSettings) -> Comparison:
    from .adder_torch import compare_adder_with_torch

    return compare_adder_with_torch(seed, settings)


COLUMNS = (Column("test_accuracy", "test sums", 9, "percent"), Column("test_correct", "right of 500", 12, "count"),
           Column("train_accuracy", "train sums", 10, "percent"), Column("test_loss", "test loss", 9, "loss"),
           Column("steps", "steps", 6, "count"), Column("seconds", "time", 8, "seconds"))

TASK = TrainingTask(
    name="adder",
    description="minGPT's adder: a gpt-nano learns 2-digit addition (500 held-out sums, exact match, greedy)",
    defaults=DEFAULTS,
    flags=("epochs", "batch_size", "lr", "weight_decay", "device", "dtype"),
    run=run_adder,
    summarize=summarize_runs,
    plots=_plots,
    compare_torch=_compare_torch,
    describe=describe,
    columns=COLUMNS,
)  # fmt: skip
