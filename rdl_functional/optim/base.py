"""The optimizer protocol: a frozen record of pure functions, its state a plain tree of tensors.

::

    init(params) -> opt_state
    update(grads, opt_state, params) -> (updates, new_opt_state)     optax's protocol
    step(params, grads, opt_state) -> (new_params, new_opt_state)    torch.optim's step, pure

``apply_updates(params, updates)`` adds the updates. ``step`` runs the rule
with its last operation fused into the params, as torch.optim does, and is
bit-identical to torch.optim's foreach implementation; ``update`` is
``step``'s params minus the params, so ``apply_updates(params, update(...))``
equals ``step`` to float rounding (one rounding more).

Every built-in optimizer is a chain of *links*, each written once over flat
lists of leaves (in the params' key order), with ``torch._foreach_*`` calls:
a *rule* (sgd, adam, ...) maps params, grads and its buffers to new params
and buffers; a *transform* (clipping, weight decay) maps grads to grads. The
same link code runs three ways, through the op tables below: pure (new
tensors; ``step``, ``update``), in place on private copies (``fit``), and
traced into a compiled graph with the step count and the rate as tensors
(``rf.compiled``, ``rf.capture`` of a step: :func:`_traced_run`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor

from ..tree import Tree, _paired, _rebuild_like, tree_difference, tree_flatten, tree_map
from .schedules import Schedule, _check_lr, _rate

__all__ = ["Optimizer", "apply_updates", "chain", "gradient_transform"]

Leaves = list[Tensor]


def _in_place(op: Callable[..., None]) -> Callable[..., Leaves]:
    def run(leaves: Leaves, *args: Any, **kwargs: Any) -> Leaves:
        op(leaves, *args, **kwargs)
        return leaves

    return staticmethod(run)


class _Pure:
    """Out-of-place foreach ops: the first op a link runs on a list it does not own."""

    copy = staticmethod(lambda dst, src: [t.clone() for t in src])


class _InPlace:
    """The same ops in place, on lists that a private copy owns (fit's): the same kernels, so the same bits."""

    copy = _in_place(torch._foreach_copy_)


for _op in ("mul", "add", "lerp", "addcmul", "addcdiv", "maximum"):
    setattr(_Pure, _op, staticmethod(getattr(torch, f"_foreach_{_op}")))
    setattr(_InPlace, _op, _in_place(getattr(torch, f"_foreach_{_op}_")))


def _first_step(count: int, first: Callable[[], Leaves], later: Callable[[], Leaves]) -> Leaves:
    return first() if count == 1 else later()


_Pure.first_step = _InPlace.first_step = staticmethod(_first_step)


class _Traced(_Pure):
    """The pure ops for a step traced into a compiled graph, where ``count`` and ``lr`` arrive as 0-dim float64
    tensors (graph inputs, so a schedule's rate and Adam's bias corrections are never constants baked into the
    graph). ``alpha=`` and ``value=`` take numbers only, so a tensor factor is a multiply; the first step's
    branch (SGD's momentum starts at the gradient) is a select on ``count == 1``. The same rules run through it:
    their maths is written once; the results equal the eager ones to float rounding, not bit for bit."""

    @staticmethod
    def add(a: Leaves, b: Leaves, alpha: Any = 1) -> Leaves:
        return torch._foreach_add(a, torch._foreach_mul(b, alpha)) if isinstance(alpha, Tensor) else \
            torch._foreach_add(a, b, alpha=alpha)

    @staticmethod
    def addcdiv(a: Leaves, b: Leaves, c: Leaves, value: Any = 1) -> Leaves:
        if isinstance(value, Tensor):
            return torch._foreach_add(a, torch._foreach_mul(torch._foreach_div(b, c), value))
        return torch._foreach_addcdiv(a, b, c, value=value)

    @staticmethod
    def first_step(count: Tensor, first: Callable[[], Leaves], later: Callable[[], Leaves]) -> Leaves:
        is_first = count == 1
        return [torch.where(is_first, a, b) for a, b in zip(first(), later(), strict=True)]


Ops = type[_Pure] | type[_InPlace] | type[_Traced]
Rule = Callable[[Ops, Leaves, Leaves, dict[str, Leaves], int | Tensor, float | Tensor],
                tuple[Leaves, dict[str, Leaves]]]
Transform = Callable[[Leaves, Leaves, Tree, str], Leaves]


@attrs.frozen
class _Link:
    """One link of an optimizer. A rule: ``rule(ops, params, grads, buffers, count, lr) -> (params, buffers)``,
    ``count`` the step being taken (1 for the first); a transform: ``transform(grads, params, params_tree, where)
    -> grads``."""

    name: str
    rule: Rule | None = None
    transform: Transform | None = None
    buffers: tuple[tuple[str, float], ...] = ()  # (name, initial value) of each per-leaf buffer
    lr: Schedule | None = None
    elementwise: bool = True  # each leaf's result depends on that leaf alone (so a stack of models is fine)
    custom: tuple[Callable[[Tree], Tree], Callable[[Tree, Tree, Tree], tuple[Tree, Tree]]] | None = None

    def init(self, params: Tree) -> Any:
        if self.custom is not None:
            return self.custom[0](params)
        if self.rule is None:
            return {}
        state: dict[str, Any] = {
            "count": torch.zeros((), dtype=torch.int64),
            "lr": torch.zeros((), dtype=torch.float64),
        }
        for name, value in self.buffers:
            state[name] = tree_map(lambda p, value=value: torch.full_like(p, value), params)
        return state


def _path(where: str, key: str) -> str:
    return f'{where}["{key}"]' if where else key


def _read_state(link: _Link, state: Any, params: Tree, where: str, who: str) -> tuple[int, dict[str, Leaves]]:
    """``(count, buffers as leaf lists)`` once ``state`` is the state ``link.init(params)`` would make."""
    if link.custom is not None:
        return 0, {}  # a user's transform: its state is its own business
    expected = ["count", "lr", *(name for name, _ in link.buffers)] if link.rule else []
    if type(state) is not dict or len(state) != len(expected) or not all(key in state for key in expected):
        if not isinstance(state, dict):
            raise TypeError(f"{who}: the optimizer state{' at ' + where if where else ''} must be a dict, "
                            f"got {type(state).__name__}")
        raise ValueError(
            f"{who}: the optimizer state{' at ' + where if where else ''} has keys {list(state)} but {link.name} "
            f"keeps {expected} (is it the state of another optimizer?)"
        )
    if not link.rule:
        return 0, {}
    count = state["count"]
    if not isinstance(count, Tensor) or count.dim() != 0 or count.dtype != torch.int64:
        raise ValueError(f'{who}: {_path(where, "count")} must be a 0-dim int64 tensor, got {count!r}')
    buffers = {}
    for name, _ in link.buffers:
        paired = _paired(params, state[name])
        if paired is None:
            found = tree_difference(params, state[name], names=("params", _path(where, name)), leaves=True)
            raise ValueError(
                f"{who}: the optimizer state does not fit the params: {found or 'it holds something else'} "
                "(is it the state of another model?)"
            )
        buffers[name] = paired.theirs
    return int(count), buffers


@attrs.frozen
class Optimizer:
    """An optimizer: pure functions over params, grads and a state tree; ``rf.sgd(0.1)``, ``rf.adam(1e-3)``, ...

    Attributes:
        init: ``(params) -> opt_state``, a dict of tensors: the step ``count``
            (0-dim int64), the rate the last step used (``lr``, 0-dim float64),
            and buffers that mirror params, named as torch.optim names them.
        update: ``(grads, opt_state, params) -> (updates, new_opt_state)``.
        step: ``(params, grads, opt_state) -> (new_params, new_opt_state)``.
        name: how it prints and how messages name it.
    """

    links: tuple[_Link, ...] = attrs.field(repr=False)
    name: str
    chained: bool = attrs.field(default=False, repr=False)

    def __repr__(self) -> str:
        return self.name

    def init(self, params: Tree) -> Tree:
        """The state before the first step."""
        states = [link.init(params) for link in self.links]
        return {str(i): s for i, s in enumerate(states)} if self.chained else states[0]

    def _states(self, state: Tree, who: str) -> list[tuple[Any, str]]:
        if not self.chained:
            return [(state, "")]
        keys = [str(i) for i in range(len(self.links))]
        if type(state) is not dict or sorted(state) != sorted(keys):
            got = list(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{who}: the state of {self.name} must be a dict keyed {keys}, got {got}")
        return [(state[key], key) for key in keys]

    def _run(self, params: Tree, grads: Tree, state: Tree, who: str) -> tuple[Leaves, Leaves, Any, Tree]:
        """The pure run: ``(params leaves, final leaves, pairing, new state)``; the final leaves are the
        new params when the chain ends in a rule, else updates."""
        if not self.chained and self.links[0].rule is not None:  # one rule (adam, sgd, ...): the hot path
            ran = _run_rule(self.links[0], params, grads, state, who)
            if ran is not None:
                return ran
        paired = _paired(params, grads)
        if paired is None:
            found = tree_difference(params, grads, names=("params", "grads"), leaves=True)
            culprit = "params" if _paired(params, params) is None else "grads"
            raise ValueError(f"{who}: {found or f'{culprit} must be plain dicts of tensors'}")
        p, g = paired.mine, paired.theirs
        reads = []
        for link, (link_state, where) in zip(self.links, self._states(state, who), strict=True):
            count, buffers = _read_state(link, link_state, params, where, who)
            reads.append((count, buffers, link_state))
        g, new_states = self._apply(p, g, params, reads, lambda leaves: _rebuild_like(params, leaves), who)
        state = {str(i): s for i, s in enumerate(new_states)} if self.chained else new_states[0]
        return p, g, paired, state

    def _apply(self, p: Leaves, g: Leaves, params: Tree, reads: list[tuple[int, dict[str, Leaves], Any]],
               fill: Callable[[Leaves], Tree], who: str, counts: list[Tensor] | None = None,
               rates: dict[int, tuple[float, Tensor]] | None = None) -> tuple[Leaves, list[Any]]:
        """The links on leaf lists: ``(final leaves, each link's new state)``, the final leaves being the new
        params when the chain ends in a rule, else updates. ``reads`` holds per link its state as read (the
        count, the buffers as leaf lists, the state itself); ``fill`` makes a buffer's tree of its new leaves.
        ``counts``, if given, holds each rule's new count tensor (made by the caller); ``rates``, if given, keeps
        each rule's last rate tensor, reused while the rate does not change."""
        new_states: list[Any] = []
        last, rule = len(self.links) - 1, 0
        for index, (link, (count, buffers, link_state)) in enumerate(zip(self.links, reads, strict=True)):
            if link.custom is not None:
                g, link_state = _custom(link, g, link_state, params, who)
                new_states.append(link_state)
                continue
            if link.transform is not None:
                g = link.transform(g, p, params, who)
                new_states.append({})
                continue
            lr = _rate(link.lr, count, who)
            new_p, buffers = link.rule(_Pure, p, g, buffers, count + 1, lr) if p else (p, buffers)
            kept = rates.get(rule) if rates is not None else None
            if kept is None or kept[0] != lr:
                kept = (lr, torch.tensor(lr, dtype=torch.float64))
                if rates is not None:
                    rates[rule] = kept
            new_state = {"count": torch.tensor(count + 1) if counts is None else counts[rule], "lr": kept[1]}
            for name, _ in link.buffers:
                new_state[name] = fill(buffers[name])
            new_states.append(new_state)
            rule += 1
            g = new_p if index == last or not p else torch._foreach_sub(new_p, p)
        return g, new_states

    def step(self, params: Tree, grads: Tree, opt_state: Tree) -> tuple[Tree, Tree]:
        """``(new_params, new_opt_state)``: one step, bit-identical to torch.optim's; nothing is mutated."""
        p, final, paired, state = self._run(params, grads, opt_state, f"{self.name}.step")
        if self.links[-1].transform is not None:
            final = torch._foreach_add(p, final) if p else []
        return paired.fill(list(final)), state

    def update(self, grads: Tree, opt_state: Tree, params: Tree) -> tuple[Tree, Tree]:
        """``(updates, new_opt_state)``: what to add to params (:func:`apply_updates`), as in optax."""
        p, final, paired, state = self._run(params, grads, opt_state, f"{self.name}.update")
        if self.links[-1].rule is not None:  # the rule made the new params: their difference is new tensors
            return paired.fill(torch._foreach_sub(final, p) if p else []), state
        callers = {id(t) for t in paired.theirs}  # a leaf a transform passed through is still the caller's grad
        return paired.fill([t.clone() if id(t) in callers else t for t in final]), state

    @property
    def elementwise(self) -> bool:
        return all(link.elementwise for link in self.links)


def _run_rule(link: _Link, params: Tree, grads: Tree, state: Any, who: str) -> tuple[Leaves, Leaves, Any,
                                                                                      Tree] | None:
    """:meth:`Optimizer._run` of one rule: each buffer tree is read by the walk that pairs it with the params,
    and its new tree filled into the skeleton that walk laid out; ``None`` for anything unusual, which the
    general path then explains."""
    if type(state) is not dict or len(state) != 2 + len(link.buffers):
        return None
    count = state.get("count")
    if not isinstance(count, Tensor) or count.dim() != 0 or count.dtype != torch.int64 or "lr" not in state:
        return None
    pairs = [_paired(params, grads)]
    for name, _ in link.buffers:
        pairs.append(_paired(params, state.get(name)))
    if None in pairs:
        return None
    p, g = pairs[0].mine, pairs[0].theirs
    buffers = {name: pair.theirs for (name, _), pair in zip(link.buffers, pairs[1:], strict=True)}
    count = int(count)
    lr = _rate(link.lr, count, who)
    new_p, buffers = link.rule(_Pure, p, g, buffers, count + 1, lr) if p else (p, buffers)
    new_state = {"count": torch.tensor(count + 1), "lr": torch.tensor(lr, dtype=torch.float64)}
    for (name, _), pair in zip(link.buffers, pairs[1:], strict=True):
        new_state[name] = pair.fill(buffers[name])
    return p, new_p, pairs[0], new_state


def _traced_run(optimizer: Optimizer, p: Leaves, g: Leaves, params: Tree, buffers: list[dict[str, Leaves]],
                counts: list[Tensor], rates: list[Tensor], who: str) -> tuple[Leaves, list[dict[str, Leaves]]]:
    """The links of ``optimizer`` on leaf lists through the :class:`_Traced` ops: ``(new params, new buffers)``.

    ``buffers``, ``counts`` and ``rates`` hold one entry per rule, in order: its buffers, the step being taken and
    its rate, both 0-dim float64 tensors. This is :meth:`Optimizer.step`'s walk with the reading and checking of
    the state (done once, outside the graph, by whoever traces it) left out; a user's transform is refused there.
    """
    new_buffers, rule, last = [], 0, len(optimizer.links) - 1
    for index, link in enumerate(optimizer.links):
        if link.transform is not None:
            g = link.transform(g, p, params, who)
            continue
        new_p, found = link.rule(_Traced, p, g, buffers[rule], counts[rule], rates[rule])
        new_buffers.append(found)
        rule += 1
        g = new_p if index == last else torch._foreach_sub(new_p, p)
    return (torch._foreach_add(p, g) if optimizer.links[-1].transform is not None else g), new_buffers


def _custom(link: _Link, g: Leaves, state: Any, params: Tree, who: str) -> tuple[Leaves, Any]:
    """Run a user's transform on trees; its updates must fit the params."""
    updates, state = link.custom[1](_rebuild_like(params, g), state, params)
    paired = _paired(params, updates)
    if paired is None:
        found = tree_difference(params, updates, names=("params", f"the updates of {link.name}"), leaves=True)
        raise ValueError(f"{who}: {found or f'{link.name} must return updates shaped like params'}")
    return paired.theirs, state


def gradient_transform(
    init: Callable[[Tree], Tree], update: Callable[[Tree, Tree, Tree], tuple[Tree, Tree]], *, name: str = "transform"
) -> Optimizer:
    """Your own transform from two pure functions, optax's protocol: it chains like the built-in ones.

    ``init(params) -> state`` and ``update(updates, state, params) -> (updates, state)``,
    over trees. Chain it before a rule to change the grads the rule sees, or
    end a chain with it to produce the updates yourself (they are added to
    the params). Its state is kept as it returns it: a plain tree of tensors
    saves with ``rf.save``.

    >>> import torch, rdl_functional as rf
    >>> sign = rf.gradient_transform(lambda params: {}, lambda g, state, params: (rf.tree_map(torch.sign, g), state),
    ...                              name="sign")
    >>> opt = rf.chain(sign, rf.sgd(0.1))          # signSGD: p ← p − 0.1 · sign(g)
    >>> params = {"w": torch.tensor([1.0, 1.0])}
    >>> opt.step(params, {"w": torch.tensor([-3.0, 0.5])}, opt.init(params))[0]["w"]
    tensor([1.1000, 0.9000])
    """
    if not callable(init) or not callable(update):
        raise TypeError(f"gradient_transform: init and update must be functions, got {type(init).__name__} and "
                        f"{type(update).__name__}")
    link = _Link(name=name, transform=lambda g, p, params, who: g, custom=(init, update), elementwise=False)
    return Optimizer(links=(link,), name=name)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """``params + updates``, leaf by leaf, into a new tree (one ``torch._foreach_add``).

    >>> import torch
    >>> apply_updates({"w": torch.tensor([1.0])}, {"w": torch.tensor([-0.25])})
    {'w': tensor([0.7500])}
    """
    paired = _paired(params, updates)
    if paired is None:
        found = tree_difference(params, updates, names=("params", "updates"), leaves=True)
        raise ValueError(f"apply_updates: {found or 'updates must be plain dicts of tensors like params'}")
    return paired.fill(torch._foreach_add(paired.mine, paired.theirs) if paired.mine else [])


def chain(*optimizers: Optimizer) -> Optimizer:
    """Run optimizers and transforms one after another, each on the updates of the one before.

    ``chain(rf.clip_by_global_norm(1.0), rf.adam(1e-3))`` clips the grads, then
    runs Adam on them. The state is ``{"0": ..., "1": ...}``, one entry per
    link (nested chains are flattened).

    >>> import rdl_functional as rf
    >>> opt = rf.chain(rf.clip_by_global_norm(1.0), rf.sgd(0.1))
    >>> list(opt.init({"w": torch.zeros(2)}))
    ['0', '1']
    """
    if not optimizers:
        raise ValueError("chain: expected at least one optimizer or transform, got none")
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, Optimizer):
            raise TypeError(f"chain: argument {i} must be an optimizer or transform (rf.sgd(...), "
                            f"rf.clip_by_global_norm(...), ...), got {type(opt).__name__}")
    links = tuple(link for opt in optimizers for link in opt.links)
    return Optimizer(links=links, name=f"chain({', '.join(o.name for o in optimizers)})", chained=True)


# ---------------------------------------------------------------------------
# Checks shared by the constructors: torch.optim's rules, in our words.


def _lr(lr: float | Schedule, who: str) -> Schedule:
    if isinstance(lr, Tensor):
        # torch.optim takes a tensor lr so that a capturable or compiled step reads a rate changed in place;
        # here the rate is already a graph input (rf.compiled, rf.capture) and a schedule changes it per step,
        # while a tensor read once would silently ignore a later in-place change.
        raise TypeError(f"{who}: lr must be a number or a schedule, got a tensor; pass float(lr), or a schedule "
                        "(a function of the step count) for a rate that changes")
    if callable(lr):
        return lr
    value = _check_lr(lr, who)
    return lambda count: value


def _at_least(who: str, name: str, value: float, low: float = 0.0, *, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{who}: {name} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{who}: {name} must be {'>' if strict else '≥'} {low}, got {value}")
    return float(value)


def _fraction(who: str, name: str, value: float) -> float:
    value = _at_least(who, name, value)
    if not value < 1:
        raise ValueError(f"{who}: {name} must lie in [0, 1), got {value}")
    return value


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


class _Running:
    """An optimizer run in place on private copies of the params and its state: fit's path.

    Each step runs the same link code as :meth:`Optimizer.step`, through the
    in-place op table, so the params and state equal ``step``'s bit for bit;
    but no tree, and no tensor per leaf, is made per step. The state is read
    and checked once, here; :meth:`state` hands out a copy.
    """

    def __init__(self, optimizer: Optimizer, params: Tree, opt_state: Tree | None, who: str) -> None:
        self.optimizer, self.who = optimizer, who
        state = optimizer.init(params) if opt_state is None else opt_state
        self.params = tree_map(torch.clone, params)
        paired = _paired(self.params, self.params)
        if paired is None:
            raise ValueError(f"{who}: params must be plain dicts of tensors")
        self.leaves = paired.mine
        self.paths = [tuple(path.split(".")) for path in tree_flatten(self.params)]
        self.counts, self.rates, self.buffers, self.custom = [], [], [], []
        for link, (link_state, where) in zip(optimizer.links, optimizer._states(state, who), strict=True):
            self.custom.append(link_state if link.custom is not None else None)
            count, buffers = _read_state(link, link_state, self.params, where, who)
            self.counts.append(count)
            self.rates.append(float(link_state["lr"]) if link.rule else 0.0)
            self.buffers.append({name: [t.clone() for t in leaves] for name, leaves in buffers.items()})
        self.checked = False

    def __call__(self, grads: Tree) -> Tree:
        if not self.checked:  # the pullbacks keep the structure; look once
            found = tree_difference(self.params, grads, names=("params", "grads"), leaves=True)
            if found:
                raise ValueError(f"{self.who}: {found}")
            self.checked = True
        g = []
        for keys in self.paths:
            node = grads
            for key in keys:
                node = node[key]
            g.append(node)
        p, last = self.leaves, len(self.optimizer.links) - 1
        for i, link in enumerate(self.optimizer.links):
            if link.custom is not None:  # a copy: the private params change in place under it
                g, self.custom[i] = _custom(link, g, self.custom[i], tree_map(torch.clone, self.params), self.who)
                continue
            if link.transform is not None:
                g = link.transform(g, p, self.params, self.who)
                continue
            self.rates[i] = lr = _rate(link.lr, self.counts[i], self.who)
            self.counts[i] += 1
            if not p:  # no params to update (a model of activations only): the count still moves on
                continue
            if i == last:
                _, self.buffers[i] = link.rule(_InPlace, p, g, self.buffers[i], self.counts[i], lr)
            else:  # its updates feed the next link, so the params are not written here
                new_p, self.buffers[i] = link.rule(_Pure, p, g, self.buffers[i], self.counts[i], lr)
                g = torch._foreach_sub(new_p, p)
        if self.optimizer.links[-1].transform is not None and p:
            torch._foreach_add_(p, g)
        return self.params

    def state(self) -> Tree:
        """The optimizer state now, as a new tree (later steps do not change it)."""
        states = []
        links = zip(self.optimizer.links, self.counts, self.rates, self.buffers, self.custom, strict=True)
        for link, count, rate, buffers, custom in links:
            if link.rule is None:
                states.append(tree_map(_clone, custom) if link.custom is not None else {})
                continue
            state = {"count": torch.tensor(count), "lr": torch.tensor(rate, dtype=torch.float64)}
            for name, _ in link.buffers:
                state[name] = _rebuild_like(self.params, [t.clone() for t in buffers[name]])
            states.append(state)
        return {str(i): s for i, s in enumerate(states)} if self.optimizer.chained else states[0]
