"""One wrapper that makes any feature backbone a fusion encoder of a chosen latent size.

Cached images are uint8 (4x smaller than float32 on disk); pretrained torchvision-format weights
expect ImageNet-normalised floats; sum fusion needs every latent the same size. This wrapper does
those three things, so each dataset only picks its backbone and statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from miles.validation import check_positive_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ProjectedEncoder(nn.Module):
    """``backbone`` with input scaling, optional per-channel normalisation and a projection.

    uint8 input becomes float in [0, 1]; other input is cast to float as it is. With ``mean`` and
    ``std`` the input is then standardised per channel. A ``Linear`` maps the backbone's
    ``out_features`` to ``latent_dim`` unless they are equal or ``latent_dim`` is ``None``.
    The backbone's parameters live under ``backbone.`` (load pretrained weights before wrapping).
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        latent_dim: int | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        width = getattr(backbone, "out_features", None)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise TypeError(f"backbone must declare a positive int out_features, got {width!r}")
        if latent_dim is not None:
            check_positive_int("latent_dim", latent_dim)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.backbone = backbone
        size = width if latent_dim is None else latent_dim
        self.proj: nn.Module = nn.Identity() if size == width else nn.Linear(width, size)
        self.out_features = size
        self.normalize = mean is not None
        m = torch.tensor(mean if mean is not None else [0.0], dtype=torch.float32)
        s = torch.tensor(std if std is not None else [1.0], dtype=torch.float32)
        self.register_buffer("mean", m.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", s.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.mean.dtype) / 255.0 if x.dtype == torch.uint8 else x.to(self.mean.dtype)
        if self.normalize:
            x = (x - self.mean) / self.std
        out: Tensor = self.proj(self.backbone(x))
        return out
