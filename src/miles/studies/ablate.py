"""``miles ablate``: MILES under a sweep of ``tau`` or ``mu``, next to its references.

The paper's Tables IV (``tau``) and V (``mu``) show how the two hyper-parameters move the fused
metric and the unimodal heads. This study reruns that sweep on one dataset and fusion: MILES once
per value and seed, all from the same base experiment, plus the references that make the numbers
readable: each modality's unimodal model, vanilla ``joint`` and ``joint+aux`` (MILES without any
slow-down), once per seed. Without those references a head metric cannot say whether a modality
is under-trained (the imbalance diagnostic).

Runs live in ``OUT/runs/<name>/seed<k>`` and go through the shared run loop, so an interrupted
ablation resumes. MILES runs are named by their full ``(tau, mu)`` pair, so a tau and a mu
ablation written to the same folder share every run they have in common (the references and the
default ``tau=0.2, mu=0.5``).

With ``mu = 1`` a slowed modality keeps its base rate, so MILES must reproduce ``joint+aux``
exactly, whatever ``tau`` is; the report checks this bit for bit on the validation history.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from miles.report.document import Document
from miles.studies.checks import check_seeds, number_pairs
from miles.studies.config import StudyConfig, quiet_base
from miles.studies.planning import PlanContext, comparison_runs
from miles.studies.runner import PlannedRun, RunBatch
from miles.studies.study import Study, run_study
from miles.studies.summary import Summary, summarize, summary_table
from miles.training.experiment import ExperimentConfig

__all__ = [
    "DEFAULT_FIXED",
    "KIND",
    "PARAMS",
    "AblateConfig",
    "Ablation",
    "compare_histories",
    "mu_one_checks",
    "parse_fixed",
    "parse_values",
    "plan_runs",
    "run_ablation",
]

KIND = "ablate"
#: the MILES hyper-parameters that can be swept
PARAMS = ("tau", "mu")
#: the paper's defaults; the swept parameter replaces its entry
DEFAULT_FIXED: dict[str, float] = {"tau": 0.2, "mu": 0.5}
#: reference methods trained once per seed (unimodal: once per modality)
REFERENCES = ("unimodal", "joint", "joint+aux")


def _check_param_value(param: str, value: Any) -> float:
    """One swept value, checked with the same rule the scheduler applies (fail before training)."""
    if param not in PARAMS:
        raise ValueError(f"unknown parameter {param!r}; choose from {list(PARAMS)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{param} values must be numbers, got {value!r}")
    value = float(value)
    if param == "tau" and value < 0:
        raise ValueError(f"tau must be >= 0, got {value!r}")
    if param == "mu" and not 0.0 < value <= 1.0:
        raise ValueError(f"mu must be in (0, 1], got {value!r}")
    return value


def parse_values(param: str, values: str | Sequence[float]) -> list[float]:
    """``"0.5,0.3,0.2"`` (or a list) -> checked, distinct floats in the given order.

    ``tau`` must be >= 0 and ``mu`` in (0, 1] (a rate factor of 0 would freeze a modality, above 1
    would speed the dominant one up); an unknown parameter or a duplicate is an error, because a
    duplicated value would silently share runs and weigh the table.
    """
    if param not in PARAMS:
        raise ValueError(f"unknown parameter {param!r}; choose from {list(PARAMS)}")
    if isinstance(values, str):
        items = [t.strip() for t in values.split(",") if t.strip()]
        try:
            raw: list[float] = [float(t) for t in items]
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {values!r}") from None
    else:
        raw = list(values)
    if not raw:
        raise ValueError(f"no {param} values given")
    checked = [_check_param_value(param, v) for v in raw]
    if len(set(checked)) != len(checked):
        raise ValueError(f"{param} values have duplicates: {checked}")
    return checked


def parse_fixed(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"tau=0.2,mu=0.5"`` -> ``{"tau": 0.2, "mu": 0.5}``; missing keys take the defaults."""
    fixed = dict(DEFAULT_FIXED)
    if text is None:
        return fixed
    if isinstance(text, str):
        pairs: dict[str, Any] = number_pairs(text.split(","), "--fixed")
    else:
        pairs = dict(text)
    for key, value in pairs.items():
        fixed[key] = _check_param_value(key, value)
    return fixed


