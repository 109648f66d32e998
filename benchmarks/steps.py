"""The step table: one SGD or Adam step of the seed task, every way of running it, against torch.nn and the floor.

For one optimizer and one batch size, these sides run interleaved in one
process on one thread, from the same initial params over the same batches
(``torch.randperm`` from a generator seeded 1), each timed over whole epochs:

- ``torch``: torch.nn + autograd + torch.optim (foreach), the baseline of every ratio;
- ``floor``: the same aten ops written out by hand (benchmarks/floor.py);
- ``fit``: ``rf.fit`` with ``rf.sgd`` / ``rf.adam``;
- ``loop``: the pure loop a user writes, ``value_and_grad`` then ``sgd_step`` / ``opt.step``;
- ``train_step``: the loop over ``rf.train_step`` (issue 17), when the library has it;
- ``compiled``: the same loop over ``rf.compiled(rf.train_step(...))`` (the full table only: it compiles, about
  30 s a configuration on a CPU the first time, then loads from its cache on disk);
- ``jax``: one ``jax.jit`` step (plain jax.numpy; optax for Adam), when jax and optax are installed.

Each side but torch becomes a row: its time per step, its ratio to torch.nn
(median and the min–max of the per-round ratios) and to the floor.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable

import torch

import rdl_functional as rf
from benchmarks.common import interleaved, loop_ours, seed_task, train_torch
from benchmarks.floor import floor_adam, floor_sgd
from rdl_functional.apps.torch_baseline import torch_seed_model

LR = {"sgd": 0.1, "adam": 1e-2}
TORCH = {"sgd": lambda p: torch.optim.SGD(p, lr=LR["sgd"], foreach=True),
         "adam": lambda p: torch.optim.Adam(p, lr=LR["adam"], foreach=True)}
OURS = {"sgd": lambda: rf.sgd(LR["sgd"]), "adam": lambda: rf.adam(LR["adam"])}
FLOOR = {"sgd": floor_sgd, "adam": floor_adam}
SEED = 1

DESCRIPTIONS = {
    "floor": "straight-line floor (the same aten ops by hand)",
    "fit": "rf `fit`",
    "loop": "rf pure loop (`value_and_grad` + {update})",
    "train_step": "rf pure loop over `rf.train_step`",
    "compiled": "rf loop over `rf.compiled(rf.train_step(...))`",
    "jax": "`jax.jit` step ({jax}), XLA on one thread",
}


def jax_missing() -> str | None:
    """Why the jax rows cannot run here, or None when they can."""
    missing = [name for name in ("jax", "optax") if importlib.util.find_spec(name) is None]
    return f"{missing[0]} is not installed (pip install -e '.[bench]')" if missing else None


def train_step_missing() -> str | None:
    """Why the train_step rows cannot run, or None: they need ``rf.train_state`` and ``rf.train_step``."""
    if hasattr(rf, "train_step") and hasattr(rf, "train_state"):
        return None
    return "rf.train_step is not in this version of the library"


def _pure_loop(model: rf.Layer, optimizer: str, params, x, target, epochs: int, batch_size: int):
    if optimizer == "sgd":
        return loop_ours(model, params, x, target, epochs, batch_size, LR["sgd"], SEED)
    opt = OURS[optimizer]()
    step, state = rf.value_and_grad(model, rf.mse_loss), opt.init(params)
    g = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
            _, grads = step(params, x[rows], target[rows])
            params, state = opt.step(params, grads, state)
    return params


def _train_step_loop(model: rf.Layer, optimizer: str, params, x, target, epochs: int, batch_size: int,
                     step: Callable | None = None):
    opt = OURS[optimizer]()
    state = rf.train_state(model, opt, params, generator=SEED)
    step = step or rf.train_step(model, rf.mse_loss, opt)
    g = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for rows in torch.randperm(x.shape[0], generator=g).split(batch_size):
            state, _ = step(state, x[rows], target[rows])
    return state


def compiled_missing() -> str | None:
    """Why the compiled rows cannot run, or None: they need ``rf.compiled``."""
    return None if hasattr(rf, "compiled") else "rf.compiled is not in this version of the library"


def _compiled(model: rf.Layer, optimizer: str, params, x, target, epochs: int, batch_size: int) -> tuple:
    """The compiled step, compiled (or loaded) by one untimed epoch, and how long that took."""
    opt = OURS[optimizer]()
    fast = rf.compiled(rf.train_step(model, rf.mse_loss, opt))
    start = time.perf_counter()
    _train_step_loop(model, optimizer, params, x, target, 1, batch_size, step=fast)
    return fast, time.perf_counter() - start


def sides(optimizer: str, batch_size: int, epochs: int,
          compiled: bool = False) -> tuple[dict[str, Callable[[], object]], dict]:
    """The step table's sides for one optimizer and batch size, and what they know before timing (compile times)."""
    model, params, x, y = seed_task()
    run: dict[str, Callable[[], object]] = {
        "torch": lambda: train_torch(torch_seed_model, params, x, y, epochs, batch_size, 0.0, SEED,
                                     make=TORCH[optimizer]),
        "floor": lambda: FLOOR[optimizer](params, x, y, epochs, batch_size, LR[optimizer], SEED),
        "fit": lambda: rf.fit(model, rf.mse_loss, params, x, y, epochs=epochs, batch_size=batch_size,
                              optimizer=OURS[optimizer](), generator=SEED, record_history=False),
        "loop": lambda: _pure_loop(model, optimizer, params, x, y, epochs, batch_size),
    }
    info: dict = {"n": x.shape[0]}
    if train_step_missing() is None:
        run["train_step"] = lambda: _train_step_loop(model, optimizer, params, x, y, epochs, batch_size)
    if compiled and compiled_missing() is None:
        fast, seconds = _compiled(model, optimizer, params, x, y, epochs, batch_size)
        run["compiled"] = lambda: _train_step_loop(model, optimizer, params, x, y, epochs, batch_size, step=fast)
        info["compiled"] = {"compile_s": seconds, "backend": sorted({choice["backend"] for choice in
                                                                      fast.chosen.values()})}
    if jax_missing() is None:
        from benchmarks import jax_side

        trainer = jax_side.Trainer(optimizer, params, x, y, LR[optimizer], batch_size)
        run["jax"] = lambda: trainer(epochs, batch_size, SEED)
        info["jax"] = {"compile_s": trainer.compile_s, "version": jax_side.VERSION}
    return run, info


