"""The benchmark runs (at tiny sizes; its numbers are only meaningful in benchmarks/, never asserted here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_and_writes_its_table_and_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--quick", "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| workload | threads | ours | torch.nn | ratio (median) | min–max | target |" in done.stdout
    assert "machine:" in done.stdout and "torch 2" in done.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert len(rows) >= 5 and all(row["workload"] and row["target"] for row in rows)
    assert all(row["ratio"] > 0 for row in rows if "ratio" in row)
    assert any(0 < row.get("added_ms", -1) < 2000 for row in rows)
    sides = {(row["optimizer"], row["side"]) for row in rows if row.get("per_step")}
    assert {(o, s) for o in ("sgd", "adam") for s in ("floor", "fit", "loop")} <= sides
    assert "straight-line floor (the same aten ops by hand) (to the floor: 1.00×" in done.stdout
    if importlib.util.find_spec("jax") and importlib.util.find_spec("optax"):
        assert {("sgd", "jax"), ("adam", "jax")} <= sides and "first call, tracing and compiling" in done.stdout
    else:
        assert "not measured: jax is not installed" in done.stdout and not any(side == "jax" for _, side in sides)


def test_the_package_loads_no_compiler_until_a_step_is_traced_and_training_loads_no_torch_baseline():
    """``import rdl_functional`` and building a model stay light. The first traced step of a process loads
    torch's compiler stack (make_fx imports torch._inductor's config, and with it dynamo: about a second, once a
    process; docs/performance.md); the torch.nn twins load only for --compare-torch."""
    code = (
        "import sys\n"
        "import rdl_functional as rf\n"
        "rf.seed_model().init(0)\n"
        "assert 'torch._dynamo' not in sys.modules and 'torch._inductor' not in sys.modules, 'imported at import'\n"
        "from rdl_functional.apps.cli import main\n"
        "main(['--epochs', '2', '--quiet'])\n"
        "main(['--epochs', '2', '--seeds', '0-1', '--quiet'])\n"
        "assert 'rdl_functional.apps.torch_baseline' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_gpu_benchmark_says_what_it_measured_or_that_there_is_no_gpu():
    import torch

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--gpu", "--quick"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "captured whole (rf.capture) vs torch.nn eager" in done.stdout
    assert ("not measured: no CUDA device" in done.stdout) != torch.cuda.is_available()


def _seed_task():
    import torch

    import rdl_functional as rf

    data, params, _ = rf.draw_run(0)
    return params, data.x_train, rf.one_hot(data.labels_train, 2), torch


def test_the_straight_line_floor_runs_the_very_kernels_of_torch_nn_and_torch_optim():
    """The floor is the bar for every eager step because it is torch.nn's step without the library: same bits."""
    from benchmarks.common import train_torch
    from benchmarks.floor import floor_adam, floor_sgd
    from rdl_functional.apps.torch_baseline import torch_seed_model

    params, x, y, torch = _seed_task()
    sgd = (floor_sgd, 0.1, lambda p: torch.optim.SGD(p, lr=0.1, foreach=True))
    adam = (floor_adam, 1e-2, lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True))
    for (floor, lr, make), batch_size in ((sgd, 10), (sgd, 1000), (adam, 100), (adam, 1000)):
        ours = floor(params, x, y, 2, batch_size, lr, 1)
        theirs = list(train_torch(torch_seed_model, params, x, y, 2, batch_size, lr, 1, make=make).parameters())
        assert len(ours) == len(theirs) == 8
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), (floor.__name__, batch_size)


def test_the_jax_side_trains_the_same_model_from_the_same_params_on_the_same_batches():
    import pytest

    from benchmarks import steps

    if steps.jax_missing():  # not importorskip: jax_side sets XLA's flags before jax starts its backend
        pytest.skip(steps.jax_missing())
    from benchmarks import jax_side
    from benchmarks.common import train_torch
    from rdl_functional.apps.torch_baseline import torch_seed_model

    params, x, y, torch = _seed_task()
    trained = {}
    for optimizer, lr, make in (("sgd", 0.1, None), ("adam", 1e-2, lambda p: torch.optim.Adam(p, lr=1e-2))):
        for batch_size in (100, 1000):
            trainer = jax_side.Trainer(optimizer, params, x, y, lr, batch_size)
            ours = trainer.params(trainer(2, batch_size, 1))
            theirs = list(train_torch(torch_seed_model, params, x, y, 2, batch_size, lr, 1, make=make).parameters())
            assert all(a.dtype == torch.float32 for a in ours)
            # XLA's float32 kernels round differently from torch's, so close, not equal; another batch order
            # is off by far more (below).
            torch.testing.assert_close(ours, theirs)
            assert trainer.compile_s > 0
            trained[optimizer, batch_size] = theirs
    trainer = jax_side.Trainer("sgd", params, x, y, 0.1, 100)
    other_batches = trainer.params(trainer(2, 100, 2))
    with pytest.raises(AssertionError, match="not close"):
        torch.testing.assert_close(other_batches, trained["sgd", 100])
    with pytest.raises(ValueError, match=r"optimizer must be 'sgd' or 'adam', got 'rmsprop'"):
        jax_side.Trainer("rmsprop", params, x, y, 0.1, 100)


def test_the_step_table_says_why_a_side_is_not_measured(monkeypatch):
    import importlib.machinery
    import importlib.util

    from benchmarks import steps

    real = importlib.util.find_spec
    present = importlib.machinery.ModuleSpec("jax", None)  # jax found, optax not, whatever this venv holds
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: {"jax": present, "optax": None}.get(name) if
                        name in ("jax", "optax") else real(name, *a))
    assert steps.jax_missing() == "optax is not installed (pip install -e '.[bench]')"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("jax", "optax") else
                        real(name, *a))
    assert steps.jax_missing() == "jax is not installed (pip install -e '.[bench]')"
    rows = {row["side"]: row for row in steps.step_rows("sgd", 400, 1, 1, steps.targets("sgd", 400))}
    assert rows["jax"]["workload"].endswith("`jax.jit` step (jax), XLA on one thread")
    assert rows["jax"]["skipped"] == "jax is not installed (pip install -e '.[bench]')"
    assert {"floor", "fit", "loop"} <= set(rows)
    assert rows["floor"]["vs_floor"] == 1.0 and rows["loop"]["target"] == "≤ 1.10× floor"
    assert all(rows[name]["ratio"] > 0 and rows[name]["ours_s"] > 0 for name in ("floor", "fit", "loop"))
