"""Shared fixtures: a tiny synthetic multimodal task that trains in well under a second."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

from miles.data import DatasetSplits, MultimodalDataset
from miles.models.encoders import MLPEncoder


def make_toy_splits(
    modalities: Sequence[str] = ("strong", "weak"),
    noise: Sequence[float] = (0.3, 1.5),
    *,
    n: tuple[int, int, int] = (240, 80, 80),
    num_classes: int = 4,
    features: int = 8,
    seed: int = 0,
    batchnorm: bool = False,
) -> DatasetSplits:
    """Each modality is a noisy copy of a class prototype; more noise = weaker modality."""
    g = torch.Generator().manual_seed(seed)
    protos = {m: torch.randn(num_classes, features, generator=g) for m in modalities}

    def split(size: int) -> MultimodalDataset:
        y = torch.randint(0, num_classes, (size,), generator=g)
        inputs = {
            m: protos[m][y] + s * torch.randn(size, features, generator=g)
            for m, s in zip(modalities, noise, strict=True)
        }
        return MultimodalDataset(inputs, y)

    def encoders(latent: int) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {}
        for m in modalities:
            enc = MLPEncoder(features, latent, hidden=(16,))
            if batchnorm:
                seq = torch.nn.Sequential(torch.nn.BatchNorm1d(features), enc)
                seq.out_features = latent  # type: ignore[assignment]
                out[m] = seq
            else:
                out[m] = enc
        return out

    return DatasetSplits(
        train=split(n[0]),
        val=split(n[1]),
        test=split(n[2]),
        modalities=tuple(modalities),
        num_classes=num_classes,
        multilabel=False,
        metric="accuracy",
        info={"name": "toy"},
        build_encoders=encoders,
    )


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads
    per test fight the other processes; one thread keeps the suite fast and steady."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def toy() -> DatasetSplits:
    return make_toy_splits()
