"""The built-in renderers of ``miles report``: one per study kind.

Each renderer re-reads the runs behind the study (``rows[*].run_dir``) and recomputes every row
with :func:`miles.results.run_row`, then builds the page with the study's own document function
(the one that wrote the study's markdown) and the study's own aggregate step, so the page and the
study's files show the same numbers by construction. It adds the figures (bars of every head,
MILES's learning dynamics) and, for every run MILES decided in, the per-epoch decision table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from miles.report.document import Document, Figure
from miles.report.page import Renderer, register_renderer
from miles.report.tables import column_notes, decision_table
from miles.results import RunResult, factors_in_force, load_result, run_row
from miles.studies import ablate, compare, demo, regime, sweep
from miles.studies.study import Study
from miles.studies.summary import Summary, display_name, summarize, summary_table

__all__ = [
    "MAX_DYNAMICS_COLUMNS",
    "missing_note",
    "missing_runs",
    "refresh_rows",
    "render_ablate",
    "render_compare",
    "render_demo",
    "render_regime",
    "render_run",
    "render_sweep",
]

#: at most this many seeds become columns of one learning-dynamics figure (wider is unreadable)
MAX_DYNAMICS_COLUMNS = 5
#: what a row says about its run that the run's own result does not (the study's identifiers)
IDENT = ("method", "label", "fusion", "seed", "value")
DYNAMICS_NOTE = (
    "Learning dynamics (as in the paper's Fig. 2): top, the conditional utilization u of each "
    "modality and their gap delta against tau, shaded where MILES slowed a modality for the next "
    "epoch; middle, each modality's learning rate; bottom, validation metric of the fused and "
    "unimodal heads per epoch, with the epoch chosen on validation."
)
RUN_COLUMNS = (
    "fused",
    "heads",
    "gap",
    "probe",
    "slice",
    "chosen",
    "acted",
    "slowed",
    "fused_last",
    "last",
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def missing_runs(rows: Sequence[Mapping[str, Any]], folder: Path) -> list[str]:
    """The run folders (``run_dir`` of the rows, relative to ``folder``) that hold no
    ``result.json`` any more: a report must say so rather than silently drop their figures."""
    wanted = dict.fromkeys(
        str(r["run_dir"]) for r in rows if r.get("run_dir") and not r.get("failed")
    )
    return [where for where in wanted if not (folder / where / "result.json").is_file()]


def missing_note(missing: Sequence[str], total: int, stored: str) -> str:
    """The warning paragraph of a report some of whose runs are gone."""
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (
        f"warning: {len(missing)} of {total} run folders hold no result.json (moved or deleted: "
        f"{shown}). Their rows show the numbers {stored} recorded when the study ran, and their "
        "figures (learning dynamics, decision tables) are left out."
    )


def refresh_rows(
    rows: Sequence[Mapping[str, Any]], folder: Path
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Rows recomputed from their runs' ``result.json`` (rows whose run is gone, or failed, are
    kept as stored), and the results read, by ``run_dir``."""
    out, results = [], {}
    for row in rows:
        new = dict(row)
        where = row.get("run_dir")
        path = folder / str(where) if where else None
        if path is not None and not row.get("failed") and (path / "result.json").is_file():
            if where not in results:
                results[str(where)] = load_result(path).to_dict()
            fresh = run_row(results[str(where)])
            new.update({k: v for k, v in fresh.items() if k not in IDENT})
        out.append(new)
    return out, results


def _bars(
    groups: Sequence[Mapping[str, Any]],
    order: Sequence[str],
    path: Path,
    *,
    title: str,
    metric: str,
    caption: str,
) -> Figure:
    from miles.report.plots import plot_metric_bars

    named = [dict(g) | {"name": display_name(g)} for g in groups]
    metrics = {"fused": "fused head"} | {m: f"{m} head" for m in order}
    plot_metric_bars(
        named, metrics, path, title=title, ylabel=f"test {metric} (%)", label_key="name"
    )
    return Figure(caption, path)


def _dynamics(runs: Mapping[str, Mapping[str, Any]], path: Path, caption: str) -> Figure:
    from miles.report.plots import plot_learning_dynamics

    plot_learning_dynamics(runs, path)
    return Figure(caption, path)


