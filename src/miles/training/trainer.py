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
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset

from miles.batch import move_batch
from miles.fileio import DamagedFileError
from miles.metrics import METRICS, HeadMetrics
from miles.models.fusion import JointFusionModel
from miles.models.losses import FUSED, head_losses
from miles.results import RunResult  # re-exported: it used to live here
from miles.strategies.base import EvalResult, Strategy, StrategyContext
from miles.strategies.data import StrategyData
from miles.training.checkpoint import (
    BEST,
    LAST,
    LAST_KEYS,
    START_OVER,
    load_checkpoint,
    save_checkpoint,
)
from miles.training.distributed import (
    BACKENDS,
    Ranks,
    ShardSampler,
    all_gather_tensors,
    broadcast_buffers,
    check_replicas,
    check_same_on_every_rank,
    current_ranks,
    is_main_process,
    join_process_group,
    rank_device,
    sum_across_ranks,
)
from miles.training.history import write_history, write_json
from miles.training.loaders import LOADERS, build_loader
from miles.training.loggers import Logger, check_loggers, epoch_scalars, start_loggers
from miles.training.precision import Precision, check_precision
from miles.training.run_folder import RunFolder
from miles.training.schedules import SCHEDULES, build_schedule
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

#: the optimizers a run can use, by name: ``(param groups, config) -> optimizer``
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], TrainerConfig], torch.optim.Optimizer]] = {
    "adam": lambda groups, cfg: torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "adamw": lambda groups, cfg: torch.optim.AdamW(
        groups, lr=cfg.lr, weight_decay=cfg.weight_decay
    ),
    "sgd": lambda groups, cfg: torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    ),
}


