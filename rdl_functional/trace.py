"""Traced once per signature: a function of trees of tensors kept as one straight-line function of tensors.

``trace(fn)`` wraps ``fn(*args)``, whose arguments are trees (tensors, and
dicts, lists and tuples of them) with hashable Python values and
``torch.Generator``s among them. Each call computes the arguments'
*signature*: the trees' structure and key order, every tensor's shape,
dtype, device, strides and ``requires_grad``, each Python value, and the grad, inference and
autocast modes. The first call of a signature runs ``fn`` itself, so every
check and message is ``fn``'s own; then ``torch.fx``'s ``make_fx`` runs it
once more and records the aten operations it calls, and the record is
written out as one Python function of the flat tensors. Later calls of that
signature run the record: the same kernels in the same order, hence the
same bits, without the closures, dicts and checks in between.

What a record cannot replay runs ``fn``, silently and correctly: an
argument that is not a tree of tensors and plain values, a function whose
result depends on a value read from a tensor (a ``.item()``, a branch on
data), anything ``make_fx`` cannot trace, a call inside ``torch.compile``,
``torch.func``'s transforms or ``torch.autocast``. A record whose kernel
refuses its data (a ``RuntimeError`` or ``IndexError``: a label out of range) runs ``fn``
again, so the error raised is ``fn``'s own.

A generator among the arguments is replaced, in the record, by one of the
record's own: set from the caller's before each call and copied back after,
so the draws and the caller's generator advance exactly as ``fn``'s would.

The record calls each operation through torch's generated binding for it
(``torch.mm``, ``Tensor.bernoulli_``, ...) rather than its ``OpOverload``,
whose Python call costs more, passing only the arguments that differ from
the schema's defaults. The record is itself traced once to check that each
call reaches the very overload recorded with the very arguments; a call
that does not is written with all its arguments, then as the overload.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Traced", "is_tracing", "reads_values", "trace"]

_MAX_SIGNATURES = 8
_LITERALS = (bool, int, float, str, type(None))


_tracing = threading.local()
_tracing.active = False


class _Untraceable(Exception):
    """An argument or a function the record cannot stand for: run the function itself."""


def is_tracing() -> bool:
    """Whether ``make_fx`` is recording the running code: a value check (a label in range) is then left to the
    kernel, since a record cannot repeat a branch on data.

    >>> is_tracing()
    False
    """
    return getattr(_tracing, "active", False)


def reads_values(tensor: Tensor) -> bool:
    """Whether a check may read ``tensor``'s values (a label in range): only on the CPU, where a read costs no
    device sync, and not where a read cannot be made or kept: make_fx recording (a record cannot repeat a branch
    on data), torch.compile (dynamo cannot trace the read) and torch.func's transforms. Where it is False, torch's
    own kernel refuses a value out of range.

    >>> reads_values(torch.zeros(2, dtype=torch.int64))
    True
    """
    if torch.compiler.is_compiling():  # first: dynamo reads it as True and skips the rest
        return False
    return (tensor.device.type == "cpu" and not is_tracing()
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor))


def _walk(tree: Any, leaves: list[Tensor], gens: list[torch.Generator], key: list[Any]) -> None:
    """``tree``'s tensors into ``leaves``, its generators into ``gens``, and what its signature is into ``key``."""
    kind = type(tree)
    if kind is Tensor:
        leaves.append(tree)
        key.append((tree.shape, tree.dtype, tree.device, tree.stride(), tree.requires_grad))
    elif kind is dict:
        key.append(tuple(tree))
        for value in tree.values():
            _walk(value, leaves, gens, key)
    elif kind is tuple or kind is list:
        key.append((kind, len(tree)))
        for value in tree:
            _walk(value, leaves, gens, key)
    elif kind is torch.Generator:
        gens.append(tree)
        key.append((kind, tree.device))
    elif kind in _LITERALS or kind is torch.dtype or kind is torch.device:
        key.append((kind, tree))
    else:
        raise _Untraceable(kind.__name__)


