"""Per-modality learning-rate search for unimodal models, the input MSLR needs.

MSLR (Yao and Mihalcea, Findings of ACL 2022; :mod:`miles.strategies.mslr_base`) starts each
encoder at the learning rate that was best for its unimodal model. :func:`sweep_unimodal_lrs` finds
those rates: for every modality and candidate rate it trains the ``unimodal`` strategy (encoder
``m`` and head ``m`` alone, best epoch chosen on ``m``'s validation metric) and keeps, per
modality, the rate with the best validation score (ties go to the smaller rate).

Results are cached as JSON in ``cache_dir``, one file per setting (dataset and its parameters,
candidate rates, epochs, seed, latent size, fusion and every trainer setting except ``progress``),
so the second call with the same setting trains nothing and any changed setting recomputes. The
file also keeps every trial's validation score. A cache file that cannot be read, or whose stored
setting does not match, is treated as a miss: the sweep warns (``RuntimeWarning``, naming the
file), recomputes and overwrites it, since a cache only ever saves time.
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

import miles.strategies.unimodal  # noqa: F401  (registers "unimodal")
from miles.training import experiment
from miles.training.experiment import ExperimentConfig
from miles.training.history import atomic_write_text
from miles.training.trainer import TrainerConfig

if TYPE_CHECKING:
    from miles.data import DatasetSplits

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
CACHE_VERSION = 1
#: trainer fields the sweep sets itself, so ``trainer_overrides`` may not
_OWNED = ("epochs", "lr", "seed", "progress")


def _check_lrs(lrs: Iterable[float]) -> tuple[float, ...]:
    values = tuple(lrs)
    if not values:
        raise ValueError("lrs must hold at least one learning rate")
    for lr in values:
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise ValueError(f"every lr must be a positive finite number, got {lr!r}")
    out = tuple(sorted(float(v) for v in values))
    if len(set(out)) != len(out):
        raise ValueError(f"lrs has duplicates: {values!r}")
    return out


def _trainer_settings(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    overrides = dict(overrides or {})
    owned = sorted(set(overrides) & set(_OWNED))
    if owned:
        raise ValueError(
            f"trainer_overrides may not set {owned}: the sweep sets epochs, lr, seed and progress"
        )
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown trainer_overrides {unknown}; expected some of {sorted(known)}")
    return overrides


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


def _cache_file(cache_dir: Path, dataset: str, settings: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(
        json.dumps(settings, sort_keys=True, default=repr).encode("utf-8")
    ).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset) or "dataset"
    return cache_dir / f"unimodal-lrs_{safe}_{digest}.json"


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


def sweep_unimodal_lrs(
    dataset: str,
    data: DatasetSplits | None = None,
    *,
    lrs: Iterable[float] = DEFAULT_LRS,
    epochs: int,
    seed: int = 0,
    latent_dim: int = 64,
    fusion: str = "concat",
    cache_dir: Path | str | None = None,
    progress: bool = True,
    trainer_overrides: Mapping[str, Any] | None = None,
    dataset_params: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Best unimodal learning rate per modality, ``{modality: lr}``, for MSLR's ``unimodal_lrs``.

    Args:
        dataset: registered dataset name (also the cache key's first part).
        data: the built :class:`~miles.data.DatasetSplits`; ``None`` builds
            ``build_dataset(dataset, **dataset_params)`` (only when the cache misses).
        lrs: candidate rates (positive, distinct); the paper searched a grid per modality.
        epochs, seed, latent_dim, fusion: as in :class:`ExperimentConfig` / :class:`TrainerConfig`.
        cache_dir: where the JSON cache lives (created if needed); ``None`` disables caching.
        progress: print one line per trial.
        trainer_overrides: other :class:`TrainerConfig` fields (batch size, optimizer, device...);
            ``epochs``, ``lr``, ``seed`` and ``progress`` are the sweep's own.
        dataset_params: the dataset builder's parameters (part of the cache key).

    Each trial is ``run_experiment`` of strategy ``unimodal`` for one modality; its score is that
    modality's validation metric at the trial's best epoch (``RunResult.val["unimodal"][m]``).
    """
    candidates = _check_lrs(lrs)
    overrides = _trainer_settings(trainer_overrides)
    params = dict(dataset_params or {})
    base = TrainerConfig(epochs=epochs, lr=candidates[0], seed=seed, progress=False, **overrides)
    ExperimentConfig(dataset=dataset, fusion=fusion, latent_dim=latent_dim)  # validates them
    trainer_key = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("lr", "progress")}
    if data is None:
        from miles.data import build_dataset

        data = build_dataset(dataset, **params)
    settings: dict[str, Any] = {
        "dataset": dataset,
        "dataset_params": params,
        # the data actually swept, so two different datasets under one name never share a file
        "data": {
            "modalities": list(data.modalities),
            "sizes": [len(data.train), len(data.val), len(data.test)],
        },
        "lrs": list(candidates),
        "latent_dim": latent_dim,
        "fusion": fusion,
        "trainer": trainer_key,
    }
    path = None
    if cache_dir is not None:
        path = _cache_file(Path(cache_dir), dataset, settings)
        cached = _read_cache(path, settings)
        if cached is not None:
            if progress:
                print(f"[lr-sweep] {dataset}: cached {cached} ({path})", flush=True)
            return cached

    modalities = tuple(data.modalities)
    scores: dict[str, dict[float, float]] = {m: {} for m in modalities}
    trials: list[dict[str, Any]] = []
    total, done = len(modalities) * len(candidates), 0
    for m in modalities:
        for lr in candidates:
            config = ExperimentConfig(
                dataset=dataset,
                dataset_params=params,
                fusion=fusion,
                latent_dim=latent_dim,
                strategy="unimodal",
                strategy_params={"modality": m},
                trainer=dataclasses.replace(base, lr=lr),
            )
            try:
                result = experiment.run_experiment(config, data=data)
                score, best_epoch = float(result.val["unimodal"][m]), result.best_epoch
                note = None
            except FloatingPointError as exc:  # the rate diverged: a losing trial, not a crash
                score, best_epoch, note = math.nan, 0, str(exc)
            scores[m][lr] = score
            trials.append(
                {
                    "modality": m,
                    "lr": lr,
                    "val": None if math.isnan(score) else score,  # JSON has no NaN
                    "best_epoch": best_epoch,
                    "note": note,
                }
            )
            done += 1
            if progress:
                print(
                    f"[lr-sweep] {dataset} [{done}/{total}] {m} lr={lr:g}: "
                    f"val {data.metric}={score:.4f} (best epoch {best_epoch})",
                    flush=True,
                )
    best = best_lrs(scores)
    if progress:
        print(f"[lr-sweep] {dataset}: best {best}", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": CACHE_VERSION,
            "settings": json.loads(json.dumps(settings, default=repr)),
            "metric": data.metric,
            "best": best,
            "trials": trials,
        }
        atomic_write_text(path, json.dumps(payload, indent=2, default=repr) + "\n")
    return best


def read_sweep(path: Path | str) -> dict[str, Any]:
    """The full cached record (settings, metric, best rates, every trial's score)."""
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))
