"""Gradient transforms: links that map grads to grads, to put before a rule with :func:`chain`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..tree import Tree, tree_flatten
from .base import Leaves, Optimizer, _at_least, _Link

__all__ = ["add_decayed_weights", "clip_by_global_norm"]


def clip_by_global_norm(max_norm: float) -> Optimizer:
    """Scale all grads by ``min(max_norm / (‖g‖ + 1e-6), 1)``, ``‖g‖`` the norm of all leaves as one vector.

    ``torch.nn.utils.clip_grad_norm_``'s formula and kernels (``_foreach_norm``,
    the norm of the norms, one ``_foreach_mul`` by a 0-dim tensor), so no value
    is read back to Python: nothing waits on the device. State: ``{}``.

    >>> import torch, rdl_functional as rf
    >>> clip = rf.clip_by_global_norm(1.0)
    >>> grads = {"w": torch.tensor([3.0, 4.0])}
    >>> clip.update(grads, clip.init(grads), grads)[0]["w"]
    tensor([0.6000, 0.8000])
    """
    max_norm = _at_least("clip_by_global_norm", "max_norm", max_norm, strict=True)

    def transform(g: Leaves, p: Leaves, params: Tree, who: str) -> Leaves:
        if not g:
            return g
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g, 2.0)), 2.0)
        return torch._foreach_mul(g, torch.clamp(max_norm / (total + 1e-6), max=1.0))

    link = _Link(name=f"clip_by_global_norm({max_norm!r})", transform=transform, elementwise=False)
    return Optimizer(links=(link,), name=link.name)


Mask = Tree | Callable[[Tree], Tree]


def _not_a_vector(params: Tree) -> Tree:
    """The default mask: decay every leaf but the 1-D ones (biases, and batch norm's scale and shift)."""
    return {path: leaf.dim() != 1 for path, leaf in tree_flatten(params).items()}


def add_decayed_weights(weight_decay: float, mask: Mask | None = None) -> Optimizer:
    """Add ``weight_decay · p`` to the grads of the leaves ``mask`` selects: L2 regularization as a transform.

    ``mask`` is a tree of bools shaped like params, or a function of the
    params returning one; by default every leaf that is not 1-D, so biases
    are not decayed. Chain it before a rule: ``rf.chain(rf.add_decayed_weights(1e-4), rf.sgd(0.1))``.
    State: ``{}``.

    >>> import torch, rdl_functional as rf
    >>> decay = rf.add_decayed_weights(0.5)
    >>> params = {"weight": torch.ones(1, 2), "bias": torch.ones(2)}
    >>> grads = {"weight": torch.zeros(1, 2), "bias": torch.zeros(2)}
    >>> updates, _ = decay.update(grads, decay.init(params), params)
    >>> updates["weight"], updates["bias"]
    (tensor([[0.5000, 0.5000]]), tensor([0., 0.]))
    """
    name = "add_decayed_weights"
    weight_decay = _at_least(name, "weight_decay", weight_decay)

    def selected(params: Tree, who: str) -> list[bool]:
        chosen = mask(params) if callable(mask) else (_not_a_vector(params) if mask is None else mask)
        flat = chosen if mask is None else tree_flatten(chosen)
        wanted = tree_flatten(params)
        if flat.keys() != wanted.keys() or not all(isinstance(v, bool) for v in flat.values()):
            raise ValueError(f"{who}: the mask must be a tree of bools with the params' paths "
                             f"{sorted(wanted)}, got {dict(sorted(flat.items()))}")
        return [flat[path] for path in wanted]

    def transform(g: Leaves, p: Leaves, params: Tree, who: str) -> Leaves:
        chosen = selected(params, who)
        picked = [i for i, keep in enumerate(chosen) if keep]
        if not picked or not weight_decay:
            return g
        decayed = torch._foreach_add([g[i] for i in picked], [p[i] for i in picked], alpha=weight_decay)
        out = list(g)
        for i, leaf in zip(picked, decayed, strict=True):
            out[i] = leaf
        return out

    # Not per leaf alone for a stack of models: the mask reads shapes, and a stacked bias is 2-D.
    link = _Link(name=f"{name}({weight_decay!r})", transform=transform, elementwise=False)
    return Optimizer(links=(link,), name=link.name)