# What a call's signature holds beside its arguments, and what makes a call run fn: read once a call, cheaply.
_is_compiling = torch.compiler.is_compiling
_functorch_level = torch._C._functorch.peek_interpreter_stack  # not None inside torch.func's transforms
_any_autocast = torch._C._is_any_autocast_enabled
_grad_enabled = torch.is_grad_enabled
_inference_mode = torch.is_inference_mode_enabled


def _rebuild(tree: Any, leaves: Any, gens: Any) -> Any:
    """``tree`` with its tensors and generators taken, in order, from the iterators ``leaves`` and ``gens``."""
    kind = type(tree)
    if kind is Tensor:
        return next(leaves)
    if kind is dict:
        return {key: _rebuild(value, leaves, gens) for key, value in tree.items()}
    if kind is tuple or kind is list:
        return kind(_rebuild(value, leaves, gens) for value in tree)
    if kind is torch.Generator:
        return next(gens)
    return tree


class _Record:
    """One signature's straight-line function (which checks the signature itself: ``_MISS`` when it is another),
    the modes it was traced under, and its Python source."""

    def __init__(self, run: Callable[..., Any], modes: tuple[Any, ...], source: str) -> None:
        self.run, self.modes, self.source = run, modes, source


_MISS = object()  # what a record returns for arguments of another signature


class Traced:
    """``fn`` traced once per signature (see the module's doc); calling it is calling ``fn``.

    ``signatures`` is how many signatures have a record (at most
    ``max_signatures`` are kept, the oldest dropped first), ``replayed``
    whether the last call ran a record rather than ``fn``, and
    ``source(i)`` the Python the ``i``-th record runs. None of them changes
    what a call computes.

    >>> import torch
    >>> double = trace(lambda tree: {"y": tree["x"] * 2})
    >>> out = double({"x": torch.ones(3)}); double.signatures, double.replayed
    (1, False)
    >>> out = double({"x": torch.zeros(3)}); double.replayed
    True
    >>> print(double.source(0).splitlines()[-2].strip())
    v0 = _mul_Tensor(a0, 2)
    """

    def __init__(self, fn: Callable[..., Any], *, max_signatures: int = _MAX_SIGNATURES) -> None:
        self._fn = fn
        self._records: dict[tuple[Any, ...], _Record | None] = {}  # None: this signature runs fn
        self._max = max_signatures
        self._last: _Record | None = None  # the record the last replay ran: tried first
        self._replayed = False

    @property
    def signatures(self) -> int:
        return sum(record is not None for record in self._records.values())

    @property
    def replayed(self) -> bool:
        return self._replayed

    def source(self, index: int) -> str:
        return [record for record in self._records.values() if record is not None][index].source

    def __call__(self, *args: Any) -> Any:
        if _is_compiling():  # torch.compile traces the closures themselves
            return self._fn(*args)
        self._replayed = False
        if _functorch_level() is not None or _any_autocast():  # what a record must not stand for
            return self._fn(*args)
        modes = (_grad_enabled(), _inference_mode())
        last = self._last
        if last is not None and last.modes == modes:  # the usual call: the last signature again, checked by it
            out = self._replay(last, args)
            if out is not _MISS:
                return out
        leaves: list[Tensor] = []
        gens: list[torch.Generator] = []
        key: list[Any] = []
        try:
            _walk(args, leaves, gens, key)
        except _Untraceable:
            return self._fn(*args)
        key.append(modes)
        signature = tuple(key)
        record = self._records.get(signature, False)
        if record is None:
            return self._fn(*args)
        if record is False:
            return self._first(signature, args, leaves, gens)
        self._last = record
        out = self._replay(record, args)
        return self._fn(*args) if out is _MISS else out

    def _replay(self, record: _Record, args: tuple[Any, ...]) -> Any:
        try:
            out = record.run(*args)
        except Exception:  # a kernel refused the data (RuntimeError, IndexError): fn's checks say why, in its words
            return self._fn(*args)
        self._replayed = out is not _MISS
        return out

    def _first(self, signature: tuple[Any, ...], args: tuple[Any, ...], leaves: list[Tensor],
               gens: list[torch.Generator]) -> Any:
        """Run ``fn`` (its checks, its errors), then record it for the calls to come."""
        states = [g.get_state() for g in gens]
        out = self._fn(*args)
        try:
            record = _record(self._fn, args, leaves, gens, states, signature[-1])
        except Exception:  # whatever make_fx cannot trace runs fn, which just succeeded
            record = None
        if len(self._records) >= self._max:
            del self._records[next(iter(self._records))]
        self._records[signature] = record
        self._last = record or self._last
        return out


