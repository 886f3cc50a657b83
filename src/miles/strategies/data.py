"""What a strategy may read of the run's data, and how it replaces the next epoch's training rows.

Several balancing methods look at the whole training set between epochs, or change it:

- Diagnosing & Re-learning clusters every training and validation latent after an epoch;
- the sample- and modality-level valuation methods value each training sample by the fused
  prediction with one modality's latent zeroed, then train the next epoch on a re-sampled set in
  which some rows repeat with a modality masked;
- UMT picks its unimodal teachers by their validation accuracy.

:class:`StrategyData` (``ctx.data``, built by the trainer) is the one way to do that:

- :meth:`StrategyData.loader` iterates a split (``"train"``, ``"val"``, ``"holdout"``) in a fixed
  order with the evaluation batch size; each batch carries ``"index"``, the rows' positions in that
  split. Its shuffling stream is its own, so a pass never moves the run's random streams: a
  strategy whose decisions end up doing nothing trains exactly like its parent method.
- :meth:`StrategyData.collect` is one eval-mode, no-grad pass of a model over a split: every latent,
  target and index (:class:`Collected`).
- :meth:`StrategyData.set_train_plan` replaces the rows the next epochs train on by a
  :class:`TrainPlan`: positions in the training part (repeats allowed) and, optionally, one keep
  mask per row and modality. The trainer iterates the plan shuffled with the run's own generator;
  a masked modality's latent is zeroed before the fused head (see :func:`keep_modalities`), as the
  valuation methods' authors do. ``set_train_plan(None)`` goes back to the plain training set.

The plan is not saved by the trainer: a strategy that sets one keeps it in its ``state_dict``
(:meth:`TrainPlan.state_dict`) and sets it again in ``on_fit_start``, so a resumed run trains on
the same rows in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from miles.batch import move_batch
from miles.models.fusion import FusionOutput, JointFusionModel

__all__ = [
    "SPLITS",
    "Collected",
    "StrategyData",
    "TrainPlan",
    "keep_modalities",
]

#: the splits a strategy may read (``"holdout"`` exists when the strategy holds data out)
SPLITS = ("train", "val", "holdout")


@dataclass(frozen=True)
class TrainPlan:
    """The rows the next epochs train on.

    Attributes:
        rows: ``(R,)`` int64 positions in the training part; a position may repeat.
        keep: ``(R, M)`` bool, ``keep[r, j]`` is False when row ``r`` trains with modality
            ``modalities[j]`` masked (its latent zeroed before the fused head); ``None``: every
            modality kept.
        modalities: the column order of ``keep``.
    """

    rows: Tensor
    keep: Tensor | None
    modalities: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.rows, Tensor) or self.rows.dim() != 1:
            raise ValueError("TrainPlan.rows must be a 1-D tensor of row positions")
        if self.rows.dtype != torch.long:
            raise TypeError(f"TrainPlan.rows must be int64, got {self.rows.dtype}")
        if self.rows.numel() == 0:
            raise ValueError("TrainPlan.rows is empty: an epoch needs at least one row")
        if self.keep is not None:
            shape = (self.rows.numel(), len(self.modalities))
            if self.keep.dtype != torch.bool or tuple(self.keep.shape) != shape:
                raise ValueError(
                    f"TrainPlan.keep must be a bool tensor of shape {shape} (rows x modalities), "
                    f"got {self.keep.dtype} {tuple(self.keep.shape)}"
                )

    def state_dict(self) -> dict[str, Any]:
        """Tensors and builtins only (what a strategy's ``state_dict`` may hold)."""
        return {"rows": self.rows, "keep": self.keep, "modalities": list(self.modalities)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> TrainPlan:
        return cls(state["rows"], state["keep"], tuple(state["modalities"]))


@dataclass
class Collected:
    """One pass over a split: every latent ``{modality: (N, d_m)}``, target and row position."""

    latents: dict[str, Tensor]
    target: Tensor
    index: Tensor


def keep_modalities(model: JointFusionModel, output: FusionOutput, keep: Tensor) -> FusionOutput:
    """``output`` with each row's masked modalities zeroed before the fused head.

    ``keep`` is ``(batch, M)`` bool in ``model.modalities`` order. The fused logits are recomputed
    from the masked latents (the latents returned are the masked ones, what the fused head saw);
    the unimodal heads keep reading their own modality's unmasked latent.
    """
    names = model.modalities
    if keep.dim() != 2 or keep.shape[1] != len(names):
        raise ValueError(
            f"keep must be (batch, {len(names)}) for modalities {list(names)}, "
            f"got {tuple(keep.shape)}"
        )
    if bool(keep.all()):
        return output
    masked = {
        m: output.latents[m] * keep[:, j].to(output.latents[m].dtype).unsqueeze(1)
        for j, m in enumerate(names)
    }
    return FusionOutput(model.fused_logits(masked), output.unimodal, masked)


class _Rows(Dataset[tuple[Any, int, Tensor | None]]):
    """Rows of a dataset, each with its position in that dataset and its keep mask."""

    def __init__(self, dataset: Dataset, rows: Sequence[int], keep: Tensor | None) -> None:
        self.dataset = dataset
        self.rows = list(rows)
        self.keep = keep

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, int, Tensor | None]:
        row = self.rows[i]
        return self.dataset[row], row, None if self.keep is None else self.keep[i]


class _CollateRows:
    """The run's collate function, plus ``"index"`` (and ``"keep"`` when the rows carry one)."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]] | None) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[Any, int, Tensor | None]]) -> dict[str, Any]:
        samples = [item for item, _, _ in items]
        collate = self.collate if self.collate is not None else default_collate
        batch = dict(collate(samples))
        batch["index"] = torch.tensor([row for _, row, _ in items], dtype=torch.long)
        if items[0][2] is not None:
            batch["keep"] = torch.stack([keep for _, _, keep in items])  # type: ignore[misc]
        return batch


class StrategyData:
    """The run's splits for strategies: ordered passes, collected latents and a training plan.

    Built by the trainer (``ctx.data``); see the module docstring for what each part is for.

    Args:
        splits: ``{"train": the training part (without any holdout), "val": ..., "holdout":
            ... or None}``.
        batch_size: the training batch size (a plan's loader uses it).
        eval_batch_size: the batch size of :meth:`loader` and :meth:`collect`.
        collate_fn: the run's collate function.
        generator: the run's training shuffling stream (a plan's loader shuffles with it).
        default_loader: what the trainer iterates when no plan is set.
        device: where batches go for :meth:`collect`.
        seed: the run's seed, for strategies that draw their own random numbers.
        modalities: the model's modalities (the column order of a plan's keep mask).
    """

    def __init__(
        self,
        splits: Mapping[str, Dataset | None],
        *,
        batch_size: int,
        eval_batch_size: int,
        collate_fn: Callable[[list[Any]], dict[str, Any]] | None,
        generator: torch.Generator,
        default_loader: DataLoader,
        device: torch.device,
        seed: int,
        modalities: Sequence[str],
    ) -> None:
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown splits {unknown}; expected some of {list(SPLITS)}")
        self._splits = dict(splits)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.collate_fn = collate_fn
        self.generator = generator
        self.default_loader = default_loader
        self.device = device
        self.seed = seed
        self.modalities = tuple(modalities)
        self._plan: TrainPlan | None = None

    # -- reading ---------------------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split``; a clear error for an unknown or absent split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        found = self._splits.get(split)
        if found is None:
            raise ValueError(
                f"this run has no {split!r} split (a holdout exists only when the strategy sets "
                "holdout_fraction > 0)"
            )
        return found

    def size(self, split: str) -> int:
        """Number of rows of ``split``."""
        return len(self.dataset(split))  # type: ignore[arg-type]

    def loader(self, split: str) -> DataLoader:
        """``split`` in its own order, evaluation batch size; batches carry ``"index"``.

        The loader has its own (fixed) generator: iterating it never draws from the global random
        stream, which a plain ``DataLoader`` does once per pass.
        """
        data = self.dataset(split)
        rows = range(len(data))  # type: ignore[arg-type]
        return DataLoader(
            _Rows(data, rows, None),
            batch_size=self.eval_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(0),
            collate_fn=_CollateRows(self.collate_fn),
        )

    @torch.no_grad()
    def collect(self, split: str, model: JointFusionModel) -> Collected:
        """Every latent of ``split`` from one eval-mode, no-grad pass of ``model`` (its training
        mode is restored afterwards)."""
        was_training = model.training
        model.eval()
        latents: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
        targets: list[Tensor] = []
        index: list[Tensor] = []
        try:
            for raw in self.loader(split):
                batch = move_batch(raw, self.device)
                encoded = model.encode(batch["inputs"], batch["lengths"] or None)
                for m in model.modalities:
                    latents[m].append(encoded[m])
                targets.append(batch["target"])
                index.append(raw["index"])
        finally:
            model.train(was_training)
        return Collected(
            {m: torch.cat(v) for m, v in latents.items()}, torch.cat(targets), torch.cat(index)
        )

    # -- the training plan -----------------------------------------------------------------------
    @property
    def train_plan(self) -> TrainPlan | None:
        """The plan the next epochs train on (``None``: the plain training set)."""
        return self._plan

    def set_train_plan(self, plan: TrainPlan | None) -> None:
        """Train the next epochs on ``plan``'s rows (``None``: the plain training set again)."""
        if plan is not None:
            if not isinstance(plan, TrainPlan):
                raise TypeError(f"plan must be a TrainPlan or None, got {type(plan).__name__}")
            if plan.modalities != self.modalities:
                raise ValueError(
                    f"the plan's keep columns are {list(plan.modalities)}, the model's modalities "
                    f"{list(self.modalities)}"
                )
            n = self.size("train")
            if int(plan.rows.min()) < 0 or int(plan.rows.max()) >= n:
                raise ValueError(f"TrainPlan.rows must lie in [0, {n}) (the training part)")
        self._plan = plan

    def epoch_loader(self) -> DataLoader:
        """What the next epoch iterates: the run's training loader, or the plan's rows shuffled
        with the run's generator (batches then carry ``"index"`` and, with a mask, ``"keep"``)."""
        plan = self._plan
        if plan is None:
            return self.default_loader
        return DataLoader(
            _Rows(self.dataset("train"), plan.rows.tolist(), plan.keep),
            batch_size=self.batch_size,
            shuffle=True,
            generator=self.generator,
            collate_fn=_CollateRows(self.collate_fn),
        )
