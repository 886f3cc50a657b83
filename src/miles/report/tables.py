"""Aggregation over seeds and the columns every results table is built from.

Rows are :func:`miles.results.run_row` rows (plus the study's identifiers and the signed gap);
:func:`aggregate` groups them into ``<value>_mean`` / ``<value>_std`` / ``n``; the
:data:`COLUMNS` turn aggregated rows into text cells. Compare, ablate, sweep, the demo and
``miles report`` all pick their columns from here, so a column with one title always holds the
same number, formatted the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import mean, stdev
from typing import Any

from miles.report.document import Table
from miles.results import GAP_RULE, decisions

__all__ = [
    "COLUMNS",
    "Column",
    "aggregate",
    "column_notes",
    "decision_table",
    "mean_std",
    "metric_columns",
    "pct",
    "pm",
    "results_table",
]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none)."""
    if not values:
        return math.nan, math.nan
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


def aggregate(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], values: Sequence[str]
) -> list[dict[str, Any]]:
    """Group rows by ``keys`` (first-seen order) and give ``value_mean``/``value_std`` plus ``n``
    (the rows in the group); ``None`` values are left out of a mean."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(zip(keys, key, strict=True))
        agg["n"] = len(members)
        for v in values:
            nums = [float(m[v]) for m in members if m.get(v) is not None]
            agg[f"{v}_mean"], agg[f"{v}_std"] = mean_std(nums)
        out.append(agg)
    return out


def pct(value: Any) -> str:
    """A metric in [0, 1] as a percentage with one decimal; ``-`` for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * float(value):.1f}"


def pm(agg: Mapping[str, Any], name: str, *, percent: bool = True) -> str:
    """``mean ± std`` of an aggregated value; the mean alone for a single run; ``-`` when absent."""
    m = agg.get(f"{name}_mean", math.nan)
    s = agg.get(f"{name}_std", math.nan)
    if m is None or math.isnan(m):
        return "-"
    scale = 100.0 if percent else 1.0
    if agg.get("n") == 1:
        value = scale * m
        return f"{value:.1f}" if percent or not value.is_integer() else f"{value:.0f}"
    return f"{scale * m:.1f} ± {scale * s:.1f}"


@dataclass(frozen=True)
class Column:
    """A table column: its title and how one aggregated row becomes its cell."""

    title: str
    cell: Callable[[Mapping[str, Any]], str]


def _joined(keys: Sequence[str], *, percent: bool = True) -> Callable[[Mapping[str, Any]], str]:
    """One cell holding several values (``a / b``), ``-`` when any is missing."""

    def cell(row: Mapping[str, Any]) -> str:
        parts = [pm(row, k, percent=percent) for k in keys]
        return "-" if "-" in parts else " / ".join(parts)

    return cell


def _vs_unimodal(order: Sequence[str]) -> Callable[[Mapping[str, Any]], str]:
    def cell(row: Mapping[str, Any]) -> str:
        deltas = [row.get(f"{m}_vs_unimodal_mean") for m in order]
        if any(d is None or math.isnan(d) for d in deltas):
            return "-"
        return " / ".join(f"{100 * d:+.1f}" for d in deltas)  # type: ignore[operator]

    return cell


def _aux(row: Mapping[str, Any]) -> str:
    return {True: "yes", False: "no"}.get(row.get("uses_aux_losses"), "-")  # type: ignore[arg-type]


def _columns(order: Sequence[str]) -> dict[str, list[Column]]:
    dom, rest = order[0], list(order[1:])
    slowed = [f"slowed_{m}" for m in order]
    return {
        "aux": [Column("aux", _aux)],
        "fused": [Column("fused", lambda r: pm(r, "fused"))],
        "heads": [
            Column(f"{dom} head (dominant)", lambda r: pm(r, dom)),
            *(Column(f"{m} head", lambda r, m=m: pm(r, m)) for m in rest),  # type: ignore[misc]
        ],
        "gap": [Column("gap", lambda r: pm(r, "gap"))],
        "probe": [Column(f"probe {' / '.join(order)}", _joined([f"probe_{m}" for m in order]))],
        "slice": [Column(f"slice {' / '.join(order)}", _joined([f"slice_{m}" for m in order]))],
        "vs_unimodal": [Column("heads vs unimodal (pp)", _vs_unimodal(order))],
        "chosen": [Column("chosen epoch", lambda r: pm(r, "best_epoch", percent=False))],
        "acted": [Column("MILES acted", lambda r: pm(r, "acted", percent=False))],
        "slowed": [Column(f"slowed {' / '.join(order)}", _joined(slowed, percent=False))],
        "fused_last": [Column("fused at last epoch", lambda r: pm(r, "fused_last"))],
        "last": [
            Column("heads at last epoch", _joined([f"{m}_last" for m in order])),
        ],
        "n": [Column("n", lambda r: str(r.get("n", "-")))],
    }


