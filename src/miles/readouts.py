"""Two unimodal readouts measured the same way for every method: a linear probe and the slice.

A method's own unimodal heads are not comparable across methods: with auxiliary losses they are
co-trained classifiers (MILES, G-Blend, MSES), without them they are online probes on detached
latents (``joint``, OGM, MSLR), and the papers' "vanilla" columns look like a third thing again,
the fused head read one modality at a time. So every run also reports two readouts that depend
only on the trained encoders (and the fused head), never on the method that trained them:

* **linear probe** (:func:`linear_probe`): per modality, a fresh ``Linear(d_m, C)`` trained on the
  *frozen* encoder's features of the training set, scored on the test set, as the OGM-GE paper
  (footnote 1: "fixing the joint-trained uni-modal encoder and finetuning a uni-modal classifier
  only") and G-Blend (Sec. 3.3: "we fix the main trunk and finetune the classifier") evaluate
  encoders. One recipe for every method (:class:`ProbeRecipe`; the sources fix none, so the
  defaults are ours, listed there);
* **fused-head slice** (:func:`slice_scores`): modality ``m``'s additive share of the fused logits,
  ``W[:, slice_m] z_m + b / N`` for concatenation, ``W z_m + b / N`` for summation (the fusion's
  :meth:`~miles.models.fusions.Fusion.modality_logits`), the per-modality prediction OGM's authors
  and BalanceBenchmark report. ``None`` for fusions that are not additive.

:func:`readouts` computes both for a trained model at its chosen epoch; ``run_experiment`` calls
it once per run after training and stores the result in ``result.json`` (``extra["readouts"]``),
where every table reads it. Everything runs under a forked, seeded random state: the readouts
never change a run, and the same encoders give the same numbers whatever method trained them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from miles.batch import move_batch
from miles.metrics import make_metric
from miles.models.fusion import JointFusionModel
from miles.models.losses import task_loss
from miles.validation import (
    check_bool,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)

__all__ = [
    "DEFAULT_RECIPE",
    "ProbeRecipe",
    "encode",
    "linear_probe",
    "readouts",
    "slice_scores",
]


@dataclass(frozen=True)
class ProbeRecipe:
    """How every post-hoc linear probe is trained (the same for every method and modality).

    No source fixes a recipe (OGM-GE, G-Blend and BalanceBenchmark say "fine-tune a new
    classifier" and nothing more), so every default is ours:

    Args:
        epochs: passes over the training features; 100 (a linear model on fixed features
            converges well within that at this learning rate; no early stopping, so the test set
            never chooses anything).
        lr: Adam step size, 1e-2.
        batch_size: 256 training samples per step.
        weight_decay: L2 on the probe's weights, 0.
        standardize: scale each feature to zero mean and unit variance with the *training* set's
            statistics before the probe (an affine change of coordinates a linear probe can undo,
            so it changes what the probe can express in no way; it makes one step size fit
            encoders whose latents have different scales, e.g. after OGM or a frozen encoder).
    """

    epochs: int = 100
    lr: float = 1e-2
    batch_size: int = 256
    weight_decay: float = 0.0
    standardize: bool = True

    def __post_init__(self) -> None:
        check_non_negative_int("epochs", self.epochs)
        check_positive("lr", self.lr)
        check_positive_int("batch_size", self.batch_size)
        check_non_negative("weight_decay", self.weight_decay)
        check_bool("standardize", self.standardize)


DEFAULT_RECIPE = ProbeRecipe()


@torch.no_grad()
def encode(
    model: JointFusionModel, loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor], Tensor]:
    """Every modality's latents over ``loader`` in eval mode (no grad), and the targets."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    latents: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
    targets: list[Tensor] = []
    try:
        for raw in loader:
            batch = move_batch(raw, device)
            z = model.encode(batch["inputs"], batch.get("lengths") or None)
            for m in model.modalities:
                latents[m].append(z[m].detach())
            targets.append(batch["target"])
    finally:
        model.train(was_training)
    if not targets:
        raise ValueError("encode: the loader is empty")
    return {m: torch.cat(v) for m, v in latents.items()}, torch.cat(targets)


def _score(
    logits: Tensor, target: Tensor, metric: str, num_classes: int, multilabel: bool
) -> float:
    scorer = make_metric(metric, num_classes, multilabel=multilabel).to(logits.device)
    scorer.update(torch.sigmoid(logits) if multilabel else logits, target)
    return float(scorer.compute())


@torch.no_grad()
def slice_scores(
    model: JointFusionModel,
    latents: Mapping[str, Tensor],
    target: Tensor,
    *,
    metric: str,
    multilabel: bool = False,
) -> dict[str, float] | None:
    """Each modality's fused-head slice, scored: ``metric(modality_logits(latents, m), target)``.

    ``None`` when the model's fusion is not additive (it has no per-modality share; tables show
    ``-``).
    """
    scores: dict[str, float] = {}
    for m in model.modalities:
        try:
            logits = model.fusion.modality_logits(latents, m)
        except NotImplementedError:
            return None
        scores[m] = _score(logits, target, metric, model.num_classes, multilabel)
    return scores


def _standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def linear_probe(
    train_latents: Mapping[str, Tensor],
    train_target: Tensor,
    test_latents: Mapping[str, Tensor],
    test_target: Tensor,
    *,
    num_classes: int,
    metric: str,
    multilabel: bool = False,
    seed: int = 0,
    recipe: ProbeRecipe = DEFAULT_RECIPE,
) -> dict[str, float]:
    """Train one linear probe per modality on fixed features and score it on the test features.

    The probe's initialisation and batch order come from ``seed`` (modality ``i`` uses
    ``seed + i``), under a forked random state; the caller's random streams are untouched.
    """
    check_non_negative_int("seed", seed)
    if not isinstance(recipe, ProbeRecipe):
        raise TypeError(f"recipe must be a ProbeRecipe, got {type(recipe).__name__}")
    missing = sorted(set(train_latents) ^ set(test_latents))
    if missing:
        raise ValueError(f"train and test latents differ in modalities {missing}")
    scores: dict[str, float] = {}
    device = train_target.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, (m, train_z) in enumerate(train_latents.items()):
            train_x, test_x = train_z.float(), test_latents[m].float()
            if recipe.standardize:
                train_x, test_x = _standardize(train_x, test_x)
            torch.manual_seed(seed + i)
            probe = nn.Linear(train_x.shape[1], num_classes).to(device)
            optimizer = torch.optim.Adam(
                probe.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
            )
            order = torch.Generator().manual_seed(seed + i)
            n = train_x.shape[0]
            for _ in range(recipe.epochs):
                for idx in torch.randperm(n, generator=order).split(recipe.batch_size):
                    idx = idx.to(device)
                    loss = task_loss(probe(train_x[idx]), train_target[idx], multilabel=multilabel)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            with torch.no_grad():
                scores[m] = _score(probe(test_x), test_target, metric, num_classes, multilabel)
    return scores


def readouts(
    model: JointFusionModel,
    train: Dataset,
    test: Dataset,
    *,
    metric: str,
    multilabel: bool = False,
    seed: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    recipe: ProbeRecipe = DEFAULT_RECIPE,
    split: str = "test",
) -> dict[str, Any]:
    """Both readouts of ``model`` as it is now (the run's chosen epoch, after ``Trainer.fit``).

    Returns ``{"probe": {m: score}, "slice": {m: score} | None, "split": split, "recipe": {...}}``:
    the probe trained on ``train`` and both readouts scored on ``test`` (``split`` names it).
    The model is put back in the mode it was in; its weights are not touched.
    """
    check_positive_int("batch_size", batch_size)
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # DataLoader iterators draw from the global RNG
        torch.manual_seed(seed)
        train_z, train_y = encode(
            model, DataLoader(train, batch_size=batch_size, collate_fn=collate_fn), device
        )
        test_z, test_y = encode(
            model, DataLoader(test, batch_size=batch_size, collate_fn=collate_fn), device
        )
    probe = linear_probe(
        train_z,
        train_y,
        test_z,
        test_y,
        num_classes=model.num_classes,
        metric=metric,
        multilabel=multilabel,
        seed=seed,
        recipe=recipe,
    )
    sliced = slice_scores(model, test_z, test_y, metric=metric, multilabel=multilabel)
    return {"probe": probe, "slice": sliced, "split": split, "recipe": asdict(recipe)}
