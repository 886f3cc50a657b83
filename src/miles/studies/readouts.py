"""Read-outs that separate what a method changes in the encoders from *which* epoch is chosen.

A run's test metrics are taken at the epoch chosen on validation (and at the last epoch, by
:mod:`miles.results`). Two more read-outs put every method on a common footing:

- **heads at a fixed epoch**: the test metric of every head with the weights of one epoch fixed in
  advance for every method (kept by :class:`Readouts` while the run trains: ``epoch<k>.pt``);
- **post-hoc linear probe**: per modality, a multinomial logistic regression trained on the
  *frozen* encoder's training-set latents and scored on the test set. It measures what an encoder
  learned whatever its own head did, with the chosen, the last and the fixed epoch's weights.

TODO: switch the probe to the library's post-hoc probe read-out once it lands on main (the
baselines work adds one); this minimal one is written here so the study can report it now.

Probe settings (:data:`PROBE`): latents standardised with the training set's mean and std, zero
initial weights, L-BFGS with a strong-Wolfe line search for at most 100 iterations, an L2
penalty of ``1e-3 * |W|^2 / 2`` on the mean cross-entropy. Deterministic on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from miles.report.document import write_json
from miles.studies.parallel import RunTask
from miles.studies.runner import PlannedRun
from miles.training.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint

__all__ = ["PROBE", "READOUTS", "Readouts", "fit_probe", "load_readouts", "snapshot_name"]

READOUTS = "readouts.json"
PENALTY = 1e-3
MAX_ITER = 100
#: the probe's settings, as recorded in ``readouts.json``
PROBE = {"penalty": PENALTY, "max_iter": MAX_ITER, "optimizer": "lbfgs (strong Wolfe)"}


def snapshot_name(epoch: int) -> str:
    return f"epoch{epoch}.pt"


def fit_probe(
    train: Tensor, train_y: Tensor, test: Tensor, num_classes: int, score: Callable[..., float]
) -> float:
    """Train a linear probe on ``train`` latents and return ``score(logits, test_y)``'s value on
    ``test`` (``score`` is called with the test logits only; it closes over the targets)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    x, xt = (train - mean) / std, (test - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=MAX_ITER, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, train_y)
        loss = loss + 0.5 * PENALTY * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return score(xt @ weight + bias)


def load_readouts(run_dir: str | Path | None) -> dict[str, Any] | None:
    """A run's ``readouts.json`` (``None`` when it has none)."""
    if run_dir is None or not (Path(run_dir) / READOUTS).is_file():
        return None
    import json

    data: dict[str, Any] = json.loads((Path(run_dir) / READOUTS).read_text(encoding="utf-8"))
    return data


@dataclass(frozen=True)
class Readouts(RunTask):
    """Keep epoch ``fixed_epoch``'s weights while a run trains; afterwards score its heads on
    test and (``probe``) the linear probes, into ``readouts.json``. Unimodal reference runs are
    skipped (their other encoders are frozen at initialisation)."""

    fixed_epoch: int | None
    probe: bool = True

    def epoch_hook(self, run: PlannedRun) -> Callable[[dict[str, Any]], None] | None:
        run_dir, fixed = run.run_dir, self.fixed_epoch
        if run_dir is None or fixed is None or run.config.strategy == "unimodal":
            return None

        def keep(row: dict[str, Any]) -> None:
            if int(row["epoch"]) == fixed:
                model = load_checkpoint(run_dir / LAST)["model"]
                save_checkpoint(run_dir / snapshot_name(fixed), {"model": model, "epoch": fixed})

        return keep

    def after(self, run: PlannedRun, result: Mapping[str, Any], data: Any) -> None:
        run_dir = run.run_dir
        if run_dir is None or run.config.strategy == "unimodal" or self.current(run_dir):
            return
        write_json(run_dir / READOUTS, self.score(run, result, data))

    def current(self, run_dir: Path) -> bool:
        """The run already has read-outs made with these settings (a run shared by two
        studies with other settings is scored again; its fixed epoch's weights may then be
        missing, and that read-out is left empty)."""
        existing = load_readouts(run_dir)
        return (
            existing is not None
            and existing.get("fixed_epoch") == self.fixed_epoch
            and (existing.get("probe_settings") is not None) == self.probe
        )

    def score(self, run: PlannedRun, result: Mapping[str, Any], data: Any) -> dict[str, Any]:
        """The read-outs of a finished run (see the module docstring)."""
        from miles.data import collate_multimodal
        from miles.metrics import make_metric
        from miles.models import JointFusionModel
        from miles.strategies import build_strategy
        from miles.training.trainer import Trainer

        assert run.run_dir is not None
        config = run.config
        torch.manual_seed(config.trainer.seed)
        model = JointFusionModel(
            data.build_encoders(config.latent_dim), data.num_classes, config.fusion
        )
        trainer = Trainer(
            model,
            build_strategy(config.strategy, **config.strategy_params),
            config.trainer,
            metric=data.metric,
            multilabel=data.multilabel,
            collate_fn=collate_multimodal,
        )

        def loader(dataset: Any) -> DataLoader:
            size = config.trainer.eval_batch_size
            return DataLoader(dataset, batch_size=size, collate_fn=collate_multimodal)

        probe = self.probe and not data.multilabel  # the probe is a softmax regression
        metric = make_metric(data.metric, data.num_classes, multilabel=data.multilabel)
        checkpoints = {"chosen": run.run_dir / BEST, "last": run.run_dir / LAST}
        if self.fixed_epoch is not None and self.fixed_epoch <= int(result["epochs_run"]):
            checkpoints["fixed"] = run.run_dir / snapshot_name(self.fixed_epoch)
        out: dict[str, Any] = {"fixed_epoch": self.fixed_epoch, "test_fixed": None, "probe": {}}
        for name, path in checkpoints.items():
            if not path.is_file():
                continue  # e.g. a run resumed past the fixed epoch by an older version
            model.load_state_dict(load_checkpoint(path)["model"])
            test = trainer.evaluate(loader(data.test), keep_latents=True)
            if name == "fixed":
                out["test_fixed"] = {"fused": test.fused, "unimodal": test.unimodal}
            if not probe:
                continue
            train = trainer.evaluate(loader(data.train), keep_latents=True)
            assert train.latents is not None and test.latents is not None
            assert train.target is not None and test.target is not None

            def score(logits: Tensor, target: Tensor = test.target) -> float:
                metric.reset()
                metric.update(logits, target)
                return float(metric.compute())

            out["probe"][name] = {
                m: fit_probe(
                    train.latents[m], train.target, test.latents[m], data.num_classes, score
                )
                for m in model.modalities
            }
        out["probe_settings"] = dict(PROBE) if probe else None
        return out
