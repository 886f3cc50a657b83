"""A plain-PyTorch trainer: train -> validate (fused + each head) -> strategy decisions -> log.

The best epoch maximises the strategy's ``selection_score`` on validation (the fused metric unless
a method says otherwise); the test set is then scored with those weights, and also with the last
epoch's weights, because best-on-validation selection alone can hide (or create) a gap between the
unimodal heads.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from miles.batch import move_batch
from miles.fileio import DamagedFileError
from miles.metrics import METRICS, HeadMetrics
from miles.models.fusion import JointFusionModel
from miles.models.losses import FUSED, head_losses
from miles.results import RunResult  # re-exported: it used to live here
from miles.strategies.base import EvalResult, Strategy, StrategyContext
from miles.training.checkpoint import (
    BEST,
    LAST,
    LAST_KEYS,
    START_OVER,
    load_checkpoint,
    save_checkpoint,
)
from miles.training.history import write_history, write_json
from miles.training.run_folder import RunFolder, is_main_process
from miles.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    check_str,
)

OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainerConfig:
    """Everything that shapes a run besides model, data and strategy."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        # validated, not converted: the values as given are what result.json records
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_positive_int(name, getattr(self, name))
        check_non_negative_int("seed", self.seed)
        check_positive("lr", self.lr)
        check_non_negative("momentum", self.momentum)
        check_non_negative("weight_decay", self.weight_decay)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_str("device", self.device)
        check_bool("progress", self.progress)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """LR of every param group keyed by its ``"name"`` (``group<i>`` if unnamed, made unique)."""
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        key = str(group.get("name", f"group{i}"))
        if key in out:
            key = f"{key}#{i}"
        out[key] = float(group["lr"])
    return out


