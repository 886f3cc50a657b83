"""``miles sweep``: the paper's hyper-parameter search for one method, with Optuna.

The paper tunes every method on the validation set: it samples the learning rate and the method's
own hyper-parameters (``tau``/``mu`` for MILES, ``alpha`` for OGM, ...) at random, keeps the trial
with the best validation fused metric, reports that trial's test result, and re-runs it over
several seeds for mean ± std. This study does exactly that:

- the search spaces are a table keyed by method name (:mod:`miles.studies.search_space`); what a
  method takes from the study rather than the search (MSLR's per-modality rates, from the
  unimodal tuning as the paper does) comes from :func:`miles.studies.planning.method_inputs`;
- the trial loop is Optuna's, with seeded per-trial samplers and a resumable storage
  (:mod:`miles.studies.optuna_study`), and every trial trains through the shared per-run runner
  (:func:`miles.studies.runner.run_one`: settings checked, divergence recorded, progress with ETA);
- best = highest validation fused metric (ties: lowest trial number); its parameters are re-run
  over seeds ``0..K-1`` through the shared run loop, and ``OUT/<study slug>/sweep.json`` /
  ``sweep.md`` hold the best parameters, every trial and the mean ± std over the re-runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from miles.report.document import Document, Table
from miles.report.tables import pct
from miles.studies.config import StudyConfig, quiet_base
from miles.studies.optimizers import check_method_optimizers
from miles.studies.optuna_study import RETRY_OF, SAMPLERS, open_study, trial_counts
from miles.studies.planning import PlanContext, method_inputs
from miles.studies.runner import IGNORED_SETTINGS, Echo, PlannedRun, Progress, RunBatch, run_one
from miles.studies.search_space import run_settings, search_space, suggest
from miles.studies.storage import shown
from miles.studies.study import Study, run_study
from miles.studies.summary import Summary, summary_table
from miles.training.experiment import ExperimentConfig

if TYPE_CHECKING:
    import optuna

__all__ = [
    "KIND",
    "Sweep",
    "SweepConfig",
    "run_sweep",
    "select_best",
    "study_slug",
]

KIND = "sweep"
#: the columns of the re-runs' table
RERUN_COLUMNS = ("fused", "heads", "gap", "probe", "slice", "chosen", "acted", "n")


def _sweep_base() -> ExperimentConfig:
    return quiet_base(epochs=10)


@dataclass
class SweepConfig(StudyConfig):
    """One sweep: ``method`` from ``base`` (dataset, fusion, budget; its trainer seed seeds the
    sampler and every trial; its learning rate is searched), ``trials`` sampled settings, then
    ``rerun_seeds`` re-runs of the best one. ``storage`` defaults to ``sqlite:///OUT/sweep.db``
    and ``study_name`` to ``dataset-method-fusion``. ``wait``: when no trial is left to start
    but some run elsewhere, keep polling (re-running those whose worker died) until all have
    finished, instead of stopping. ``sweep_lrs``/``sweep_epochs``/``sweep_cache`` configure the
    unimodal LR sweep MSLR takes its rates from (default cache: the study folder's
    ``lr-sweep``); ``method_optimizers`` may give the method its own optimizer settings (as in
    ``miles compare``; its learning rate is searched, so it may not set ``lr``)."""

    base: ExperimentConfig = field(default_factory=_sweep_base)
    method: str = "miles"
    trials: int = 10
    sampler: str = "random"
    rerun_seeds: int = 3
    storage: str | None = None
    study_name: str | None = None
    stale_after: int = 120
    wait: bool = False
    sweep_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    sweep_epochs: int = 5
    sweep_cache: str | None = None
    method_optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_dir: str = "sweep-out"

    #: may differ between the workers of one study: they do not change what a trial measures
    EXTENDABLE: ClassVar[tuple[str, ...]] = (
        "trials",
        "rerun_seeds",
        "storage",
        "study_name",
        "stale_after",
        "wait",
        "out_dir",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        search_space(self.method)  # unknown or unsweepable methods fail here, before any work
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name, low in (("trials", 1), ("rerun_seeds", 0), ("stale_after", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value!r}")
        if not isinstance(self.wait, bool):
            raise TypeError(f"wait must be a bool, got {self.wait!r}")
        self.method_optimizers = check_method_optimizers(self.method_optimizers, [self.method])
        if "lr" in self.method_optimizers.get(self.method, {}):
            raise ValueError("method_optimizers may not set lr in a sweep: the sweep searches it")
        self.run_config(strategy=self.method)  # validates the method with the base

    @property
    def seed(self) -> int:
        return self.base.trainer.seed

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(Path(self.out_dir) / 'sweep.db').resolve()}"

    @property
    def name(self) -> str:
        return self.study_name or f"{self.base.dataset}-{self.method}-{self.base.fusion}"

    @property
    def study_dir(self) -> Path:
        """``OUT/<slug of the study name>``: the run folders and reports of this study only."""
        return Path(self.out_dir) / study_slug(self.name)

    def to_dict(self) -> dict[str, Any]:
        """As stored in ``sweep.json``: a password in ``storage`` is masked."""
        raw = super().to_dict()
        if raw["storage"]:
            raw["storage"] = shown(raw["storage"])
        return raw

    def shared_settings(self) -> dict[str, Any]:
        """What every process working on one study must agree on: the base experiment (but the
        searched rate, device and output folder), the method, sampler and search space."""
        base = self.base.to_dict()
        for key in ("strategy", "strategy_params", "out_dir"):
            base.pop(key)
        base["trainer"].pop("lr")  # searched
        for key in IGNORED_SETTINGS:  # what does not change a run's numbers may differ too
            section, _, name = key.partition(".")
            if name and section == "trainer":
                base["trainer"].pop(name, None)
        settings = {
            "base": base,
            "method": self.method,
            "sampler": self.sampler,
            "search_space": [p.__dict__ for p in search_space(self.method)],
        }
        if self.method_optimizers:  # only when set, so older studies still open
            settings["method_optimizer"] = self.method_optimizers[self.method]
        return dict(json.loads(json.dumps(settings)))


def study_slug(name: str) -> str:
    """A folder name for study ``name``: the name itself when it is a safe one, else its safe
    characters plus a short hash of the name, so two names never share a folder."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "study"
    if slug == name:
        return slug
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def select_best(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest validation fused metric; ties: lowest number."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["val"] is not None]
    if not done:
        return None
    return dict(max(done, key=lambda r: (r["val"], -r["number"])))


def _trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        result = t.user_attrs.get("result") or {}
        test = result.get("test") or {}
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "val": t.value if t.state.name == "COMPLETE" else None,
                "test": test.get("fused"),
                "test_unimodal": test.get("unimodal"),
                "best_epoch": result.get("best_epoch"),
                "wall_time_s": result.get("wall_time_s"),
                "diverged": t.user_attrs.get("diverged"),
                RETRY_OF: t.user_attrs.get(RETRY_OF),
                "run_dir": t.user_attrs.get("run_dir"),
            }
        )
    return rows


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _trials_table(trials: Sequence[Mapping[str, Any]]) -> Table:
    rows = []
    for r in trials:
        note = []
        if r["diverged"]:
            note.append(f"diverged: {r['diverged']}")
        if r[RETRY_OF] is not None:
            note.append(f"re-run of interrupted trial {r[RETRY_OF]}")
        if r["state"] == "FAIL":
            note.append("interrupted")
        rows.append(
            [
                str(r["number"]),
                r["state"],
                _fmt_params(r["params"]),
                pct(r["val"]),
                pct(r["test"]),
                "; ".join(note),
            ]
        )
    return Table("every trial", ["trial", "state", "params", "val", "test", "note"], rows)