def trace(fn: Callable[..., Any], *, max_signatures: int = _MAX_SIGNATURES) -> Traced:
    """``fn`` traced once per signature of its arguments, and replayed after (see the module's doc).

    >>> import torch
    >>> f = trace(lambda a, b: a.mm(b).relu())
    >>> torch.equal(f(torch.eye(2), -torch.ones(2, 2)), torch.zeros(2, 2))
    True
    """
    return Traced(fn, max_signatures=max_signatures)


# ---------------------------------------------------------------------------
# Recording and writing out


def _record(fn: Callable[..., Any], args: tuple[Any, ...], leaves: list[Tensor], gens: list[torch.Generator],
            states: list[Tensor], modes: tuple[Any, ...]) -> _Record | None:
    own = [torch.Generator(g.device) for g in gens]
    for mine, state in zip(own, states, strict=True):
        mine.set_state(state)
    shape: list[Any] = []

    def flat(*tensors: Tensor) -> list[Tensor]:
        out = fn(*_rebuild(args, iter(tensors), iter(own)))
        found: list[Tensor] = []
        _walk(out, found, [], [])
        shape.append(out)
        return found

    graph = _graph(flat, leaves)
    if not shape:
        return None
    for node in graph.nodes:  # a value read from a tensor: the record would replay one branch for every value
        if node.op == "call_function" and not _returns_tensors(node):
            return None
    # Each operation is first written as torch's binding with its arguments as the closures passed them; where
    # tracing the record shows another overload or other arguments, with all its arguments; then as the overload.
    calls = [node for node in graph.nodes if node.op == "call_function" and node.target is not operator.getitem]
    tiers = dict.fromkeys(calls, 0)
    while True:  # each pass raises a tier or ends: it ends
        # Checked with its tensors' checks in Python: a tensor being traced fails dynamo's C++ guard.
        wrong = _other_calls(_compiled(*_write(graph, args, leaves, shape[0], tiers, own, False)),
                             graph, args, leaves, own, states)
        if wrong is None:  # the record fails on the very arguments it was traced from
            if all(tier == _OVERLOAD for tier in tiers.values()):
                return None  # no record rather than one that raises at every call and falls back to fn
            wrong = list(range(len(calls)))
        if not wrong or all(tiers[calls[i]] == _OVERLOAD for i in wrong):
            break  # called as recorded; or what differs is not how it is called: the overload is as recorded
        for i in wrong:
            tiers[calls[i]] = min(tiers[calls[i]] + 1, _OVERLOAD)
    source, names = _write(graph, args, leaves, shape[0], tiers, own, True)
    return _Record(_compiled(source, names), modes, source)


def _compiled(source: str, names: dict[str, Any]) -> Callable[..., Any]:
    scope = dict(names)
    exec(compile(source, "<rdl_functional trace>", "exec"), scope)  # the source written from the record
    return scope["replay"]


def _returns_tensors(node: Any) -> bool:
    if node.target is operator.getitem:
        return True
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else [value]
    return all(isinstance(v, Tensor) or v is None for v in values)


def _binding(op: Any) -> Callable[..., Any] | None:
    """torch's generated binding for the aten operation ``op``, if it has one of its name."""
    name = op._schema.name.split("::")[-1]
    for namespace in (torch._C._VariableFunctions, torch._C._nn, torch._C._linalg, torch._C._special):
        found = getattr(namespace, name, None)
        if found is not None:
            return found
    return getattr(torch._C.TensorBase, name, None)