def _name(value: float) -> str:
    """A short exact text for a value (``repr`` of the float: 0.1 stays ``0.1``)."""
    return repr(float(value))


def _ablate_base() -> ExperimentConfig:
    base = quiet_base(epochs=15)
    base.dataset = "mfeat-pix-fou"
    return base


@dataclass
class AblateConfig(StudyConfig):
    """MILES at every ``values`` of ``param`` (the other one ``fixed``) x ``seeds``, from
    ``base`` (its strategy, seed and ``out_dir`` are set per run)."""

    base: ExperimentConfig = field(default_factory=_ablate_base)
    param: str = "tau"
    values: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.2, 0.1, 0.0])
    fixed: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FIXED))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out_dir: str = "ablate-out"

    EXTENDABLE: ClassVar[tuple[str, ...]] = ("param", "values", "fixed", "seeds", "out_dir")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.param not in PARAMS:
            raise ValueError(f"unknown parameter {self.param!r}; choose from {list(PARAMS)}")
        self.values = parse_values(self.param, self.values)
        self.fixed = parse_fixed(self.fixed)
        self.seeds = check_seeds(self.seeds)

    def miles_params(self, value: float) -> dict[str, float]:
        """The MILES keyword arguments at one swept value."""
        return {**self.fixed, self.param: value}

    def setting_label(self, value: float) -> str:
        return f"{self.param}={value:g}"

    @property
    def other(self) -> str:
        """The parameter held fixed."""
        return "mu" if self.param == "tau" else "tau"

    @property
    def stem(self) -> str:
        """File stem: ``ablate_mu``, or ``ablate_mu_tau0.0`` off the default fixed value.

        Several ablations of one parameter (under different fixed values) can then share one
        output folder, and its runs, without overwriting each other's files.
        """
        value = self.fixed[self.other]
        suffix = "" if value == DEFAULT_FIXED[self.other] else f"_{self.other}{_name(value)}"
        return f"{KIND}_{self.param}{suffix}"


def plan_runs(config: AblateConfig, modalities: Sequence[str]) -> list[PlannedRun]:
    """Every run, seed-major so a partial ablation already has complete seeds."""
    root = Path(config.out_dir) / "runs"
    ctx = PlanContext(tuple(modalities), dict)
    runs: list[PlannedRun] = []
    for seed in config.seeds:
        cells: list[tuple[str, str, dict[str, Any], str, float | None]] = []
        for ref in REFERENCES:
            for label, params in comparison_runs(ref, ctx):
                folder = f"{ref}-{label}" if label else ref
                cells.append((ref, label or ref, params, folder, None))
        for swept in config.values:
            params = config.miles_params(swept)
            folder = f"miles-tau{_name(params['tau'])}-mu{_name(params['mu'])}"
            cells.append(("miles", config.setting_label(swept), params, folder, swept))
        for method, label, params, folder, value in cells:
            runs.append(
                PlannedRun(
                    config.run_config(
                        strategy=method,
                        strategy_params=dict(params),
                        seed=seed,
                        out_dir=str(root / folder / f"seed{seed}"),
                    ),
                    {"method": method, "label": label, "seed": seed, "value": value},
                    f"seed {seed} {label}",
                )
            )
    return runs


