"""Hand-made run results: histories whose every reported number is known in advance.

:func:`miles_result` is a 4-epoch MILES run on modalities ``a`` and ``b`` whose decisions are:

- after epoch 1: slow ``a`` (factors a 0.5, b 1) -> epoch 2 trains with ``a`` slowed;
- after epoch 2: no decision (fused metric 0) -> epoch 3 keeps ``a`` slowed;
- after epoch 3: balanced (factors 1, 1) -> epoch 4 at full rate;
- after epoch 4: slow ``b`` -> applies to no epoch.

So it *acted* in epochs 2 and 3 (``a`` slowed in both, ``b`` in none), whereas counting the
decisions that slowed a modality (the old rule) gives 1. Its test heads are a 0.70, b 0.80.
"""

from __future__ import annotations

from typing import Any

BASE_LR = 1e-3


def decision(
    epoch: int, u: dict[str, float], factors: dict[str, float], slowed: str | None, reason: str
) -> dict[str, Any]:
    """A MILES decision record as ``Decision.to_dict`` writes it."""
    return {
        "epoch": epoch,
        "fused": 0.8,
        "estimator": "heads",
        "metrics": {m: 0.5 for m in u},
        "u": u,
        "delta": max(u.values()) - min(u.values()),
        "slowed": slowed,
        "reason": reason,
        "factors": factors,
        "lrs": [BASE_LR * factors[m] for m in factors] + [BASE_LR],
    }


def row(
    epoch: int,
    factors: dict[str, float],
    strategy: dict[str, Any],
    val: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A history row in the trainer's key order; ``factors`` are those the epoch trained with."""
    val = val or {m: 0.5 + 0.01 * epoch for m in factors}
    return {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "train_loss_fused": 0.5 / epoch,
        **{f"train_loss_{m}": 0.25 / epoch for m in factors},
        "val_loss": 0.9 / epoch,
        "val_fused": 0.6 + 0.01 * epoch,
        **{f"val_{m}": v for m, v in val.items()},
        **{f"lr_{m}": BASE_LR * f for m, f in factors.items()},
        "lr_shared": BASE_LR,
        "strategy": strategy,
        "time_s": 0.1,
        "selection_score": 0.6 + 0.01 * epoch,
    }


def result(
    method: str,
    history: list[dict[str, Any]],
    *,
    heads: dict[str, float],
    fused: float = 0.9,
    seed: int = 0,
    fusion: str = "concat",
    best_epoch: int = 3,
) -> dict[str, Any]:
    """A ``result.json`` dict (``RunResult.to_dict``) around ``history``."""
    modalities = list(heads)
    return {
        "kind": "run",
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "val": {"fused": 0.63, "unimodal": {m: 0.5 for m in modalities}},
        "test": {"fused": fused, "unimodal": dict(heads)},
        "test_last": {"fused": fused - 0.01, "unimodal": {m: v - 0.02 for m, v in heads.items()}},
        "history": history,
        "strategy": {"name": method, "uses_aux_losses": method != "joint", "tau": 0.2},
        "config": {"seed": seed, "lr": BASE_LR, "metric": "accuracy", "epochs": len(history)},
        "wall_time_s": 1.0,
        "extra": {"dataset": "handmade", "fusion": fusion, "modalities": modalities},
    }


def miles_result(*, mu_one: bool = False, seed: int = 0, fusion: str = "concat") -> dict[str, Any]:
    """The MILES run of the module docstring (``mu_one``: every factor 1 instead of 0.5)."""
    slow = 1.0 if mu_one else 0.5
    d1 = decision(1, {"a": 0.4, "b": -0.1}, {"a": slow, "b": 1.0}, "a", "slowed")
    d3 = decision(3, {"a": 0.05, "b": 0.0}, {"a": 1.0, "b": 1.0}, None, "balanced")
    d4 = decision(4, {"a": -0.1, "b": 0.3}, {"a": 1.0, "b": slow}, "b", "slowed")
    full, a_slow = {"a": 1.0, "b": 1.0}, {"a": slow, "b": 1.0}
    history = [
        row(1, full, {"decision": d1}),
        row(2, a_slow, {"decision": None, "note": "fused metric is 0: no decision"}),
        row(3, a_slow, {"decision": d3}),
        row(4, full, {"decision": d4}),
    ]
    return result("miles", history, heads={"a": 0.70, "b": 0.80}, seed=seed, fusion=fusion)


def joint_result(
    *, seed: int = 0, fusion: str = "concat", heads: dict[str, float] | None = None
) -> dict[str, Any]:
    """A 4-epoch joint run (no decisions): heads a 0.60, b 0.90 unless given."""
    full = {"a": 1.0, "b": 1.0}
    history = [row(e, full, {}) for e in range(1, 5)]
    return result("joint", history, heads=heads or {"a": 0.60, "b": 0.90}, seed=seed, fusion=fusion)


def unimodal_result(modality: str, head: float, *, seed: int = 0) -> dict[str, Any]:
    """A unimodal reference of ``modality`` whose own head scores ``head``."""
    full = {"a": 1.0, "b": 1.0}
    history = [row(e, full, {}) for e in range(1, 5)]
    heads = {"a": 0.1, "b": 0.1} | {modality: head}
    res = result("unimodal", history, heads=heads, seed=seed)
    res["strategy"] |= {"modality": modality, "uses_aux_losses": False}
    return res