_BINDING, _BINDING_ALL_ARGUMENTS, _OVERLOAD = 0, 1, 2  # how an operation is called, fastest first


def _write(graph: Any, args: tuple[Any, ...], leaves: list[Tensor], out_tree: Any, tiers: dict[Any, int],
           own: list[torch.Generator], guard: bool) -> tuple[str, dict[str, Any]]:
    """The record as ``replay(*args) -> out``: first the signature's checks (``_MISS`` if the arguments have
    another), then one line per operation, each value dropped after its last use."""
    names: dict[str, Any] = {"_MISS": _MISS, "_Tensor": Tensor, "_Generator": torch.Generator}
    constants: dict[Any, str] = {}
    var: dict[Any, str] = {}

    def constant(value: Any) -> str:
        if type(value) in (bool, int, str, type(None)) or (type(value) is float and value == value
                                                           and abs(value) != float("inf")):
            return repr(value)
        if isinstance(value, (list, tuple)):
            items = ", ".join(render(item) for item in value)
            return f"[{items}]" if type(value) is list else f"({items}{',' if len(value) == 1 else ''})"
        if type(value) is torch.Generator:
            value = _own_generator(value, own)
        try:
            key: Any = (type(value), value)
            hash(key)
        except TypeError:
            key = id(value)
        if key not in constants:
            constants[key] = f"_c{len(constants)}"
            names[constants[key]] = value
        return constants[key]

    def render(value: Any) -> str:
        return var[value] if isinstance(value, torch.fx.Node) else constant(value)

    def function(op: Any, tier: int) -> str:
        binding = _binding(op) if tier != _OVERLOAD else None
        label = f"_{op._schema.name.split('::')[-1]}_{op._overloadname}" + ("" if binding else "_op")
        names[label] = binding or op._op
        return label

    nodes = list(graph.nodes)
    last_use = {node: i for i, user in enumerate(nodes) for node in user.all_input_nodes}
    lines = [f"def replay({', '.join(f'r{i}' for i in range(len(args)))}):"]
    generators: list[str] = []
    lines += _checks(args, constant, generators, _tensor_guard(leaves) if guard else None)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    for i, node in enumerate(placeholders):
        var[node] = f"a{i}"
    for i, (name, mine) in enumerate(zip(generators, own, strict=True)):  # draw from the record's own, in sync
        names[f"_own{i}"] = mine
        lines.append(f"    _own{i}.set_state({name}.get_state())")
    out: list[str] = []
    for i, node in enumerate(nodes):
        if node.op == "call_function":
            var[node] = f"v{len(var) - len(placeholders)}"
            if node.target is operator.getitem:
                lines.append(f"    {var[node]} = {render(node.args[0])}[{node.args[1]}]")
            else:
                tier = tiers[node]
                args, kwargs = _arguments(node.target, node.args, node.kwargs, tier == _BINDING)
                call = [render(arg) for arg in args] + [f"{k}={render(v)}" for k, v in kwargs.items()]
                lines.append(f"    {var[node]} = {function(node.target, tier)}({', '.join(call)})")
        elif node.op == "get_attr":
            var[node] = constant(getattr(graph.owning_module, node.target))
        elif node.op == "output":
            out = [render(value) for value in node.args[0]]
            continue
        elif node.op != "placeholder":
            raise _Untraceable(node.op)
        dead = [var[done] for done in node.all_input_nodes if last_use.get(done) == i and done.op == "call_function"]
        if dead and node.op == "call_function":
            lines.append(f"    del {', '.join(dict.fromkeys(dead))}")
    lines += [f"    {name}.set_state(_own{i}.get_state())" for i, name in enumerate(generators)]
    lines.append(f"    return {_assembled(out_tree, iter(out), constant)}")
    return "\n".join(lines) + "\n", names


