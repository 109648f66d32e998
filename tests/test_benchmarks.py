"""The benchmark runs (at tiny sizes; its numbers are only meaningful in benchmarks/, never asserted here)."""

from __future__ import annotations

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


def test_the_default_training_path_never_imports_dynamo_or_compile():
    code = (
        "import sys\n"
        "from rdl_functional.apps.cli import main\n"
        "main(['--epochs', '2', '--quiet'])\n"
        "main(['--epochs', '2', '--seeds', '0-1', '--quiet'])\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
        "assert 'torch._inductor' not in sys.modules, 'torch._inductor was imported'\n"
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
