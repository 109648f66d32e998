from __future__ import annotations

import math

import pytest
import torch

import rdl_functional as rf


def test_disc_dataset_shapes_dtypes_and_range():
    x, labels = rf.disc_dataset(1000, 0)
    assert x.shape == (1000, 2) and x.dtype == torch.float32
    assert labels.shape == (1000,) and labels.dtype == torch.int64
    assert 0 <= x.min() and x.max() < 1
    assert set(labels.tolist()) == {0, 1}


def test_disc_labels_are_one_exactly_inside_the_disc():
    x, labels = rf.disc_dataset(5000, torch.Generator().manual_seed(1))
    distance = torch.hypot(x[:, 0] - 0.5, x[:, 1] - 0.5).double()
    radius = 1 / math.sqrt(2 * math.pi)
    far_from_edge = (distance - radius).abs() > 1e-6
    assert torch.equal(labels[far_from_edge], (distance < radius)[far_from_edge].long())


def test_disc_classes_are_balanced_as_the_disc_has_half_the_area():
    _, labels = rf.disc_dataset(20000, 2)
    assert abs(labels.double().mean().item() - 0.5) < 0.02


def test_disc_dataset_is_deterministic_and_advances_a_generator():
    g = torch.Generator().manual_seed(3)
    first, second = rf.disc_dataset(10, g)[0], rf.disc_dataset(10, g)[0]
    assert torch.equal(first, rf.disc_dataset(10, 3)[0])
    assert not torch.equal(first, second)


def test_disc_dataset_rejects_a_negative_size():
    with pytest.raises(ValueError, match=r"disc_dataset: n must be an int ≥ 0, got -1"):
        rf.disc_dataset(-1, 0)


def test_one_hot_matches_torch():
    labels = torch.tensor([0, 2, 1, 2])
    expected = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.equal(rf.one_hot(labels, 3), expected)
    assert rf.one_hot(labels, 3, dtype=torch.float64).dtype == torch.float64


def test_one_hot_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"one_hot: labels must lie in \[0, 2\), got values in \[-1, 1\]"):
        rf.one_hot(torch.tensor([1, -1]), 2)
    with pytest.raises(TypeError, match=r"one_hot: labels must be an integer tensor, got torch.float32"):
        rf.one_hot(torch.tensor([1.0]), 2)
    with pytest.raises(ValueError, match=r"one_hot: labels must have shape \(n,\), got \(1, 1\)"):
        rf.one_hot(torch.tensor([[1]]), 2)