def _tensor_guard(leaves: list[Tensor]) -> Any:
    """One C++ check of every tensor's type, dtype, device, shape, strides, requires_grad and dispatch keys (and
    that no two alias), dynamo's own; ``None`` where this torch has none, and the record checks in Python."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        guard = TensorGuards(*leaves, dynamic_dims_sizes=[list(t.shape) for t in leaves],
                             dynamic_dims_strides=[list(t.stride()) for t in leaves])
        return guard if guard.check(*leaves) else None
    except Exception:  # a private API: without it, the record's own lines check the same
        return None


def _checks(args: tuple[Any, ...], constant: Callable[[Any], str], generators: list[str],
            guard: Any = None) -> list[str]:
    """Lines that bind the arguments' tensors to ``a0, a1, ...`` (in ``_walk``'s order) and generators to
    ``g0, ...`` (named in ``generators``), returning ``_MISS`` where the arguments are not of the signature;
    the tensors are checked by ``guard`` (see :func:`_tensor_guard`) if there is one, else line by line."""
    lines: list[str] = []
    counts = {"a": 0, "n": 0}

    def check(tree: Any, expr: str) -> None:
        kind = type(tree)
        if kind is Tensor:
            name = f"a{counts['a']}"
            counts["a"] += 1
            lines.append(f"    {name} = {expr}")
            if guard is not None:
                return
            lines.append(f"    if type({name}) is not _Tensor or {name}.shape != {tuple(tree.shape)!r} or {name}.dtype "
                         f"is not {constant(tree.dtype)} or {name}.device != {constant(tree.device)} or "
                         f"{name}.stride() != {tree.stride()!r} or {name}.requires_grad is not {tree.requires_grad}:")
        elif kind is dict or kind is tuple or kind is list:
            name = f"n{counts['n']}"
            counts["n"] += 1
            lines.append(f"    {name} = {expr}")
            shape = f"tuple({name}) != {tuple(tree)!r}" if kind is dict else f"len({name}) != {len(tree)}"
            lines.append(f"    if type({name}) is not {kind.__name__} or {shape}:")
            lines.append("        return _MISS")
            items = tree.items() if kind is dict else enumerate(tree)
            for key, value in items:
                check(value, f"{name}[{key!r}]")
            return
        elif kind is torch.Generator:
            name = f"g{len(generators)}"
            generators.append(name)
            lines.append(f"    {name} = {expr}")
            lines.append(f"    if type({name}) is not _Generator or {name}.device != {constant(tree.device)}:")
        elif tree is None or kind is bool:
            lines.append(f"    if {expr} is not {tree!r}:")
        else:
            lines.append(f"    if type({expr}) is not {constant(kind)} or {expr} != {constant(tree)}:")
        lines.append("        return _MISS")

    for i, arg in enumerate(args):
        check(arg, f"r{i}")
    if guard is not None and counts["a"]:
        lines += [f"    if not {constant(guard)}.check({', '.join(f'a{i}' for i in range(counts['a']))}):",
                  "        return _MISS"]
    return lines


def _own_generator(value: torch.Generator, own: list[torch.Generator]) -> torch.Generator:
    """Which of the record's generators ``value`` wraps (make_fx hands back another Python object for it)."""
    for i, mine in enumerate(own):
        state = mine.get_state()
        mine.manual_seed(0x5EED0000 + i)  # a mark to find it by; its state is set again before every replay
        found = value.initial_seed() == 0x5EED0000 + i
        mine.set_state(state)
        if found:
            return mine
    raise _Untraceable("a generator made inside the function: a record would not draw what it draws")


def _assembled(tree: Any, out: Any, constant: Callable[[Any], str]) -> str:
    """The expression that builds ``tree``'s shape from the record's outputs, named in order by ``out``."""
    kind = type(tree)
    if kind is Tensor:
        return next(out)
    if kind is dict:
        return "{" + ", ".join(f"{key!r}: {_assembled(value, out, constant)}" for key, value in tree.items()) + "}"
    if kind is tuple or kind is list:
        items = [_assembled(value, out, constant) for value in tree]
        body = ", ".join(items) + ("," if kind is tuple and len(items) == 1 else "")
        return f"({body})" if kind is tuple else f"[{body}]"
    return constant(tree)