def _ratios(times: dict[str, list[float]], name: str, over: str) -> tuple[float, float, float]:
    per_round = [a / b for a, b in zip(times[name], times[over], strict=True)]
    return statistics.median(times[name]) / statistics.median(times[over]), min(per_round), max(per_round)


def step_rows(optimizer: str, batch_size: int, epochs: int, rounds: int, targets: dict[str, str],
              compiled: bool = False) -> list[dict]:
    """One row per side but torch.nn's, in the order of ``DESCRIPTIONS``; ``targets`` by side ("report" if absent).

    Times are per step. A side that cannot run here is a row that says why.
    """
    run, info = sides(optimizer, batch_size, epochs, compiled)
    cpu: dict[str, list[float]] = {}
    times = interleaved(run, rounds, cpu=cpu)
    steps = epochs * -(-info["n"] // batch_size)  # the last batch of an epoch may be short
    update = "`sgd_step`" if optimizer == "sgd" else "`opt.step`"
    head = (f"{'SGD' if optimizer == 'sgd' else 'Adam'} step, seed task, batch {batch_size}, {epochs} "
            f"epoch{'s' if epochs != 1 else ''}: ")
    rows = []
    for name, description in DESCRIPTIONS.items():
        workload = head + description.format(update=update, jax=info.get("jax", {}).get("version", "jax"))
        target = targets.get(name, "report")
        if name not in run:
            why = {"jax": jax_missing, "compiled": lambda: compiled_missing() or "the full table only (it compiles)",
                   "train_step": train_step_missing}[name]()
            rows.append({"workload": workload, "threads": 1, "side": name, "target": target, "skipped": why})
            continue
        ratio, low, high = _ratios(times, name, "torch")
        to_floor, floor_low, floor_high = _ratios(times, name, "floor")
        rows.append({"workload": workload, "threads": 1, "per_step": True, "side": name, "optimizer": optimizer,
                     "batch_size": batch_size, "ours_s": statistics.median(times[name]) / steps,
                     "torch_s": statistics.median(times["torch"]) / steps, "ratio": ratio, "ratio_min": low,
                     "ratio_max": high, "vs_floor": to_floor, "vs_floor_min": floor_low, "vs_floor_max": floor_high,
                     "cpu_per_wall": sum(cpu[name]) / sum(times[name]), "target": target, "rounds": rounds,
                     **{key: info[name][key] for key in ("compile_s", "backend") if key in info.get(name, {})}})
    return rows


def user_linear(in_features: int, out_features: int) -> rf.Layer:
    """A linear layer as docs/write-your-own-layer.md teaches a user to write one: its own checks, apply, vjp and
    pullback in plain torch ops, nothing declared to the library (no skips_dx, no stacked form)."""
    name = f"user_linear({in_features}, {out_features})"
    reference = rf.linear(in_features, out_features)

    def check(where: str, params, x) -> None:
        if x.shape[-1] != in_features:
            raise ValueError(f"{where}: x has {x.shape[-1]} features, the layer takes {in_features}")
        if params["weight"].shape != (out_features, in_features):
            raise ValueError(f"{where}: weight is {tuple(params['weight'].shape)}, not {(out_features, in_features)}")

    def apply(params, x):
        check(f"{name}.apply", params, x)
        return torch.nn.functional.linear(x, params["weight"], params["bias"])  # y = x Wᵀ + b

    def vjp(params, x):
        check(f"{name}.vjp", params, x)
        weight = params["weight"]
        y = torch.nn.functional.linear(x, weight, params["bias"])

        def pullback(dy):
            return {"weight": dy.t().mm(x), "bias": dy.sum(0)}, dy.mm(weight)  # dW = dyᵀ x, db = Σ dy, dx = dy W

        return y, pullback

    return rf.Layer(init=reference.init, apply=apply, vjp=vjp, name=name)


def user_layer_rows(batch_size: int, epochs: int, rounds: int, target: str) -> list[dict]:
    """The seed model built from a user's own linear layers (:func:`user_linear`) against the same model from the
    library's, both as loops of ``rf.train_step`` with SGD, from the same params over the same batches."""
    model, params, x, y = seed_task()
    theirs = rf.compose(user_linear(2, 25), rf.relu, user_linear(25, 25), rf.relu, user_linear(25, 25), rf.relu,
                        user_linear(25, 2), rf.tanh)
    run = {"library": lambda: _train_step_loop(model, "sgd", params, x, y, epochs, batch_size),
           "user": lambda: _train_step_loop(theirs, "sgd", params, x, y, epochs, batch_size)}
    times = interleaved(run, rounds)
    ratio, low, high = _ratios(times, "user", "library")
    steps = epochs * -(-x.shape[0] // batch_size)
    return [{"workload": f"SGD step, seed task, batch {batch_size}, {epochs} epochs: rf.train_step of the seed model "
                         "with a user's own linear layers, against the library's linear", "threads": 1,
             "per_step": True, "optimizer": "sgd", "side": "user layer",
             "ours_s": statistics.median(times["user"]) / steps,
             "torch_s": statistics.median(times["library"]) / steps, "ratio": ratio, "ratio_min": low,
             "ratio_max": high, "target": target, "rounds": rounds, "baseline": "library layers"}]


# The targets for the pure step (issue 17): within 1.10× of the floor at every batch size, and at batch 100
# at or under 0.40× (SGD) and 0.50× (Adam) of torch.nn.
def targets(optimizer: str, batch_size: int) -> dict[str, str]:
    pure = "≤ 1.10× floor" + (f", ≤ {'0.40' if optimizer == 'sgd' else '0.50'}×" if batch_size == 100 else "")
    return {"loop": pure, "train_step": pure, "jax": "report (the bar for the compiled step)",
            "compiled": "≤ jax.jit" + (", ≤ 0.15×" if (optimizer, batch_size) == ("sgd", 100) else "")}


# Epochs per batch size: about 800 steps at batch 10 and 100, 400 at batch 1000 (the whole set of 800 points).
EPOCHS = {10: 10, 100: 100, 1000: 400}


def table(rounds: int, quick: bool = False) -> list[dict]:
    """Every row of the step table: SGD then Adam, at batch 10, 100 and 1000 (``quick``: batch 100, one epoch)."""
    sizes = {100: 1} if quick else EPOCHS
    return [*(row for optimizer in ("sgd", "adam") for batch_size, epochs in sizes.items()
              for row in step_rows(optimizer, batch_size, epochs, rounds, targets(optimizer, batch_size),
                                   compiled=not quick)),
            *user_layer_rows(100, sizes[100], rounds, "≤ 1.10× the library's layers")]
