"""The library computes every gradient by hand: no autograd, no torch.func transforms, no torch.nn.

The one exception is ``torch.func.vmap``, which differentiates nothing: :func:`rf.stacked`
maps a layer that has no stacked form of its own over a stack of models with it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rdl_functional

PACKAGE = Path(rdl_functional.__file__).parent
FORBIDDEN_ATTRIBUTES = {"backward", "requires_grad", "requires_grad_", "grad_fn", "autograd", "func", "nn"}


def _uses(source: str, *, export_container: bool = False) -> list[str]:
    """The forbidden uses in ``source``; with ``export_container``, a class deriving ``torch.nn.Module`` is allowed
    (``torch.export`` takes nothing else: the container holds no layer and computes no gradient)."""
    tree = ast.parse(source)
    allowed = {id(base.value) for node in ast.walk(tree) if export_container and isinstance(node, ast.ClassDef)
               for base in node.bases if ast.unparse(base) == "torch.nn.Module"}
    found = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        # .func is torch.func only (a functools.partial's .func is no transform).
        torch_func = node.attr != "func" or ast.unparse(node.value) == "torch" if isinstance(node, ast.Attribute) \
            else True
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES and torch_func:
            found.append(f"line {node.lineno}: .{node.attr}")
        vmap_only = isinstance(node, ast.ImportFrom) and [a.name for a in node.names] == ["vmap"]
        if vmap_only and node.module == "torch.func":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            found += [f"line {node.lineno}: import {n}" for n in names if n.startswith(("torch.autograd", "torch.func",
                                                                                          "torch.nn", "functorch"))]
    return found


# The oracles, public so that users can check their own layers; never on the training path.
ORACLES = {"testing.py", "torch_baseline.py", "adder_torch.py", "digits_torch.py"}
# rf.compiled hands its flat step to torch.export, which takes a torch.nn.Module: the one container allowed.
EXPORTS = {"_compilers.py"}


# The trace's signature reads each tensor's requires_grad flag (it is among the dispatch keys a record was made
# for); reading a flag computes no gradient.
FLAGS_READ = {"trace.py"}


def test_the_package_never_uses_autograd_torch_func_or_torch_nn():
    offenders = {path.name: [use for use in _uses(path.read_text(), export_container=path.name in EXPORTS)
                             if not (path.name in FLAGS_READ and use.endswith(": .requires_grad"))]
                 for path in PACKAGE.rglob("*.py") if path.name not in ORACLES}
    assert {name: uses for name, uses in offenders.items() if uses} == {}


def test_the_export_container_is_the_only_torch_nn_allowed():
    container = "import torch\nclass M(torch.nn.Module):\n    pass\n"
    assert _uses(container) and not _uses(container, export_container=True)
    assert _uses(container + "layer = torch.nn.Linear(2, 3)\n", export_container=True)


def test_a_partials_func_is_not_torch_func():
    assert not _uses("import functools\nf = functools.partial(max, 1)\ng = f.func\n")
    assert _uses("import torch\nv = torch.func.vmap\n")


def test_the_scan_would_see_a_use():
    assert _uses("import torch\nloss.backward()\nx = torch.func.vjp(f, p)\nfrom torch.autograd import grad\n")
    assert _uses("from torch.func import vjp\n") and _uses("from torch.func import vmap, grad\n")
    assert not _uses("from torch.func import vmap\n")