def _full(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Every argument of ``op``'s schema, its defaults written out (a binding's defaults may differ from them):
    the positional ones in order, the keyword-only ones by name."""
    full: list[Any] = []
    named: dict[str, Any] = {}
    for i, argument in enumerate(op._schema.arguments):
        if i < len(args):
            value = args[i]
        elif argument.name in kwargs:
            value = kwargs[argument.name]
        elif argument.has_default_value():
            value = argument.default_value
        else:
            raise _Untraceable(f"{op} without its argument {argument.name}")
        if argument.kwarg_only:
            named[argument.name] = value
        else:
            full.append(value)
    return full, named


def _arguments(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], fewest: bool) -> tuple[list[Any],
                                                                                                dict[str, Any]]:
    """The arguments to write: all of the schema's (``fewest=False``; a trailing or keyword ``None`` with a default
    left out, which every binding reads as absent and some refuse), or only those that differ from the schema's
    defaults."""
    full, named = _full(op, args, kwargs)
    schema = op._schema.arguments
    defaults = {a.name: a.default_value for a in schema if a.has_default_value()}

    def is_default(name: str, value: Any) -> bool:
        # A None is left out only where the schema has a default: avg_pool2d_backward's divisor_override has none.
        return name in defaults and (value is None or (fewest and not isinstance(value, (Tensor, torch.fx.Node))
                                                       and type(value) is type(defaults[name])
                                                       and value == defaults[name]))

    while full and is_default(schema[len(full) - 1].name, full[-1]):
        full.pop()
    return full, {name: value for name, value in named.items() if not is_default(name, value)}


def _shape_of_call(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """An operation and its arguments other than tensors: what a binding must reproduce."""
    full, named = _full(op, args, kwargs)
    return (op, *[_no_tensors(v) for v in [*full, *named.values()]])


def _no_tensors(value: Any) -> Any:
    """``value`` with each tensor (or the node that stands for one), in lists too, as ``None``."""
    if isinstance(value, (Tensor, torch.fx.Node)):
        return None
    if isinstance(value, (list, tuple)):
        return tuple(_no_tensors(item) for item in value)
    return value


def _graph(fn: Callable[..., Any], leaves: list[Tensor]) -> Any:
    """The aten operations ``fn(*leaves)`` calls, as make_fx records them before dispatch: a composite operation
    (``linear``) stays one call, as the closures made it, rather than the kernels it runs (``t``, ``addmm``)."""
    from torch.fx.experimental.proxy_tensor import make_fx  # imported on the first trace only

    _tracing.active = True
    try:
        return make_fx(fn, tracing_mode="real", pre_dispatch=True)(*leaves).graph
    finally:
        _tracing.active = False


def _calls(graph: Any) -> list[tuple[Any, ...]]:
    return [_shape_of_call(node.target, node.args, node.kwargs) for node in graph.nodes
            if node.op == "call_function" and node.target is not operator.getitem]


def _other_calls(run: Callable[..., Any], graph: Any, args: tuple[Any, ...], leaves: list[Tensor],
                 own: list[torch.Generator], states: list[Tensor]) -> list[int] | None:
    """Which of the record's operations ``run`` does not call as recorded (the same overload, the same arguments,
    in the same order), found by tracing ``run`` as the record was traced; ``None`` if ``run`` fails."""
    for mine, state in zip(own, states, strict=True):
        mine.set_state(state)
    recorded = _calls(graph)
    try:
        replayed = _calls(_graph(lambda *tensors: run(*_rebuild(args, iter(tensors), iter(own))), leaves))
    except Exception:  # a binding that refuses the arguments written
        return None
    if len(replayed) != len(recorded):
        return list(range(len(recorded)))
    return [i for i, (a, b) in enumerate(zip(replayed, recorded, strict=True)) if a != b]
