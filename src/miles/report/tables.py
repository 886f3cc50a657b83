"""Turn run results into table rows and markdown: the numbers users compare methods by."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import mean, stdev
from typing import Any


def decisions(result: Mapping[str, Any]) -> list[dict[str, Any] | None]:
    """The MILES decision of every epoch (``None`` where no decision was taken or no MILES)."""
    out = []
    for row in result["history"]:
        record = row.get("strategy") or {}
        out.append(record.get("decision"))
    return out


def epochs_acted(result: Mapping[str, Any]) -> int | None:
    """In how many epochs MILES trained a modality at a lowered rate (``None`` without MILES).

    A decision applies to the *next* epoch, so the one taken after the last epoch changed nothing
    and is not counted.
    """
    if result["strategy"].get("name") != "miles":
        return None
    effective = decisions(result)[:-1]
    return sum(1 for d in effective if d is not None and d.get("slowed") is not None)


def idle_reasons(result: Mapping[str, Any]) -> dict[str, int]:
    """Why MILES did not act, counted over the epochs whose decision applied to training."""
    counts: dict[str, int] = {}
    for d in decisions(result)[:-1]:
        reason = "no decision (fused metric 0)" if d is None else d["reason"]
        if d is None or d.get("slowed") is None:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def max_delta(result: Mapping[str, Any]) -> float | None:
    deltas = [d["delta"] for d in decisions(result) if d is not None]
    return max(deltas) if deltas else None


def summarize_run(result: Mapping[str, Any]) -> dict[str, Any]:
    """One row: test fused / each head (best-on-validation epoch), head gap, chosen epoch, acted."""
    test = result["test"] or result["val"]
    modalities = list(test["unimodal"])
    heads = [test["unimodal"][m] for m in modalities]
    row: dict[str, Any] = {
        "method": result["strategy"]["name"],
        "fusion": result.get("extra", {}).get("fusion", ""),
        "seed": result["config"]["seed"],
        "fused": test["fused"],
        **{m: test["unimodal"][m] for m in modalities},
        "gap": max(heads) - min(heads),
        "best_epoch": result["best_epoch"],
        "epochs": result["epochs_run"],
        "acted": epochs_acted(result),
        "max_delta": max_delta(result),
    }
    if result.get("test_last"):
        for m in modalities:
            row[f"{m}_last"] = result["test_last"]["unimodal"][m]
    return row


def _fmt(value: Any, pct: bool) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if pct else f"{value:.3f}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, percent: Sequence[str] = ()
) -> str:
    """A GitHub markdown table; columns in ``percent`` print as percentages with one decimal."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_fmt(row.get(c), c in percent) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


def aggregate(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], values: Sequence[str]
) -> list[dict[str, Any]]:
    """Group rows by ``keys`` and give ``value_mean``/``value_std`` plus ``n`` per group."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(zip(keys, key, strict=True))
        agg["n"] = len(members)
        for v in values:
            nums = [float(m[v]) for m in members if m.get(v) is not None]
            agg[f"{v}_mean"], agg[f"{v}_std"] = mean_std(nums)
        out.append(agg)
    return out


def pm(agg: Mapping[str, Any], name: str, *, pct: bool = True) -> str:
    """``mean +- std`` text for an aggregated column."""
    m, s = agg[f"{name}_mean"], agg[f"{name}_std"]
    if math.isnan(m):
        return "-"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.1f} ± {s:.1f}"
