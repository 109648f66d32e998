"""The sequence layers of issue 18: layer_norm, embedding, positional_embedding, multi_head_attention,
transformer_block. Each through rf.check_vjp in float64, and bit for bit against its torch.nn twin in float32
(init, forward, every cotangent, 20 training steps of a small GPT)."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf
from rdl_functional.apps.torch_baseline import (
    TorchPositionalEmbedding,
    TorchSelfAttention,
    torch_gpt,
    torch_transformer_block,
)

B, T, E, H, V = 3, 5, 8, 2, 11


def _mask() -> torch.Tensor:
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, -2:] = True  # the last two keys of the first sequence are padding
    mask[2, 1] = True
    return mask


def _floats(g, dtype):
    return torch.randn(B, T, E, generator=g, dtype=dtype)


def _ids(g, dtype):
    return torch.randint(0, V, (B, T), generator=g)


def _padded(g, dtype):
    return _floats(g, dtype), _mask()


def _fully_masked(g, dtype):
    """Every key of the second sequence masked, and the first key of the first: with causal, query 0 sees none."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1] = True
    mask[0, 0] = True
    return _floats(g, dtype), mask


def _attention(**options):
    return (lambda: rf.multi_head_attention(E, H, **options),
            lambda: TorchSelfAttention(E, H, **options))


# name: (our layer, its torch.nn twin, the input). Adding a layer is one line.
LAYERS = {
    "layer_norm": (lambda: rf.layer_norm(E), lambda: torch.nn.LayerNorm(E), _floats),
    "layer_norm_2d": (lambda: rf.layer_norm((T, E)), lambda: torch.nn.LayerNorm((T, E)), _floats),
    "layer_norm_no_affine": (lambda: rf.layer_norm(E, elementwise_affine=False),
                             lambda: torch.nn.LayerNorm(E, elementwise_affine=False), _floats),
    "layer_norm_eps": (lambda: rf.layer_norm([E], eps=1e-3), lambda: torch.nn.LayerNorm([E], eps=1e-3), _floats),
    "embedding": (lambda: rf.embedding(V, E), lambda: torch.nn.Embedding(V, E), _ids),
    "positional_embedding": (lambda: rf.positional_embedding(7, E), lambda: TorchPositionalEmbedding(7, E), _floats),
    "attention": (*_attention(), _floats),
    "attention_causal": (*_attention(causal=True), _floats),
    "attention_no_bias": (*_attention(bias=False), _floats),
    "attention_padded": (*_attention(), _padded),
    "attention_causal_padded_no_bias": (*_attention(causal=True, bias=False), _padded),
    # A query with no key to attend to gets out_proj.bias in torch, not NaN (the docs said NaN).
    "attention_fully_masked": (*_attention(), _fully_masked),
    "attention_causal_fully_masked": (*_attention(causal=True), _fully_masked),
    "attention_dropout": (*_attention(dropout=0.25), _floats),
    "attention_causal_dropout_padded": (*_attention(causal=True, dropout=0.5), _padded),
    "transformer_block": (lambda: rf.transformer_block(E, H), lambda: torch_transformer_block(E, H), _floats),
    "transformer_block_dropout": (lambda: rf.transformer_block(E, H, mlp_ratio=2, dropout=0.25),
                                  lambda: torch_transformer_block(E, H, mlp_ratio=2, dropout=0.25), _floats),
}


def _perturbed(params, g):
    """Params away from their init (layer norm's ones and zeros, attention's zero biases): every term shows."""
    return rf.tree_map(lambda p: p + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype), params)


@pytest.mark.parametrize("name", LAYERS)
def test_vjp_matches_torch_func_in_float64(name):
    make, _, make_input = LAYERS[name]
    layer, g = make(), torch.Generator().manual_seed(0)
    params = _perturbed(layer.init(0, dtype=torch.float64), g)
    x = make_input(g, torch.float64)
    if isinstance(layer, rf.StatefulLayer):
        rf.check_vjp(layer, params, layer.init_state(dtype=torch.float64), x, layer_seed=3)
    else:
        rf.check_vjp(layer, params, x)


