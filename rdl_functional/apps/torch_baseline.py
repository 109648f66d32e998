"""The same experiment trained by torch.nn + autograd + the matching torch.optim optimizer, for comparison.

An oracle, like :mod:`rdl_functional.testing`: it uses torch's autograd on
purpose, to show that the library's hand-written pullbacks give the same
numbers. Only ``rdl-train --compare-torch`` imports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from ..io import split_state, to_state_dict
from ..layers import Params
from ..stateful import State, StatefulLayer
from ..train import fit, predict
from ..tree import tree_unflatten
from .disc import DiscSettings, draw_run

__all__ = [
    "TorchComparison",
    "TorchPositionalEmbedding",
    "TorchResidual",
    "TorchSelfAttention",
    "compare_with_torch",
    "torch_gpt",
    "torch_optimizer",
    "torch_seed_model",
    "torch_transformer_block",
    "train_torch",
]


def torch_seed_model(*, dropout: float = 0.0, batch_norm: bool = False) -> torch.nn.Sequential:
    """``rf.seed_model(dropout=..., batch_norm=...)`` as a ``torch.nn.Sequential``, with the same state-dict keys."""
    modules: list[torch.nn.Module] = []
    for fan_in in (2, 25, 25):
        modules.append(torch.nn.Linear(fan_in, 25))
        modules += [torch.nn.BatchNorm1d(25)] if batch_norm else []
        modules.append(torch.nn.ReLU())
        modules += [torch.nn.Dropout(dropout)] if dropout else []
    return torch.nn.Sequential(*modules, torch.nn.Linear(25, 2), torch.nn.Tanh())


class TorchSelfAttention(torch.nn.MultiheadAttention):
    """``rf.multi_head_attention(E, H, causal=..., bias=..., dropout=...)`` as torch.nn: batch-first self-attention
    called with ``need_weights=False`` (the path ours follows), on ``x`` or ``(x, key_padding_mask)``; its state
    dict is nn.MultiheadAttention's, ``in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias``."""

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=True)
        self.causal = causal

    def forward(self, x: Any) -> Tensor:  # type: ignore[override]
        x, mask = x if isinstance(x, tuple) else (x, None)
        length = x.shape[1]
        causal_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1) if self.causal else None
        return super().forward(x, x, x, key_padding_mask=mask, need_weights=False, attn_mask=causal_mask,
                               is_causal=self.causal)[0]


class TorchResidual(torch.nn.Sequential):
    """``rf.residual(rf.compose(...))``: ``x + layers(x)``, keyed ``0, 1, ...`` as the compose's params."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return x + super().forward(x)


class TorchPositionalEmbedding(torch.nn.Embedding):
    """``rf.positional_embedding(max_length, dim)``: ``x + weight[arange(sequence)]``, its state dict ``weight``."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return x + super().forward(torch.arange(x.shape[-2], device=x.device))


def torch_transformer_block(embed_dim: int, num_heads: int, *, mlp_ratio: int = 4, causal: bool = True,
                            dropout: float = 0.0) -> torch.nn.Sequential:
    """``rf.transformer_block(...)`` as torch.nn, with the same state-dict keys (pre-LN, as minGPT)."""
    hidden = mlp_ratio * embed_dim
    return torch.nn.Sequential(
        TorchResidual(torch.nn.LayerNorm(embed_dim),
                      TorchSelfAttention(embed_dim, num_heads, causal=causal, dropout=dropout)),
        TorchResidual(torch.nn.LayerNorm(embed_dim), torch.nn.Linear(embed_dim, hidden), torch.nn.GELU(),
                      torch.nn.Linear(hidden, embed_dim)),
    )


def torch_gpt(vocab: int, max_length: int, embed_dim: int, num_heads: int, blocks: int = 1, *,
              mlp_ratio: int = 4, dropout: float = 0.0) -> torch.nn.Sequential:
    """A small GPT as torch.nn: token embedding, position embedding, causal blocks, final layer norm, a linear
    head to the vocabulary. Its state-dict keys are those of the rf model
    ``rf.compose(rf.embedding(vocab, E), rf.positional_embedding(max_length, E), *[rf.transformer_block(E, H,
    mlp_ratio=..., dropout=...)] * blocks, rf.layer_norm(E), rf.linear(E, vocab))``."""
    return torch.nn.Sequential(
        torch.nn.Embedding(vocab, embed_dim), TorchPositionalEmbedding(max_length, embed_dim),
        *[torch_transformer_block(embed_dim, num_heads, mlp_ratio=mlp_ratio, dropout=dropout) for _ in range(blocks)],
        torch.nn.LayerNorm(embed_dim), torch.nn.Linear(embed_dim, vocab),
    )


def torch_optimizer(settings: DiscSettings, parameters: Any) -> torch.optim.Optimizer:
    """The torch.optim optimizer ``settings.make_optimizer()`` equals (foreach implementation), at rate 0:
    :func:`train_torch` sets the rate before each step."""
    momentum, decay = settings.tuned("momentum"), settings.tuned("weight_decay")
    name = settings.optimizer
    if name in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(parameters, lr=0.0, momentum=momentum, nesterov=name == "nesterov",
                               weight_decay=decay, foreach=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=0.0, momentum=momentum, weight_decay=decay, foreach=True)
    if name == "adagrad":
        return torch.optim.Adagrad(parameters, lr=0.0, weight_decay=decay, foreach=True)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(parameters, lr=0.0, weight_decay=decay, foreach=True)


