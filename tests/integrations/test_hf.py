"""MILESCallback with the real Hugging Face Trainer: decisions, schedule x factor, exact resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from miles.integrations.hf import FusionForTrainer, MILESCallback, head_metrics  # noqa: E402
from miles.models import FusionOutput, JointFusionModel  # noqa: E402
from miles.models.encoders import MLPEncoder  # noqa: E402
from miles.models.param_groups import param_groups_by_prefix  # noqa: E402

MODALITIES = ("strong", "weak")
BATCH, N_TRAIN = 16, 48
STEPS_PER_EPOCH = N_TRAIN // BATCH
EPOCHS, WARMUP, LR = 4, 2, 0.2


class Toy(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        protos = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(7))
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.strong = protos[0][self.y] + 0.3 * torch.randn(n, 6, generator=g)
        self.weak = protos[1][self.y] + 2.0 * torch.randn(n, 6, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"strong": self.strong[i], "weak": self.weak[i], "labels": self.y[i]}


class SmallFusion(nn.Module):
    """Our encoders, a head per modality and a fused head: a state dict of tensors only."""

    def __init__(self) -> None:
        super().__init__()
        self.modalities = MODALITIES
        self.encoders = nn.ModuleDict({m: MLPEncoder(6, 8) for m in MODALITIES})
        self.heads = nn.ModuleDict({m: nn.Linear(8, 4) for m in MODALITIES})
        self.fused_head = nn.Linear(16, 4)

    def forward(self, inputs: dict[str, torch.Tensor]) -> FusionOutput:
        z = {m: self.encoders[m](inputs[m]) for m in MODALITIES}
        fused = self.fused_head(torch.cat([z[m] for m in MODALITIES], dim=-1))
        return FusionOutput(fused, {m: self.heads[m](z[m]) for m in MODALITIES}, z)


def build(kind: str) -> FusionForTrainer:
    torch.manual_seed(0)
    if kind == "small":
        return FusionForTrainer(SmallFusion())
    return FusionForTrainer(JointFusionModel({m: MLPEncoder(6, 8) for m in MODALITIES}, 4))


class Recorder(transformers.TrainerCallback):
    """The LRs in force at every optimizer step; optionally stops after some epochs."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.lrs: list[list[float]] = []
        self.stop_after = stop_after

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.lrs.append([float(g["lr"]) for g in kwargs["optimizer"].param_groups])

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop_after is not None and state.epoch >= self.stop_after:
            control.should_training_stop = True  # after this epoch's evaluation and checkpoint


def make_trainer(out: Path, kind: str, callbacks: list[Any]) -> Any:
    model = build(kind)
    groups = param_groups_by_prefix(
        model,
        {m: [f"model.encoders.{m}.", f"model.heads.{m}."] for m in MODALITIES},
        shared="",  # the fused head
    )
    args = transformers.TrainingArguments(
        output_dir=str(out),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=32,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        report_to="none",
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Toy(N_TRAIN, 1),
        eval_dataset=Toy(32, 2),
        optimizers=(torch.optim.SGD(groups, lr=LR), None),  # HF adds cosine with warm-up
        compute_metrics=head_metrics(MODALITIES, num_classes=4),
        callbacks=callbacks,
    )


def lone_schedule() -> list[float]:
    """The LR multiplier HF's cosine-with-warm-up gives at each optimizer step, alone."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = transformers.get_cosine_schedule_with_warmup(opt, WARMUP, EPOCHS * STEPS_PER_EPOCH)
    out = []
    for _ in range(EPOCHS * STEPS_PER_EPOCH):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["small", "joint"])  # any module; a JointFusionModel
def test_four_epochs_then_two_plus_two_from_a_checkpoint(tmp_path: Path, kind: str) -> None:
    straight_cb, straight_rec = MILESCallback(tau=0.05, mu=0.5), Recorder()
    straight = make_trainer(tmp_path / "a", kind, [straight_cb, straight_rec])
    straight.train()
    assert straight_cb.scheduler is not None
    history = straight_cb.scheduler.history
    assert len(history) == EPOCHS and any(d.slowed for d in history)  # MILES acted

    # every step trains at HF's schedule x the factor of the previous evaluation's decision
    modalities = [g["modality"] for g in straight.optimizer.param_groups]
    for step, (seen, mult) in enumerate(zip(straight_rec.lrs, lone_schedule(), strict=True)):
        epoch = step // STEPS_PER_EPOCH
        factors = history[epoch - 1].factors if epoch else dict.fromkeys(MODALITIES, 1.0)
        for lr, modality in zip(seen, modalities, strict=True):
            want = LR * mult * (1.0 if modality is None else factors[modality])
            assert math.isclose(lr, want, rel_tol=1e-12, abs_tol=1e-15), (step, modality)

    first_rec = Recorder(stop_after=2)
    make_trainer(tmp_path / "b", kind, [MILESCallback(tau=0.05, mu=0.5), first_rec]).train()
    checkpoint = tmp_path / "b" / f"checkpoint-{2 * STEPS_PER_EPOCH}"
    assert (checkpoint / "model.safetensors").is_file()
    resumed_cb, resumed_rec = MILESCallback(tau=0.05, mu=0.5), Recorder()
    resumed = make_trainer(tmp_path / "c", kind, [resumed_cb, resumed_rec])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_cb.scheduler is not None
    assert resumed_cb.scheduler.history == history  # identical decisions, u and LRs
    assert first_rec.lrs + resumed_rec.lrs == straight_rec.lrs  # every step, bit for bit
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_decisions_reach_the_metrics_the_log_history_and_a_logger(tmp_path: Path) -> None:
    logged: list[dict[str, float]] = []
    callback = MILESCallback(tau=0.05, log=logged.append)
    trainer = make_trainer(tmp_path, "small", [callback])
    trainer.args.num_train_epochs = 2
    trainer.train()
    rows = [r for r in trainer.state.log_history if "miles/delta" in r]
    assert len(rows) == len(logged) == 2
    assert set(rows[0]) >= {"miles/u/strong", "miles/factor/weak", "miles/lr/strong", "step"}
    assert rows[-1]["miles/delta"] == logged[-1]["miles/delta"]
    evals = [r for r in trainer.state.log_history if "eval_fused" in r]
    assert {"eval_head/strong", "eval_head/weak"} <= set(evals[0])
    assert callback.scheduler is not None and len(callback.scheduler.history) == 2
    metrics = trainer.evaluate()  # after train(): evaluation only, no decision
    assert len(callback.scheduler.history) == 2 and "miles/delta" not in metrics


def test_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mu"):
        MILESCallback(mu=0.0)
    callback = MILESCallback()
    trainer = make_trainer(tmp_path, "small", [callback])
    trainer.compute_metrics = None
    with pytest.raises(KeyError, match=r"no 'eval_fused'.*head_metrics"):
        trainer.train()
    compute = head_metrics(MODALITIES, num_classes=4)
    bad = transformers.EvalPrediction(predictions=torch.zeros(2, 4).numpy(), label_ids=None)
    with pytest.raises(ValueError, match=r"3 predictions \(fused, strong, weak\)"):
        compute(bad)
