"""rf.linear(..., init=NAME) draws what torch.nn.init's twin draws from a generator in the same state."""

from __future__ import annotations

import pytest
import torch

import rdl_functional as rf

TWINS = {
    "torch_default": lambda w, g: torch.nn.init.kaiming_uniform_(w, a=5**0.5, generator=g),
    "xavier_uniform": lambda w, g: torch.nn.init.xavier_uniform_(w, generator=g),
    "xavier_normal": lambda w, g: torch.nn.init.xavier_normal_(w, generator=g),
    "kaiming_uniform": lambda w, g: torch.nn.init.kaiming_uniform_(w, generator=g),
    "kaiming_normal": lambda w, g: torch.nn.init.kaiming_normal_(w, generator=g),
    "orthogonal": lambda w, g: torch.nn.init.orthogonal_(w, generator=g),
    "zeros": lambda w, g: torch.nn.init.zeros_(w),
}


@pytest.mark.parametrize("name", sorted(rf.initializers.INITIALIZERS))
@pytest.mark.parametrize(("fan_in", "fan_out"), [(3, 5), (7, 2), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_initializer_equals_its_torch_nn_init_twin_and_the_bias_is_linears(name, fan_in, fan_out, dtype):
    params = rf.linear(fan_in, fan_out, init=name).init(torch.Generator().manual_seed(11), dtype=dtype)
    reference = torch.nn.Linear(fan_in, fan_out, dtype=dtype)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        TWINS[name](reference.weight, g)
        bound = 1 / fan_in**0.5  # then torch.nn.Linear's bias draw, from the same generator
        reference.bias.uniform_(-bound, bound, generator=g)
    assert torch.equal(params["weight"], reference.weight.detach())
    assert torch.equal(params["bias"], reference.bias.detach())
    assert params["weight"].dtype == dtype and params["weight"].is_contiguous()


def test_the_default_is_todays_linear_and_an_orthogonal_weight_is_orthogonal():
    assert all(torch.equal(a, b) for a, b in zip(rf.tree_leaves(rf.linear(4, 3).init(0)),
                                                 rf.tree_leaves(rf.linear(4, 3, init="torch_default").init(0)),
                                                 strict=True))
    w = rf.linear(6, 4, init="orthogonal").init(0, dtype=torch.float64)["weight"]
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=torch.float64))


def test_a_function_draws_the_weight_and_is_checked():
    def ones(generator, shape, dtype):
        return torch.ones(shape, dtype=dtype)

    layer = rf.linear(2, 3, init=ones)
    assert torch.equal(layer.init(0)["weight"], torch.ones(3, 2)) and "init=ones" in layer.name
    with pytest.raises(ValueError, match=r"init function must return a torch.float32 tensor of shape \(3, 2\), "
                                         r"got torch.float32 \(2, 3\)"):
        rf.linear(2, 3, init=lambda g, shape, dtype: torch.ones(2, 3)).init(0)
    with pytest.raises(ValueError, match=r"linear: init must be one of \[.*'zeros'\] or a function"):
        rf.linear(2, 3, init="he")
    with pytest.raises(TypeError, match=r"linear: init must be a name or a function"):
        rf.linear(2, 3, init=3)
