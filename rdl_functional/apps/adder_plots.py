"""Pictures of the adder task: the training curves, an attention map (and its maths), the curves of several seeds.

Needs matplotlib (``rdl_functional[plot]``), as the disc's pictures in ``apps/plots.py`` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import layer_norm
from ..layers import Params
from .adder import BLOCKS, FEATURES, HEADS, LAYERS, MODEL, NDIGIT, AdderResult, greedy_answers
from .plots import _figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["attention_weights", "plot_adder_curves", "plot_adder_seeds", "plot_attention"]


def attention_weights(params: Params, tokens: Tensor, block: int = 0) -> Tensor:
    """The attention weights of each head of transformer block ``block`` (0, 1, 2) on ``tokens`` ``(batch, seq)``:
    ``(batch, heads, seq, seq)``, row ``t`` the weights position ``t`` puts on positions ``≤ t``.

    The block's attention maths on the params, as ``nn.MultiheadAttention(need_weights=True,
    average_attn_weights=False)`` computes them: the stream entering the block (the layers before it), its
    layer norm ``h``, ``q = h W_qᵀ + b_q`` and ``k = h W_kᵀ + b_k`` (the first two thirds of ``in_proj``), split
    into heads of ``d = 48 / 3`` features, ``softmax(q kᵀ / √d)`` with the future masked out.
    """
    layers, stream = MODEL.sequence, tokens
    for key in range(2 + block):
        stream = layers[key].apply(params[str(key)], stream)
    norm, attention = params[BLOCKS[block]]["0"]["0"], params[BLOCKS[block]]["0"]["1"]
    h = layer_norm(FEATURES).apply(norm, stream)
    weight, bias = attention["in_proj_weight"], attention["in_proj_bias"]
    batch, length, d = h.shape[0], h.shape[1], FEATURES // HEADS
    q, k = ((h @ weight[i * FEATURES:(i + 1) * FEATURES].T + bias[i * FEATURES:(i + 1) * FEATURES])
            .view(batch, length, HEADS, d).transpose(1, 2) for i in (0, 1))
    scores = q @ k.transpose(-1, -2) / d**0.5
    future = torch.ones(length, length, dtype=torch.bool, device=h.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def _steps(result: AdderResult) -> tuple[list[int], list[int], list[int]]:
    """Where on the step axis the curves' points lie: each recorded step loss, each epoch of the history, each
    epoch's exact match (a resumed run recorded the last steps and epochs only)."""
    per_epoch, epochs = result.settings.steps_per_epoch, result.history.epochs
    ran = len(result.step_losses)
    ends = [per_epoch * epoch for epoch in range(1, epochs + 1)]
    return list(range(result.settings.steps - ran + 1, result.settings.steps + 1)), ends, \
        ends[epochs - len(result.test_exact):]


def plot_adder_curves(result: AdderResult, *, title: str | None = None) -> Figure:
    """Left: the loss of every step's batch and, after each epoch, on the whole training and test sets (answer
    digits, log scale). Right: after each epoch, the test set's sums written right by greedy decoding, and its
    answer digits predicted right under teacher forcing."""
    fig = _figure(figsize=(10, 4.2))
    loss_ax, accuracy_ax = fig.subplots(1, 2)
    each_step, steps, exact_steps = _steps(result)
    history = result.history
    loss_ax.plot(each_step, result.step_losses, color="#bbbbbb", linewidth=0.8,
                 label="each step's batch")
    loss_ax.plot(steps, history.train_loss, "o-", label=f"training set (last {history.train_loss[-1]:.2g})")
    loss_ax.plot(steps, history.test_loss, "s--", label=f"test set (last {history.test_loss[-1]:.2g})")
    loss_ax.set(xlabel="step", ylabel="cross-entropy of the answer digits", yscale="log", title="Loss")
    accuracy_ax.plot(exact_steps, [100 * a for a in result.test_exact], "o-",
                     label=f"sums right, greedy (last {result.test_correct}/500)")
    accuracy_ax.plot(steps, [100 * a for a in history.test_accuracy], "s--",
                     label=f"digits right, teacher-forced (last {history.test_accuracy[-1]:.1%})")
    accuracy_ax.set(xlabel="step", ylabel="% of the 500 held-out problems", ylim=(0, 101), title="Test accuracy")
    for ax in (loss_ax, accuracy_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or f"Adder, seed {result.seed}: {result.test_correct}/500 held-out sums right")
    return fig


def plot_attention(result: AdderResult, *, example: int = 0, block: int = LAYERS - 1) -> Figure:
    """The attention weights of each head of one block for one held-out problem (the test set's ``example``-th),
    run on the 6 tokens the model reads: rows are the positions attending, columns the positions attended to."""
    tokens = result.data.test[example:example + 1, :-1]
    weights = attention_weights(result.params, tokens, block)[0].tolist()  # lists: numpy 2 warns on a tensor
    answer = greedy_answers(MODEL, result.params, tokens[:, :2 * NDIGIT])[0].tolist()
    digits = [str(t) for t in tokens[0].tolist()]
    names = [f"{d}\n{part}" for d, part in zip(digits, ("a", "a", "b", "b", "c₀", "c₁"), strict=True)]
    fig = _figure(figsize=(4 * HEADS, 4.4))
    for head, ax in enumerate(fig.subplots(1, HEADS)):
        image = ax.imshow(weights[head], vmin=0, vmax=1, cmap="viridis")
        ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
               xlabel="attended to", title=f"head {head + 1}")
        ax.set_ylabel("attending" if head == 0 else "")
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="attention weight")
    a, b = int("".join(digits[:NDIGIT])), int("".join(digits[NDIGIT:2 * NDIGIT]))
    written = int("".join(map(str, answer))[::-1])
    fig.suptitle(f"Block {block + 1}'s attention on {a} + {b} (the model writes {written}), seed {result.seed}")
    return fig


def plot_adder_seeds(results: list[AdderResult], *, title: str | None = None) -> Figure:
    """Each seed's step losses (left) and test sums right after each epoch (right)."""
    fig = _figure(figsize=(10, 4.2))
    loss_ax, accuracy_ax = fig.subplots(1, 2)
    for result in results:
        each_step, _, exact_steps = _steps(result)
        line, = loss_ax.plot(each_step, result.step_losses, linewidth=0.8, label=f"seed {result.seed}")
        accuracy_ax.plot(exact_steps, [100 * a for a in result.test_exact], "o-", color=line.get_color(),
                         label=f"seed {result.seed}: {result.test_correct}/500")
    loss_ax.set(xlabel="step", ylabel="answer cross-entropy (batch)", yscale="log", title="Step loss")
    accuracy_ax.set(xlabel="step", ylabel="% of held-out sums right (greedy)", ylim=(0, 101),
                    title="Test sums right")
    for ax in (loss_ax, accuracy_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or f"Adder over {len(results)} seeds")
    return fig

