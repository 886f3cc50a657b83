"""What the step-level strategy tests share: a small model, a random batch and a context around
them (no trainer), so each test drives ``training_step`` by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.strategies import StrategyContext


def small_model(
    modalities: Sequence[str] = ("a", "v"), *, latent: int = 2, classes: int = 3, seed: int = 0
) -> JointFusionModel:
    """Seeded MLP encoders of 3-d inputs, ``latent``-d latents, concat fusion."""
    torch.manual_seed(seed)
    encoders = {m: MLPEncoder(3, latent, hidden=(4,)) for m in modalities}
    return JointFusionModel(encoders, classes)


def random_batch(
    modalities: Sequence[str] = ("a", "v"), *, n: int = 6, classes: int = 3, seed: int = 1
) -> dict[str, Any]:
    """``n`` seeded examples of 3-d inputs per modality, in the collated batch layout."""
    torch.manual_seed(seed)
    return {
        "inputs": {m: torch.randn(n, 3) for m in modalities},
        "lengths": {},
        "target": torch.randint(0, classes, (n,)),
    }


def context_fields(
    model: JointFusionModel, *, lr: float = 0.1, momentum: float = 0.0, **extra: Any
) -> dict[str, Any]:
    """A context's fields: SGD over the trainable parameters, CPU, single-label accuracy."""
    params = [p for p in model.parameters() if p.requires_grad]
    return {
        "model": model,
        "optimizer": torch.optim.SGD(params, lr=lr, momentum=momentum),
        "device": torch.device("cpu"),
        "epochs": 1,
        "multilabel": False,
        "metric": "accuracy",
        "evaluate": lambda loader: None,
        **extra,
    }


def step_context(model: JointFusionModel, **options: Any) -> StrategyContext:
    """A :class:`StrategyContext` built from :func:`context_fields`."""
    return StrategyContext(**context_fields(model, **options))