#: the column groups :func:`metric_columns` knows, in table order
COLUMNS = (
    "aux",
    "fused",
    "heads",
    "gap",
    "probe",
    "slice",
    "vs_unimodal",
    "chosen",
    "acted",
    "slowed",
    "fused_last",
    "last",
    "n",
)
_LAST = (
    "at last epoch = the same runs scored with the last epoch's weights (selection on "
    "validation alone can hide or create a gap)"
)
#: what each column group means, for captions (``{dominant}``/``{weak}``: the order's ends)
COLUMN_NOTES = {
    "aux": "aux = trained with the auxiliary unimodal losses",
    "heads": "head = the method's own unimodal head (a classifier co-trained by the method's "
    "loss for methods marked aux, an online probe on detached latents otherwise)",
    "gap": GAP_RULE,
    "probe": "probe = a linear classifier trained afterwards on each frozen encoder at the chosen "
    "epoch (training set, one seeded recipe for every method: miles.readouts.ProbeRecipe), "
    "scored on test: the same readout for every method",
    "slice": "slice = the fused head read one modality at a time (its additive share "
    "W[:, m] z_m + b/N), scored on test; - for fusions that are not additive",
    "vs_unimodal": "heads vs unimodal = each head minus its own modality's unimodal model (the "
    "unimodal row: each modality's encoder and head trained alone, same budget and seed), in "
    "points: the imbalance diagnostic",
    "chosen": "chosen epoch = the epoch chosen on validation, whose weights the test metrics use",
    "acted": "MILES acted = epochs trained with a lowered learning rate (a factor below 1); the "
    "decision after the last epoch applies to none",
    "slowed": "slowed = such epochs per modality",
    "fused_last": _LAST,
    "last": _LAST,
    "n": "n = runs averaged",
}


def column_notes(groups: Sequence[str], order: Sequence[str]) -> str:
    """What the columns of ``groups`` mean, as sentences for a caption."""
    notes = [COLUMN_NOTES.get(g, "").format(dominant=order[0], weak=order[-1]) for g in groups]
    return " ".join(f"{n}." for n in dict.fromkeys(notes) if n)


#: the values of a run row that the columns read (what :func:`aggregate` must average)
VALUES = ("fused", "gap", "best_epoch", "acted", "fused_last")


def metric_columns(order: Sequence[str], groups: Sequence[str] = COLUMNS) -> list[Column]:
    """The columns of ``groups`` (names from :data:`COLUMNS`) for modalities ``order``."""
    table = _columns(order)
    unknown = [g for g in groups if g not in table]
    if unknown:
        raise ValueError(f"unknown column groups {unknown}; choose from {list(COLUMNS)}")
    return [c for g in groups for c in table[g]]


def metric_values(order: Sequence[str]) -> list[str]:
    """Every per-run value the metric columns read, for :func:`aggregate`."""
    return [
        *VALUES,
        *order,
        *(f"slowed_{m}" for m in order),
        *(f"{m}_last" for m in order),
        *(f"probe_{m}" for m in order),
        *(f"slice_{m}" for m in order),
    ]


def results_table(
    caption: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    drop_empty: bool = True,
) -> Table:
    """Text table of aggregated ``rows``; ``drop_empty`` leaves out columns that are ``-`` in
    every row (e.g. MILES acted in a table without MILES)."""
    cells = [[c.cell(r) for c in columns] for r in rows]
    keep = [
        i
        for i in range(len(columns))
        if not drop_empty or not rows or any(row[i] != "-" for row in cells)
    ]
    return Table(
        caption, [columns[i].title for i in keep], [[row[i] for i in keep] for row in cells]
    )


def _lr(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3g}"


def decision_table(result: Mapping[str, Any], caption: str) -> Table | None:
    """MILES's decision after every epoch, or ``None`` for a run without MILES decisions.

    Columns: epoch, u per modality, delta, what MILES decided for the next epoch (``slowed m``,
    or its reason: ``balanced``, ``all-negative``, ``no decision``), and the learning rate every
    param group trained with in that epoch.
    """
    decs = decisions(result)
    if all(d is None for d in decs) and not any(
        "decision" in (row.get("strategy") or {}) for row in result["history"]
    ):
        return None
    modalities = list(result["val"]["unimodal"])
    groups = [k.removeprefix("lr_") for k in result["history"][0] if k.startswith("lr_")]
    rows = []
    for row, d in zip(result["history"], decs, strict=True):
        if d is None:
            decided = ["-"] * len(modalities) + ["-", "no decision (fused metric 0)"]
        else:
            verdict = str(d["reason"])
            if d.get("slowed"):
                factor = float(d["factors"].get(d["slowed"], 1.0))
                verdict = f"slowed {d['slowed']}" + (" (factor 1)" if factor >= 1.0 else "")
            decided = [f"{d['u'][m]:+.3f}" for m in modalities] + [f"{d['delta']:.3f}", verdict]
        rows.append([str(row["epoch"]), *decided, *(_lr(row.get(f"lr_{g}")) for g in groups)])
    return Table(
        caption,
        ["epoch", *(f"u {m}" for m in modalities), "delta", "decision for next epoch"]
        + [f"lr {g}" for g in groups],
        rows,
    )
