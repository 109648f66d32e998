from __future__ import annotations

import pytest
import torch

import rdl_functional as rf

TREE = {"0": {"weight": 1, "bias": 2}, "1": {}, "2": {"sub": {"w": 3}}}


def test_leaves_follow_key_order_and_skip_empty_dicts():
    assert rf.tree_leaves(TREE) == [1, 2, 3]
    assert rf.tree_leaves(5) == [5]


def test_flatten_and_unflatten_round_trip_without_empty_entries():
    flat = rf.tree_flatten(TREE)
    assert flat == {"0.weight": 1, "0.bias": 2, "2.sub.w": 3}
    assert rf.tree_unflatten(flat) == {"0": {"weight": 1, "bias": 2}, "2": {"sub": {"w": 3}}}


def test_flatten_rejects_keys_that_cannot_be_read_back():
    with pytest.raises(ValueError, match=r"key 'a.b' at \"0\" must be a non-empty string without dots"):
        rf.tree_flatten({"0": {"a.b": 1}})
    with pytest.raises(ValueError, match=r"key 3 at the root"):
        rf.tree_flatten({3: 1})


def test_unflatten_rejects_a_path_that_is_both_leaf_and_prefix():
    with pytest.raises(ValueError, match=r'"0" is a leaf and also the prefix of "0.weight"'):
        rf.tree_unflatten({"0": 1, "0.weight": 2})
    with pytest.raises(ValueError, match=r'"0" is a leaf and also the prefix of another path'):
        rf.tree_unflatten({"0.weight": 2, "0": 1})
    with pytest.raises(ValueError, match=r"'0..w' is not a dotted path of non-empty keys"):
        rf.tree_unflatten({"0..w": 1})


def test_map_keeps_structure_and_order():
    doubled = rf.tree_map(lambda x: 2 * x, TREE)
    assert doubled == {"0": {"weight": 2, "bias": 4}, "1": {}, "2": {"sub": {"w": 6}}}
    assert list(doubled["0"]) == ["weight", "bias"]


def test_map_over_several_trees_pairs_leaves_by_key_not_position():
    other = {"2": {"sub": {"w": 30}}, "1": {}, "0": {"bias": 20, "weight": 10}}
    expected = {"0": {"weight": 11, "bias": 22}, "1": {}, "2": {"sub": {"w": 33}}}
    assert rf.tree_map(lambda a, b: a + b, TREE, other) == expected


def test_map_names_the_first_differing_path():
    with pytest.raises(ValueError, match=r'tree_map: trees\[1\] has no entry at "0.bias" that tree has'):
        rf.tree_map(lambda a, b: a, TREE, {"0": {"weight": 1}, "1": {}, "2": {"sub": {"w": 3}}})
    with pytest.raises(ValueError, match=r'trees\[1\] has an entry at "3" that tree lacks'):
        rf.tree_map(lambda a, b: a, TREE, {**TREE, "3": 1})
    with pytest.raises(ValueError, match=r'tree has a dict at "1" but trees\[1\] has a int'):
        rf.tree_map(lambda a, b: a, TREE, {**TREE, "1": 0})


def test_difference_compares_leaf_shapes_and_dtypes_only_when_asked():
    a, b = {"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 2)}
    assert rf.tree_same_structure(a, b)
    assert rf.tree_difference(a, b, names=("params", "grads"), leaves=True) == (
        'params has a float32 tensor of shape (2, 3) at "w" but grads has a float32 tensor of shape (3, 2)'
    )
    assert rf.tree_difference(a, {"w": torch.zeros(2, 3, dtype=torch.float64)}, leaves=True).endswith(
        "float64 tensor of shape (2, 3)"
    )
