"""The step as straight-line code: what value_and_grad runs for a compose of the library's own layers.

A layer (or loss) may declare a :class:`Code`: its forward and backward
pass as lines of Python, with placeholders for its input, output,
cotangents and params. When every leaf of a model and its loss declare one,
:func:`generate` writes the whole step as one function: a guard that checks
everything the layers would check (each param's keys, shape, dtype and device, the
input's and the target's), then the same kernel calls the layers make, in
the same order, with no closure, dict or loop per layer. If the guard finds
anything it does not vouch for, the step runs the general plan instead,
which gives the same results and raises the same messages; so the code is
only ever a faster way to the same bits. The params may be laid out as
``model.init`` gives them (an entry per layer) or as a torch state dict
(:func:`~rdl_functional.from_state_dict`: no entry for a parameterless layer);
the grads have the params' keys either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import torch

__all__ = ["Code"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen(eq=False)  # compared and hashed by identity, as the functions of a Layer are
class Code:
    """A layer's or loss's pass as lines of Python, with ``str.format`` placeholders.

    For a layer: ``{x}`` its input, ``{y}`` its output, ``{dy}`` and ``{dx}``
    their cotangents, and for each param key ``k``, ``{k}`` the param and
    ``{dk}`` its gradient. For a loss: ``{x}`` the prediction, ``{t}`` the
    target, ``{y}`` the value, ``{dy}`` the seed cotangent, ``{dx}`` the
    prediction's cotangent; ``guard`` is a condition on them that must hold.

    Attributes:
        forward: computes ``{y}``.
        pullback: computes ``{dx}`` and every ``{dk}`` from ``{dy}``.
        pullback_no_dx: the same without ``{dx}`` (the first layer's), or ``None``.
        params: each param's key and shape, in the order the layer's grads list them.
        in_features: the size of the input's last dimension the layer needs, if any.
        out_features: the size of the output's last dimension, if the layer sets it (``None``: the input's).
        guard: for a loss, a condition on ``{x}`` and ``{t}``.
        names: the globals the lines use.
    """

    forward: str
    pullback: str
    pullback_no_dx: str | None = None
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()
    in_features: int | None = None
    out_features: int | None = None
    guard: str = "True"
    names: Mapping[str, Any] = attrs.field(factory=dict)


def generate(
    keys: list[str | None], codes: list[Code], loss: Code, fallback: Callable[..., Any]
) -> Callable[..., Any] | None:
    """``step(params, x, target, seed) -> (value, grads)`` for a compose of leaves keyed ``keys``
    (``[None]`` for a model that is one layer), or ``None`` when the step cannot be written out."""
    from .layers import autocast_on  # here: layers imports this module

    names: dict[str, Any] = {"_Tensor": torch.Tensor, "_EMPTY": _EMPTY, "_fallback": fallback,
                             "_ones_like": torch.ones_like, "_autocast": autocast_on}
    for code in [*codes, loss]:
        for name, value in code.names.items():
            if names.setdefault(name, value) is not value:
                return None  # two layers mean different things by one name
    first_in = next((code.in_features for code in codes if code.in_features is not None), None)
    width = first_in
    for code in codes:  # layers that do not fit together: the plan says so, in the layer's words
        if code.in_features is not None and width is not None and code.in_features != width:
            return None
        width = code.out_features if code.out_features is not None else width
    lines = ["def step(params, x, target, seed):",
             "    if type(x) is not _Tensor or not x.is_floating_point() or _autocast(x.device.type)"
             + (f" or x.dim() != 2 or x.shape[1] != {first_in}" if first_in is not None else "") + ":",
             "        return _fallback(params, x, target, seed)",
             "    dtype, device = x.dtype, x.device"]
    # Two layouts of the params take this path: model.init's, an entry per layer, and a torch state dict's
    # (rf.from_state_dict), without the parameterless layers' entries; the grads have exactly the params' keys.
    given = tuple(keys)
    sparse = tuple(key for key, code in zip(keys, codes, strict=True) if code.params)
    if keys != [None]:
        lines += ["    if type(params) is not dict:", "        return _fallback(params, x, target, seed)",
                  f"    full = tuple(params) == {given!r}"]
        if sparse != given:
            lines += [f"    if not full and tuple(params) != {sparse!r}:",
                      "        return _fallback(params, x, target, seed)"]
        else:
            lines += ["    if not full:", "        return _fallback(params, x, target, seed)"]
    args: list[dict[str, str]] = []
    for i, (key, code) in enumerate(zip(keys, codes, strict=True)):
        p = "params" if key is None else f"p{i}"
        if not code.params:  # in a state dict's layout the entry is absent; in model.init's, it must be empty
            check = "params" if key is None else f"full and params[{key!r}]"
            lines += [f"    if {check}:", "        return _fallback(params, x, target, seed)"]
        else:
            if key is not None:
                lines.append(f"    {p} = params[{key!r}]")
            order = tuple(k for k, _ in code.params)
            lines += [f"    if type({p}) is not dict or tuple({p}) != {order!r}:",
                      "        return _fallback(params, x, target, seed)"]
        fields = {"x": f"a{i}", "y": f"a{i + 1}", "dy": f"d{i + 1}", "dx": f"d{i}"}
        for k, shape in code.params:
            fields[k], fields[f"d{k}"] = f"w{i}_{k}", f"g{i}_{k}"
            lines += [f"    w{i}_{k} = {p}[{k!r}]",
                      f"    if type(w{i}_{k}) is not _Tensor or w{i}_{k}.shape != {shape!r} or "
                      f"w{i}_{k}.dtype != dtype or w{i}_{k}.device != device:",
                      "        return _fallback(params, x, target, seed)"]
        args.append(fields)
    n = len(codes)
    pullbacks = [code.pullback_no_dx if i == 0 and code.pullback_no_dx else code.pullback
                 for i, code in enumerate(codes)]
    # a{j} is layer j's input and layer j-1's output: kept for the backward pass only if one of them reads it,
    # as each layer's pullback keeps only what it reads.
    kept = [(j < n and "{x}" in pullbacks[j]) or (j > 0 and "{y}" in pullbacks[j - 1]) for j in range(n)]
    kept.append(True)  # the prediction: the loss's pullback reads it
    lines.append("    a0 = x")
    for i, (code, fields) in enumerate(zip(codes, args, strict=True)):
        lines += ["    " + line for line in code.forward.format(**fields).splitlines()]
        if not kept[i]:
            lines.append(f"    del a{i}")
    out = {"x": f"a{n}", "t": "target", "y": "value", "dy": "seed", "dx": f"d{n}"}
    lines += [f"    if not ({loss.guard.format(**out)}):", "        return _fallback(params, x, target, seed)"]
    lines += ["    " + line for line in loss.forward.format(**out).splitlines()]
    lines += ["    if seed is None:", "        seed = _ones_like(value)",
              "    elif type(seed) is not _Tensor or seed.dim() != 0:",
              "        return _fallback(params, x, target, seed)"]
    lines += ["    " + line for line in loss.pullback.format(**out).splitlines()]
    for i in range(n - 1, -1, -1):
        lines += ["    " + line for line in pullbacks[i].format(**args[i]).splitlines()]
        # freed as soon as this layer is done, as autograd frees a node's
        lines.append(f"    del a{i + 1}, d{i + 1}" if kept[i + 1] else f"    del d{i + 1}")
    grads = [f"{{{', '.join(f'{k!r}: g{i}_{k}' for k, _ in code.params)}}}" for i, code in enumerate(codes)]
    if keys == [None]:
        lines.append(f"    return value, {grads[0]}")
    else:
        entries = {key: f"{key!r}: {g}" for key, g in zip(keys, grads, strict=True)}
        if sparse != given:
            lines += ["    if not full:", f"        return value, {{{', '.join(entries[key] for key in sparse)}}}"]
        lines.append(f"    return value, {{{', '.join(entries.values())}}}")
    source = "\n".join(lines) + "\n"
    scope: dict[str, Any] = dict(names)
    exec(compile(source, "<rdl_functional generated step>", "exec"), scope)
    return scope["step"]
