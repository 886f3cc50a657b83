"""MILESCallback with real Lightning: decisions after validation, exact resume, logs."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from miles.integrations.lightning import MILESCallback  # noqa: E402
from miles.metrics import HeadMetrics  # noqa: E402
from miles.models import JointFusionModel, head_losses, modality_param_groups  # noqa: E402
from miles.models.encoders import MLPEncoder  # noqa: E402
from miles.scheduler import MILES  # noqa: E402

STEPS_PER_EPOCH = 3
WARMUP = 4


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP) * 0.9 ** (step // STEPS_PER_EPOCH)


class Fusion(L.LightningModule):
    """The README's pattern: log val/fused and val/head/<m>, return any optimizer + schedule."""

    def __init__(self, schedule: str = "step") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = JointFusionModel({m: MLPEncoder(6, 8) for m in ("strong", "weak")}, 4)
        self.heads = HeadMetrics(self.model.modalities, num_classes=4)
        self.schedule = schedule
        self.seen_lrs: list[list[float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen_lrs.append([float(g["lr"]) for g in self.trainer.optimizers[0].param_groups])
        x_strong, x_weak, y = batch
        out = self.model({"strong": x_strong, "weak": x_weak})
        return sum(head_losses(out, y).values())  # type: ignore[return-value]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x_strong, x_weak, y = batch
        self.heads.update(self.model({"strong": x_strong, "weak": x_weak}), y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.heads.compute().as_log_dict("val/"))
        self.heads.reset()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(modality_param_groups(self.model), lr=0.2)
        if self.schedule == "none":
            return optimizer
        if self.schedule == "miles-as-scheduler":  # what users tried before the callback
            return {"optimizer": optimizer, "lr_scheduler": MILES(optimizer)}
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(2, 4, 6, generator=g)

    def split(n: int) -> TensorDataset:
        y = torch.randint(0, 4, (n,), generator=g)
        strong = protos[0][y] + 0.3 * torch.randn(n, 6, generator=g)
        weak = protos[1][y] + 2.0 * torch.randn(n, 6, generator=g)
        return TensorDataset(strong, weak, y)

    return DataLoader(split(48), batch_size=16), DataLoader(split(32), batch_size=16)


def trainer(
    tmp: Path, epochs: int, callback: MILESCallback, extra: list[Any] = (), **kwargs: Any
) -> Any:
    options: dict[str, Any] = {"logger": False, "enable_checkpointing": bool(extra), **kwargs}
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, *extra],
        default_root_dir=str(tmp),
        **options,
    )


@pytest.fixture(autouse=True)
def _quiet_lightning() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning on torch 2.13
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
        yield


def test_four_epochs_then_two_plus_two_from_a_checkpoint(tmp_path: Path) -> None:
    train, val = loaders()
    straight_cb = MILESCallback(tau=0.05, mu=0.5)
    straight = Fusion()
    trainer(tmp_path / "a", 4, straight_cb).fit(straight, train, val)
    assert straight_cb.scheduler is not None
    history = straight_cb.scheduler.history
    assert len(history) == 4 and any(d.slowed for d in history)  # MILES acted

    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = Fusion()
    trainer(tmp_path / "b", 2, MILESCallback(tau=0.05, mu=0.5), extra=[checkpoint]).fit(
        first, train, val
    )
    resumed_cb = MILESCallback(tau=0.05, mu=0.5)
    resumed = Fusion()
    trainer(tmp_path / "c", 4, resumed_cb).fit(
        resumed, train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed_cb.scheduler is not None
    assert resumed_cb.scheduler.history == history  # identical decisions, u, LRs
    assert first.seen_lrs + resumed.seen_lrs == straight.seen_lrs  # every step's LRs, bit for bit
    got = [p for p in resumed.model.parameters()]
    want = [p for p in straight.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_decision_sets_the_next_epoch_on_top_of_the_schedule(tmp_path: Path) -> None:
    """Not one epoch late: epoch k trains at warmup(step) x factors of decision k - 1."""
    train, val = loaders()
    callback = MILESCallback(tau=0.05, mu=0.5)
    module = Fusion()
    trainer(tmp_path, 4, callback).fit(module, train, val)
    assert callback.scheduler is not None
    history = callback.scheduler.history
    modalities = [g["modality"] for g in callback.scheduler.optimizer.param_groups]
    for step, seen in enumerate(module.seen_lrs):
        epoch = step // STEPS_PER_EPOCH
        factors = history[epoch - 1].factors if epoch else {"strong": 1.0, "weak": 1.0}
        for lr, modality in zip(seen, modalities, strict=True):
            want = 0.2 * warmup(step) * (1.0 if modality is None else factors[modality])
            assert math.isclose(lr, want, rel_tol=1e-12), (step, modality)
    assert any(f < 1 for d in history[:-1] for f in d.factors.values())


def test_decisions_are_logged_as_flat_scalars(tmp_path: Path) -> None:
    train, val = loaders()
    logger = L.loggers.CSVLogger(str(tmp_path), name="run")
    t = trainer(tmp_path, 2, MILESCallback(tau=0.05), logger=logger, log_every_n_steps=1)
    t.fit(Fusion(), train, val)
    with open(Path(logger.log_dir) / "metrics.csv", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("miles/delta")]
    assert len(rows) == 2
    for key in ("miles/u/strong", "miles/u/weak", "miles/factor/weak", "miles/lr/strong"):
        assert rows[-1][key] != ""
    assert float(rows[0]["miles/lr/shared"]) > 0


def test_missing_metrics_are_named(tmp_path: Path) -> None:
    train, val = loaders()
    callback = MILESCallback(fused_key="val/acc")
    with pytest.raises(RuntimeError, match=r"no 'val/acc' among the logged metrics \['val/fused'"):
        trainer(tmp_path, 1, callback).fit(Fusion("none"), train, val)


def test_miles_returned_as_a_scheduler_warns_instead_of_silently_doing_nothing(
    tmp_path: Path,
) -> None:
    train, val = loaders()
    t = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    with pytest.warns(UserWarning, match=r"lightning\.MILESCallback"):
        t.fit(Fusion("miles-as-scheduler"), train, val)


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="mu"):
        MILESCallback(mu=2.0)
    with pytest.raises(ValueError, match="estimator"):
        MILESCallback(estimator="probe")
