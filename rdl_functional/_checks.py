"""The checks the layers share, each written once: a layer's params against the shapes it was built for, an
``x`` against its params' dtype and device, a parameterless layer's ``{}``, and ``eps``.

Each message says where, what was expected, what arrived and the likely fix (docs/STYLE: errors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

Shapes = Mapping[str, "tuple[int, ...] | Shapes"]  # a key's shape, or a sub-dict's shapes (attention's out_proj)


def check_params(where: str, params: Any, shapes: Shapes, fix: str = "") -> None:
    """``params`` holds exactly the keys of ``shapes``, each a floating tensor of its shape, all of one dtype and on
    one device. ``fix`` is said where the keys differ (``" (the layer was built with bias=False)"``)."""
    found: list[tuple[str, Tensor]] = []
    _walk(where, params, shapes, fix, "params", found)
    for path, tensor in found:
        if not tensor.is_floating_point():
            raise TypeError(f"{where}: {path} is {tensor.dtype}, but params must be floating tensors (init them with "
                            f"a floating dtype, or rf.tree_map(lambda p: p.float(), params))")
    for path, tensor in found[1:]:
        first_path, first = found[0]
        if tensor.dtype != first.dtype:
            raise TypeError(f"{where}: {path} is {tensor.dtype} but {first_path} is {first.dtype} (a layer's params "
                            f"share one dtype: rf.tree_map(lambda p: p.to({first.dtype}), params))")
        if tensor.device != first.device:
            raise ValueError(f"{where}: {path} is on {tensor.device} but {first_path} is on {first.device} (a layer's "
                             f"params share one device: rf.tree_map(lambda p: p.to(device), params))")


def _walk(where: str, params: Any, shapes: Shapes, fix: str, path: str, found: list[tuple[str, Tensor]]) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"{where}: {path} must be a dict with {list(shapes)}, got {type(params).__name__}")
    if sorted(params) != sorted(shapes):
        missing = [key for key in shapes if key not in params]
        raise ValueError(f"{where}: {path} must have the keys {list(shapes)}, got {sorted(params)}"
                         + (f" (missing {missing})" if missing else "") + fix)
    for key, shape in shapes.items():
        value, at = params[key], f"{path}[{key!r}]"
        if isinstance(shape, Mapping):
            _walk(where, value, shape, fix, at, found)
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {at} must be a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{where}: {at} has shape {tuple(value.shape)} but the layer was built for "
                             f"{tuple(shape)} (are these another layer's params?)")
        found.append((at, value))


def check_x(where: str, x: Tensor, name: str | None = None, param: Tensor | None = None) -> None:
    """A floating ``x`` (a tensor: checked before), in ``param``'s dtype and on its device where there is one."""
    if not x.is_floating_point():
        raise TypeError(f"{where}: a floating x is needed, got {x.dtype} (convert it: x.float(), or "
                        f"x.to({param.dtype if param is not None else 'torch.float32'}))")
    if param is None:
        return
    if x.dtype != param.dtype:
        raise TypeError(f"{where}: x is {x.dtype} but {name} is {param.dtype} (convert x with x.to({param.dtype}) "
                        "or init the params with that dtype)")
    if x.device != param.device:
        raise ValueError(f"{where}: x is on {x.device} but {name} is on {param.device} (move them to one device: "
                         "rf.tree_map(lambda p: p.to(device), params), x.to(device))")


def check_no_params(name: str, where: str, params: Any) -> None:
    """A parameterless layer's params: ``{}``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name}.{where}: {name} has no parameters, so params must be {{}}, got "
                        f"{type(params).__name__}")
    if params:
        raise ValueError(f"{name}.{where}: {name} has no parameters, so params must be {{}}, got keys "
                         f"{sorted(params)} (are the params of another layer misplaced?)")


def check_eps(where: str, eps: Any) -> float:
    """``eps`` as a float, once it is a finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{where}: eps must be a finite number > 0 (it keeps 1/√(σ² + ε) finite where a variance "
                         f"is 0; torch refuses eps ≤ 0 too), got {eps!r}")
    return float(eps)
