"""Train a copy of the run's model on the side, without disturbing the run itself.

Several balancing methods train extra networks next to the main run: G-Blend trains one copy per
head from the current checkpoint to measure how each head over-fits, UMT trains unimodal teachers
first, ReconBoost trains one branch at a time. :func:`train_copy` is the one way to do it, so every
such method trains its copies the same way: a deep copy (or a given model) trained for a number of
epochs with the run's optimizer settings (``ctx.make_optimizer``) and the run's step primitives
(so device, precision and clipping settings apply), on a loader of its own.

The run stays exactly as it would be without the copy: the copy's shuffling uses its own seeded
generator, and the global random streams (dropout, noise) are forked and restored, so a method that
estimates something on the side changes the main run only through what it decides from the
estimate. That keeps resumption exact and makes "same seed, same numbers" hold whether or not a
copy was trained. :func:`mean_head_losses` measures a copy (or the run's model) on the side the
same way, and :func:`in_order` gives an unshuffled pass over the training data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from miles.batch import move_batch
from miles.models.fusion import FusionOutput, JointFusionModel
from miles.strategies.base import StrategyContext
from miles.validation import check_non_negative_int

#: ``loss_fn(losses, output, batch) -> scalar``, the same signature as ``Strategy.loss``
LossFn = Callable[[Mapping[str, Tensor], FusionOutput, Mapping[str, Any]], Tensor]


def reshuffled(loader: DataLoader, seed: int) -> DataLoader:
    """``loader``'s dataset, batch size and collate function with its own shuffling generator."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def in_order(loader: DataLoader) -> DataLoader:
    """``loader``'s dataset, batch size and collate function, unshuffled: an evaluation pass over
    the training data (e.g. MILES's training-set metrics) that leaves the training loader's
    shuffling stream where it was."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=False,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


@torch.no_grad()
def mean_head_losses(
    ctx: StrategyContext, loader: DataLoader, model: JointFusionModel | None = None
) -> dict[str, float]:
    """Per-head mean loss (``"fused"`` and one per modality) of ``model`` (default: the run's) over
    ``loader``, in eval mode, per sample, with the run's loss function.

    Runs under a forked random state (a DataLoader iterator draws its seed from the global
    generator), so measuring a copy, or the run itself, on the side changes nothing in the run.
    """
    net = ctx.model if model is None else model
    was_training = net.training
    sums: dict[str, float] = {}
    count = 0
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        net.eval()
        try:
            for raw in loader:
                batch = move_batch(raw, ctx.device)
                n = int(batch["target"].shape[0])
                for name, value in ctx.head_losses(ctx.forward(batch, model=net), batch).items():
                    sums[name] = sums.get(name, 0.0) + float(value) * n
                count += n
        finally:
            net.train(was_training)
    if count == 0:
        raise ValueError("mean_head_losses: the loader is empty")
    return {name: total / count for name, total in sums.items()}


def train_copy(
    ctx: StrategyContext,
    loss_fn: LossFn,
    *,
    epochs: int,
    seed: int,
    model: JointFusionModel | None = None,
    loader: DataLoader | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    on_epoch_end: Callable[[int, JointFusionModel], None] | None = None,
) -> JointFusionModel:
    """Train a copy of ``ctx.model`` (or ``model`` itself) for ``epochs`` and return it.

    Args:
        ctx: the run's context (its model, optimizer factory, step primitives, training loader).
        loss_fn: what the copy minimises, e.g. one head's loss only.
        epochs: full passes over ``loader`` (0 returns the untrained copy).
        seed: seeds the copy's shuffling; the run's own generators are not touched.
        model: train this model in place instead of a deep copy of ``ctx.model``.
        loader: the batches to train on (default: ``ctx.train_loader``, reshuffled with ``seed``).
        param_groups: the copy's optimizer groups (default: one group of all its trainable
            parameters at the run's base learning rate).
        on_epoch_end: called as ``on_epoch_end(epoch, copy)`` after each epoch (``epoch`` from 1),
            e.g. to score the copy and keep its best weights; it may switch the copy to eval mode
            (each epoch starts in training mode again).
    """
    check_non_negative_int("epochs", epochs)
    if ctx.make_optimizer is None:
        raise ValueError("train_copy needs ctx.make_optimizer (the trainer provides it)")
    source = loader if loader is not None else ctx.train_loader
    if source is None:
        raise ValueError("train_copy needs a loader (ctx.train_loader is not set)")
    net = copy.deepcopy(ctx.model) if model is None else model
    groups = param_groups
    if groups is None:
        groups = [{"params": [p for p in net.parameters() if p.requires_grad]}]
    optimizer = ctx.make_optimizer(groups)
    batches = reshuffled(source, seed) if loader is None else source
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            net.train()
            for raw in batches:
                batch = move_batch(raw, ctx.device)
                output = ctx.forward(batch, model=net)
                loss = loss_fn(ctx.head_losses(output, batch), output, batch)
                ctx.zero_grad(optimizer)
                ctx.backward(loss, optimizer)
                ctx.optimizer_step(optimizer)
            if on_epoch_end is not None:
                on_epoch_end(epoch, net)
    return net