def _run_name(row: Mapping[str, Any]) -> str:
    fusion = f"{row['fusion']} fusion, " if row.get("fusion") else ""
    return f"{fusion}{display_name(row)}, seed {row.get('seed')}"


def _miles_parts(
    doc: Document,
    rows: Sequence[Mapping[str, Any]],
    results: Mapping[str, Mapping[str, Any]],
    files: Path,
) -> None:
    """MILES's learning dynamics (one figure per fusion and setting, one column per seed) and
    the per-epoch decision table of every run MILES decided in."""
    decided = [
        (r, results[r["run_dir"]])
        for r in rows
        if r.get("run_dir") in results and factors_in_force(results[r["run_dir"]]) is not None
    ]
    if not decided:
        return
    groups: dict[tuple[str, str], list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    seen = set()
    for row, result in decided:
        if row["run_dir"] in seen:  # a run shown under several fusions is drawn once
            continue
        seen.add(row["run_dir"])
        groups.setdefault((str(row.get("fusion") or ""), display_name(row)), []).append(
            (row, result)
        )
    dynamics = doc.section("MILES learning dynamics")
    for (fusion, name), members in groups.items():
        shown = members[:MAX_DYNAMICS_COLUMNS]
        more = (
            f" Only the first {len(shown)} of {len(members)} seeds are drawn."
            if len(members) > len(shown)
            else ""
        )
        where = f"{fusion} fusion, {name}" if fusion else name
        dynamics.blocks.append(
            _dynamics(
                {_run_name(r): res for r, res in shown},
                files / f"dynamics_{_slug(fusion)}_{_slug(name)}.png",
                f"{where}: one column per seed. {DYNAMICS_NOTE}{more}",
            )
        )
    table_section = doc.section("MILES decisions per epoch")
    table_section.paragraphs.append(
        "After every epoch MILES computes u per modality on validation and their gap delta; the "
        "decision applies to the next epoch. The learning rates are those the epoch trained with."
    )
    for row, result in decided:
        if row["run_dir"] not in seen:
            continue
        seen.discard(row["run_dir"])
        table = decision_table(result, f"{_run_name(row)}: MILES's decisions")
        if table is not None:
            table_section.blocks.append(table)


def _add_bars(
    doc: Document,
    summary: Summary,
    metric: str,
    files: Path,
    *,
    section_of: Callable[[Mapping[str, Any]], str],
    title: str,
) -> None:
    """One bar chart per section of the study's table (e.g. per fusion), under the table."""
    by_section: dict[str, list[dict[str, Any]]] = {}
    for a in summary.aggregate:
        by_section.setdefault(section_of(a), []).append(a)
    for name, cells in by_section.items():
        doc.section(name).blocks.append(
            _bars(
                cells,
                summary.order,
                files / f"bars_{_slug(name)}.png",
                title=f"{title}, {name}",
                metric=metric,
                caption=f"{name}: test {metric} of the fused head and every unimodal head, "
                "mean over seeds; error bars one standard deviation over seeds (n under each "
                "name). A name without a fused bar has no fused head (unimodal references).",
            )
        )


def _metric(payload: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]) -> str:
    if payload.get("metric"):
        return str(payload["metric"])
    return next((str(r["config"].get("metric")) for r in results.values()), "metric")


# -- one renderer per kind -------------------------------------------------------------------------


@register_renderer(RunResult.KIND)
def render_run(payload: Mapping[str, Any], folder: Path, files: Path) -> Document:
    """One run: its row, its heads as bars, its learning dynamics and MILES's decisions."""
    result = RunResult.from_dict(payload).to_dict()
    row = run_row(result) | {"label": "", "run_dir": "."}
    summary = summarize([row], list(result["val"]["unimodal"]))
    metric = result["config"].get("metric", "metric")
    dataset = result.get("extra", {}).get("dataset", "?")
    name, fusion = row["method"], row["fusion"] or "?"
    which = "test" if result.get("test") else "validation"
    doc = Document(
        RunResult.KIND,
        f"miles run: {name} on {dataset}",
        [
            f"One run: strategy {name} ({_settings(result['strategy'])}), dataset {dataset}, "
            f"fusion {fusion}, seed {row['seed']}; {row['epochs']} epochs run in "
            f"{result.get('wall_time_s', float('nan')):.1f} s.",
            f"{which.capitalize()} {metric} (%) at epoch {row['best_epoch']}, chosen on "
            f"validation. Modalities ranked by {summary.rule}. {summary.gap_rule}. "
            + column_notes(("heads", "probe", "slice"), summary.order),
        ],
    )
    section = doc.section(f"{name}, {fusion} fusion")
    section.blocks.append(
        summary_table(f"{which} {metric} (%)", summary.aggregate, summary.order, groups=RUN_COLUMNS)
    )
    section.blocks.append(
        _bars(
            summary.aggregate,
            summary.order,
            files / "bars.png",
            title=f"{dataset}: {name}",
            metric=metric,
            caption=f"{which} {metric} of the fused head and each unimodal head.",
        )
    )
    section.blocks.append(
        _dynamics(
            {f"{name}, seed {row['seed']}": result},
            files / "dynamics.png",
            f"{name}. {DYNAMICS_NOTE}",
        )
    )
    table = decision_table(result, f"{name}: MILES's decision after every epoch")
    if table is not None:
        section.blocks.append(table)
    return doc


