"""Small per-modality encoders (torch only) that map one modality to a latent vector.

Every encoder is an ``nn.Module`` with an int attribute ``out_features`` (the latent size the fusion
module needs) and ``forward(x)`` or, for sequences, ``forward(x, lengths)``. They are deliberately
small: the benchmark tasks are easy and the point is the balance between modalities, not capacity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from miles.validation import check_fraction, check_positive_int

__all__ = ["ImageCNN", "MLPEncoder", "SequenceEncoder", "check_lengths"]


class ImageCNN(nn.Module):
    """Conv-BN-ReLU-maxpool blocks, an adaptive average pool to ``pool_size x pool_size`` and a
    linear projection.

    Sized for 28x28 digits but accepts any HxW (pooling uses ``ceil_mode``). The pool keeps a
    coarse spatial layout (4x4 by default) because a global average pool after two small convs
    throws away where strokes are, which is most of what identifies a digit. Input
    ``(B, C, H, W)``, or ``(B, H, W)`` when ``in_channels == 1``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 64,
        channels: Sequence[int] = (16, 32),
        pool_size: int = 4,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_features = check_positive_int("out_features", out_features)
        check_positive_int("pool_size", pool_size)
        if len(channels) == 0:
            raise ValueError(f"channels must be a non-empty sequence of ints >= 1, got {channels}")
        for i, c in enumerate(channels):
            check_positive_int(f"channels[{i}]", c)
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            layers += [
                nn.Conv2d(prev, c, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            prev = c
        layers += [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(prev * pool_size * pool_size, out_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ImageCNN expects (B, {self.in_channels}, H, W)"
                + (" or (B, H, W)" if self.in_channels == 1 else "")
                + f", got shape {tuple(x.shape)}"
            )
        return self.proj(self.features(x))


def check_lengths(lengths: Tensor | None, batch: int, steps: int) -> Tensor:
    """Sequence lengths as a CPU int64 ``(batch,)`` tensor (packed RNNs need them on the CPU);
    ``None`` means every sequence is full length. Lengths outside ``[1, steps]`` are an error."""
    if lengths is None:
        return torch.full((batch,), steps, dtype=torch.long)
    lengths_cpu = torch.as_tensor(lengths).detach().to("cpu", torch.long).reshape(-1)
    if lengths_cpu.numel() != batch:
        raise ValueError(f"lengths must have {batch} entries, got {lengths_cpu.numel()}")
    if batch and (int(lengths_cpu.min()) < 1 or int(lengths_cpu.max()) > steps):
        raise ValueError(
            f"lengths must lie in [1, {steps}], got min {int(lengths_cpu.min())} "
            f"max {int(lengths_cpu.max())}"
        )
    return lengths_cpu


class SequenceEncoder(nn.Module):
    """1-D conv front (kernel 3) + GRU over ``(B, T, F)`` frame sequences; padding-invariant.

    The output of a sequence does not depend on how much zero padding follows it in a batch:
    input frames beyond each length are zeroed before the conv (so the last valid frame sees
    zeros, exactly as at the end of an unpadded sequence), conv outputs beyond each length are
    zeroed, and the GRU runs on a packed sequence so it stops at each length. Returns the last
    hidden state projected to ``out_features``. No batch norm: batch statistics would mix in
    padded frames.
    """

    def __init__(
        self, in_features: int, out_features: int = 64, hidden: int = 64, conv_channels: int = 64
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        check_positive_int("hidden", hidden)
        check_positive_int("conv_channels", conv_channels)
        self.conv = nn.Conv1d(in_features, conv_channels, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.gru = nn.GRU(conv_channels, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[2] != self.in_features:
            raise ValueError(
                f"SequenceEncoder expects (B, T, {self.in_features}), got shape {tuple(x.shape)}"
            )
        batch, steps, _ = x.shape
        lengths_cpu = check_lengths(lengths, batch, steps)
        # (B, T, 1) mask of valid frames, on the input's device.
        valid = torch.arange(steps, device=x.device)[None, :] < lengths_cpu.to(x.device)[:, None]
        mask = valid.unsqueeze(-1).to(x.dtype)
        h = self.conv((x * mask).transpose(1, 2)).transpose(1, 2)
        h = self.act(h) * mask
        packed = pack_padded_sequence(h, lengths_cpu, batch_first=True, enforce_sorted=False)
        _, h_n = self.gru(packed)
        return self.proj(h_n[-1])


class MLPEncoder(nn.Module):
    """Linear-ReLU(-dropout) stack for flat feature vectors; inputs ``(B, ...)`` are flattened."""

    def __init__(
        self,
        in_features: int,
        out_features: int = 64,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        for i, h in enumerate(hidden):
            check_positive_int(f"hidden[{i}]", h)
        check_fraction("dropout", dropout)
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Linear(prev, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLPEncoder expects {self.in_features} features per sample, got {x.shape[1]}"
            )
        return self.net(x)
