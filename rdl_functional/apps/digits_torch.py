"""The digits CNN trained by torch.nn + autograd + torch.optim.AdamW, for ``rdl-train --task digits --compare-torch``.

An oracle, as :mod:`~rdl_functional.apps.torch_baseline` is for the disc: the same modules in the same order (so
the state dicts match key for key), the same shuffles, shifts and dropout masks, drawn from the global RNG set to
the run's generator state, and the one-cycle rate set before each step.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import rdl_functional as rf

from ..layers import Params
from ..stateful import State
from .digits import DigitsSettings, digits_model, draw_run, one_cycle_schedule, shift_images, steps_of
from .tasks import Comparison

__all__ = ["RandomShift", "compare_with_torch", "torch_digits_model", "train_torch"]


class RandomShift(torch.nn.Module):
    """:func:`~rdl_functional.apps.digits.random_shift` as a module: each image moved by up to ``shift`` pixels in
    training (offsets from the global RNG), the identity in eval mode."""

    def __init__(self, shift: int = 1) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.shift == 0:
            return x
        offsets = torch.randint(0, 2 * self.shift + 1, (x.shape[0], 2))
        return shift_images(x, offsets, self.shift)


def torch_digits_model(width: int = 32, dropout: float = 0.4, shift: int = 1) -> torch.nn.Sequential:
    """``digits_model(width, dropout, shift)`` as a ``torch.nn.Sequential``, with the same state-dict keys."""
    w = width

    def block(fan_in: int, fan_out: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(fan_in, fan_out, 3, padding=1, bias=False), torch.nn.BatchNorm2d(fan_out),
                torch.nn.ReLU()]

    return torch.nn.Sequential(RandomShift(shift), *block(1, w), *block(w, w), torch.nn.MaxPool2d(2),
                               *block(w, 2 * w), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(8 * w, 10))


def train_torch(params: Params, state: State, x: Tensor, labels: Tensor, settings: DigitsSettings,
                generator: torch.Generator) -> tuple[torch.nn.Sequential, float]:
    """Train the twin from ``params`` and ``state`` as ``fit`` trains the CNN: ``(trained module, seconds)``."""
    model = torch_digits_model(settings.width, settings.dropout, settings.shift).train()
    model.load_state_dict(rf.to_state_dict(params, state), strict=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=settings.weight_decay, foreach=True)
    rate = one_cycle_schedule(settings.lr, steps_of(settings, len(labels)))
    count, clock = 0, time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.set_state(generator.get_state())
        for _ in range(settings.epochs):
            for rows in torch.randperm(x.shape[0]).split(settings.batch_size):
                optimizer.param_groups[0]["lr"] = rate(count)
                optimizer.zero_grad()
                F.cross_entropy(model(x[rows]), labels[rows]).backward()
                optimizer.step()
                count += 1
    return model.eval(), time.perf_counter() - clock


def compare_with_torch(seed: int, settings: DigitsSettings) -> Comparison:
    """Train the CNN here (``fit``) and as its torch.nn twin from the same params, batches, shifts and masks."""
    if settings.device != "cpu" or settings.dtype != "float32":
        raise ValueError("compare_with_torch: the digits twin trains on the CPU in float32")
    data, params, generator = draw_run(seed, settings)
    model = digits_model(settings.width, settings.dropout, settings.shift)
    state = model.init_state()
    rate = one_cycle_schedule(settings.lr, steps_of(settings, len(data.labels_train)))

    def copy() -> torch.Generator:
        return torch.Generator().set_state(generator.get_state())

    clock = time.perf_counter()
    ours, history = rf.fit(model, rf.cross_entropy_loss, params, data.x_train, data.labels_train,
                           epochs=settings.epochs, batch_size=settings.batch_size, generator=copy(),
                           optimizer=rf.adamw(rate, weight_decay=settings.weight_decay), record_history=False)
    seconds = time.perf_counter() - clock
    twin, torch_seconds = train_torch(params, state, data.x_train, data.labels_train, settings, copy())

    def accuracy(predicted: Tensor, labels: Tensor) -> float:
        return (predicted == labels).double().mean().item()

    with torch.no_grad():
        theirs = {name: accuracy(twin(x).argmax(1), labels) for name, x, labels in
                  (("train", data.x_train, data.labels_train), ("test", data.x_test, data.labels_test))}
    mine = {name: accuracy(rf.predict(model, ours, x, state=history.model_state), labels) for name, x, labels in
            (("train", data.x_train, data.labels_train), ("test", data.x_test, data.labels_test))}
    ours_flat, theirs_flat = rf.to_state_dict(ours, history.model_state), twin.state_dict()
    difference: Any = max((ours_flat[k].double() - theirs_flat[k].double()).abs().max().item() for k in ours_flat)
    return Comparison(
        twin="the same CNN trained by torch.nn + autograd + torch.optim.AdamW",
        figures=(("train accuracy", mine["train"], theirs["train"], ".1%"),
                 ("test accuracy", mine["test"], theirs["test"], ".1%")),
        max_param_difference=difference, seconds=seconds, torch_seconds=torch_seconds,
    )  # fmt: skip
