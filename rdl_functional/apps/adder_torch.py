"""The adder task trained by a torch.nn twin + autograd + torch.optim.AdamW, for comparison.

An oracle, like :mod:`rdl_functional.apps.torch_baseline`: it uses torch's autograd on purpose, to show that the
library's hand-written pullbacks give the same numbers. Only the tests and ``rdl-train --task adder
--compare-torch`` import it.
"""

from __future__ import annotations

import time

import attrs
import torch
from torch import Tensor

from ..io import to_state_dict
from ..layers import Params
from ..train import fit
from ..tree import tree_unflatten
from .adder import BLOCK_SIZE, MODEL, VOCAB, AdderSettings, answer_loss, draw_run, exact_match, inputs_and_targets
from .tasks import Comparison
from .torch_baseline import torch_gpt

__all__ = ["TorchAnswerPositions", "compare_adder_with_torch", "torch_adder_model", "train_adder_torch"]


class TorchAnswerPositions(torch.nn.Module):
    """``answer_positions(start)``: ``x[:, start:]``, no params."""

    def __init__(self, start: int = 3) -> None:
        super().__init__()
        self.start = start

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.start:]


def torch_adder_model(blocks: int = 3, heads: int = 3, features: int = 48) -> torch.nn.Sequential:
    """:func:`~rdl_functional.apps.adder.adder_model` as torch.nn (``torch_gpt``'s layers, the answer positions,
    ``nn.LogSoftmax``), with the same state-dict keys: ``rf.to_state_dict(params)`` loads into it strictly."""
    return torch.nn.Sequential(*torch_gpt(VOCAB, BLOCK_SIZE, features, heads, blocks), TorchAnswerPositions(),
                               torch.nn.LogSoftmax(dim=-1))


def train_adder_torch(params: Params, x: Tensor, target: Tensor, settings: AdderSettings,
                      generator: torch.Generator) -> Params:
    """Train :func:`torch_adder_model` from ``params`` the way ``rf.fit`` trains :data:`~.adder.MODEL`: each epoch's
    shuffle drawn from ``generator`` (``torch.randperm``), batches of ``settings.batch_size`` rows in that order,
    ``F.nll_loss`` of the log-probabilities (``F.cross_entropy`` on the answer positions), and
    ``torch.optim.AdamW(lr, weight_decay)`` (foreach), its rate set from ``settings.learning_rate()`` before each
    step. Returns the trained params as a tree."""
    model = torch_adder_model().to(device=settings.device, dtype=getattr(torch, settings.dtype))
    model.load_state_dict(to_state_dict(params), strict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                  foreach=True)
    rate, count = settings.learning_rate(), 0
    for _ in range(settings.epochs):
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for rows in order.split(settings.batch_size):
            optimizer.param_groups[0]["lr"] = rate(count) if callable(rate) else rate
            count += 1
            optimizer.zero_grad()
            torch.nn.functional.nll_loss(model(x[rows]).flatten(0, 1), target[rows].flatten()).backward()
            optimizer.step()
    return tree_unflatten({key: value.detach().clone() for key, value in model.state_dict().items()})


def compare_adder_with_torch(seed: int, settings: AdderSettings) -> Comparison:
    """Train the adder here (``rf.fit``) and by the torch.nn twin from the same params on the same batches;
    compare what each learned. Neither side measures anything while training; each first trains one untimed
    epoch, so that the times are of training, not of loading torch's machinery on first use."""
    data, params, generator = draw_run(seed, settings)
    x, y = inputs_and_targets(data.train)

    def shuffles() -> torch.Generator:  # a copy, so that both sides draw the same shuffles
        return torch.Generator().set_state(generator.get_state())

    def ours(epochs: int) -> Params:
        return fit(MODEL, answer_loss, params, x, y, epochs=epochs, batch_size=settings.batch_size,
                   optimizer=settings.make_optimizer(), generator=shuffles(), record_history=False)[0]

    ours(1), train_adder_torch(params, x, y, attrs.evolve(settings, epochs=1), shuffles())
    clock = time.perf_counter()
    mine = ours(settings.epochs)
    seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    theirs = train_adder_torch(params, x, y, settings, shuffles())
    torch_seconds = time.perf_counter() - clock

    def figures(trained: Params) -> tuple[float, float, float]:
        x_test, y_test = inputs_and_targets(data.test)
        return (exact_match(MODEL, trained, data.test).double().mean().item(),
                exact_match(MODEL, trained, data.train).double().mean().item(),
                answer_loss(MODEL.apply(trained, x_test), y_test).item())

    labels = (("test exact match", ".1%"), ("train exact match", ".2%"), ("test answer loss", ".4f"))
    mine_flat, theirs_flat = to_state_dict(mine), to_state_dict(theirs)
    return Comparison(
        twin="the same GPT trained by torch.nn (nn.MultiheadAttention, nn.LayerNorm, ...) + autograd + "
             "torch.optim.AdamW",
        figures=tuple((label, a, b, spec) for (label, spec), a, b in zip(labels, figures(mine), figures(theirs),
                                                                          strict=True)),
        max_param_difference=max((mine_flat[k].double() - theirs_flat[k].double()).abs().max().item()
                                 for k in mine_flat),
        seconds=seconds,
        torch_seconds=torch_seconds,
    )  # fmt: skip
