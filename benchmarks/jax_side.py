"""The seed task in JAX: what a functional-style user picks instead, one ``jax.jit`` step per batch.

Imported only when jax and optax are installed (``pip install -e '.[bench]'``);
the library itself never imports jax. The model is the seed model in plain
``jax.numpy`` (``h @ Wᵀ + b``, ReLU, Tanh output, MSE over all elements, as
torch's defaults), float32, from our initial params; each step is one jitted
call: forward, ``jax.value_and_grad``, and the SGD update or optax's Adam.
Batches are the ones every other side draws (``torch.randperm`` from a
generator seeded with ``seed``, split in ``batch_size``): the row indices go
to the step as a NumPy array and the gather runs inside the jitted function,
its fastest form here (against host-side batches or device-side index
slices, measured). JAX dispatches asynchronously, so each epoch ends with
``block_until_ready``.

XLA on CPU is held to one thread, as the other sides are
(``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``,
appended to ``XLA_FLAGS`` before jax's backend starts).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# XLA reads XLA_FLAGS when its backend starts (jax's first computation), not at ``import jax``: past that, say so
# rather than measure something else.
_bridge = sys.modules.get("jax._src.xla_bridge")
if _bridge is not None and _bridge.backends_are_initialized():
    raise RuntimeError("benchmarks.jax_side: jax has already computed in this process, so XLA_FLAGS can no longer "
                       "hold XLA to one thread (import benchmarks.jax_side before anything runs jax)")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

VERSION = f"jax {jax.__version__}, optax {optax.__version__}"
_KEYS = ("0", "2", "4", "6")


def to_jax(params) -> list[tuple[jax.Array, jax.Array]]:
    """Our seed-model params tree as [(W, b), ...] of float32 jax arrays, W of shape (out, in) as torch's."""
    return [(jnp.asarray(params[k]["weight"].numpy()), jnp.asarray(params[k]["bias"].numpy())) for k in _KEYS]


def to_torch(params: list[tuple[jax.Array, jax.Array]]) -> list[torch.Tensor]:
    """Back to torch: the leaves [w0, b0, ..., w3, b3], the order of torch.nn's ``parameters()``."""
    return [torch.from_numpy(np.array(leaf)) for pair in params for leaf in pair]


def _loss(params, x: jax.Array, target: jax.Array) -> jax.Array:
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w.T + b
        h = jnp.tanh(h) if i == len(params) - 1 else jax.nn.relu(h)
    return jnp.mean((h - target) ** 2)


def sgd_step(lr: float) -> Callable:
    """``step(params, x_all, target_all, rows) -> (params, loss)``, jitted: p ← p − lr·g."""

    def step(params, x, target, rows):
        loss, grads = jax.value_and_grad(_loss)(params, x[rows], target[rows])
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss

    return jax.jit(step)


def adam_step(lr: float) -> tuple[Callable, optax.GradientTransformation]:
    """``step((params, opt_state), x_all, target_all, rows) -> ((params, opt_state), loss)``, jitted, optax.adam."""
    optimizer = optax.adam(lr)

    def step(carry, x, target, rows):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(_loss)(params, x[rows], target[rows])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step), optimizer


class Trainer:
    """One jitted step and its data on the device; ``trainer(epochs, batch_size, seed)`` trains from our init.

    ``compile_s`` is the first call's time (trace, compile, one step) at
    ``batch_size``, measured when the trainer is made: jit compiles once per
    batch shape, and the last batch of an epoch may be another.
    """

    def __init__(self, optimizer: str, params, x: torch.Tensor, target: torch.Tensor, lr: float, batch_size: int):
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"jax_side.Trainer: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.x, self.target = jnp.asarray(x.numpy()), jnp.asarray(target.numpy())
        self.n = x.shape[0]
        if optimizer == "sgd":
            self.step, self.init = sgd_step(lr), to_jax(params)
        else:
            self.step, tx = adam_step(lr)
            self.init = (to_jax(params), tx.init(to_jax(params)))
        start = time.perf_counter()
        jax.block_until_ready(self.step(self.init, self.x, self.target, np.arange(min(batch_size, self.n))))
        self.compile_s = time.perf_counter() - start

    def __call__(self, epochs: int, batch_size: int, seed: int):
        carry, step, x, target = self.init, self.step, self.x, self.target
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(self.n, generator=g).numpy()
            for start in range(0, self.n, batch_size):
                carry, _ = step(carry, x, target, perm[start:start + batch_size])
            jax.block_until_ready(carry)
        return carry

    def params(self, carry) -> list[torch.Tensor]:
        """The trained params of ``carry`` (what ``__call__`` returned) as torch leaves."""
        return to_torch(carry if isinstance(carry, list) else carry[0])
