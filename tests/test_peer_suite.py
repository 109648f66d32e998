"""The peer suite (issue 19, item 5): torch's own test inputs for every optimizer, layer and loss we have.

Cases come from ``torch.testing._internal``: ``optim_db`` (each ``OptimizerInfo.optim_inputs_func``) and
``module_db`` (each ``ModuleInfo.module_inputs_func``). torch's constructor arguments are bound to the torch
signature, then passed by name to our constructor. Each case then either

- matches torch: optimizers bit for bit in float32 over ten steps against ``foreach=True``; layers and losses
  in float64 to 1e-10, forward, every gradient and (batch norm) the new state; or
- is refused with a message: at construction for an argument we lack (counted under that argument; a loss that
  does not take an argument yet counts the same way, so the counts rise as losses gain options), or at the call
  for an input we do not take (counted under "input").

A mismatch fails the test. The counts print at the end (``pytest -s`` or the terminal summary);
docs/torch-parity.md lists each unsupported argument with the reason.
"""

from __future__ import annotations

import collections
import inspect

import pytest
import torch

import rdl_functional as rf

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
REFUSED: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

OPTIMIZERS = {"SGD": rf.sgd, "Adam": rf.adam, "AdamW": rf.adamw, "RMSprop": rf.rmsprop, "Adagrad": rf.adagrad}


def _refused(family: str, name: str, ours: object, bound: dict, error: Exception) -> None:
    """Count a refusal under the first torch argument our constructor lacks, else under its message."""
    try:
        accepted = set(inspect.signature(ours).parameters)
    except (TypeError, ValueError):
        accepted = set()
    missing = [key for key in bound if key not in accepted]
    what = missing[0] if missing and isinstance(error, TypeError) and missing[0] in str(error) else None
    if what is None:
        value = next((k for k in bound if k in str(error)), None)
        what = f"{value}={bound[value]!r}" if value is not None and not isinstance(bound[value], torch.Tensor) \
            else (f"{value} (a tensor)" if value is not None else str(error)[:60])
    assert str(error), f"{name}: refused without a message"
    COUNTS[family]["refused"] += 1
    REFUSED[family][f"{name}: {what}"] += 1


def test_optimizers_match_torch_optim_foreach_bit_for_bit_or_refuse_by_name():
    infos = [info for info in common_optimizers.optim_db if info.optim_cls.__name__ in OPTIMIZERS]
    assert len(infos) == len(OPTIMIZERS)
    for info in infos:
        name = info.optim_cls.__name__
        for case in info.optim_inputs_func(device="cpu", dtype=torch.float32):
            COUNTS["optimizers"]["cases"] += 1
            kwargs = dict(case.kwargs)
            try:
                ours = OPTIMIZERS[name](**kwargs)
            except (TypeError, ValueError) as error:
                _refused("optimizers", name, OPTIMIZERS[name], kwargs, error)
                continue
            g = torch.Generator().manual_seed(0)
            shapes = [(3, 4), (4,), (2, 2, 3)]
            params = {str(i): torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}
            theirs = [p.clone().requires_grad_() for p in params.values()]
            reference = info.optim_cls(theirs, foreach=True, **kwargs)
            state = ours.init(params)
            for _ in range(10):
                grads = {key: torch.randn(p.shape, generator=g) for key, p in params.items()}
                params, state = ours.step(params, grads, state)
                for p, grad in zip(theirs, grads.values(), strict=True):
                    p.grad = grad.clone()
                reference.step()
            mismatch = [key for key, p in zip(params, theirs, strict=True) if not torch.equal(params[key], p.detach())]
            assert not mismatch, f"{name}({case.desc}, {kwargs}): leaves {mismatch} differ from torch.optim's"
            COUNTS["optimizers"]["matched"] += 1


# ---------------------------------------------------------------------------
# Layers: torch.nn class -> (our constructor, torch argument name -> ours, how x goes in and y comes out)

def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() <= 2 else x.movedim(1, -1)


def _channels_first(y: torch.Tensor) -> torch.Tensor:
    return y if y.dim() <= 2 else y.movedim(-1, 1)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