class Sweep(Study[SweepConfig]):
    """The sweep: its plan is the search itself (Optuna's trial loop, each trial through the
    shared per-run runner), which yields the re-runs of the best trial, run by the shared loop."""

    kind = KIND
    config_type = SweepConfig
    title_format = (
        "miles sweep: {config.method} on {config.base.dataset} ({config.base.fusion} fusion)"
    )
    columns = (("seed",), ("method",))

    def __init__(self, config: SweepConfig, data: Any, echo: Echo) -> None:
        super().__init__(config, data, echo)
        self.progress = Progress(0, echo)
        self.trials: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.finished = self.running = 0
        #: the strategy params every trial takes from the study (:meth:`inputs`)
        self.fixed: dict[str, Any] | None = None

    @property
    def out(self) -> Path:
        return self.config.study_dir

    def check(self) -> None:
        """The study's shared settings are checked by its Optuna storage (:meth:`plan`)."""
        self.out.mkdir(parents=True, exist_ok=True)

    def inputs(self) -> dict[str, Any]:
        """What every trial of the method takes from the study, not from the search
        (:func:`~miles.studies.planning.method_inputs`; e.g. MSLR's unimodal rates, tuned on each
        modality's own validation metric as the paper does), less what the search samples."""
        if self.fixed is None:
            from miles.studies.lr_sweep import sweep_unimodal_lrs

            cfg = self.config

            def unimodal_lrs() -> dict[str, float]:
                return sweep_unimodal_lrs(
                    cfg.run_config(),
                    self.data,
                    lrs=cfg.sweep_lrs,
                    epochs=cfg.sweep_epochs,
                    cache_dir=cfg.sweep_cache or self.out / "lr-sweep",
                    echo=self.echo,
                )

            ctx = PlanContext(tuple(self.data.modalities), unimodal_lrs, cfg.base.dataset)
            searched = {p.name for p in search_space(cfg.method)}
            found = method_inputs(cfg.method, ctx)
            self.fixed = {k: v for k, v in found.items() if k not in searched}
        return dict(self.fixed)

    def _planned(self, params: Mapping[str, Any], *, seed: int, out: Path, name: str) -> PlannedRun:
        """One run of the method with a trial's flat parameters (and the study's inputs)."""
        cfg = self.config
        lr, strategy_params = run_settings(cfg.method, params, self.data.modalities)
        exp = cfg.run_config(
            strategy=cfg.method,
            strategy_params={**self.inputs(), **strategy_params},
            lr=lr,
            seed=seed,
            out_dir=str(out),
            **cfg.method_optimizers.get(cfg.method, {}),
        )
        return PlannedRun(exp, {"method": cfg.method, "label": "", "seed": seed}, name)

    def _objective(self, trial: optuna.Trial) -> float:
        import optuna

        params = suggest(trial, self.config.method, self.data.modalities)
        run_dir = self.out / "trials" / f"trial{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        name = f"trial {trial.number} ({_fmt_params(params)})"
        run = self._planned(params, seed=self.config.seed, out=run_dir, name=name)
        outcome = run_one(run, self.data, progress=self.progress, label="sweep run")
        if outcome.result is None:
            # a setting that diverges is a finished, bad trial: recorded, never re-run
            trial.set_user_attr("diverged", outcome.failed)
            raise optuna.TrialPruned(f"diverged: {outcome.failed}")
        result = outcome.result
        value = float(result["val"]["fused"])
        # one attribute, one storage write: what the trial table shows besides the value
        trial.set_user_attr(
            "result",
            {k: result[k] for k in ("test", "best_epoch", "wall_time_s")},
        )
        if not math.isfinite(value):
            trial.set_user_attr("diverged", f"validation fused metric {value}")
            raise optuna.TrialPruned(f"validation fused metric {value}")
        return value

    def plan(self) -> list[PlannedRun]:
        """Run (or resume, or join) the search; then the best trial's re-runs, once every
        trial has finished (else none: the sweep says the re-runs wait)."""
        cfg = self.config
        fixed = self.inputs()  # e.g. MSLR's unimodal rates: every trial shares them
        shared = open_study(
            cfg.storage_url,
            cfg.name,
            sampler=cfg.sampler,
            seed=cfg.seed,
            stale_after=cfg.stale_after,
            settings={**cfg.shared_settings(), **({"inputs": fixed} if fixed else {})},
        )
        study = shared.study
        finished, running = trial_counts(study)
        self.progress.to_train = max(cfg.trials - finished - running, 0)
        announced = waiting = False
        while True:
            claim = shared.claim(cfg.trials)
            if claim.requeued:
                self.echo(f"interrupted trials {claim.requeued}: re-run with the same parameters")
            if claim.trial is None:
                if not (cfg.wait and claim.running and claim.finished < cfg.trials):
                    break
                if not waiting:
                    self.echo(
                        f"waiting for {claim.running} trials running elsewhere (one silent for "
                        f"{cfg.stale_after} s is re-run here)"
                    )
                    waiting = True
                time.sleep(shared.heartbeat_interval)
                continue
            if not announced:
                self.echo(
                    f"study {cfg.name!r}: {claim.finished} of {cfg.trials} trials finished, "
                    f"{claim.running} running elsewhere; storage {shown(cfg.storage_url)}"
                )
                announced = True
            shared.run(claim.trial, self._objective)
        self.trials = _trial_rows(study)
        self.best = select_best(self.trials)
        self.finished, self.running = trial_counts(study)
        if self.best is None or self.finished < cfg.trials:
            return []
        best = self.best
        self.echo(f"best trial {best['number']}: {_fmt_params(best['params'])}")
        return [
            self._planned(
                best["params"],
                seed=seed,
                out=self.out / "rerun" / f"trial{best['number']:04d}" / f"seed{seed}",
                name=f"re-run of trial {best['number']}, seed {seed}",
            )
            for seed in range(cfg.rerun_seeds)
        ]

    def extra(self, batch: RunBatch) -> dict[str, Any]:
        import optuna

        cfg = self.config
        waiting = self.best is not None and cfg.rerun_seeds and self.finished < cfg.trials
        note = (
            f"Re-runs wait until all {cfg.trials} trials have finished ({self.finished} "
            f"finished, {self.running} running elsewhere or left by a killed process, which is "
            f"re-run once silent for {cfg.stale_after} s): run the same command again, or with "
            "--wait to poll until they finish."
        )
        return {
            "study_name": cfg.name,
            "storage": shown(cfg.storage_url),
            "search_space": [p.describe() for p in search_space(cfg.method)],
            "inputs": self.fixed or {},
            "finished": self.finished,
            "best": self.best,
            "rerun_seeds": list(range(cfg.rerun_seeds)),
            "rerun_note": note if waiting else None,
            "trials": self.trials,
            "meta": f"Optuna {optuna.__version__}.",
            "wall_s": time.perf_counter() - self.progress.start,
            "trained": self.progress.trained + batch.trained,
        }

    @classmethod
    def write_up(
        cls, doc: Document, payload: Mapping[str, Any], config: SweepConfig, summary: Summary
    ) -> None:
        """The best trial, the mean ± std of its re-runs, and every trial."""
        t, best, metric = config.base.trainer, payload["best"], payload["metric"]
        doc.intro += [
            f"Study `{payload['study_name']}`: {payload['finished']} of {config.trials} trials "
            f"finished, {config.sampler} sampler, seed {t.seed}, {t.epochs} epochs each. Metric: "
            f"{metric} (%); val = the run's best validation fused metric (the selection "
            "criterion), test = fused test metric at that epoch.",
            "Search space: " + "; ".join(payload["search_space"]) + ".",
            (
                "Fixed for every trial (from the study, not searched): "
                + _fmt_params(payload["inputs"])
                + "."
            )
            if payload.get("inputs")
            else "",
            "No trial has completed yet."
            if best is None
            else f"**Best trial {best['number']}** (highest val; ties: lowest number): "
            f"{_fmt_params(best['params'])}; val {pct(best['val'])}, test {pct(best['test'])}.",
            payload.get("rerun_note") or "",
        ]
        if payload["rows"]:
            section = doc.section(f"Best parameters over seeds {payload['rerun_seeds']}")
            section.paragraphs.append(
                f"Test {metric} (%), mean ± std over the re-runs. " + summary.explain(RERUN_COLUMNS)
            )
            table = summary_table(
                "the best parameters re-run", summary.aggregate, summary.order, groups=RERUN_COLUMNS
            )
            section.blocks.append(table)
        doc.section("Trials").blocks.append(_trials_table(payload["trials"]))


def run_sweep(config: SweepConfig, **options: Any) -> dict[str, Any]:
    """Run (or resume, or join) the sweep, re-run its best trial, write ``sweep.md`` and
    ``sweep.json`` (``kind: sweep``) into :attr:`SweepConfig.study_dir`; ``options`` as
    :func:`~miles.studies.study.run_study`. A sweep whose trials are still running elsewhere
    reports what has finished and skips the re-runs; running the command again once they finish
    completes it. Returns what ``sweep.json`` holds."""
    return run_study(Sweep, config, **options)