def _ours(layer, params, x, seed):
    if isinstance(layer, rf.StatefulLayer):
        y, _, pullback = layer.vjp(params, {}, x, train=True, generator=torch.Generator().manual_seed(seed))
        return y, pullback
    return layer.vjp(params, x)


@pytest.mark.parametrize("name", LAYERS)
def test_init_forward_and_every_cotangent_equal_the_torch_nn_twin_bit_for_bit(name):
    make, make_twin, make_input = LAYERS[name]
    layer, g = make(), torch.Generator().manual_seed(1)
    with torch.random.fork_rng():  # the twin draws from the global RNG: restored after
        # Our init from a generator in the state the twin's global RNG has: the same numbers, in torch's order.
        torch.manual_seed(5)
        fresh = make_twin().state_dict()
        ours = rf.to_state_dict(layer.init(5))
        assert list(ours) == list(fresh) and all(torch.equal(ours[key], fresh[key]) for key in fresh)

        twin = make_twin().train()
        params = _perturbed(layer.init(0), g)
        twin.load_state_dict(rf.to_state_dict(params), strict=True)  # the names and layouts are torch's
        x = make_input(g, torch.float32)
        y, pullback = _ours(layer, params, x, seed=7)
        dy = torch.randn(y.shape, generator=g)
        dparams, dx = pullback(dy)

        floats = x[0] if isinstance(x, tuple) else x
        torch.manual_seed(7)  # the twin's dropout masks from the state our generator had

        def twin_apply(state_dict, inputs):
            return torch.func.functional_call(twin, state_dict, ((inputs, x[1]) if isinstance(x, tuple) else inputs,))

        state_dict = dict(twin.named_parameters())
        if floats.is_floating_point():
            y_twin, twin_pullback = torch.func.vjp(twin_apply, state_dict, floats)
            d_state, d_x = twin_pullback(dy)
            assert torch.equal(dx[0] if isinstance(x, tuple) else dx, d_x)
        else:  # integer ids: no cotangent
            y_twin, twin_pullback = torch.func.vjp(lambda sd: twin_apply(sd, floats), state_dict)
            (d_state,) = twin_pullback(dy)
            assert dx is None
    assert torch.equal(y, y_twin)
    got = rf.to_state_dict(dparams)
    assert list(got) == list(d_state)
    assert all(torch.equal(got[key], d_state[key]) for key in d_state), [
        key for key in d_state if not torch.equal(got[key], d_state[key])]


def test_attention_with_dropout_evaluates_as_without_and_is_stateful_only_with_it():
    plain, dropped = rf.multi_head_attention(E, H, causal=True), rf.multi_head_attention(E, H, causal=True,
                                                                                         dropout=0.5)
    assert isinstance(plain, rf.Layer) and isinstance(dropped, rf.StatefulLayer)
    params, x = plain.init(0), torch.randn(B, T, E, generator=torch.Generator().manual_seed(0))
    y, state = dropped(params, {}, x, train=False)
    assert torch.equal(y, plain(params, x)) and state == {}
    with pytest.raises(ValueError, match=r"in training \(train=True\) attention dropout draws a random mask and "
                                         r"needs a generator"):
        dropped(params, {}, x, train=True)


def _gpt(blocks: int = 1, dropout: float = 0.0):
    return rf.compose(rf.embedding(V, E), rf.positional_embedding(T, E),
                      *[rf.transformer_block(E, H, dropout=dropout) for _ in range(blocks)],
                      rf.layer_norm(E), rf.linear(E, V))