LAYERS = {  # torch.nn class: (ours, renamed arguments, x to ours, y back to torch's layout)
    "Linear": (rf.linear, {}, _same, _same),
    "BatchNorm1d": (rf.batch_norm, {"num_features": "features"}, _channels_last, _channels_first),
    "BatchNorm2d": (rf.batch_norm2d, {}, _same, _same),
    "Conv1d": (rf.conv1d, {}, _same, _same),
    "Conv2d": (rf.conv2d, {}, _same, _same),
    "MaxPool2d": (rf.max_pool2d, {}, _same, _same),
    "AvgPool2d": (rf.avg_pool2d, {}, _same, _same),
    "GroupNorm": (rf.group_norm, {}, _same, _same),
    "LayerNorm": (rf.layer_norm, {}, _same, _same),
    "Embedding": (rf.embedding, {}, _same, _same),
    "MultiheadAttention": (rf.multi_head_attention, {}, _same, _same),
    "ReLU": (lambda: rf.relu, {}, _same, _same),
    "Tanh": (lambda: rf.tanh, {}, _same, _same),
    "Sigmoid": (lambda: rf.sigmoid, {}, _same, _same),
    "SiLU": (lambda: rf.silu, {}, _same, _same),
    "LeakyReLU": (rf.leaky_relu, {}, _same, _same),
    "ELU": (rf.elu, {}, _same, _same),
    "GELU": (rf.gelu, {}, _same, _same),
    "Softplus": (rf.softplus, {}, _same, _same),
    "Softmax": (rf.softmax, {}, _same, _same),
    "LogSoftmax": (rf.log_softmax, {}, _same, _same),
}

LOSSES = {"CrossEntropyLoss": "cross_entropy_loss", "NLLLoss": "nll_loss", "BCEWithLogitsLoss": "bce_with_logits_loss",
          "MSELoss": "mse_loss", "L1Loss": "l1_loss", "HuberLoss": "huber_loss"}

# torch arguments that only choose what our layer always is: dropped when they say so, refused otherwise.
ALWAYS = {"inplace": False, "batch_first": True, "device": None, "dtype": None}


def _bound(module_cls: type, case: object) -> dict:
    """torch's constructor arguments of ``case``, by name, as the caller wrote them (defaults left out)."""
    signature = inspect.signature(module_cls)
    bound = dict(signature.bind(*case.constructor_input.args, **case.constructor_input.kwargs).arguments)
    if "batch_first" in signature.parameters:  # torch's default is sequence first, which ours is not
        bound.setdefault("batch_first", False)
    return bound


def _construct(module_cls: type, make: object, renames: dict, bound: dict) -> object:
    """Ours, from torch's arguments by name. An argument we lack, at torch's default value, is what our layer
    is (``add_bias_kv=False``, ``bias=True`` on a norm), so it is dropped; any other value reaches our
    constructor, which refuses it by name."""
    defaults = {key: p.default for key, p in inspect.signature(module_cls).parameters.items()}
    ours = set(inspect.signature(make).parameters)
    for key, value in list(bound.items()):
        if ALWAYS.get(key, object()) is value or (renames.get(key, key) not in ours and key != "batch_first"
                                                  and not isinstance(value, torch.Tensor)
                                                  and defaults.get(key, object()) == value):
            del bound[key]
    return make(**{renames.get(key, key): value for key, value in bound.items()})


class _InputRefused(Exception):
    """Our layer refused the case's input (at the call, with its message): counted, not failed."""


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


def _check_layer(name: str, layer: object, module: torch.nn.Module, x: torch.Tensor, to_ours, from_ours,
                 train: bool) -> None:
    stateful = isinstance(layer, rf.StatefulLayer)
    params = layer.init(0, dtype=torch.float64)
    state = layer.init_state(dtype=torch.float64) if stateful else None
    module.load_state_dict(rf.to_state_dict(params, state), strict=True)
    module.train(train)
    floating = x.is_floating_point()
    x_ref = x.detach().clone().requires_grad_(floating)
    y_ref = module(x_ref)
    try:  # only the call may refuse: anything after it is a comparison, and a difference fails
        if stateful:
            y, new_state, pullback = layer.vjp(params, state, to_ours(x.detach()), train=train)
        else:
            y, pullback = layer.vjp(params, to_ours(x.detach()))
    except (TypeError, ValueError) as error:
        raise _InputRefused(str(error)) from error
    _close(from_ours(y), y_ref.detach(), f"{name} y")
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=y_ref.dtype)
    weights = dict(module.named_parameters())
    inputs = [*weights.values(), *([x_ref] if floating else [])]
    grads = torch.autograd.grad(y_ref, inputs, dy, allow_unused=True) if inputs else ()
    dparams, dx = pullback(to_ours(dy))
    ours = rf.to_state_dict(dparams)
    for (key, _), want in zip(weights.items(), grads, strict=False):
        _close(ours[key], want, f"{name} d{key}")
    if floating:
        _close(from_ours(dx), grads[-1], f"{name} dx")
    if stateful:
        for key, value in rf.to_state_dict(params, new_state).items():
            _close(value.to(torch.float64), module.state_dict()[key].to(torch.float64), f"{name} new {key}")


