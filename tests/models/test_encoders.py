"""Small encoders: shapes, padding invariance, gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from miles.models.encoders import ImageCNN, MLPEncoder, SequenceEncoder


def test_image_cnn_shapes() -> None:
    torch.manual_seed(0)
    enc = ImageCNN(1, 16)
    assert enc.out_features == 16
    x = torch.rand(5, 1, 28, 28)
    assert enc(x).shape == (5, 16)
    enc.eval()
    assert torch.allclose(enc(x), enc(x.squeeze(1)))  # (B, H, W) gets a channel
    assert enc(torch.rand(2, 1, 15, 16)).shape == (2, 16)  # any HxW
    rgb = ImageCNN(3, 8, channels=(4, 8, 8))
    assert rgb(torch.rand(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(ValueError, match="shape"):
        rgb(torch.rand(2, 32, 32))


def test_mlp_encoder() -> None:
    enc = MLPEncoder(12, 7, hidden=(16, 8), dropout=0.1)
    assert enc.out_features == 7
    assert enc(torch.rand(4, 12)).shape == (4, 7)
    assert enc(torch.rand(4, 3, 4)).shape == (4, 7)  # flattened
    assert MLPEncoder(3, 2, hidden=())(torch.rand(1, 3)).shape == (1, 2)
    with pytest.raises(ValueError, match="12"):
        enc(torch.rand(4, 11))


def test_sequence_encoder_shapes_and_validation() -> None:
    enc = SequenceEncoder(13, 10, hidden=8, conv_channels=6)
    assert enc.out_features == 10
    x = torch.randn(3, 9, 13)
    assert enc(x).shape == (3, 10)
    assert torch.allclose(enc(x), enc(x, torch.tensor([9, 9, 9])))  # None means full length
    with pytest.raises(ValueError, match="lengths"):
        enc(x, torch.tensor([0, 9, 9]))
    with pytest.raises(ValueError, match="lengths"):
        enc(x, torch.tensor([10, 9, 9]))
    with pytest.raises(ValueError, match="13"):
        enc(torch.randn(3, 9, 12))


def test_sequence_encoder_is_padding_invariant() -> None:
    torch.manual_seed(0)
    enc = SequenceEncoder(5, 8, hidden=12, conv_channels=7)
    lengths = [4, 11, 1, 7]
    seqs = [torch.randn(t, 5) for t in lengths]
    batch = torch.zeros(len(seqs), 11, 5)
    for i, s in enumerate(seqs):
        # garbage (not zeros) in the padding must not matter either
        batch[i] = torch.randn(11, 5) * 100
        batch[i, : len(s)] = s
    out = enc(batch, torch.tensor(lengths))
    for i, s in enumerate(seqs):
        alone = enc(s.unsqueeze(0), torch.tensor([len(s)]))
        assert torch.allclose(out[i], alone[0], atol=1e-6), i
        assert torch.allclose(alone, enc(s.unsqueeze(0)), atol=1e-6)


@pytest.mark.parametrize(
    ("enc", "make_args"),
    [
        (ImageCNN(1, 4), lambda: (torch.rand(3, 1, 28, 28),)),
        (MLPEncoder(6, 4), lambda: (torch.rand(3, 6),)),
        (SequenceEncoder(3, 4, 5, 5), lambda: (torch.randn(3, 6, 3), torch.tensor([6, 2, 4]))),
    ],
)
def test_gradients_flow(
    enc: torch.nn.Module, make_args: Callable[[], tuple[torch.Tensor, ...]]
) -> None:
    args = make_args()
    x = args[0].requires_grad_(True)
    out = enc(*args)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
