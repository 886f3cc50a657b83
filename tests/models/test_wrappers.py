"""ProjectedEncoder: uint8 scaling, per-channel normalisation, projection only when needed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miles.models.wrappers import ProjectedEncoder


class _Mean(nn.Module):
    """Backbone that returns each channel's mean: easy to check by hand."""

    out_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_uint8_is_scaled_and_normalised() -> None:
    enc = ProjectedEncoder(_Mean(), mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0])
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    assert isinstance(enc.proj, nn.Identity) and enc.out_features == 3
    torch.testing.assert_close(enc(x), torch.tensor([[2.0, 1.0, 0.5]] * 2))
    floats = torch.full((1, 3, 2, 2), 0.5)
    torch.testing.assert_close(enc(floats), torch.zeros(1, 3))  # floats are taken as [0, 1]


def test_projection_only_when_sizes_differ() -> None:
    enc = ProjectedEncoder(_Mean(), 8)
    assert isinstance(enc.proj, nn.Linear) and enc.out_features == 8
    assert enc(torch.rand(2, 3, 4, 4)).shape == (2, 8)
    assert isinstance(ProjectedEncoder(_Mean(), 3).proj, nn.Identity)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="out_features"):
        ProjectedEncoder(nn.ReLU())
    with pytest.raises(ValueError, match="both mean and std"):
        ProjectedEncoder(_Mean(), mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="latent_dim"):
        ProjectedEncoder(_Mean(), 0)
