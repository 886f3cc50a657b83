"""Per-modality learning-rate search for unimodal models, the input MSLR needs.

MSLR (Yao and Mihalcea, Findings of ACL 2022; :mod:`miles.strategies.mslr_base`) starts each
encoder at the learning rate that was best for its unimodal model. :func:`sweep_unimodal_lrs` finds
those rates: for every modality and candidate rate it trains the ``unimodal`` strategy (encoder
``m`` and head ``m`` alone, best epoch chosen on ``m``'s validation metric) and keeps, per
modality, the rate with the best validation score (ties go to the smaller rate).

It is a study like the others: the runs go through the shared run loop
(:func:`miles.studies.runner.run_all`). With a ``cache_dir`` every trial has its own run folder
and the choice is cached as JSON, one file per setting (dataset and its parameters, the data's
sizes, candidate rates, epochs, latent size, fusion and every trainer setting but the rate and
``progress``), so a second call with the same setting trains nothing, an interrupted sweep resumes
and any changed setting recomputes. The file also keeps every trial's validation score. A cache
file that cannot be read, or whose stored setting does not match, is treated as a miss: the sweep
warns (``RuntimeWarning``, naming the file) and rewrites it from the trial runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miles.report.document import write_json
from miles.studies.runner import Echo, PlannedRun, RunOutcome, describe_test, run_all
from miles.training.experiment import ExperimentConfig
from miles.validation import check_positive

if TYPE_CHECKING:
    from miles.data import DatasetSplits

__all__ = ["CACHE_VERSION", "DEFAULT_LRS", "best_lrs", "read_sweep", "sweep_unimodal_lrs"]

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
CACHE_VERSION = 2


def _check_lrs(lrs: Iterable[float]) -> tuple[float, ...]:
    values = tuple(lrs)
    if not values:
        raise ValueError("lrs must hold at least one learning rate")
    out = tuple(sorted(check_positive("every lr", lr) for lr in values))
    if len(set(out)) != len(out):
        raise ValueError(f"lrs has duplicates: {values!r}")
    return out


def best_lrs(scores: Mapping[str, Mapping[float, float]]) -> dict[str, float]:
    """Per modality, the rate with the highest score; ties go to the smaller rate.

    A NaN score (a diverged trial) never wins over a number.
    """
    best: dict[str, float] = {}
    for modality, by_lr in scores.items():
        if not by_lr:
            raise ValueError(f"no scores for modality {modality!r}")
        if all(math.isnan(v) for v in by_lr.values()):
            raise FloatingPointError(
                f"every candidate learning rate diverged for modality {modality!r} "
                f"({sorted(by_lr)}); try smaller rates"
            )

        def key(lr: float, table: Mapping[float, float] = by_lr) -> tuple[float, float]:
            score = table[lr]
            return (-math.inf if math.isnan(score) else score, -lr)

        best[modality] = max(by_lr, key=key)
    return best


def _cache_stem(dataset: str, settings: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(
        json.dumps(settings, sort_keys=True, default=repr).encode("utf-8")
    ).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset) or "dataset"
    return f"unimodal-lrs_{safe}_{digest}"


def _read_cache(path: Path, settings: Mapping[str, Any]) -> dict[str, float] | None:
    """The cached choice, or ``None`` (with a warning when the file exists but is unusable)."""
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("version") != CACHE_VERSION:
            raise ValueError(f"cache version {payload.get('version')!r} != {CACHE_VERSION}")
        if payload["settings"] != json.loads(json.dumps(settings, default=repr)):
            raise ValueError("stored settings differ from the requested ones")
        best = {str(m): float(lr) for m, lr in payload["best"].items()}
        if not best or not all(math.isfinite(v) and v > 0 for v in best.values()):
            raise ValueError(f"bad 'best' entry {payload['best']!r}")
        return best
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(
            f"ignoring unusable learning-rate sweep cache {path} ({exc}); recomputing it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _score(outcome: RunOutcome) -> float:
    """The trial's score: its modality's validation metric at its best epoch (NaN: diverged)."""
    if outcome.result is None:
        return math.nan
    return float(outcome.result["val"]["unimodal"][outcome.run.ident["modality"]])


def _summary(result: Mapping[str, Any]) -> str:
    modality = result["strategy"].get("modality")
    if modality is None:
        return describe_test(result)
    score = result["val"]["unimodal"][modality]
    return f"val {modality} {score:.4f} (best epoch {result['best_epoch']})"


def sweep_unimodal_lrs(
    base: ExperimentConfig,
    data: DatasetSplits | None = None,
    *,
    lrs: Iterable[float] = DEFAULT_LRS,
    epochs: int | None = None,
    cache_dir: Path | str | None = None,
    echo: Echo | None = print,
) -> dict[str, float]:
    """Best unimodal learning rate per modality, ``{modality: lr}``, for MSLR's ``unimodal_lrs``.

    Args:
        base: the experiment every trial starts from (dataset and its parameters, latent size,
            fusion, trainer settings and seed); the sweep sets the strategy, the rate and
            ``epochs``.
        data: the built :class:`~miles.data.DatasetSplits`; ``None`` builds ``base``'s dataset.
        lrs: candidate rates (positive, distinct); the paper searched a grid per modality.
        epochs: epochs per trial (``None``: ``base.trainer.epochs``).
        cache_dir: where the trial runs and the JSON cache live; ``None`` trains in memory.
        echo: where progress lines go (``None``: silent).

    Each trial is the ``unimodal`` strategy for one modality; its score is that modality's
    validation metric at the trial's best epoch (``RunResult.val["unimodal"][m]``).
    """
    if not isinstance(base, ExperimentConfig):
        raise TypeError(f"base must be an ExperimentConfig, got {type(base).__name__}")
    candidates = _check_lrs(lrs)
    trainer = dataclasses.replace(
        base.trainer, epochs=base.trainer.epochs if epochs is None else epochs, progress=False
    )
    if data is None:
        from miles.data import build_dataset

        data = build_dataset(base.dataset, **base.dataset_params)
    trainer_key = {
        k: v for k, v in dataclasses.asdict(trainer).items() if k not in ("lr", "progress")
    }
    settings: dict[str, Any] = {
        "dataset": base.dataset,
        "dataset_params": dict(base.dataset_params),
        # the data actually swept, so two different datasets under one name never share a file
        "data": {
            "modalities": list(data.modalities),
            "sizes": [len(data.train), len(data.val), len(data.test)],
        },
        "lrs": list(candidates),
        "latent_dim": base.latent_dim,
        "fusion": base.fusion,
        "trainer": trainer_key,
    }
    say = echo or (lambda _m: None)
    path = runs_dir = None
    if cache_dir is not None:
        stem = _cache_stem(base.dataset, settings)
        path, runs_dir = Path(cache_dir) / f"{stem}.json", Path(cache_dir) / stem
        cached = _read_cache(path, settings)
        if cached is not None:
            say(f"[lr-sweep] {base.dataset}: cached {cached} ({path})")
            return cached

    runs = [
        PlannedRun(
            dataclasses.replace(
                base,
                strategy="unimodal",
                strategy_params={"modality": m},
                trainer=dataclasses.replace(trainer, lr=lr),
                out_dir=None if runs_dir is None else str(runs_dir / f"{m}-lr{lr!r}"),
            ),
            ident={"modality": m, "lr": lr},
            name=f"[lr-sweep] {base.dataset} {m} lr={lr:g}",
        )
        for m in data.modalities
        for lr in candidates
    ]
    batch = run_all(runs, data, echo=say, summary=_summary, label="lr-sweep run")
    scores: dict[str, dict[float, float]] = {m: {} for m in data.modalities}
    trials = []
    for outcome in batch.outcomes:
        m, lr = outcome.run.ident["modality"], outcome.run.ident["lr"]
        score = scores[m][lr] = _score(outcome)
        trials.append(
            {
                "modality": m,
                "lr": lr,
                "val": None if math.isnan(score) else score,  # JSON has no NaN
                "best_epoch": outcome.result["best_epoch"] if outcome.result else 0,
                "note": outcome.failed,
            }
        )
    best = best_lrs(scores)
    say(f"[lr-sweep] {base.dataset}: best {best}")
    if path is not None:
        payload = {
            "version": CACHE_VERSION,
            "settings": json.loads(json.dumps(settings, default=repr)),
            "metric": data.metric,
            "best": best,
            "trials": trials,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, payload)
    return best


def read_sweep(path: Path | str) -> dict[str, Any]:
    """The full cached record (settings, metric, best rates, every trial's score)."""
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))