@dataclass
class TrainerConfig:
    """Everything that shapes a run besides model, data and strategy.

    The defaults train in float32 on one process, with constant rates and batches cut from
    in-memory tensors where possible; every other setting is opt-in (see the README's trainer
    section and ``docs/performance.md``).
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "adam"  #: ``adam``, ``adamw`` (decoupled ``weight_decay``) or ``sgd``
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"  #: under torchrun a bare ``cuda`` is each rank's ``cuda:LOCAL_RANK``
    progress: bool = True
    #: ``"32"``, ``"bf16-mixed"`` (autocast) or ``"16-mixed"`` (autocast + gradient scaler)
    precision: str = "32"
    grad_clip_norm: float | None = None  #: clip the global gradient norm (``None``: never)
    #: the base learning-rate schedule, stepped per batch: ``constant``, ``cosine`` or ``step``
    schedule: str = "constant"
    warmup_epochs: int = 0  #: linear warm-up over this many epochs (or use ``warmup_steps``)
    warmup_steps: int = 0  #: linear warm-up over this many batches
    min_lr_factor: float = 0.0  #: ``cosine``: the last batch's rate, as a fraction of the base
    step_every: int = 30  #: ``step``: epochs between two decays
    step_gamma: float = 0.1  #: ``step``: the factor of each decay
    num_workers: int = 0  #: DataLoader worker processes (seeded; resume stays exact)
    pin_memory: bool = True  #: pinned host memory for the batches (CUDA only)
    #: ``auto``: batches cut from in-memory tensors where possible, else a DataLoader;
    #: ``dataloader``: always a DataLoader; ``tensor``: in-memory tensors or an error
    loader: str = "auto"
    channels_last: bool = True  #: channels-last memory format for CNNs (CUDA only)
    compile: bool = False  #: ``torch.compile`` the model
    backend: str = "auto"  #: torch.distributed backend under torchrun (auto: NCCL on CUDA)
    #: DDP's ``find_unused_parameters`` (``None``: when the strategy may leave some unused)
    find_unused_parameters: bool | None = None
    #: where each epoch's scalars also go: ``csv``, ``tensorboard``, ``wandb`` (rank 0 only)
    loggers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # validated, not converted: the values as given are what result.json records
        for name in ("epochs", "batch_size", "eval_batch_size", "step_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("seed", "warmup_epochs", "warmup_steps", "num_workers"):
            check_non_negative_int(name, getattr(self, name))
        check_positive("lr", self.lr)
        check_non_negative("momentum", self.momentum)
        check_non_negative("weight_decay", self.weight_decay)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_str("device", self.device)
        for name in ("progress", "pin_memory", "channels_last", "compile"):
            check_bool(name, getattr(self, name))
        check_precision(self.precision)
        if self.grad_clip_norm is not None:
            check_positive("grad_clip_norm", self.grad_clip_norm)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.warmup_epochs and self.warmup_steps:
            raise ValueError(
                "give warmup_epochs or warmup_steps, not both (got "
                f"{self.warmup_epochs} and {self.warmup_steps})"
            )
        check_fraction("min_lr_factor", self.min_lr_factor, one=True)
        check_positive("step_gamma", self.step_gamma)
        check_choice("loader", self.loader, LOADERS)
        check_choice("backend", self.backend, BACKENDS)
        if self.find_unused_parameters is not None:
            check_bool("find_unused_parameters", self.find_unused_parameters)
        check_loggers(self.loggers)


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
        config: epochs, optimiser, batch sizes, seed, device, precision, schedule, loaders,
            loggers.
        metric: validation/test metric driving selection and MILES (``accuracy``, ``f1_micro``,
            ``f1_macro``).
        multilabel: targets are 0/1 vectors (BCE loss, thresholded metrics).
        out_dir: where history, checkpoints and ``result.json`` go (``None``: keep in memory).
        collate_fn: batch builder (``miles.data.collate_multimodal`` for our datasets).
        on_epoch_end: called with each epoch's history row once it is logged and saved (e.g. to
            print the strategy's decision); it cannot change training. Under ``torchrun`` it is
            called on every rank (:func:`miles.training.distributed.is_main_process` tells rank 0).
        settings: what ``out_dir`` records as this run's settings, and what a resume must match
            (default: :meth:`default_settings`; :func:`~miles.training.experiment.run_experiment`
            passes the whole experiment config).

    Under ``torchrun`` (or inside an initialised process group) ``fit`` trains data-parallel:
    see :mod:`miles.training.distributed`.
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
        if self.config.loggers and self.out_dir is None:
            raise ValueError(f"loggers {self.config.loggers} write into out_dir; give one")
        self.precision = Precision(self.config.precision, self.device, self.config.grad_clip_norm)
        #: one HeadMetrics per evaluated loader, reset before each pass
        self._metrics: weakref.WeakKeyDictionary[Any, HeadMetrics] = weakref.WeakKeyDictionary()
        self._eval_module: nn.Module | None = None
        self._channels_last = False

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
        return OPTIMIZERS[self.config.optimizer](groups, self.config)

    def _loader(
        self,
        dataset: Dataset,
        *,
        train: bool,
        generator: torch.Generator | None = None,
        ranks: Ranks | None = None,
    ) -> Any:
        """A training (shuffled) or evaluation loader; sharded over the ranks when distributed."""
        cfg = self.config
        ranks = current_ranks() if ranks is None else ranks
        sampler: Sampler[int] | None = None
        if ranks.distributed:
            n = len(dataset)  # type: ignore[arg-type]
            sampler = (
                DistributedSampler(
                    dataset, ranks.world_size, ranks.rank, shuffle=True, seed=cfg.seed
                )
                if train
                else ShardSampler(n, ranks)
            )
        return build_loader(
            dataset,
            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
            shuffle=train,
            generator=generator,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory and self.device.type == "cuda",
            mode=cfg.loader,
        )

    def _move(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return move_batch(raw, self.device, channels_last=self._channels_last)

    def _head_metrics(self, loader: Any) -> HeadMetrics:
        """The loader's HeadMetrics (built once, reset for each pass)."""
        metrics = self._metrics.get(loader)
        if metrics is None:
            model = self.model
            metrics = HeadMetrics(
                model.modalities, model.num_classes, self.metric, multilabel=self.multilabel
            ).to(self.device)
            self._metrics[loader] = metrics
        metrics.reset()
        return metrics

    @torch.no_grad()
    def evaluate(
        self,
        loader: Any,
        *,
        keep_latents: bool = False,
        model: JointFusionModel | None = None,
    ) -> EvalResult:
        """Metric of the fused head and of every unimodal head over ``loader`` (of the run's
        model, or of ``model``, e.g. a copy a strategy trains on the side).

        The losses are summed on the device and read once; under ``torch.distributed`` the
        metrics and losses are those of every rank's shard together.
        """
        if model is None:
            model = self.model
            net = model if self._eval_module is None else self._eval_module
        else:
            net = model
        was_training = model.training
        model.eval()
        metrics = self._head_metrics(loader)
        names = (FUSED, *model.modalities)
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        count = 0
        latents: dict[str, list[Tensor]] = {m: [] for m in model.modalities}
        targets: list[Tensor] = []
        for raw in loader:
            batch = self._move(raw)
            with self.precision.autocast():
                out = net(batch["inputs"], batch["lengths"] or None)
                losses = head_losses(out, batch["target"], multilabel=self.multilabel)
            metrics.update(out, batch["target"])
            n = batch["target"].shape[0]
            sums = sums + torch.stack([losses[name] for name in names]).double() * n
            count += n
            if keep_latents:
                for m in model.modalities:
                    latents[m].append(out.latents[m].float())  # autocast: float32 for later heads
                targets.append(batch["target"])
        totals = sum_across_ranks(
            torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64, device=self.device)])
        ).tolist()
        count = int(totals[-1])
        if count == 0:
            raise ValueError("evaluation loader is empty")
        scores = metrics.compute()
        model.train(was_training)
        mean = dict(zip(names, (total / count for total in totals), strict=False))
        kept_latents: dict[str, Tensor] | None = None
        kept_target: Tensor | None = None
        if keep_latents:
            parts = all_gather_tensors(
                [torch.cat(latents[m]) for m in model.modalities] + [torch.cat(targets)]
            )
            kept_latents = dict(zip(model.modalities, parts[:-1], strict=True))
            kept_target = parts[-1]
        return EvalResult(
            fused=scores.fused,
            unimodal=scores.unimodal,
            loss=mean[FUSED],
            unimodal_loss={m: mean[m] for m in model.modalities},
            latents=kept_latents,
            target=kept_target,
        )

    def _train_epoch(
        self, loader: Any, optimizer: torch.optim.Optimizer, ctx: StrategyContext, epoch: int = 0
    ) -> dict[str, float]:
        """One pass over ``loader``; the losses are summed on the device and read once, at the
        end, where a loss that stopped being finite stops the run."""
        model, strategy = self.model, self.strategy
        model.train()
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        skipped = ctx.precision.skipped_steps
        #: per set of loss names a step returned: the sums of (loss, *losses) x batch size
        sums: dict[tuple[str, ...], Tensor] = {}
        count = 0
        try:
            for raw in loader:
                batch = self._move(raw)
                step = strategy.training_step(ctx, batch)
                if ctx.lr_schedule is not None:
                    strategy.step_lr_schedule(ctx)
                key = tuple(step.losses)
                values = torch.stack([step.loss, *step.losses.values()]).detach()
                values = values.double() * step.batch_size
                sums[key] = values if key not in sums else sums[key] + values
                count += step.batch_size
        except Exception as exc:
            self._explain_failure(exc, sums, epoch)
            raise
        stats = self._epoch_means(sums, count)
        if not math.isfinite(stats.get("loss", 0.0)):
            raise FloatingPointError(
                f"training loss became {stats['loss']} in epoch {epoch}; lower the learning rate"
            )
        if ctx.precision.scales_loss:
            stats["skipped_steps"] = float(ctx.precision.skipped_steps - skipped)
        broadcast_buffers(model)
        check_replicas(model, f"epoch {epoch}'s training")
        return stats

    @staticmethod
    def _epoch_means(sums: Mapping[tuple[str, ...], Tensor], count: int) -> dict[str, float]:
        """Per-sample means of the summed losses (over every rank when distributed)."""
        if len(sums) == 1:  # the usual case: the same losses every step, one read
            ((key, values),) = sums.items()
            totals = sum_across_ranks(
                torch.cat([values, values.new_tensor([float(count)])])
            ).tolist()
            count = int(totals.pop())
            names = ("loss", *(f"loss_{k}" for k in key))
            return {name: total / max(count, 1) for name, total in zip(names, totals, strict=True)}
        out: dict[str, float] = {}
        for key, values in sums.items():  # steps returned different losses (rank-local means)
            for name, total in zip(
                ("loss", *(f"loss_{k}" for k in key)), values.tolist(), strict=True
            ):
                out[name] = out.get(name, 0.0) + total
        return {name: total / max(count, 1) for name, total in out.items()}

    def _explain_failure(
        self, exc: Exception, sums: Mapping[tuple[str, ...], Tensor], epoch: int
    ) -> None:
        """Raise a clearer error for a step that failed because training diverged or because
        DDP found parameters without gradient; return to re-raise ``exc`` as it is."""
        losses_finite = all(bool(torch.isfinite(v[0])) for v in sums.values())
        tensors = [t for p in self.model.parameters() for t in (p, p.grad) if t is not None]
        weights_finite = all(bool(torch.isfinite(t).all()) for t in tensors)
        if not (losses_finite and weights_finite):
            raise FloatingPointError(
                f"training stopped being finite in epoch {epoch} (loss, weights or gradients) "
                f"and then a "
                f"step failed ({type(exc).__name__}: {exc}); lower the learning rate"
            ) from exc
        if isinstance(exc, RuntimeError) and "find_unused_parameters" in str(exc):
            raise RuntimeError(
                f"under DistributedDataParallel, strategy {self.strategy.name!r} left some "
                "parameters without a gradient: set the trainer's find_unused_parameters: true "
                "(or give the strategy unused_parameters = True)"
            ) from exc

    def _wrap(self, model: JointFusionModel, ranks: Ranks) -> nn.Module | None:
        """The module training steps call: DDP when distributed, compiled when asked (``None``:
        the model itself)."""
        cfg = self.config
        module: nn.Module = model
        if ranks.distributed:
            reason = self.strategy.single_process
            if reason is not None:
                raise ValueError(
                    f"{self.strategy.name} cannot run data-parallel: {reason}; train it in one "
                    "process"
                )
            unused = cfg.find_unused_parameters
            if unused is None:
                unused = self.strategy.unused_parameters
            module = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )
        if cfg.compile:
            module = torch.compile(module)  # type: ignore[assignment]
            self._eval_module = torch.compile(model)  # type: ignore[assignment]
        return None if module is model else module

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
        if self.out_dir is None and (resume or overwrite):
            raise ValueError("resume=True and overwrite=True need an out_dir")
        created = join_process_group(self.config.backend, self.device)
        try:
            return self._fit_in_folder(train, val, test, resume, overwrite, force)
        finally:
            if created:
                dist.destroy_process_group()

    def _fit_in_folder(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset | None,
        resume: bool,
        overwrite: bool,
        force: bool,
    ) -> RunResult:
        """``_fit`` in the locked, checked run folder (rank 0 of a distributed run locks, records
        and writes it; the other ranks only read it to resume)."""
        if self.out_dir is None:
            return self._fit(train, val, test, resume=False)
        folder = RunFolder(self.out_dir)
        if not is_main_process():
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

        ranks = current_ranks()
        self.device = rank_device(torch.device(self.config.device), ranks)
        self.precision.device = self.device
        run = self._setup(train, val, ranks)
        checkpoint = self._load_last() if resume else None
        if checkpoint is not None:
            self._restore(run, checkpoint)
        check_same_on_every_rank(
            run.first_epoch,
            "the epoch to start from",
            "every rank reads out_dir/last.pt when resuming: put out_dir on a file system "
            "all of them see",
        )
        self.strategy.on_fit_start(run.ctx)
        if checkpoint is not None:
            self._restore_rng(run, checkpoint)
        writes = self.out_dir is not None and ranks.is_main
        loggers: list[Logger] = []
        if writes and self.config.loggers:
            assert self.out_dir is not None
            loggers = start_loggers(
                self.config.loggers,
                self.out_dir,
                first_epoch=run.first_epoch,
                config=self._described(),
            )
        bar = tqdm(
            range(run.first_epoch, self.config.epochs + 1),
            desc=f"{self.strategy.name}",
            disable=not (self.config.progress and ranks.is_main),
            leave=False,
            unit="ep",
        )
        try:
            for epoch in bar:
                improved = self._run_epoch(run, epoch)
                if writes:
                    self._checkpoint(run, epoch, improved)
                for logger in loggers:
                    logger.log(epoch_scalars(run.history[-1]), step=epoch)
                bar.set_postfix(val=f"{run.history[-1]['val_fused']:.3f}", best=run.best_epoch)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(dict(run.history[-1]))
                if run.stopped:
                    break
        finally:
            bar.close()
            for logger in loggers:
                logger.close()
        if not run.history:
            raise RuntimeError("no epoch was trained (epochs must be >= 1)")
        self.strategy.on_fit_end(run.ctx)
        result = self._score(run, test)
        if writes:
            assert self.out_dir is not None
            changes = RunFolder(self.out_dir).changes()
            if changes:  # a forced resume: the result says which epochs ran under what
                result.extra["settings_changes"] = changes
            write_json(self.out_dir / "result.json", result.to_dict())
        return result

    def _described(self) -> dict[str, Any]:
        """The run's settings as the loggers record them (hyper-parameters)."""
        return {
            **asdict(self.config),
            "metric": self.metric,
            "multilabel": self.multilabel,
            "strategy": self.strategy.describe(),
        }

    # -- the steps of fit ------------------------------------------------------------------------
    def _setup(self, train: Dataset, val: Dataset, ranks: Ranks | None = None) -> _Run:
        """Seed, configure the model, build the optimizer, the loaders, the schedule, the DDP /
        compiled wrapper and the strategy context."""
        cfg, model, strategy = self.config, self.model, self.strategy
        ranks = current_ranks() if ranks is None else ranks
        start = time.perf_counter()
        # Dropout, noise-adding strategies and the like draw from the global RNG: seed it too
        # (a resumed run restores its saved state after on_fit_start).
        torch.manual_seed(cfg.seed)
        strategy.configure_model(model)
        model.to(self.device)
        self._channels_last = (
            cfg.channels_last
            and self.device.type == "cuda"
            and any(isinstance(m, nn.Conv2d) for m in model.modules())
        )
        if self._channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        optimizer = self._make_optimizer(strategy.param_groups(model))
        train_part, holdout_part = split_holdout(train, strategy.holdout_fraction, cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        train_loader = self._loader(train_part, train=True, generator=generator, ranks=ranks)
        holdout_loader = train_probe_loader = None
        if holdout_part is not None:
            holdout_loader = self._loader(holdout_part, train=False, ranks=ranks)
            # a fixed slice of the training part, as large as the holdout, scored the same way
            n_train, n_holdout = len(train_part), len(holdout_part)  # type: ignore[arg-type]
            probe = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed + 1))
            probe = probe[:n_holdout]
            train_probe_loader = self._loader(
                Subset(train_part, probe.tolist()), train=False, ranks=ranks
            )
        schedule = build_schedule(
            optimizer,
            cfg.schedule,
            epochs=cfg.epochs,
            steps_per_epoch=len(train_loader),
            warmup_epochs=cfg.warmup_epochs,
            warmup_steps=cfg.warmup_steps,
            min_factor=cfg.min_lr_factor,
            step_every=cfg.step_every,
            gamma=cfg.step_gamma,
        )
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
            seed=cfg.seed,
            data=StrategyData(
                {"train": train_part, "val": val, "holdout": holdout_part},
                batch_size=cfg.batch_size,
                eval_batch_size=cfg.eval_batch_size,
                collate_fn=self.collate_fn,
                generator=generator,
                default_loader=train_loader,
                device=self.device,
                seed=cfg.seed,
                modalities=model.modalities,
            ),
            forward_module=self._wrap(model, ranks),
            precision=self.precision,
            lr_schedule=schedule,
        )
        return _Run(
            ctx=ctx,
            generator=generator,
            train_loader=train_loader,
            val_loader=self._loader(val, train=False, ranks=ranks),
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
        # outside the guard: a schedule of another length is a setting, not damage, and says so
        self._load_engine_state(run, ckpt.get("engine", {}))
        if run.best_epoch:
            run.best_state = self._restore_best(ckpt, epoch, run.best_epoch)
        if is_main_process():  # derived from last.pt, written after it: a kill in between
            write_history(self.out_dir, run.history)  # leaves them one epoch old
        run.first_epoch = self.config.epochs + 1 if ckpt.get("stopped") else epoch + 1
        run.elapsed_before = float(ckpt.get("elapsed_s", 0.0))

    def _engine_state(self, run: _Run) -> dict[str, Any]:
        """What the trainer's own machinery needs to resume: the loss scaler and the schedule."""
        schedule = run.ctx.lr_schedule
        return {
            "precision": self.precision.state_dict(run.ctx.optimizer),
            "lr_schedule": None if schedule is None else schedule.state_dict(),
        }

    def _load_engine_state(self, run: _Run, state: Mapping[str, Any]) -> None:
        self.precision.load_state_dict(run.ctx.optimizer, state.get("precision", {}))
        schedule, saved = run.ctx.lr_schedule, state.get("lr_schedule")
        if (schedule is None) != (saved is None):
            raise ValueError(
                "last.pt was saved with a different base schedule setting than this run's "
                f"(schedule {self.config.schedule!r}, warm-up): resume with the same settings"
            )
        if schedule is not None and saved is not None:
            wanted = schedule.state_dict()["lr_lambdas"]
            if saved["lr_lambdas"] != wanted:
                raise ValueError(
                    f"last.pt's base schedule was {saved['lr_lambdas'][0]}, this run's is "
                    f"{wanted[0]}: a schedule depends on the run's length, so resume with the "
                    "same epochs and schedule settings"
                )
            schedule.load_state_dict(saved)

    def _restore_best(self, ckpt: Mapping[str, Any], epoch: int, best_epoch: int) -> dict[str, Any]:
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
        # the training part, or the rows of a plan the strategy set (ctx.data.set_train_plan)
        loader = ctx.data.epoch_loader() if ctx.data is not None else run.train_loader
        if loader is not run.train_loader:
            self._check_plan_fits(ctx)
        train_stats = self._train_epoch(loader, ctx.optimizer, ctx, epoch)
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

    def _check_plan_fits(self, ctx: StrategyContext) -> None:
        """A training plan (re-sampled rows) changes the epoch's length and is not sharded:
        refuse the settings it would silently break rather than train with them."""
        name = self.strategy.name
        if ctx.lr_schedule is not None:
            raise ValueError(
                f"{name} trains on a re-sampled plan of rows whose epochs are longer than the "
                f"training set's, but the base schedule ({self.config.schedule!r}, warm-up) counts "
                "its steps per epoch from the training set and would end early: use schedule "
                "'constant' with no warm-up for this method"
            )
        if current_ranks().distributed:
            raise ValueError(
                f"{name} trains on a re-sampled plan of rows, which is not sharded over the "
                "processes: it cannot run data-parallel; train it in one process"
            )

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
                "engine": self._engine_state(run),
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
    train_loader: Any
    val_loader: Any
    holdout_loader: Any | None
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
