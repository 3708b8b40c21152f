import pytest
import torch

from s3prl_ekd.core.aggregation import build_targets, head_dims, head_weights, layerwise_average, layerwise_concat
from s3prl_ekd.errors import ConfigError


def test_layerwise_average_hand_computed():
    a = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2)   # (B, L, T, D)
    b = torch.tensor([3.0, 6.0]).reshape(1, 1, 1, 2)
    assert torch.equal(layerwise_average([a, b]), torch.tensor([2.0, 4.0]).reshape(1, 1, 1, 2))
    # weights 3:1 -> 0.75 * a + 0.25 * b
    assert torch.allclose(layerwise_average([a, b], [3, 1]), torch.tensor([1.5, 3.0]).reshape(1, 1, 1, 2))


def test_layerwise_average_keeps_layers_apart():
    a = torch.arange(2 * 3 * 4 * 5, dtype=torch.float).reshape(2, 3, 4, 5)
    b = -2 * a
    out = layerwise_average([a, b])
    assert out.shape == (2, 3, 4, 5)
    assert torch.allclose(out[:, 1], (a[:, 1] + b[:, 1]) / 2)


def test_layerwise_average_rejects_different_dims():
    with pytest.raises(ConfigError, match="one hidden dimension"):
        layerwise_average([torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 6)])


def test_layerwise_concat_hand_computed():
    a = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2)
    b = torch.tensor([7.0]).reshape(1, 1, 1, 1)
    assert torch.equal(layerwise_concat([a, b]), torch.tensor([1.0, 2.0, 7.0]).reshape(1, 1, 1, 3))


def test_build_targets_per_mode():
    a, b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 6)
    assert [t.shape[-1] for t in build_targets("layerwise_concat", [a, b])] == [10]
    multi = build_targets("multi_head", [a, b])
    assert len(multi) == 2 and multi[0] is a and multi[1] is b
    assert head_dims("layerwise_concat", [4, 6]) == [10]
    assert head_dims("multi_head", [4, 6]) == [4, 6]
    assert head_dims("layerwise_average", [4, 4]) == [4]
    assert head_weights("multi_head", [1.0, 2.0]) == [1.0, 2.0]
    assert head_weights("layerwise_average", [1.0, 2.0]) == [1.0]
    with pytest.raises(ConfigError):
        head_dims("layerwise_average", [4, 6])
