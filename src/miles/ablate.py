"""``miles ablate``: MILES under a sweep of ``tau`` or ``mu``, next to its references.

The paper's Tables IV (``tau``) and V (``mu``) show how the two hyper-parameters move the fused
metric and the two unimodal heads. This module reruns that sweep on one dataset and fusion: MILES
once per value and seed, all under the same trainer settings, plus the references that make the
numbers readable: each modality's unimodal model (same encoder and budget), vanilla ``joint`` and
``joint+aux`` (MILES without any slow-down), once per seed. Without those references a head
metric cannot say whether a modality is under-trained (the imbalance diagnostic).

Runs live in ``OUT/runs/<name>/seed<k>`` with a ``done.json`` marker, so an interrupted ablation
resumes (finished runs are only read, an unfinished one continues from its ``last.pt``). MILES runs
are named by their full ``(tau, mu)`` pair, so a tau and a mu ablation written to the same folder
share every run they have in common (the references and the default ``tau=0.2, mu=0.5``).

With ``mu = 1`` a slowed modality keeps its base rate, so MILES must reproduce ``joint+aux``
exactly, whatever ``tau`` is; the report checks this bit for bit on the validation history.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from miles.cli_args import key_value, positive_int
from miles.compare import DONE, _check_same_settings, _write_csv, dominant_order, run_or_resume
from miles.report.tables import aggregate, pm, summarize_run
from miles.training.experiment import ExperimentConfig, run_experiment
from miles.training.history import write_json
from miles.training.trainer import TrainerConfig

__all__ = [
    "DEFAULT_FIXED",
    "PARAMS",
    "AblateConfig",
    "AblationRun",
    "add_parser",
    "compare_histories",
    "parse_fixed",
    "parse_values",
    "plan_runs",
    "run_ablation",
    "run_cli",
]

#: the MILES hyper-parameters that can be swept
PARAMS = ("tau", "mu")
#: the paper's defaults; the swept parameter replaces its entry
DEFAULT_FIXED: dict[str, float] = {"tau": 0.2, "mu": 0.5}
#: reference methods trained once per seed (unimodal: once per modality)
REFERENCES = ("unimodal", "joint", "joint+aux")
#: settings that may differ between invocations sharing an output folder (they only add runs)
_EXTENDABLE = ("param", "values", "fixed", "seeds", "out_dir")


def _check_param_value(param: str, value: float) -> float:
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
        pairs: dict[str, Any] = {}
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--fixed expects KEY=VALUE pairs, got {item!r}")
            try:
                pairs[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--fixed {key.strip()}: not a number: {value!r}") from None
    else:
        pairs = dict(text)
    for key, value in pairs.items():
        fixed[key] = _check_param_value(key, value)
    return fixed


def _name(value: float) -> str:
    """A short exact text for a value (``repr`` of the float: 0.1 stays ``0.1``)."""
    return repr(float(value))


@dataclass
class AblateConfig:
    """One ablation: MILES at every ``values`` of ``param`` x ``seeds``, on one dataset/fusion."""

    dataset: str = "mfeat-pix-fou"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    fusion: str = "concat"
    param: str = "tau"
    values: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.2, 0.1, 0.0])
    fixed: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FIXED))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 15
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    latent_dim: int = 64
    out_dir: str = "ablate-out"

    def __post_init__(self) -> None:
        if self.param not in PARAMS:
            raise ValueError(f"unknown parameter {self.param!r}; choose from {list(PARAMS)}")
        self.values = parse_values(self.param, self.values)
        self.fixed = parse_fixed(self.fixed)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        # TrainerConfig and ExperimentConfig validate the rest; build them now to fail early.
        self.trainer_config(self.seeds[0])
        ExperimentConfig(dataset=self.dataset, fusion=self.fusion, latent_dim=self.latent_dim)

    def trainer_config(self, seed: int) -> TrainerConfig:
        return TrainerConfig(
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            seed=seed,
            progress=False,
        )

    def miles_params(self, value: float) -> dict[str, float]:
        """The MILES keyword arguments at one swept value."""
        return {**self.fixed, self.param: value}

    def setting_label(self, value: float) -> str:
        return f"{self.param}={value:g}"

    @property
    def stem(self) -> str:
        """Report file stem: ``ablate_mu``, or ``ablate_mu_tau0.0`` off the default fixed value.

        Several ablations of one parameter (under different fixed values) can then share one
        output folder, and its runs, without overwriting each other's reports.
        """
        other = "mu" if self.param == "tau" else "tau"
        suffix = (
            ""
            if self.fixed[other] == DEFAULT_FIXED[other]
            else f"_{other}{_name(self.fixed[other])}"
        )
        return f"ablate_{self.param}{suffix}"


@dataclass
class AblationRun:
    """One training run of the ablation and where it lives on disk."""

    method: str
    label: str  #: table row: "tau=0.2", "joint", ... ; a modality's name for unimodal runs
    params: dict[str, Any]
    seed: int
    out_dir: Path
    value: float | None = None  #: the swept value (MILES runs only)


def plan_runs(config: AblateConfig, modalities: Sequence[str]) -> list[AblationRun]:
    """Every run, seed-major so a partial ablation already has complete seeds."""
    root = Path(config.out_dir) / "runs"
    runs: list[AblationRun] = []
    for seed in config.seeds:
        for m in modalities:
            runs.append(
                AblationRun(
                    "unimodal", m, {"modality": m}, seed, root / f"unimodal-{m}" / f"seed{seed}"
                )
            )
        for ref in ("joint", "joint+aux"):
            runs.append(AblationRun(ref, ref, {}, seed, root / ref / f"seed{seed}"))
        for value in config.values:
            params = config.miles_params(value)
            name = f"miles-tau{_name(params['tau'])}-mu{_name(params['mu'])}"
            runs.append(
                AblationRun(
                    "miles",
                    config.setting_label(value),
                    params,
                    seed,
                    root / name / f"seed{seed}",
                    value,
                )
            )
    return runs


def _train(run: AblationRun, config: AblateConfig, data: Any) -> dict[str, Any]:
    """Train (or resume) one run and return its result dict; finished runs are only read.

    Same contract as ``miles compare``: ``done.json`` marks a finished run, a diverged run
    (``FloatingPointError``) is recorded as failed and not retried, and a run folder started under
    other settings is refused instead of mixed.
    """
    exp = ExperimentConfig(
        dataset=config.dataset,
        dataset_params=dict(config.dataset_params),
        fusion=config.fusion,
        latent_dim=config.latent_dim,
        strategy=run.method,
        strategy_params=dict(run.params),
        trainer=config.trainer_config(run.seed),
        out_dir=str(run.out_dir),
    )
    return run_or_resume(exp, data, runner=run_experiment)


def slowed_epochs(result: Mapping[str, Any], modalities: Sequence[str]) -> dict[str, list[int]]:
    """Per modality, the epochs it was *trained* at a rate below the base rate.

    Read from the learning rates the history records for each epoch (the rates the epoch trained
    with), not from the decisions: with ``mu = 1`` MILES still "decides" to slow a modality but
    nothing changes, and the decision after the last epoch never applies.
    """
    base = float(result["config"]["lr"])
    out: dict[str, list[int]] = {m: [] for m in modalities}
    for row in result["history"]:
        for m in modalities:
            lr = row.get(f"lr_{m}")
            if lr is not None and lr < base:
                out[m].append(int(row["epoch"]))
    return out


def _row(run: AblationRun, result: Mapping[str, Any], modalities: Sequence[str]) -> dict[str, Any]:
    """One table row per run: chosen-epoch test metrics, last-epoch test metrics, MILES activity."""
    row = summarize_run(result)
    row.update({"method": run.method, "label": run.label, "seed": run.seed, "value": run.value})
    last = result.get("test_last")
    row["fused_last"] = last["fused"] if last else None
    slowed = slowed_epochs(result, modalities)
    acted = sorted({e for eps in slowed.values() for e in eps})
    row["acted"] = len(acted) if run.method == "miles" else None
    row["acted_epochs"] = acted if run.method == "miles" else None
    for m in modalities:
        row[f"slowed_{m}"] = len(slowed[m]) if run.method == "miles" else None
    return row


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


def _mu_one_checks(
    config: AblateConfig, results: Mapping[tuple[str, str, int], Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """For every MILES setting with ``mu = 1``: is each seed bit-identical to ``joint+aux``?"""
    checks = []
    for value in config.values:
        if config.miles_params(value)["mu"] != 1.0:
            continue
        label = config.setting_label(value)
        differences: dict[int, str] = {}
        compared = []
        for seed in config.seeds:
            mine = results.get(("miles", label, seed))
            ref = results.get(("joint+aux", "joint+aux", seed))
            if not mine or not ref or "failed" in mine or "failed" in ref:
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


def _table(
    rows: list[dict[str, Any]], config: AblateConfig, order: list[str]
) -> list[dict[str, Any]]:
    """Aggregate per table row (references first, then the swept values in the given order)."""
    ok = [r for r in rows if not r.get("failed")]
    refs = {(r["seed"], r["label"]): r[r["label"]] for r in ok if r["method"] == "unimodal"}
    table = []
    for seed in config.seeds:
        own = {m: refs.get((seed, m)) for m in order}
        if all(v is not None for v in own.values()):
            table.append(
                {"label": "unimodal", "method": "unimodal", "seed": seed}
                | own
                | {"gap": own[order[0]] - own[order[-1]]}  # type: ignore[operator]
            )
    for r in ok:
        if r["method"] == "unimodal":
            continue
        r["gap"] = r[order[0]] - r[order[-1]]
        for m in order:
            ref = refs.get((r["seed"], m))
            r[f"{m}_vs_unimodal"] = None if ref is None else r[m] - ref
        table.append(r)
    values = [
        "fused",
        *order,
        "gap",
        *(f"{m}_vs_unimodal" for m in order),
        "best_epoch",
        "acted",
        *(f"slowed_{m}" for m in order),
        "fused_last",
        *(f"{m}_last" for m in order),
    ]
    agg = aggregate(table, ["label", "method"], values)
    rank = {"unimodal": 0, "joint": 1, "joint+aux": 2}
    rank |= {config.setting_label(v): 3 + i for i, v in enumerate(config.values)}
    agg.sort(key=lambda a: rank.get(a["label"], 99))
    return agg


def markdown_report(
    agg: list[dict[str, Any]],
    config: AblateConfig,
    order: list[str],
    rule: str,
    metric: str,
    checks: list[dict[str, Any]],
    meta: str,
    failures: Mapping[str, int],
) -> str:
    """The Table IV/V-shaped markdown with the imbalance diagnostic and last-epoch heads."""
    dom, weak = order[0], order[-1]
    other = config.fixed["mu" if config.param == "tau" else "tau"]
    other_name = "mu" if config.param == "tau" else "tau"
    lines = [
        f"# miles ablate {config.param}: {config.dataset}, {config.fusion} fusion",
        "",
        f"MILES with {config.param} in {[float(v) for v in config.values]} and {other_name} = "
        f"{other:g}. Test {metric} (%), mean ± std over seeds {config.seeds}. Dominant modality "
        f"by {rule}: {dom}; weaker: {weak}. Chosen epoch = best fused metric on validation; "
        "'last' = the same runs scored at the last epoch. 'vs uni' = the head minus the same "
        "modality's unimodal model (same encoder, budget and seed): how far joint training leaves "
        "that encoder behind (the imbalance diagnostic). 'acted' = epochs trained with a lowered "
        f"rate (of {config.epochs}); 'slowed {dom}/{weak}' = such epochs per modality.",
        "",
        f"| setting | fused | {dom} head (dominant) | {weak} head | gap | {dom} vs uni | "
        f"{weak} vs uni | chosen epoch | acted | slowed {dom} / {weak} | last: fused | "
        f"last: {dom} | last: {weak} |",
        "|---|" + "---|" * 12,
    ]
    for a in agg:
        is_miles = a["method"] == "miles"
        uni = a["method"] == "unimodal"
        label = "unimodal (each alone)" if uni else a["label"]
        acted = pm(a, "acted", pct=False) if is_miles else "-"
        slowed = (
            f"{pm(a, f'slowed_{dom}', pct=False)} / {pm(a, f'slowed_{weak}', pct=False)}"
            if is_miles
            else "-"
        )
        dash = "-"
        lines.append(
            f"| {label} | {dash if uni else pm(a, 'fused')} | {pm(a, dom)} | {pm(a, weak)} | "
            f"{pm(a, 'gap')} | {dash if uni else pm(a, f'{dom}_vs_unimodal')} | "
            f"{dash if uni else pm(a, f'{weak}_vs_unimodal')} | "
            f"{pm(a, 'best_epoch', pct=False)} | {acted} | {slowed} | "
            f"{dash if uni else pm(a, 'fused_last')} | {pm(a, f'{dom}_last')} | "
            f"{pm(a, f'{weak}_last')} |"
        )
    lines.append("")
    for check in checks:
        if not check["seeds_compared"]:
            verdict = "not checked (no finished pair of runs)"
        elif check["identical"]:
            n = len(check["seeds_compared"])
            verdict = (
                f"bit-identical to joint+aux in {n}/{n} seeds "
                "(every validation metric of every epoch, the chosen epoch and both test "
                "evaluations compared with ==)"
            )
        else:
            verdict = f"NOT identical to joint+aux: {check['differences']}"
        lines += [f"Check, MILES with mu = 1 ({check['setting']}): {verdict}.", ""]
    if failures:
        notes = "; ".join(f"{k}: {n} run(s)" for k, n in failures.items())
        lines += [f"Diverged runs (left out of the means): {notes}.", ""]
    lines.append(meta)
    return "\n".join(lines) + "\n"


def run_ablation(
    config: AblateConfig, *, echo: Callable[[str], None] = print, data: Any = None
) -> dict[str, Any]:
    """Run (or resume) the ablation and write its report.

    Writes ``<stem>.md`` (the table), ``<stem>_table.csv`` (aggregated), ``<stem>_runs.csv`` (one
    row per run) and ``<stem>.json`` (everything); ``<stem>`` is :attr:`AblateConfig.stem`.
    """
    out = Path(config.out_dir)
    settings = {k: v for k, v in asdict(config).items() if k not in _EXTENDABLE}
    _check_same_settings(out / "ablate_settings.json", settings, what=f"ablation in {out}")
    if data is None:
        from miles.data import build_dataset

        data = build_dataset(config.dataset, **config.dataset_params)
    modalities = list(data.modalities)
    runs = plan_runs(config, modalities)
    to_train = sum(1 for r in runs if not (r.out_dir / DONE).is_file())
    echo(f"{len(runs)} runs planned, {len(runs) - to_train} already done, {to_train} to train")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    trained = 0
    for index, run in enumerate(runs, 1):
        tag = f"[{index}/{len(runs)}] seed {run.seed} {run.method} {run.label}"
        was_done = (run.out_dir / DONE).is_file()
        t0 = time.perf_counter()
        result = _train(run, config, data)
        results[(run.method, run.label, run.seed)] = result
        ident = {"method": run.method, "label": run.label, "seed": run.seed, "value": run.value}
        if "failed" in result:
            rows.append(ident | {"failed": result["failed"]})
        else:
            rows.append(_row(run, result, modalities))
        if was_done:
            continue
        trained += 1
        elapsed = time.perf_counter() - start
        if "failed" in result:
            outcome = f"DIVERGED ({result['failed']})"
        elif run.method == "unimodal":  # its fused head is never trained
            outcome = f"{run.label} head {100 * result['test']['unimodal'][run.label]:.1f}"
        else:
            outcome = f"fused {100 * result['test']['fused']:.1f}"
        echo(
            f"{tag}: {outcome} ({time.perf_counter() - t0:.1f} s; elapsed {elapsed:.0f} s, "
            f"~{elapsed / trained * (to_train - trained):.0f} s left)"
        )
    ok = [r for r in rows if not r.get("failed")]
    order, rule = dominant_order(ok, modalities)
    agg = _table(rows, config, order)
    checks = _mu_one_checks(config, results)
    failures: dict[str, int] = {}
    for r in rows:
        if r.get("failed"):
            failures[r["label"]] = failures.get(r["label"], 0) + 1
    wall = time.perf_counter() - start
    meta = (
        f"Setting: {config.epochs} epochs, {config.optimizer} lr {config.lr}, batch "
        f"{config.batch_size}, latent {config.latent_dim}, dataset params "
        f"{config.dataset_params or 'default'}. Hardware: {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. Wall time of this "
        f"invocation: {wall:.0f} s ({trained} runs trained, {len(runs) - trained} read from disk)."
    )
    report = markdown_report(agg, config, order, rule, data.metric, checks, meta, failures)
    stem = config.stem
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(report, encoding="utf-8")
    _write_csv(out / f"{stem}_runs.csv", rows, ["method", "label", "value", "seed"])
    _write_csv(out / f"{stem}_table.csv", agg, ["label", "method", "n"])
    payload = {
        "config": asdict(config),
        "dominant_order": order,
        "dominant_rule": rule,
        "rows": rows,
        "aggregate": agg,
        "mu_one_checks": checks,
        "wall_time_s": wall,
        "runs_trained": trained,
        "meta": meta,
    }
    write_json(out / f"{stem}.json", payload)
    echo("")
    echo(report)
    echo(f"wrote {out / (stem + '.md')}, {stem}_table.csv, {stem}_runs.csv, {stem}.json")
    return payload


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``miles ablate`` (the tau / mu sweep of the paper's Tables IV and V)."""
    from miles.models.fusion import FUSIONS

    p = subparsers.add_parser(
        "ablate", help="MILES over a sweep of tau or mu, next to unimodal/joint/joint+aux"
    )
    p.add_argument("--dataset", default="mfeat-pix-fou")
    p.add_argument(
        "--dataset-option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="a dataset parameter (repeatable), e.g. --dataset-option max_train=60",
    )
    p.add_argument("--fusion", default="concat", choices=list(FUSIONS))
    p.add_argument("--param", required=True, choices=list(PARAMS), help="the swept parameter")
    p.add_argument("--values", required=True, help="comma-separated, e.g. 0.5,0.3,0.2,0.1,0.0")
    p.add_argument(
        "--fixed",
        default=None,
        help="the other parameter, e.g. tau=0.2,mu=0.5 (default; the swept one is replaced)",
    )
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--latent-dim", type=positive_int, default=64)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: torch's)"
    )
    p.add_argument("--out", default="ablate-out")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``miles ablate`` from parsed arguments; a bad value exits with its message."""
    try:
        values = parse_values(args.param, args.values)
        config = AblateConfig(
            dataset=args.dataset,
            dataset_params=dict(args.dataset_option),
            fusion=args.fusion,
            param=args.param,
            values=values,
            fixed=parse_fixed(args.fixed),
            seeds=list(range(args.seeds)),
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            latent_dim=args.latent_dim,
            out_dir=args.out,
        )
    except ValueError as exc:
        raise SystemExit(f"miles ablate: {exc}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run_ablation(config)
    return 0