OPTIMIZERS = {  # ours, and torch.optim's twin (foreach, as rf's optimizers match)
    "sgd": (lambda: rf.sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True)),
    "adam": (lambda: rf.adam(1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_twenty_steps_of_a_one_block_gpt_equal_torch_nn_and_torch_optim_bit_for_bit(name):
    ours, theirs = OPTIMIZERS[name]
    model, g = _gpt(), torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, V, (2, 20, 4, T), generator=g)
    state = rf.train_state(model, ours(), model.init(0))
    with torch.random.fork_rng():
        twin = torch_gpt(V, T, E, H)
    twin.load_state_dict(rf.to_state_dict(state.params), strict=True)
    optimizer = theirs(twin.train().parameters())
    step = rf.train_step(model, rf.cross_entropy_loss, ours())
    for i in range(20):
        state, metrics = step(state, ids[i], targets[i])
        assert step._flat.replayed == (i > 0)  # traced on the first step, the record replayed after
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(twin(ids[i]).reshape(-1, V), targets[i].reshape(-1))
        loss.backward()
        optimizer.step()
        assert torch.equal(metrics["loss"], loss.detach())
    expected, got = twin.state_dict(), rf.to_state_dict(state.params)
    assert list(got) == list(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_a_gpt_with_attention_dropout_trains_as_its_twin_with_the_global_rng_in_the_generators_state():
    model, g = _gpt(dropout=0.25), torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, V, (2, 3, 4, T), generator=g)
    state = rf.train_state(model, rf.sgd(0.1), model.init(0), generator=11)
    with torch.random.fork_rng():
        twin = torch_gpt(V, T, E, H, dropout=0.25)
        twin.load_state_dict(rf.to_state_dict(state.params), strict=True)
        optimizer = torch.optim.SGD(twin.train().parameters(), lr=0.1, foreach=True)
        step = rf.train_step(model, rf.cross_entropy_loss, rf.sgd(0.1))
        for i in range(3):
            torch.random.set_rng_state(state.generator)  # the masks our step draws from its state's generator
            state, metrics = step(state, ids[i], targets[i])
            assert step._flat.replayed == (i > 0)  # the dropout masks drawn by the record, after the first step
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(twin(ids[i]).reshape(-1, V), targets[i].reshape(-1))
            loss.backward()
            optimizer.step()
            assert torch.equal(metrics["loss"], loss.detach())
    expected, got = twin.state_dict(), rf.to_state_dict(state.params)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


ERRORS = [  # (the call, error, match)
    (lambda: rf.embedding(V, E)(rf.embedding(V, E).init(0), torch.tensor([[0, V]])), ValueError,
     r"embedding\(11, 8\).apply: ids must lie in \[0, 11\) \(num_embeddings=11\), got values in \[0, 11\]"),
    (lambda: rf.embedding(V, E)(rf.embedding(V, E).init(0), torch.tensor([[-1, 2]])), ValueError,
     r"ids must lie in \[0, 11\).*got values in \[-1, 2\]"),
    (lambda: rf.embedding(V, E)(rf.embedding(V, E).init(0), torch.zeros(2, 3)), TypeError,
     r"embedding\(11, 8\).apply: ids must be int64 \(or int32\) token ids, got torch.float32"),
    (lambda: rf.multi_head_attention(E, H)(rf.multi_head_attention(E, H).init(0), (torch.zeros(B, T, E),
                                                                                   torch.zeros(B, T + 1).bool())),
     ValueError, r"multi_head_attention\(8, 2\).apply: key_padding_mask must have shape \(batch, sequence\) = "
                 r"\(3, 5\), got \(3, 6\)"),
    (lambda: rf.multi_head_attention(E, H)(rf.multi_head_attention(E, H).init(0), (torch.zeros(B, T, E),
                                                                                   torch.zeros(B, T))),
     TypeError, r"key_padding_mask must be a bool tensor \(True = ignore that key, torch's convention\), got "
                r"torch.float32"),
    (lambda: rf.multi_head_attention(E, H)(rf.multi_head_attention(E, H).init(0), torch.zeros(T, E)),
     ValueError, r"x must have shape \(batch, sequence, 8\), batch first and features last, got \(5, 8\)"),
    (lambda: rf.positional_embedding(4, E)(rf.positional_embedding(4, E).init(0), torch.zeros(B, T, E)),
     ValueError, r"positional_embedding\(4, 8\).apply: the sequence has 5 positions but the layer holds "
                 r"max_length=4"),
    (lambda: rf.multi_head_attention(10, 3), ValueError,
     r"multi_head_attention: embed_dim must be divisible by num_heads .*got embed_dim=10, num_heads=3"),
    (lambda: rf.transformer_block(10, 4), ValueError, r"embed_dim must be divisible by num_heads"),
    (lambda: rf.multi_head_attention(E, H, dropout=1.0), ValueError, r"dropout must be a probability in \[0, 1\)"),
    (lambda: rf.layer_norm(E)(rf.layer_norm(E).init(0), torch.zeros(B, T, E + 1)), ValueError,
     r"layer_norm\(8\).apply: x must be a floating tensor of shape \(..., 8\), features last, got torch.float32 "
     r"\(3, 5, 9\)"),
    (lambda: rf.layer_norm(E, elementwise_affine=False)(rf.layer_norm(E).init(0), torch.zeros(B, T, E)), ValueError,
     r"params must have the keys \[\], got \['bias', 'weight'\] \(the layer was built with "
     r"elementwise_affine=False\)"),
    (lambda: rf.layer_norm(0), ValueError, r"layer_norm: normalized_shape must be a positive int"),
    (lambda: rf.multi_head_attention(E, H, bias=False)(rf.multi_head_attention(E, H).init(0), torch.zeros(B, T, E)),
     ValueError, r"params must have the keys \['in_proj_weight', 'out_proj'\].*\(the layer was built with "
                 r"bias=False\)"),
    (lambda: rf.layer_norm(E)({"weight": torch.ones(E), "bias": torch.zeros(E, dtype=torch.float64)},
                              torch.zeros(B, T, E)),
     TypeError, r"layer_norm\(8\).apply: params\['bias'\] is torch.float64 but params\['weight'\] is torch.float32"),
    (lambda: rf.layer_norm(E)(rf.layer_norm(E).init(0), torch.zeros(B, E, dtype=torch.int64)), TypeError,
     r"layer_norm\(8\).apply: a floating x is needed, got torch.int64"),
    (lambda: _attention_call(lambda p: {**p, "out_proj": rf.tree_map(torch.Tensor.double, p["out_proj"])}),
     TypeError, r"params\['out_proj'\]\['weight'\] is torch.float64 but params\['in_proj_weight'\] is torch.float32"),
    (lambda: _attention_call(lambda p: {**p, "in_proj_bias": p["in_proj_bias"].double()}),
     TypeError, r"params\['in_proj_bias'\] is torch.float64 but params\['in_proj_weight'\] is torch.float32"),
    (lambda: _attention_call(lambda p: {key: p[key] for key in ("in_proj_weight", "in_proj_bias")}),
     ValueError, r"params must have the keys \['in_proj_weight', 'in_proj_bias', 'out_proj'\], got "
                 r"\['in_proj_bias', 'in_proj_weight'\] \(missing \['out_proj'\]\)"),
    (lambda: _attention_call(lambda p: p, torch.zeros(0, T, E)),
     ValueError, r"x has shape \(0, 5, 8\), an empty batch or sequence"),
    (lambda: _attention_call(lambda p: p, torch.zeros(B, 0, E)),
     ValueError, r"x has shape \(3, 0, 8\), an empty batch or sequence"),
    (lambda: _attention_call(lambda p: p, (torch.zeros(B, T, E), torch.zeros(B, T, dtype=torch.bool, device="meta"))),
     ValueError, r"key_padding_mask is on meta but x is on cpu \(move it: mask.to\(x.device\)\)"),
    (lambda: _attention_call(lambda p: {**p, "out_proj": torch.zeros(E, E)}),
     TypeError, r"params\['out_proj'\] must be a dict with \['weight', 'bias'\], got Tensor"),
    (lambda: _attention_call(lambda p: {**p, "in_proj_bias": [0.0] * (3 * E)}),
     TypeError, r"params\['in_proj_bias'\] must be a torch.Tensor, got list"),
    (lambda: _attention_call(lambda p: {**p, "in_proj_bias": p["in_proj_bias"].to("meta")}),
     ValueError, r"params\['in_proj_bias'\] is on meta but params\['in_proj_weight'\] is on cpu \(a layer's params "
                 r"share one device"),
    (lambda: rf.layer_norm(E, eps=0), ValueError, r"layer_norm: eps must be a finite number > 0 \(it keeps"),
]


def _attention_call(change, x=None):
    layer = rf.multi_head_attention(E, H)
    return layer(change(layer.init(0)), torch.zeros(B, T, E) if x is None else x)


@pytest.mark.parametrize(("call", "error", "match"), ERRORS, ids=[case[2][:40] for case in ERRORS])
def test_bad_input_is_refused_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_compose_names_the_layer_that_refused_the_ids():
    model = _gpt()
    with pytest.raises(ValueError, match=r"^layer 0: embedding\(11, 8\).apply: ids must lie in \[0, 11\)"):
        model(model.init(0), torch.full((1, T), V))


def test_the_layers_are_pure():
    model, g = _gpt(), torch.Generator().manual_seed(2)
    params, ids = model.init(0), torch.randint(0, V, (B, T), generator=g)
    before, ids_before = rf.tree_map(torch.clone, params), ids.clone()
    logits, pullback = model.vjp(params, ids)
    dy = torch.randn(logits.shape, generator=g)
    dy_before = dy.clone()
    pullback(dy)
    assert rf.tree_difference(params, before, leaves=True) is None
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(params), rf.tree_leaves(before), strict=True))
    assert torch.equal(ids, ids_before) and torch.equal(dy, dy_before)


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"causal": True, "bias": False}], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_attention_off_the_cpu_runs_the_math_path_which_checks_out_and_agrees_with_the_fused_kernel(
        options, padded, monkeypatch):
    """Off the CPU the fused kernel is not there and the math path runs: here forced on the CPU."""
    import rdl_functional.attention as attention_module

    layer, g = rf.multi_head_attention(E, H, **options), torch.Generator().manual_seed(4)
    params = _perturbed(layer.init(0, dtype=torch.float64), g)
    x = _padded(g, torch.float64) if padded else _floats(g, torch.float64)
    fused = layer(params, x)
    monkeypatch.setattr(attention_module, "_FUSED_DEVICES", ())
    rf.check_vjp(layer, params, x)
    torch.testing.assert_close(layer(params, x), fused, rtol=1e-12, atol=1e-12)


