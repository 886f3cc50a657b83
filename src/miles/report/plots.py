"""Learning-dynamics figure in the spirit of the paper's Fig. 2.

Per run (one column each): u per modality with delta and tau; the learning rate of each modality's
parameter group; validation metrics of the fused head and every unimodal head, per epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from miles.report.tables import decisions


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
    fig, axes = plt.subplots(3, len(runs), figsize=(5 * len(runs), 9), squeeze=False, sharex="col")
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
