"""rdl_functional: a functional deep-learning core on PyTorch tensors.

Every layer is a record of three pure functions, ``init`` / ``apply`` /
``vjp``, over explicit parameter trees (nested dicts of tensors). Backward
passes are written by hand; torch.autograd is never used.

>>> import torch
>>> import rdl_functional as rf
>>> model = rf.compose(rf.linear(2, 25), rf.relu, rf.linear(25, 2), rf.tanh)
>>> params = model.init(0)
>>> loss, grads = rf.value_and_grad(model, rf.mse_loss)(params, torch.zeros(8, 2), torch.zeros(8, 2))
>>> params = rf.sgd_step(params, grads, lr=0.1)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .activations import elu, flatten, gelu, log_softmax, silu, softmax, softplus
from .attention import multi_head_attention, transformer_block
from .autodiff import value_and_grad
from .combinators import add, compose, concat, fan_out, parallel, residual
from .conv import conv1d, conv2d
from .data import DISC_CENTER, DISC_RADIUS, disc_dataset, one_hot
from .distributed import data_parallel
from .ensemble import fit_stacked, stack_params, stacked, unstack_params
from .hooks import EarlyStopping, Progress, early_stopping
from .layers import Layer, identity, leaky_relu, linear, relu, sigmoid, tanh
from .losses import (
    Loss,
    bce_with_logits_loss,
    cross_entropy_loss,
    huber_loss,
    l1_loss,
    mse_loss,
    nll_loss,
)
from .metrics import TASKS, Evaluation
from .normalization import batch_norm2d, group_norm
from .optim import (
    Optimizer,
    Schedule,
    adagrad,
    adam,
    adamw,
    add_decayed_weights,
    apply_updates,
    chain,
    clip_by_global_norm,
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    gradient_transform,
    linear_schedule,
    piecewise_constant_schedule,
    rmsprop,
    sgd,
    sgd_step,
    warmup_cosine_decay_schedule,
)
from .pooling import avg_pool2d, global_avg_pool2d, max_pool2d
from .sequences import embedding, layer_norm, positional_embedding
from .stateful import State, StatefulLayer, batch_norm, dropout, stateful
from .step import TrainState, TrainStep, train_state, train_step
from .train import History, NonFiniteLoss, accuracy, evaluate, fit, predict
from .tree import (
    tree_difference,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_same_structure,
    tree_unflatten,
)

if TYPE_CHECKING:  # imported on first use (below); named here for type checkers and readers
    from .apps.disc import (
        DiscData,
        DiscResult,
        DiscSettings,
        check_params_fit,
        draw_run,
        logistic_model,
        run_disc,
        run_disc_together,
        seed_model,
        summarize,
    )
    from .apps.plots import plot_dataset, plot_decision_boundary, plot_history, plot_seed_spread, save_figure
    from .checkpoint import Checkpoint, load_state, read_checkpoint, save_state
    from .graphs import Captured, capture
    from .io import from_state_dict, load, save, split_state, to_state_dict
    from .testing import VjpMismatch, VjpReport, check_vjp
    from .transforms import CapturedStep, CompiledStep, compiled, compiled_step

__version__ = "0.1.0"

# The modules a training step does not need load when one of their names is first used,
# so that ``import rdl_functional`` stays light (Python compiles every module it imports).
_LAZY = {
    **dict.fromkeys(("Checkpoint", "load_state", "read_checkpoint", "save_state"), "checkpoint"),
    **dict.fromkeys(("Captured", "capture"), "graphs"),
    **dict.fromkeys(("CapturedStep", "CompiledStep", "compiled", "compiled_step"), "transforms"),
    **dict.fromkeys(("DiscData", "DiscResult", "DiscSettings", "check_params_fit", "draw_run", "logistic_model",
                     "run_disc", "run_disc_together", "seed_model", "summarize"), "apps.disc"),
    **dict.fromkeys(("from_state_dict", "load", "save", "split_state", "to_state_dict"), "io"),
    **dict.fromkeys(("plot_dataset", "plot_decision_boundary", "plot_history", "plot_seed_spread", "save_figure"),
                    "apps.plots"),
    **dict.fromkeys(("VjpMismatch", "VjpReport", "check_vjp"), "testing"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rdl_functional' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__() -> list[str]:
    """The public API (``__all__``, lazy names included) and the module's dunders: not its imports
    (``importlib``, ``Any``, ...), nor its submodules, which tab completion would otherwise offer."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__") and name.endswith("__"))})

__all__ = [
    "DISC_CENTER",
    "DISC_RADIUS",
    "TASKS",
    "Captured",
    "CapturedStep",
    "Checkpoint",
    "CompiledStep",
    "DiscData",
    "DiscResult",
    "DiscSettings",
    "EarlyStopping",
    "Evaluation",
    "History",
    "Layer",
    "Loss",
    "NonFiniteLoss",
    "Optimizer",
    "Progress",
    "Schedule",
    "State",
    "StatefulLayer",
    "TrainState",
    "TrainStep",
    "VjpMismatch",
    "VjpReport",
    "accuracy",
    "adagrad",
    "adam",
    "adamw",
    "add",
    "add_decayed_weights",
    "apply_updates",
    "avg_pool2d",
    "batch_norm",
    "batch_norm2d",
    "bce_with_logits_loss",
    "capture",
    "chain",
    "check_params_fit",
    "check_vjp",
    "clip_by_global_norm",
    "compiled",
    "compiled_step",
    "compose",
    "concat",
    "constant_schedule",
    "conv1d",
    "conv2d",
    "cosine_decay_schedule",
    "cross_entropy_loss",
    "data_parallel",
    "disc_dataset",
    "draw_run",
    "dropout",
    "early_stopping",
    "elu",
    "embedding",
    "evaluate",
    "exponential_decay",
    "fan_out",
    "fit",
    "fit_stacked",
    "flatten",
    "from_state_dict",
    "gelu",
    "global_avg_pool2d",
    "gradient_transform",
    "group_norm",
    "huber_loss",
    "identity",
    "l1_loss",
    "layer_norm",
    "leaky_relu",
    "linear",
    "linear_schedule",
    "load",
    "load_state",
    "log_softmax",
    "logistic_model",
    "max_pool2d",
    "mse_loss",
    "multi_head_attention",
    "nll_loss",
    "one_hot",
    "parallel",
    "piecewise_constant_schedule",
    "plot_dataset",
    "plot_decision_boundary",
    "plot_history",
    "plot_seed_spread",
    "positional_embedding",
    "predict",
    "read_checkpoint",
    "relu",
    "residual",
    "rmsprop",
    "run_disc",
    "run_disc_together",
    "save",
    "save_figure",
    "save_state",
    "seed_model",
    "sgd",
    "sgd_step",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "split_state",
    "stack_params",
    "stacked",
    "stateful",
    "summarize",
    "tanh",
    "to_state_dict",
    "train_state",
    "train_step",
    "transformer_block",
    "tree_difference",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_same_structure",
    "tree_unflatten",
    "unstack_params",
    "value_and_grad",
    "warmup_cosine_decay_schedule",
]