def train_torch(
    params: Params,
    x: Tensor,
    target: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: Callable[[int], float],
    generator: torch.Generator,
    settings: DiscSettings | None = None,
    state: State | None = None,
) -> tuple[Params, State | None]:
    """Train ``torch_seed_model()`` from ``params`` the way :func:`~rdl_functional.fit` trains: ``(params, state)``.

    The same shuffles (drawn from ``generator``), the same batches, MSE, and
    the optimizer :func:`torch_optimizer` makes for ``settings`` (plain
    ``torch.optim.SGD`` without them), its rate set from the schedule ``lr``
    before each step. With dropout, torch's modules draw their masks from the
    global RNG: it is set to ``generator``'s state for the run (and restored
    after), so that the masks are the ones ``fit`` draws from ``generator``.
    ``state`` is the model's state to start from (with batch norm; a fresh
    one by default); the returned state is ``None`` for a plain model.
    """
    settings = settings or DiscSettings()
    if state is None and settings.batch_norm:
        state = settings.task.model.init_state()
    model = torch_seed_model(dropout=settings.dropout, batch_norm=settings.batch_norm).train()
    model.load_state_dict(to_state_dict(params, state), strict=True)
    optimizer = torch_optimizer(settings, model.parameters())
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.set_state(generator.get_state())
        for _ in range(epochs):
            for rows in torch.randperm(x.shape[0]).split(batch_size):
                optimizer.param_groups[0]["lr"] = lr(count)
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x[rows]), target[rows]).backward()
                optimizer.step()
                count += 1
        generator.set_state(torch.default_generator.get_state())  # advanced, as fit advances its generator
    trained = tree_unflatten({key: value.detach().clone() for key, value in model.state_dict().items()})
    if state is None:
        return trained, None
    return split_state(trained, state)


@attrs.frozen
class TorchComparison:
    """Our run and torch.nn's, from the same params on the same batches."""

    seed: int
    test_accuracy: float
    torch_test_accuracy: float
    train_accuracy: float
    torch_train_accuracy: float
    max_param_difference: float
    seconds: float
    torch_seconds: float
    torch_optimizer: str = "torch.optim.SGD"


def compare_with_torch(seed: int, settings: DiscSettings) -> TorchComparison:
    """Train the seed MLP here and with torch.nn from the same start; compare the results.

    Both sides start from one initial tree and draw one sequence of shuffles,
    all from ``seed``; neither measures the test set during training (ours
    measures the training set after each epoch, as ``fit`` always does). Each
    side first runs one untimed epoch, so that the times are of training, not
    of loading torch's machinery on first use.
    """
    if settings.model != "mlp":
        raise ValueError(f"compare_with_torch: the torch baseline is the seed MLP, not {settings.model!r}")
    data, params, generator = draw_run(seed, settings)
    task = settings.task
    model, target = task.model, task.targets(data.labels_train)

    def shuffles() -> torch.Generator:  # a copy, so that both sides draw the same shuffles
        return torch.Generator().set_state(generator.get_state())

    lr = settings.learning_rate()
    schedule = lr if callable(lr) else (lambda count: lr)
    state = model.init_state() if isinstance(model, StatefulLayer) else None
    # One untimed epoch each first: torch's first backward pass loads its autograd machinery (about 2 s here),
    # which is not the training's cost; ours has its own first-call costs. Both then train from the start.
    fit(model, task.loss, params, data.x_train, target, epochs=1, batch_size=settings.batch_size,
        optimizer=settings.make_optimizer(), generator=shuffles(), record_history=False)
    train_torch(params, data.x_train, target, epochs=1, batch_size=settings.batch_size, lr=schedule,
                generator=shuffles(), settings=settings, state=state)
    clock = time.perf_counter()
    ours, history = fit(model, task.loss, params, data.x_train, target, epochs=settings.epochs,
                        batch_size=settings.batch_size, optimizer=settings.make_optimizer(), generator=shuffles())
    seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    theirs, their_state = train_torch(params, data.x_train, target, epochs=settings.epochs,
                                      batch_size=settings.batch_size, lr=schedule, generator=shuffles(),
                                      settings=settings, state=state)
    torch_seconds = time.perf_counter() - clock

    def accuracy(params: Params, state: State | None, x: Tensor, labels: Tensor) -> float:
        return (predict(model, params, x, state=state) == labels).double().mean().item()

    ours_flat, theirs_flat = to_state_dict(ours, history.model_state), to_state_dict(theirs, their_state)
    return TorchComparison(
        seed=seed,
        test_accuracy=accuracy(ours, history.model_state, data.x_test, data.labels_test),
        torch_test_accuracy=accuracy(theirs, their_state, data.x_test, data.labels_test),
        train_accuracy=accuracy(ours, history.model_state, data.x_train, data.labels_train),
        torch_train_accuracy=accuracy(theirs, their_state, data.x_train, data.labels_train),
        max_param_difference=max((ours_flat[k].double() - theirs_flat[k].double()).abs().max().item()
                                 for k in ours_flat),
        seconds=seconds,
        torch_seconds=torch_seconds,
        torch_optimizer=f"torch.optim.{type(torch_optimizer(settings, [torch.zeros(1)])).__name__}",
    )