def split_holdout(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``fraction`` of the training set, seeded, for strategies that need it."""
    if check_fraction("holdout_fraction", fraction) == 0:
        return dataset, None
    n = len(dataset)  # type: ignore[arg-type]
    k = max(1, round(n * fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(perm[k:])), Subset(dataset, sorted(perm[:k]))


class Trainer:
    """Trains a :class:`JointFusionModel` with a :class:`Strategy`.

    Args:
        model: the joint-fusion model (built after seeding, for reproducible initialisation).
        strategy: the balancing method (``joint``, ``joint+aux``, ``miles``, ...).
        config: epochs, optimiser, batch sizes, seed, device.
        metric: validation/test metric driving selection and MILES (``accuracy``, ``f1_micro``,
            ``f1_macro``).
        multilabel: targets are 0/1 vectors (BCE loss, thresholded metrics).
        out_dir: where history, checkpoints and ``result.json`` go (``None``: keep in memory).
        collate_fn: batch builder (``miles.data.collate_multimodal`` for our datasets).
        on_epoch_end: called with each epoch's history row once it is logged and saved (e.g. to
            print the strategy's decision); it cannot change training.
        settings: what ``out_dir`` records as this run's settings, and what a resume must match
            (default: :meth:`default_settings`; :func:`~miles.training.experiment.run_experiment`
            passes the whole experiment config).
    """

    def __init__(
        self,
        model: JointFusionModel,
        strategy: Strategy,
        config: TrainerConfig | None = None,
        *,
        metric: str = "accuracy",
        multilabel: bool = False,
        out_dir: str | Path | None = None,
        collate_fn: Any = None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        check_choice("metric", metric, METRICS)
        check_bool("multilabel", multilabel)
        self.model = model
        self.strategy = strategy
        self.config = config or TrainerConfig()
        self.metric = metric
        self.multilabel = multilabel
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.collate_fn = collate_fn
        self.on_epoch_end = on_epoch_end
        self.settings = dict(settings) if settings is not None else self.default_settings()
        self._run_id: str | None = None  #: the run folder's run id, stamped into checkpoints
        self.device = torch.device(self.config.device)

    def default_settings(self) -> dict[str, Any]:
        """The run's settings when none are given: the trainer config, the strategy's
        description, the metric, and the model's modalities, classes and parameter shapes."""
        shapes = [[name, list(p.shape)] for name, p in self.model.state_dict().items()]
        return {
            "trainer": asdict(self.config),
            "strategy": self.strategy.describe(),
            "metric": self.metric,
            "multilabel": self.multilabel,
            "model": {
                "modalities": list(self.model.modalities),
                "num_classes": self.model.num_classes,
                "parameters": shapes,
            },
        }

    # -- building blocks -------------------------------------------------------------------------
    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "adam":
            return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    def _loader(
        self, dataset: Dataset, *, train: bool, generator: torch.Generator | None = None
    ) -> DataLoader:
        size = self.config.batch_size if train else self.config.eval_batch_size
        return DataLoader(
            dataset, batch_size=size, shuffle=train, generator=generator, collate_fn=self.collate_fn
        )

    @torch.no_grad()
    def evaluate(self, loader: DataLoader, *, keep_latents: bool = False) -> EvalResult:
        """Metric of the fused head and of every unimodal head over ``loader``."""
        model = self.model
        was_training = model.training
        model.eval()
        metrics = HeadMetrics(
            model.modalities, model.num_classes, self.metric, multilabel=self.multilabel
        ).to(self.device)
        loss_sums: dict[str, float] = {}
        count = 0
        latents: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
        targets: list[Tensor] = []
        for raw in loader:
            batch = move_batch(raw, self.device)
            out = model(batch["inputs"], batch["lengths"] or None)
            metrics.update(out, batch["target"])
            n = batch["target"].shape[0]
            for name, value in head_losses(
                out, batch["target"], multilabel=self.multilabel
            ).items():
                loss_sums[name] = loss_sums.get(name, 0.0) + float(value) * n
            count += n
            if keep_latents:
                for m in model.modalities:
                    latents[m].append(out.latents[m])
                targets.append(batch["target"])
        if count == 0:
            raise ValueError("evaluation loader is empty")
        scores = metrics.compute()
        model.train(was_training)
        return EvalResult(
            fused=scores.fused,
            unimodal=scores.unimodal,
            loss=loss_sums[FUSED] / count,
            unimodal_loss={m: loss_sums[m] / count for m in model.modalities},
            latents={m: torch.cat(v) for m, v in latents.items()} if keep_latents else None,
            target=torch.cat(targets) if keep_latents else None,
        )

    def _train_epoch(
        self, loader: DataLoader, optimizer: torch.optim.Optimizer, ctx: StrategyContext
    ) -> dict[str, float]:
        model, strategy = self.model, self.strategy
        model.train()
        sums: dict[str, float] = {}
        count = 0
        for raw in loader:
            batch = move_batch(raw, self.device)
            step = strategy.training_step(ctx, batch)
            if not torch.isfinite(step.loss):
                raise FloatingPointError(
                    f"training loss became {float(step.loss)}; lower the learning rate"
                )
            n = step.batch_size
            count += n
            sums["loss"] = sums.get("loss", 0.0) + float(step.loss) * n
            for name, value in step.losses.items():
                sums[f"loss_{name}"] = sums.get(f"loss_{name}", 0.0) + float(value) * n
        return {k: v / max(count, 1) for k, v in sums.items()}

    # -- the loop --------------------------------------------------------------------------------
    def fit(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        force: bool = False,
    ) -> RunResult:
        """Train for ``config.epochs`` (or until the strategy stops), then score the test set.

        With an ``out_dir`` (see :mod:`miles.training.run_folder`), the folder is locked while
        the run trains in it, and it records the run's :attr:`settings`:

        - ``resume=True`` continues from ``out_dir/last.pt`` when it exists; the result is the
          same as an uninterrupted run with the same seed (on CPU). The recorded settings must
          match (else a ``RunFolderError`` lists the keys that differ); ``force=True`` resumes
          anyway and records the change in ``result.json`` (``extra["settings_changes"]``).
        - otherwise the folder must not hold a run already; ``overwrite=True`` deletes that
          run's files first.
        """
        if self.out_dir is None:
            if resume or overwrite:
                raise ValueError("resume=True and overwrite=True need an out_dir")
            return self._fit(train, val, test, resume=False)
        folder = RunFolder(self.out_dir)
        if not is_main_process():  # another rank owns (locks, records, writes) the folder
            self._run_id = folder.run_id()
            return self._fit(train, val, test, resume=resume)
        with folder.lock():
            folder.open(self.settings, resume=resume, overwrite=overwrite, force=force)
            self._run_id = folder.run_id()
            return self._fit(train, val, test, resume=resume)

    def _fit(
        self, train: Dataset, val: Dataset, test: Dataset | None, *, resume: bool
    ) -> RunResult:
        from tqdm.auto import tqdm

        run = self._setup(train, val)
        checkpoint = self._load_last() if resume else None
        if checkpoint is not None:
            self._restore(run, checkpoint)
        self.strategy.on_fit_start(run.ctx)
        if checkpoint is not None:
            self._restore_rng(run, checkpoint)
        bar = tqdm(
            range(run.first_epoch, self.config.epochs + 1),
            desc=f"{self.strategy.name}",
            disable=not self.config.progress,
            leave=False,
            unit="ep",
        )
        for epoch in bar:
            improved = self._run_epoch(run, epoch)
            if self.out_dir is not None:
                self._checkpoint(run, epoch, improved)
            bar.set_postfix(val=f"{run.history[-1]['val_fused']:.3f}", best=run.best_epoch)
            if self.on_epoch_end is not None:
                self.on_epoch_end(dict(run.history[-1]))
            if run.stopped:
                break
        bar.close()
        if not run.history:
            raise RuntimeError("no epoch was trained (epochs must be >= 1)")
        self.strategy.on_fit_end(run.ctx)
        result = self._score(run, test)
        if self.out_dir is not None:
            changes = RunFolder(self.out_dir).changes()
            if changes:  # a forced resume: the result says which epochs ran under what
                result.extra["settings_changes"] = changes
            write_json(self.out_dir / "result.json", result.to_dict())
        return result

    # -- the steps of fit ------------------------------------------------------------------------
    def _setup(self, train: Dataset, val: Dataset) -> _Run:
        """Seed, configure the model, build the optimizer, the loaders and the strategy context."""
        cfg, model, strategy = self.config, self.model, self.strategy
        start = time.perf_counter()
        # Dropout, noise-adding strategies and the like draw from the global RNG: seed it too
        # (a resumed run restores its saved state after on_fit_start).
        torch.manual_seed(cfg.seed)
        strategy.configure_model(model)
        model.to(self.device)
        optimizer = self._make_optimizer(strategy.param_groups(model))
        train_part, holdout_part = split_holdout(train, strategy.holdout_fraction, cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        train_loader = self._loader(train_part, train=True, generator=generator)
        holdout_loader = train_probe_loader = None
        if holdout_part is not None:
            holdout_loader = self._loader(holdout_part, train=False)
            # a fixed slice of the training part, as large as the holdout, scored the same way
            n_train, n_holdout = len(train_part), len(holdout_part)  # type: ignore[arg-type]
            probe = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed + 1))
            probe = probe[:n_holdout]
            train_probe_loader = self._loader(Subset(train_part, probe.tolist()), train=False)
        ctx = StrategyContext(
            model=model,
            optimizer=optimizer,
            device=self.device,
            epochs=cfg.epochs,
            multilabel=self.multilabel,
            metric=self.metric,
            evaluate=self.evaluate,
            holdout_loader=holdout_loader,
            train_probe_loader=train_probe_loader,
            train_loader=train_loader,
            make_optimizer=self._make_optimizer,
        )
        return _Run(
            ctx=ctx,
            generator=generator,
            train_loader=train_loader,
            val_loader=self._loader(val, train=False),
            holdout_loader=holdout_loader,
            start=start,
        )

    def _load_last(self) -> dict[str, Any] | None:
        """``out_dir/last.pt``, or ``None`` when there is none yet (a resume starts afresh)."""
        assert self.out_dir is not None
        path = self.out_dir / LAST
        if not path.is_file():
            return None
        ckpt = load_checkpoint(path, required=LAST_KEYS)
        self._check_run_id(path, ckpt)
        return ckpt

    def _check_run_id(self, path: Path, ckpt: Mapping[str, Any], advice: str = START_OVER) -> None:
        """Refuse a checkpoint stamped by another run than the one this folder records."""
        mine, theirs = self._run_id, ckpt.get("run_id")
        if mine is not None and theirs is not None and theirs != mine:
            raise DamagedFileError(
                path,
                f"it was written by another run (run id {theirs}; this folder's run is {mine}): "
                "a file copied from another folder?",
                advice,
            )

    def _restore(self, run: _Run, ckpt: Mapping[str, Any]) -> None:
        """Model, optimizer, strategy and progress from ``last.pt``, before ``on_fit_start``:
        the strategy's hooks then build on the restored optimizer and state."""
        assert self.out_dir is not None
        try:
            self.model.load_state_dict(ckpt["model"])
            run.ctx.optimizer.load_state_dict(ckpt["optimizer"])
            self.strategy.load_state_dict(ckpt["strategy"])
            run.history = list(ckpt["history"])
            run.best_epoch, run.best_score = int(ckpt["best_epoch"]), float(ckpt["best_score"])
            epoch = int(ckpt["epoch"])
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise DamagedFileError(
                self.out_dir / LAST, f"it does not fit this run ({exc})", START_OVER
            ) from exc
        if run.best_epoch:
            run.best_state = self._restore_best(ckpt, epoch, run.best_epoch)
        if is_main_process():  # derived from last.pt, written after it: a kill in between
            write_history(self.out_dir, run.history)  # leaves them one epoch old
        run.first_epoch = self.config.epochs + 1 if ckpt.get("stopped") else epoch + 1
        run.elapsed_before = float(ckpt.get("elapsed_s", 0.0))

    def _restore_best(
        self, ckpt: Mapping[str, Any], epoch: int, best_epoch: int
    ) -> dict[str, Any]:
        """The best epoch's weights, consistent with ``last.pt`` (the commit point).

        ``last.pt`` is written before ``best.pt`` (:meth:`_checkpoint`): when the last epoch was
        the best, ``last.pt`` holds its weights and ``best.pt`` may lag one write behind (it is
        rewritten); otherwise ``best.pt`` must hold exactly ``last.pt``'s best epoch.
        """
        assert self.out_dir is not None
        path = self.out_dir / BEST
        if best_epoch == epoch:
            state: dict[str, Any] = ckpt["model"]
            try:
                stored = load_checkpoint(path, required=("epoch",))["epoch"]
            except (FileNotFoundError, DamagedFileError):
                stored = None
            if stored != epoch and is_main_process():
                save_checkpoint(path, self._best_payload(state, epoch))
            return state
        advice = (
            f"without it the weights of the best epoch ({best_epoch}) cannot be restored: "
            + START_OVER
        )
        if not path.is_file():
            raise DamagedFileError(
                path, f"missing, but {LAST} says epoch {best_epoch} was the best", advice
            )
        best = load_checkpoint(path, required=("model", "epoch"), advice=advice)
        self._check_run_id(path, best, advice)
        if int(best["epoch"]) != best_epoch:
            raise DamagedFileError(
                path,
                f"it holds epoch {best['epoch']} but {LAST} says the best epoch is {best_epoch}: "
                "the two files are not from the same run",
                advice,
            )
        return dict(best["model"])

    def _restore_rng(self, run: _Run, ckpt: Mapping[str, Any]) -> None:
        """The random streams, restored after ``on_fit_start``: whatever a hook draws there is the
        same in a fresh and a resumed fit, and training continues the saved stream exactly."""
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        run.generator.set_state(ckpt["loader_rng"])

    def _run_epoch(self, run: _Run, epoch: int) -> bool:
        """Train, validate, let the strategy decide, record the row; True if the best improved."""
        strategy, ctx = self.strategy, run.ctx
        t0 = time.perf_counter()
        strategy.on_epoch_start(ctx, epoch)
        lrs = group_lrs(ctx.optimizer)
        train_stats = self._train_epoch(run.train_loader, ctx.optimizer, ctx)
        val_res = self.evaluate(run.val_loader, keep_latents=strategy.needs_latents)
        holdout_res = self.evaluate(run.holdout_loader) if run.holdout_loader is not None else None
        record = strategy.on_epoch_end(ctx, epoch, val_res, holdout_res)
        row: dict[str, Any] = {
            "epoch": epoch,
            **{f"train_{k}": v for k, v in train_stats.items()},
            "val_loss": val_res.loss,
            "val_fused": val_res.fused,
            **{f"val_{m}": v for m, v in val_res.unimodal.items()},
            **{f"lr_{k}": v for k, v in lrs.items()},
            "strategy": record,
            "time_s": time.perf_counter() - t0,
        }
        run.history.append(row)
        score = strategy.selection_score(val_res)
        row["selection_score"] = score
        improved = score > run.best_score
        if improved:
            run.best_epoch, run.best_score = epoch, score
            run.best_state = copy.deepcopy(self.model.state_dict())
        run.stopped = strategy.should_stop()
        return improved

    def _checkpoint(self, run: _Run, epoch: int, improved: bool) -> None:
        """``last.pt`` (all a resume needs: the commit point), then ``best.pt`` when the epoch
        improved, then the history. In this order a crash between two writes leaves a consistent
        pair: an improved epoch's weights are in ``last.pt`` itself (see :meth:`_restore_best`)."""
        assert self.out_dir is not None
        save_checkpoint(
            self.out_dir / LAST,
            {
                "epoch": epoch,
                "model": self.model.state_dict(),
                "optimizer": run.ctx.optimizer.state_dict(),
                "strategy": self.strategy.state_dict(),
                "history": run.history,
                "best_epoch": run.best_epoch,
                "best_score": run.best_score,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loader_rng": run.generator.get_state(),
                "elapsed_s": run.elapsed_s(),
                "stopped": run.stopped,
                "run_id": self._run_id,
            },
        )
        if improved:
            assert run.best_state is not None
            save_checkpoint(self.out_dir / BEST, self._best_payload(run.best_state, epoch))
        write_history(self.out_dir, run.history)

    def _best_payload(self, state: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        return {"model": state, "epoch": epoch, "run_id": self._run_id}

    def _score(self, run: _Run, test: Dataset | None) -> RunResult:
        """Test with the last weights, then with the best epoch's (left in the model)."""
        model = self.model
        test_last = test_best = None
        test_loader = self._loader(test, train=False) if test is not None else None
        if test_loader is not None:
            last = self.evaluate(test_loader)
            test_last = {"fused": last.fused, "unimodal": last.unimodal}
        if run.best_state is not None:
            model.load_state_dict(run.best_state)
        if test_loader is not None:
            best = self.evaluate(test_loader)
            test_best = {"fused": best.fused, "unimodal": best.unimodal}
        history = run.history
        best_row = history[run.best_epoch - 1] if run.best_epoch else history[-1]
        return RunResult(
            best_epoch=run.best_epoch,
            epochs_run=len(history),
            val={
                "fused": best_row["val_fused"],
                "unimodal": {m: best_row[f"val_{m}"] for m in model.modalities},
            },
            test=test_best,
            test_last=test_last,
            history=history,
            strategy=self.strategy.describe(),
            config={**asdict(self.config), "metric": self.metric, "multilabel": self.multilabel},
            wall_time_s=run.elapsed_s(),
        )


@dataclass
class _Run:
    """What one ``fit`` carries from step to step (and what ``last.pt`` saves of it)."""

    ctx: StrategyContext
    generator: torch.Generator  #: the training loader's shuffling stream
    train_loader: DataLoader
    val_loader: DataLoader
    holdout_loader: DataLoader | None
    start: float  #: ``time.perf_counter()`` when this fit started
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf
    best_state: dict[str, Any] | None = None
    first_epoch: int = 1
    elapsed_before: float = 0.0  #: seconds spent by the fit(s) this one resumes
    stopped: bool = False

    def elapsed_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start