def _layer_cases():
    for info in common_modules.module_db:
        name = info.module_cls.__name__
        if name not in LAYERS:
            continue
        for train in (True, False) if info.train_and_eval_differ else (True,):
            for case in info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False,
                                                training=train):
                yield info, name, case, train


def test_layers_match_torch_nn_in_float64_or_refuse_by_name():
    for info, name, case, train in _layer_cases():
        COUNTS["layers"]["cases"] += 1
        make, renames, to_ours, from_ours = LAYERS[name]
        bound = _bound(info.module_cls, case)
        try:
            layer = _construct(info.module_cls, make, renames, bound := {k: v for k, v in bound.items()})
        except (TypeError, ValueError) as error:
            _refused("layers", name, make, {renames.get(k, k): v for k, v in bound.items()}, error)
            continue
        args, kwargs = case.forward_input.args, case.forward_input.kwargs
        x = args[0] if args else kwargs.get("input")
        extra = len(args) > 1 or any(v is not None for k, v in kwargs.items() if k != "input")
        if extra or x.dim() < (2 if name.startswith(("Conv", "MaxPool", "AvgPool", "BatchNorm")) else 0):
            COUNTS["layers"]["refused"] += 1  # unbatched images, separate key and value, masks: not ours
            REFUSED["layers"][f"{name}: input {'(query, key, value, masks)' if extra else 'without a batch'}"] += 1
            continue
        torch.manual_seed(0)
        module = info.module_cls(*case.constructor_input.args, **case.constructor_input.kwargs).to(torch.float64)
        try:
            _check_layer(name, layer, module, x, to_ours, from_ours, train)
        except _InputRefused as error:
            COUNTS["layers"]["refused"] += 1
            message = str(error).split(": ", 1)[-1]
            REFUSED["layers"][f"{name}: input {tuple(x.shape)}: {message[:70]}"] += 1
            continue
        COUNTS["layers"]["matched"] += 1


def test_losses_match_torch_nn_in_float64_or_refuse_by_name():
    for info in common_modules.module_db:
        name = info.module_cls.__name__
        if name not in LOSSES:
            continue
        base = getattr(rf, LOSSES[name])
        for case in info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False,
                                            training=True):
            COUNTS["losses"]["cases"] += 1
            bound = _bound(info.module_cls, case)
            try:  # the bare loss is torch's defaults; a factory (or, later, every loss) takes torch's options
                loss = base if not bound and isinstance(base, rf.Loss) else base(**bound)
                if not isinstance(loss, rf.Loss):
                    raise TypeError(f"{LOSSES[name]}(...) did not return a Loss")
            except (TypeError, ValueError) as error:
                _refused("losses", name, base, bound, error)
                continue
            pred, target = case.forward_input.args[:2]
            module = info.module_cls(*case.constructor_input.args, **case.constructor_input.kwargs)
            pred_ref = pred.detach().clone().requires_grad_()
            value_ref = module(pred_ref, target)
            # torch's class losses take (N, C, d1, ...); ours keep classes last, as every layer's features.
            moved = name in ("CrossEntropyLoss", "NLLLoss") and pred.dim() >= 3
            pred_ours = pred.detach().movedim(1, -1) if moved else pred.detach()
            target_ours = target.movedim(1, -1) if moved and target.shape == pred.shape else target
            try:
                value, pullback = loss.vjp(pred_ours, target_ours)
            except (TypeError, ValueError) as error:
                COUNTS["losses"]["refused"] += 1
                REFUSED["losses"][f"{name}: input pred {tuple(pred.shape)}, target {target.dtype}"] += 1
                assert str(error)
                continue
            _close(value, value_ref.detach(), f"{name} value")
            g = torch.randn(value_ref.shape, generator=torch.Generator().manual_seed(1), dtype=value_ref.dtype)
            (want,) = torch.autograd.grad(value_ref, [pred_ref], g)
            dpred = pullback(g)
            _close(dpred.movedim(-1, 1) if moved else dpred, want, f"{name} dpred")
            COUNTS["losses"]["matched"] += 1


def test_zz_the_counts(capsys):
    """Prints what the suite found (its tests run in file order: this one last)."""
    lines = ["peer suite against torch's optim_db / module_db:"]
    for family in ("optimizers", "layers", "losses"):
        counts = COUNTS[family]
        lines.append(f"  {family}: {counts['cases']} cases, {counts['matched']} matched, {counts['refused']} refused")
        lines += [f"      {count:3d} × {what}" for what, count in sorted(REFUSED[family].items())]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert all(COUNTS[f]["cases"] == COUNTS[f]["matched"] + COUNTS[f]["refused"] for f in COUNTS)