def test_a_replayed_step_still_refuses_ids_out_of_range_by_name():
    model, g = _gpt(), torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, V, (2, 4, T), generator=g)
    state = rf.train_state(model, rf.sgd(0.1), model.init(0))
    step = rf.train_step(model, rf.cross_entropy_loss, rf.sgd(0.1))
    for _ in range(2):
        state, _ = step(state, ids, targets)
    assert step._flat.replayed
    with pytest.raises(ValueError, match=r"layer 0: embedding\(11, 8\).vjp: ids must lie in \[0, 11\)"):
        step(state, torch.full((4, T), V), targets)


def test_a_query_whose_every_key_is_masked_gets_the_out_proj_bias_not_nan():
    layer = rf.multi_head_attention(E, H)
    params = _perturbed(layer.init(0), torch.Generator().manual_seed(2))
    x, mask = _fully_masked(torch.Generator().manual_seed(3), torch.float32)
    y = layer(params, (x, mask))
    assert torch.equal(y[1], params["out_proj"]["bias"].expand(T, E))


def test_a_transformer_block_takes_a_plain_x_and_refuses_a_key_padding_pair_by_name():
    block = rf.transformer_block(E, H)
    with pytest.raises(TypeError, match=r"layer 0\.0: layer_norm\(8\)\.apply: x must be a torch.Tensor, got tuple"):
        block(block.init(0), (torch.zeros(B, T, E), _mask()))
