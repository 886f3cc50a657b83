"""The aggregate step every study shares: run rows -> dominant order, gaps, references, means.

Rows are :meth:`miles.studies.runner.RunOutcome.row` s: a study's identifiers (``method``,
``label``, ``fusion``, ``seed``) plus :func:`miles.results.run_row`. :func:`summarize`

1. ranks the modalities (:func:`miles.results.dominant_order`);
2. gives every run its signed gap (:func:`miles.results.signed_gap`);
3. builds, per fusion and seed, the *unimodal* row from the per-modality reference runs (each
   modality's own model: its head is the only number that run measures), and gives every other
   run its heads minus those references (``<m>_vs_unimodal``, the imbalance diagnostic);
4. aggregates per (fusion, method, label) into mean ± std over seeds.

Compare, ablate and the demo all summarize through this one function, and ``miles report``
re-summarizes the same rows with it, so their tables cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.report.document import Document, Table, write_study_files
from miles.report.tables import (
    COLUMNS,
    Column,
    aggregate,
    column_notes,
    metric_columns,
    metric_values,
    results_table,
)
from miles.results import GAP_RULE, dominant_order, signed_gap

__all__ = [
    "REFERENCE",
    "Summary",
    "display_name",
    "study_payload",
    "summarize",
    "summary_table",
    "write_study",
]

#: the method whose runs are the per-modality references (one run per modality, labelled by it)
REFERENCE = "unimodal"
#: what a summary row is keyed by
KEYS = ("fusion", "method", "label", "uses_aux_losses")


def display_name(row: Mapping[str, Any]) -> str:
    """How a run is called: the name its study gave it, else its label (``tau=0.2``, a
    variant), else its method."""
    return str(row.get("name") or row.get("label") or row["method"])


@dataclass
class Summary:
    """What :func:`summarize` found: the order and its rule, the rows (with gaps and reference
    differences), the aggregated rows, and every diverged run (``fusion method label, seed N:
    reason``)."""

    order: list[str]
    rule: str
    rows: list[dict[str, Any]]
    aggregate: list[dict[str, Any]]
    failures: list[str]

    @property
    def gap_rule(self) -> str:
        return GAP_RULE.format(dominant=self.order[0], weak=self.order[-1])

    def explain(self, groups: Sequence[str] = COLUMNS) -> str:
        """The caption of a table with these column groups: the dominance rule, then what each
        column means (one text for every study)."""
        return f"Dominant modality by {self.rule}: {self.order[0]}. " + column_notes(
            groups, self.order
        )

    @property
    def failure_note(self) -> str | None:
        """``Diverged runs (left out of the means): ...`` (``None`` when every run finished)."""
        if not self.failures:
            return None
        return f"Diverged runs (left out of the means): {'; '.join(self.failures)}."


def _references(ok: Sequence[dict[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    """Per (fusion, seed) with a reference run of every modality: their combined row."""
    own: dict[tuple[Any, Any], dict[str, float]] = {}
    probes: dict[tuple[Any, Any], dict[str, Any]] = {}
    for r in ok:
        if r["method"] == REFERENCE:
            key, m = (r.get("fusion"), r.get("seed")), r["label"]
            own.setdefault(key, {})[m] = r[m]
            probes.setdefault(key, {})[f"probe_{m}"] = r.get(f"probe_{m}")
    combined = []
    for (fusion, seed), heads in own.items():
        if set(heads) >= set(order):
            combined.append(
                {"fusion": fusion, "method": REFERENCE, "label": "", "seed": seed}
                | {m: heads[m] for m in order}
                | probes[(fusion, seed)]
                | {"gap": signed_gap(heads, order), "uses_aux_losses": None}
            )
    return combined


def summarize(
    rows: Sequence[Mapping[str, Any]],
    modalities: Sequence[str],
    *,
    rank: Callable[[Mapping[str, Any]], Any] | None = None,
) -> Summary:
    """Order, gaps, references and means of a study's rows (see the module docstring).

    ``rank`` sorts the aggregated rows (default: first-seen order).
    """
    copies: list[dict[str, Any]] = [dict(r) for r in rows]
    ok = [r for r in copies if not r.get("failed")]
    order, rule = dominant_order(ok, modalities)
    references = _references(ok, order)
    ref_heads = {(r["fusion"], r["seed"]): r for r in references}
    table = list(references)
    for r in ok:
        if r["method"] == REFERENCE:
            # one modality's own model: its head is the only number this run measures
            # (the fused head, hence every slice, is untrained; the other encoders are frozen)
            own = r["label"]
            for key in (
                "gap",
                "fused",
                "fused_last",
                *(k for m in order if m != own for k in (m, f"{m}_last", f"probe_{m}")),
                *(f"slice_{m}" for m in order),
            ):
                r[key] = None
            continue
        r["gap"] = signed_gap(r, order)
        ref = ref_heads.get((r.get("fusion"), r.get("seed")))
        for m in order:
            r[f"{m}_vs_unimodal"] = None if ref is None else r[m] - ref[m]
        table.append(r)
    values = [*metric_values(order), *(f"{m}_vs_unimodal" for m in order)]
    agg = aggregate(table, KEYS, values)
    if rank is not None:
        agg.sort(key=rank)
    failures = [
        " ".join(str(r[k]) for k in ("fusion", "method", "label") if r.get(k))
        + f", seed {r.get('seed')}: {r['failed']}"
        for r in copies
        if r.get("failed")
    ]
    return Summary(order, rule, copies, agg, failures)


def summary_table(
    caption: str,
    agg: Sequence[Mapping[str, Any]],
    order: Sequence[str],
    *,
    first: Sequence[Column] = (),
    groups: Sequence[str] = COLUMNS,
) -> Table:
    """A results table of aggregated rows: ``first`` columns (default: the row's name), then the
    metric column ``groups``."""
    lead = list(first) or [Column("method", display_name)]
    return results_table(caption, agg, [*lead, *metric_columns(order, groups)])


def study_payload(
    kind: str,
    config: Any,
    data: Any,
    summary: Summary,
    meta: str,
    *,
    wall_s: float,
    trained: int,
    **extra: Any,
) -> dict[str, Any]:
    """What a study's JSON holds: ``kind`` (``miles report`` dispatches on it), the config, the
    data's metric and modalities, the summary, ``meta``, timing, and the study's ``extra``."""
    return {
        "kind": kind,
        "config": config.to_dict(),
        "metric": data.metric,
        "modalities": list(data.modalities),
        "dominant_order": summary.order,
        "dominant_rule": summary.rule,
        "rows": summary.rows,
        "aggregate": summary.aggregate,
        **extra,
        "meta": meta,
        "wall_time_s": wall_s,
        "runs_trained": trained,
    }


def write_study(
    out: Path,
    stem: str,
    payload: Mapping[str, Any],
    doc: Document,
    first: tuple[Sequence[str], Sequence[str]],
    show: Callable[[str], None],
    figures: Sequence[Path | str] = (),
) -> None:
    """The write step: ``<stem>.md``, ``.json``, ``_runs.csv`` and ``_table.csv`` (``first``:
    their leading columns); then the markdown and the files written (with ``figures``) are
    shown."""
    files = write_study_files(
        out,
        stem,
        doc,
        payload,
        {"runs": (payload["rows"], first[0]), "table": (payload["aggregate"], first[1])},
    )
    show("\n" + files[0].read_text(encoding="utf-8"))
    show("wrote " + ", ".join(str(f) for f in [*files, *figures]))
