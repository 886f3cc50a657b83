"""Learning-dynamics figure in the spirit of the paper's Fig. 2.

Per run (one column each): u per modality with delta and tau; the learning rate of each modality's
parameter group; validation metrics of the fused head and every unimodal head, per epoch. Also
grouped per-method bar charts with std error bars, for ``miles report``, and heat maps of a
difference over a grid of settings (the regime map).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miles.results import decisions


def plot_learning_dynamics(
    runs: Mapping[str, Mapping[str, Any]], path: str | Path, *, tau: float | None = None
) -> Path:
    """Draw one column per run (``{title: result dict}``) and save a PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as exc:  # pragma: no cover - needs the extra missing
        raise ModuleNotFoundError("plots need matplotlib: pip install 'miles-lr[plot]'") from exc
    if not runs:
        raise ValueError("no runs to plot")
    path = Path(path)
    width = max(5 * len(runs), 8)  # one column still leaves room for the title
    fig, axes = plt.subplots(3, len(runs), figsize=(width, 9), squeeze=False, sharex="col")
    for col, (title, result) in enumerate(runs.items()):
        history = result["history"]
        epochs = [row["epoch"] for row in history]
        modalities = list(result["val"]["unimodal"])
        ax_u, ax_lr, ax_m = axes[0][col], axes[1][col], axes[2][col]
        decs = decisions(result)
        for m in modalities:
            ys = [d["u"][m] if d else float("nan") for d in decs]
            ax_u.plot(epochs, ys, marker="o", ms=3, label=f"u {m}")
        ax_u.plot(epochs, [d["delta"] if d else float("nan") for d in decs], "k--", label="delta")
        run_tau = result["strategy"].get("tau", tau)
        if run_tau is not None:
            ax_u.axhline(run_tau, color="grey", lw=0.8, ls=":", label=f"tau = {run_tau}")
        for e, d in zip(epochs, decs, strict=True):
            if d and d.get("slowed"):
                ax_u.axvspan(e - 0.5, e + 0.5, color="orange", alpha=0.15, lw=0)
        ax_u.set_title(title)
        ax_u.set_ylabel("conditional utilization")
        ax_u.legend(fontsize=7)
        for m in modalities:
            lr_key = f"lr_{m}"
            if lr_key in history[0]:
                ax_lr.plot(epochs, [row[lr_key] for row in history], marker="o", ms=3, label=m)
        ax_lr.set_ylabel("learning rate (used in epoch)")
        ax_lr.legend(fontsize=7)
        ax_m.plot(
            epochs, [row["val_fused"] for row in history], "k-", marker="o", ms=3, label="fused"
        )
        for m in modalities:
            ax_m.plot(
                epochs, [row[f"val_{m}"] for row in history], marker="o", ms=3, label=f"{m} head"
            )
        ax_m.axvline(result["best_epoch"], color="green", lw=0.8, ls=":", label="chosen epoch")
        ax_m.set_ylabel(f"validation {result['config'].get('metric', 'metric')}")
        ax_m.set_xlabel("epoch")
        ax_m.legend(fontsize=7)
    fig.suptitle("Learning dynamics (shaded: epochs after which MILES slowed a modality)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_bars(
    groups: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, str],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    label_key: str = "method",
    percent: bool = True,
) -> list[tuple[str, str]]:
    """Grouped bars: one group per row of ``groups``, one bar per metric, std as error bars.

    ``groups`` are rows in :func:`miles.report.tables.aggregate`'s shape (``{key}_mean``,
    ``{key}_std``, ``n``), so mean ± std over seeds in a compare table and a single run (std 0)
    draw alike. ``metrics`` maps each key to its legend label. A missing or NaN mean (the unimodal
    references have no fused head) leaves that bar out instead of drawing a zero that reads as a
    result.

    The figure is saved to ``path``; returns the bars drawn, as ``(group label, metric key)`` in
    drawing order (so a caller or test can tell which bars were left out).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as exc:  # pragma: no cover - needs the extra missing
        raise ModuleNotFoundError("plots need matplotlib: pip install 'miles-lr[plot]'") from exc
    if not groups or not metrics:
        raise ValueError("no groups or no metrics to plot")
    path = Path(path)
    scale = 100.0 if percent else 1.0
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2.0), 4.2))
    drawn: list[tuple[str, str]] = []
    for i, (key, label) in enumerate(metrics.items()):
        xs, means, stds = [], [], []
        for g, row in enumerate(groups):
            mean = row.get(f"{key}_mean")
            if mean is None or not math.isfinite(float(mean)):
                continue
            std = row.get(f"{key}_std")
            xs.append(g - 0.4 + width * (i + 0.5))
            means.append(scale * float(mean))
            stds.append(scale * float(std) if std is not None and math.isfinite(std) else 0.0)
            drawn.append((str(row[label_key]), key))
        if not xs:
            continue
        bars = ax.bar(xs, means, width * 0.92, yerr=stds, capsize=3, label=label, color=f"C{i}")
        # values inside the bars: above them they would collide with the error bars
        ax.bar_label(
            bars, fmt="%.1f" if percent else "%.3g", fontsize=7, label_type="center", color="w"
        )
    ticks = [
        f"{row[label_key]}\n(n={row['n']})" if "n" in row else str(row[label_key]) for row in groups
    ]
    ax.set_xticks(range(len(groups)), ticks, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: no overlap
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return drawn


@dataclass(frozen=True)
class HeatPanel:
    """One heat map: ``values[r][c]`` (NaN: no cell), the text written in each cell and whether
    it is marked (a bold frame, e.g. a significant paired test)."""

    title: str
    values: Sequence[Sequence[float]]
    text: Sequence[Sequence[str]]
    marked: Sequence[Sequence[bool]]


def plot_heatmaps(
    panels: Sequence[HeatPanel],
    rows: Sequence[str],
    columns: Sequence[str],
    path: str | Path,
    *,
    title: str,
    row_title: str,
    column_title: str,
    colorbar: str,
    per_row: int = 2,
) -> Path:
    """Heat maps, ``per_row`` panels side by side, on one symmetric diverging scale (white: no
    difference; NaN cells left blank)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as exc:  # pragma: no cover - needs the extra missing
        raise ModuleNotFoundError("plots need matplotlib: pip install 'miles-lr[plot]'") from exc
    if not panels or not rows or not columns:
        raise ValueError("nothing to plot: no panels, rows or columns")
    finite = [abs(v) for p in panels for line in p.values for v in line if math.isfinite(v)]
    bound = max(finite, default=1.0) or 1.0
    path = Path(path)
    ncols = min(per_row, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(1.5 + 1.3 * len(columns) * ncols, 0.9 + 0.75 * len(rows) * nrows),
        squeeze=False,
        constrained_layout=True,
    )
    # no cell here: grey, not the white of "no difference"
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.85")
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.axis("off")
            continue
        panel = panels[index]
        grid = [[v if math.isfinite(v) else math.nan for v in line] for line in panel.values]
        image = ax.imshow(grid, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto")
        for r in range(len(rows)):
            for c in range(len(columns)):
                ax.text(c, r, panel.text[r][c], ha="center", va="center", fontsize=7)
                if panel.marked[r][c]:
                    ax.add_patch(
                        plt.Rectangle((c - 0.47, r - 0.47), 0.94, 0.94, fill=False, lw=2.2)
                    )
        ax.set_xticks(range(len(columns)), columns, fontsize=7)
        ax.set_yticks(range(len(rows)), rows if index % ncols == 0 else [], fontsize=7)
        if index // ncols == nrows - 1:
            ax.set_xlabel(column_title, fontsize=8)
        if index % ncols == 0:
            ax.set_ylabel(row_title, fontsize=8)
        ax.set_title(panel.title, fontsize=8)
    assert image is not None
    fig.colorbar(image, ax=axes, label=colorbar, shrink=0.8)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