def compare_histories(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """``None`` when two results have exactly equal validation histories and test metrics.

    Compares every ``val_*`` entry of every epoch (the numbers MILES decides on and the best epoch
    is chosen by) with ``==``, then the chosen epoch and both test evaluations; otherwise returns
    where they first differ.
    """
    ha, hb = a["history"], b["history"]
    if len(ha) != len(hb):
        return f"{len(ha)} vs {len(hb)} epochs"
    for ra, rb in zip(ha, hb, strict=True):
        va = {k: v for k, v in ra.items() if k.startswith("val_")}
        vb = {k: v for k, v in rb.items() if k.startswith("val_")}
        if va != vb:
            keys = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
            return f"epoch {ra['epoch']}: {keys[0]} {va.get(keys[0])!r} vs {vb.get(keys[0])!r}"
    for key in ("best_epoch", "test", "test_last"):
        if a.get(key) != b.get(key):
            return f"{key} differs"
    return None


def mu_one_checks(
    config: AblateConfig, results: Mapping[tuple[str, int], Mapping[str, Any] | None]
) -> list[dict[str, Any]]:
    """For every MILES setting with ``mu = 1``: is each seed bit-identical to ``joint+aux``?

    ``results`` maps ``(label, seed)`` to a run's result (``None``: failed or missing).
    """
    checks = []
    for value in config.values:
        if config.miles_params(value)["mu"] != 1.0:
            continue
        label = config.setting_label(value)
        differences: dict[int, str] = {}
        compared = []
        for seed in config.seeds:
            mine, ref = results.get((label, seed)), results.get(("joint+aux", seed))
            if not mine or not ref:
                continue
            compared.append(seed)
            diff = compare_histories(mine, ref)
            if diff is not None:
                differences[seed] = diff
        checks.append(
            {
                "setting": label,
                "seeds_compared": compared,
                "identical": bool(compared) and not differences,
                "differences": differences,
            }
        )
    return checks


def _verdict(check: Mapping[str, Any]) -> str:
    if not check["seeds_compared"]:
        return "not checked (no finished pair of runs)"
    if check["identical"]:
        n = len(check["seeds_compared"])
        return (
            f"bit-identical to joint+aux in {n}/{n} seeds (every validation metric of every "
            "epoch, the chosen epoch and both test evaluations compared with ==)"
        )
    return f"NOT identical to joint+aux: {check['differences']}"


class Ablation(Study[AblateConfig]):
    """The ablation: references and MILES at every swept value; the ``mu = 1`` checks."""

    kind = KIND
    config_type = AblateConfig
    title_format = "miles ablate {config.param}: {config.base.dataset}, {config.base.fusion} fusion"
    columns = (("method", "label", "value", "seed"), ("label", "method", "uses_aux_losses"))

    @property
    def stem(self) -> str:
        return self.config.stem

    def plan(self) -> list[PlannedRun]:
        return plan_runs(self.config, self.data.modalities)

    def rows(self, batch: RunBatch) -> list[dict[str, Any]]:
        return [o.row(self.out) | {"fusion": self.config.base.fusion} for o in batch.outcomes]

    @classmethod
    def aggregate(
        cls, rows: Sequence[Mapping[str, Any]], config: AblateConfig, modalities: Sequence[str]
    ) -> Summary:
        """References first, then the swept values in the given order."""
        rank = {"unimodal": 0, "joint": 1, "joint+aux": 2}
        rank |= {config.setting_label(v): 3 + i for i, v in enumerate(config.values)}
        return summarize(rows, modalities, rank=lambda a: rank.get(a["label"] or a["method"], 99))

    def extra(self, batch: RunBatch) -> dict[str, Any]:
        results = {(o.run.ident["label"], o.run.ident["seed"]): o.result for o in batch.outcomes}
        return {"mu_one_checks": mu_one_checks(self.config, results)}

    @classmethod
    def write_up(
        cls, doc: Document, payload: Mapping[str, Any], config: AblateConfig, summary: Summary
    ) -> None:
        """The Table IV/V-shaped table and the ``mu = 1`` checks."""
        section = doc.section(f"{config.param} ablation")
        caption = f"MILES over {config.param}: test {payload['metric']} (%)"
        section.blocks.append(summary_table(caption, summary.aggregate, summary.order))
        section.paragraphs += [
            f"Check, MILES with mu = 1 ({c['setting']}): {_verdict(c)}."
            for c in payload.get("mu_one_checks", [])
        ]
        other = f"{config.other} = {config.fixed[config.other]:g}"
        doc.intro.append(
            f"MILES with {config.param} in {config.values} and {other}; "
            f"{config.base.trainer.epochs} epochs. Test {payload['metric']} (%) at the chosen "
            f"epoch, mean ± std over seeds {config.seeds}. {summary.explain()}"
        )


def run_ablation(config: AblateConfig, **options: Any) -> dict[str, Any]:
    """Run (or resume) the ablation and write ``<stem>.md`` (the table), ``<stem>_table.csv``
    (aggregated), ``<stem>_runs.csv`` (one row per run) and ``<stem>.json`` (everything,
    ``kind: ablate``); ``<stem>`` is :attr:`AblateConfig.stem`; ``options`` as
    :func:`~miles.studies.study.run_study`. Returns what ``<stem>.json`` holds."""
    return run_study(Ablation, config, **options)