def _settings(params: Mapping[str, Any]) -> str:
    """``tau=0.2, mu=0.5``: a strategy's settings as a reader writes them (its name left out)."""
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "name") or "defaults"


def _legacy_demo(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A ``results.json`` written before the demo recorded its config and kind."""
    runs = payload["runs"]
    first = next(iter(runs.values()))
    trainer = {"epochs": payload["epochs"], "lr": payload["lr"], "seed": payload["seed"]}
    return {
        **payload,
        "kind": demo.KIND,
        "config": {
            "base": {"dataset": payload["dataset"], "trainer": trainer},
            "methods": list(dict.fromkeys(k.split("/", 1)[1] for k in runs)),
            "fusions": list(dict.fromkeys(k.split("/", 1)[0] for k in runs)),
            "miles_params": payload.get("miles_params") or {},
        },
        "modalities": list(first["val"]["unimodal"]),
        "metric": first["config"].get("metric", "metric"),
    }


def _render_study(
    study: type[Study[Any]],
    payload: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
    files: Path,
    *,
    section_of: Callable[[Any, Mapping[str, Any]], str],
    all_runs: bool = False,
) -> Document:
    """The study's own document, then its bars (one chart per ``section_of(config, row)``),
    optionally every run, and MILES's dynamics and decisions."""
    payload = {**payload, "metric": _metric(payload, results)}
    doc = study.document(payload)
    config, summary = study.summary_of(payload)
    if summary.aggregate:
        _add_bars(
            doc,
            summary,
            payload["metric"],
            files,
            section_of=lambda a: section_of(config, a),
            title=config.base.dataset,
        )
    if all_runs:
        _all_runs(doc, summary, payload["metric"])
    _miles_parts(doc, summary.rows, results, files)
    return doc


def _per_fusion(config: Any, row: Mapping[str, Any]) -> str:
    return f"{row['fusion']} fusion"


@register_renderer(demo.KIND)
def render_demo(payload: Mapping[str, Any], folder: Path, files: Path) -> Document:
    """The demo's table (recomputed from the runs it embeds), bars per fusion, MILES's parts."""
    if "config" not in payload:
        payload = _legacy_demo(payload)
    runs = {k: dict(v) for k, v in payload["runs"].items()}
    rows = [
        run_row(result)
        | dict(zip(("fusion", "method"), key.split("/", 1), strict=True))
        | {"label": "", "run_dir": key}
        for key, result in runs.items()
    ]
    return _render_study(demo.Demo, {**payload, "rows": rows}, runs, files, section_of=_per_fusion)


def _legacy_compare(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """A ``compare.json`` written before compare recorded its kind, base config and run paths
    (a current one is returned as it is)."""
    if "base" in payload["config"]:
        return payload
    old = dict(payload["config"])
    trainer = {k: old.pop(k) for k in ("epochs", "lr", "batch_size", "optimizer") if k in old}
    base = {k: old.pop(k) for k in ("dataset", "dataset_params", "latent_dim") if k in old}
    config = {**old, "base": {**base, "trainer": {**trainer, "progress": False}}}
    rows = [
        {"run_dir": compare.run_folder(r["method"], r.get("label", ""), r["fusion"], r["seed"])} | r
        for r in payload["rows"]
    ]
    return {
        **payload,
        "kind": compare.KIND,
        "config": config,
        "rows": rows,
        "modalities": payload.get("modalities") or list(payload["dominant_order"]),
    }


def _all_runs(doc: Document, summary: Summary, metric: str) -> None:
    """Every run and seed, so a mean can be traced to the runs behind it."""
    from miles.report.tables import Column, aggregate, metric_values

    ok = [r for r in summary.rows if not r.get("failed")]
    per_run = aggregate(ok, ("fusion", "method", "label", "seed"), [*metric_values(summary.order)])
    first = [
        Column("fusion", lambda r: str(r.get("fusion") or "-")),
        Column("run", lambda r: f"{r['method']} {r.get('label') or ''}".strip()),
        Column("seed", lambda r: str(r["seed"])),
    ]
    section = doc.section("All runs")
    section.paragraphs.append(
        "One row per run and seed (runs that do not depend on the fusion, such as the unimodal "
        "references, are listed under every fusion; a unimodal reference measures only its own "
        "head)."
    )
    section.blocks.append(
        summary_table(
            f"every run: test {metric} (%) at the epoch chosen on validation",
            per_run,
            summary.order,
            first=first,
            groups=("fused", "heads", "gap", "probe", "slice", "chosen", "acted"),
        )
    )
    failed = [r for r in summary.rows if r.get("failed")]
    if failed:
        section.paragraphs.append(
            "Diverged: " + "; ".join(f"{_run_name(r)}: {r['failed']}" for r in failed) + "."
        )


def _study_renderer(
    study: type[Study[Any]],
    section_of: Callable[[Any, Mapping[str, Any]], str],
    *,
    all_runs: bool = False,
    upgrade: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> Renderer:
    """The renderer of a study whose rows point at their runs (compare, ablate, sweep): rows
    recomputed from the runs, then :func:`_render_study`."""

    def render(payload: Mapping[str, Any], folder: Path, files: Path) -> Document:
        payload = upgrade(payload) if upgrade is not None else payload
        rows, results = refresh_rows(payload["rows"], folder)
        doc = _render_study(
            study,
            {**payload, "rows": rows},
            results,
            files,
            section_of=section_of,
            all_runs=all_runs,
        )
        missing = missing_runs(payload["rows"], folder)
        if missing:
            total = len({str(r["run_dir"]) for r in payload["rows"] if r.get("run_dir")})
            doc.intro.insert(0, missing_note(missing, total, f"{study.kind}.json"))
        return doc

    render.__doc__ = f"Render a {study.kind} study (see :func:`_render_study`)."
    return render


#: per fusion the Table II-shaped table and its bars; every run; MILES's parts
render_compare = register_renderer(compare.KIND)(
    _study_renderer(compare.Compare, _per_fusion, all_runs=True, upgrade=_legacy_compare)
)
#: the Table IV/V-shaped table, its bars, the mu = 1 checks, every run, MILES's parts
render_ablate = register_renderer(ablate.KIND)(
    _study_renderer(ablate.Ablation, lambda config, _r: f"{config.param} ablation", all_runs=True)
)
#: the best trial, its re-runs (table and bars), every trial, MILES's parts of the re-runs
render_sweep = register_renderer(sweep.KIND)(
    _study_renderer(
        sweep.Sweep,
        lambda config, _r: f"Best parameters over seeds {list(range(config.rerun_seeds))}",
    )
)


@register_renderer(regime.KIND)
def render_regime(payload: Mapping[str, Any], folder: Path, files: Path) -> Document:
    """A regime study: its document (rows recomputed from the runs; the read-outs and speeds
    kept as stored) with the heat map drawn again, and MILES's dynamics and decisions."""
    rows, results = refresh_rows(payload["rows"], folder)
    payload = {**payload, "rows": rows}
    doc = regime.RegimeStudy.document(payload)
    config, summary = regime.RegimeStudy.summary_of(payload)
    assert isinstance(summary, regime.RegimeSummary)
    heat = regime.heatmap(summary, config, files / "heatmap.png")
    if heat is not None:
        section = doc.section("Heat map")
        section.paragraphs = []  # the study's own page links its PNG; the report embeds it
        section.blocks.append(Figure(regime.HEATMAP_CAPTION, heat))
    _miles_parts(doc, summary.rows, results, files)
    return doc
