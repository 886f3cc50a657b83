"""Typed run results and the one definition of every number the tables report.

A run's ``result.json`` is a :class:`RunResult`; each row of its ``history`` is an
:class:`EpochRecord`. Every table, CSV, JSON and report of ``miles`` (compare, ablate, sweep, demo,
``miles train``, ``miles report``) computes its numbers through the functions below, so a number
with one name has one meaning everywhere:

- **dominant / weak order** (:func:`dominant_order`, rule in :data:`DOMINANT_RULE`): modalities
  ranked by the mean test metric of their unimodal reference runs when the study has them, else by
  their heads under vanilla ``joint`` training, else in the modalities' own order.
- **gap** (:func:`signed_gap`): the dominant modality's head minus the weakest one's, *signed*: it
  is negative when the dominant modality's head ends below the other's.
- **acted epochs** (:func:`acted_epochs`) and **slowed epochs** per modality
  (:func:`slowed_epochs`): the epochs *trained* with a learning-rate factor below 1, read from the
  factors MILES recorded in its decisions. A decision applies to the next epoch, so the decision
  taken after the last epoch never counts, and ``mu = 1`` (factor 1) never acts.
- **chosen epoch** (:func:`chosen_epoch`): the epoch the strategy's selection score picked on
  validation; the test metrics are measured with its weights.
- **heads at last epoch** (:func:`heads_at_last_epoch`): the test metric of every head with the
  last epoch's weights (selection on validation alone can hide or create a gap).
- **probe / slice readouts** (:func:`readout_scores`): the same two unimodal readouts for every
  method, measured once per run at the chosen epoch (:mod:`miles.readouts`): a post-hoc linear
  probe on each frozen encoder, and the fused head's share of each modality.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "DOMINANT_RULE",
    "GAP_RULE",
    "EpochRecord",
    "RunResult",
    "acted_epochs",
    "chosen_epoch",
    "decisions",
    "dominant_order",
    "factors_in_force",
    "heads_at_last_epoch",
    "idle_reasons",
    "load_result",
    "max_delta",
    "readout_scores",
    "run_row",
    "signed_gap",
    "slowed_epochs",
]

#: how :func:`dominant_order` ranks the modalities (for captions)
DOMINANT_RULE = (
    "the mean test metric of each modality's unimodal reference when the study has them, else of "
    "its head under joint training, else the modalities' own order"
)
#: what :func:`signed_gap` measures (for captions; ``{dominant}`` and ``{weak}`` are filled in)
GAP_RULE = (
    "gap = {dominant} head - {weak} head (signed: negative when the dominant modality's head "
    "ends below the other's)"
)

_TRAIN, _VAL, _LR = "train_", "val_", "lr_"
_VAL_FIXED = ("val_loss", "val_fused")


@dataclass
class EpochRecord:
    """One row of a run's history: the flat dict the trainer logs, as a typed record.

    ``to_dict`` gives back exactly the row ``history.json`` holds (same keys, same order), so the
    two can be used interchangeably. Keys: ``epoch``, ``train_<stat>``, ``val_loss``,
    ``val_fused``, ``val_<modality>``, ``lr_<param group>`` (the rates the epoch trained with),
    ``strategy`` (the strategy's record, e.g. MILES's decision), ``time_s``, ``selection_score``.
    """

    epoch: int
    train: dict[str, float]
    val_loss: float
    val_fused: float
    val: dict[str, float]
    lrs: dict[str, float]
    strategy: dict[str, Any]
    time_s: float
    selection_score: float | None = None

    @property
    def decision(self) -> dict[str, Any] | None:
        """The MILES decision taken after this epoch (``None``: no decision, or not MILES)."""
        decision = self.strategy.get("decision")
        return dict(decision) if isinstance(decision, Mapping) else None

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": self.epoch}
        row.update({f"{_TRAIN}{k}": v for k, v in self.train.items()})
        row.update({"val_loss": self.val_loss, "val_fused": self.val_fused})
        row.update({f"{_VAL}{m}": v for m, v in self.val.items()})
        row.update({f"{_LR}{g}": v for g, v in self.lrs.items()})
        row.update({"strategy": self.strategy, "time_s": self.time_s})
        if self.selection_score is not None:
            row["selection_score"] = self.selection_score
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> EpochRecord:
        """Read one history row; a row missing a required key is a ``ValueError`` naming it."""
        if not isinstance(row, Mapping):
            raise TypeError(f"a history row must be a mapping, got {type(row).__name__}")
        missing = [k for k in ("epoch", *_VAL_FIXED, "strategy", "time_s") if k not in row]
        if missing:
            raise ValueError(f"history row lacks {missing} (keys: {sorted(row)})")
        known = {"epoch", *_VAL_FIXED, "strategy", "time_s", "selection_score"}
        unknown = [k for k in row if k not in known and not k.startswith((_TRAIN, _VAL, _LR))]
        if unknown:
            raise ValueError(f"history row has unknown keys {unknown}")

        def prefixed(prefix: str) -> dict[str, float]:
            return {
                k[len(prefix) :]: v
                for k, v in row.items()
                if k.startswith(prefix) and k not in _VAL_FIXED
            }

        return cls(
            epoch=int(row["epoch"]),
            train=prefixed(_TRAIN),
            val_loss=row["val_loss"],
            val_fused=row["val_fused"],
            val=prefixed(_VAL),
            lrs=prefixed(_LR),
            strategy=dict(row["strategy"] or {}),
            time_s=row["time_s"],
            selection_score=row.get("selection_score"),
        )


@dataclass
class RunResult:
    """Outcome of one training run; ``to_dict`` is what ``result.json`` holds.

    ``val``/``test``/``test_last`` are ``{"fused": x, "unimodal": {modality: x}}``: validation and
    test at the chosen epoch, and test with the last epoch's weights (``None`` without a test
    split). ``history`` holds one flat row per epoch (see :class:`EpochRecord`).
    """

    best_epoch: int
    epochs_run: int
    val: dict[str, Any]
    test: dict[str, Any] | None
    test_last: dict[str, Any] | None
    history: list[dict[str, Any]]
    strategy: dict[str, Any]
    config: dict[str, Any]
    wall_time_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    #: the ``kind`` field of ``result.json``, which ``miles report`` dispatches on
    KIND = "run"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        """Rebuild from :meth:`to_dict`'s output (``kind`` may be absent in older files)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a run result must be a mapping, got {type(data).__name__}")
        kind = data.get("kind", cls.KIND)
        if kind != cls.KIND:
            raise ValueError(f"not a run result: kind {kind!r}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n != "extra"]
        if missing:
            raise ValueError(f"run result lacks {missing}")
        unknown = sorted(set(data) - set(names) - {"kind"})
        if unknown:
            raise ValueError(f"run result has unknown keys {unknown}")
        history = data["history"]
        if not isinstance(history, list) or not history:
            raise ValueError(f"a run result's history holds its epochs, this one {history!r}")
        for i, row in enumerate(history):
            try:
                EpochRecord.from_dict(row)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"history[{i}]: {exc}") from None
        val = data["val"]
        if not isinstance(val, Mapping) or not isinstance(val.get("unimodal"), Mapping):
            raise ValueError(f"'val' must hold 'fused' and 'unimodal', got {val!r}")
        return cls(**{n: data[n] for n in names if n in data})

    @property
    def records(self) -> list[EpochRecord]:
        """The history as typed records."""
        return [EpochRecord.from_dict(row) for row in self.history]

    @property
    def modalities(self) -> list[str]:
        return list(self.val["unimodal"])


def load_result(path: str | Path) -> RunResult:
    """Read a ``result.json`` (or the run folder holding it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not JSON or not a run result; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "result.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no run result at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"damaged run result {path}: not valid JSON ({exc})") from None
    try:
        return RunResult.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"damaged run result {path}: {exc}") from None


def _as_dict(result: RunResult | Mapping[str, Any]) -> Mapping[str, Any]:
    return result.to_dict() if isinstance(result, RunResult) else result


# -- MILES decisions ------------------------------------------------------------------------------


def decisions(result: RunResult | Mapping[str, Any]) -> list[dict[str, Any] | None]:
    """The MILES decision taken after each epoch (``None`` where none was taken or no MILES)."""
    out: list[dict[str, Any] | None] = []
    for row in _as_dict(result)["history"]:
        record = row.get("strategy") or {}
        decision = record.get("decision")
        out.append(dict(decision) if isinstance(decision, Mapping) else None)
    return out


def _records_decisions(result: Mapping[str, Any]) -> bool:
    """A run whose strategy records MILES decisions (a ``decision`` entry, possibly ``None``)."""
    return any("decision" in (row.get("strategy") or {}) for row in result["history"])


def factors_in_force(result: RunResult | Mapping[str, Any]) -> list[dict[str, float]] | None:
    """Per epoch, the learning-rate factor each modality *trained* with (``None`` without MILES).

    Epoch 1 trains at the base rates. Each decision sets the factors of the next epoch; an epoch
    after which no decision was taken (fused metric 0) keeps them.
    """
    data = _as_dict(result)
    if not _records_decisions(data):
        return None
    modalities = list(data["val"]["unimodal"])
    current = dict.fromkeys(modalities, 1.0)
    out = []
    for decision in decisions(data):
        out.append(dict(current))
        if decision is not None:
            current = {m: float(decision["factors"].get(m, 1.0)) for m in modalities}
    return out


def slowed_epochs(result: RunResult | Mapping[str, Any]) -> dict[str, list[int]] | None:
    """Per modality, the epochs it trained with a factor below 1 (``None`` without MILES)."""
    data = _as_dict(result)
    factors = factors_in_force(data)
    if factors is None:
        return None
    epochs = [int(row["epoch"]) for row in data["history"]]
    modalities = list(data["val"]["unimodal"])
    return {m: [e for e, f in zip(epochs, factors, strict=True) if f[m] < 1.0] for m in modalities}


def acted_epochs(result: RunResult | Mapping[str, Any]) -> list[int] | None:
    """The epochs trained with any modality's factor below 1 (``None`` without MILES)."""
    slowed = slowed_epochs(result)
    if slowed is None:
        return None
    return sorted({e for eps in slowed.values() for e in eps})


def idle_reasons(result: RunResult | Mapping[str, Any]) -> dict[str, int]:
    """Why MILES left the next epoch at full rate, counted over the decisions that applied."""
    data = _as_dict(result)
    factors = factors_in_force(data) or []
    counts: dict[str, int] = {}
    # decision i applies to epoch i + 1: the last one applies to nothing
    for decision, nxt in zip(decisions(data)[:-1], factors[1:], strict=False):
        if all(f >= 1.0 for f in nxt.values()):
            reason = "no decision (fused metric 0)" if decision is None else decision["reason"]
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def max_delta(result: RunResult | Mapping[str, Any]) -> float | None:
    """The largest imbalance ``delta`` MILES saw (``None`` without decisions)."""
    deltas = [float(d["delta"]) for d in decisions(result) if d is not None]
    return max(deltas) if deltas else None


# -- the reported numbers -------------------------------------------------------------------------


def chosen_epoch(result: RunResult | Mapping[str, Any]) -> int:
    """The epoch chosen on validation (the strategy's selection score); test uses its weights."""
    return int(_as_dict(result)["best_epoch"])


def heads_at_last_epoch(result: RunResult | Mapping[str, Any]) -> dict[str, float] | None:
    """Test metric of every unimodal head with the last epoch's weights (``None``: no test)."""
    last = _as_dict(result).get("test_last")
    return dict(last["unimodal"]) if last else None


def readout_scores(result: RunResult | Mapping[str, Any], kind: str) -> dict[str, float] | None:
    """A run's ``"probe"`` or ``"slice"`` readout per modality (``None``: not measured, e.g. a run
    made before readouts existed, or a slice of a fusion that is not additive)."""
    if kind not in ("probe", "slice"):
        raise ValueError(f"kind must be 'probe' or 'slice', got {kind!r}")
    found = (_as_dict(result).get("extra") or {}).get("readouts") or {}
    scores = found.get(kind)
    return {str(m): float(v) for m, v in scores.items()} if scores else None


def signed_gap(heads: Mapping[str, Any], order: Sequence[str]) -> float:
    """The dominant modality's head minus the weakest one's (``order``: dominant first)."""
    if len(order) < 2:
        raise ValueError(f"a gap needs at least two modalities, got {list(order)}")
    return float(heads[order[0]]) - float(heads[order[-1]])


def _mean_head(
    rows: Sequence[Mapping[str, Any]], method: str, modality: str, *, own_run: bool
) -> float | None:
    """Mean test metric of ``modality``'s head over ``method``'s rows (``own_run``: only the
    rows labelled with the modality, i.e. the unimodal reference of that modality)."""
    vals = [
        float(r[modality])
        for r in rows
        if r.get("method") == method
        and not r.get("failed")
        and r.get(modality) is not None
        and (not own_run or r.get("label") == modality)
    ]
    return sum(vals) / len(vals) if vals else None


def dominant_order(
    rows: Sequence[Mapping[str, Any]], modalities: Sequence[str]
) -> tuple[list[str], str]:
    """Modalities from dominant to weakest, and the rule that decided (see :data:`DOMINANT_RULE`).

    ``rows`` are :func:`run_row` rows with ``method`` (and ``label``: the modality, for unimodal
    reference rows). Ties keep the modalities' own order.
    """
    for method, own_run, rule in (
        ("unimodal", True, "unimodal reference (test)"),
        ("joint", False, "head under joint training (test)"),
    ):
        means = {m: _mean_head(rows, method, m, own_run=own_run) for m in modalities}
        if all(v is not None for v in means.values()):
            return sorted(modalities, key=lambda m: -(means[m] or 0.0)), rule
    return list(modalities), "modality order (no unimodal or joint runs)"


def run_row(result: RunResult | Mapping[str, Any]) -> dict[str, Any]:
    """One table row per run: every reported number of a run, each by its one definition.

    Test metrics at the chosen epoch (validation when the run has no test split): ``fused`` and
    one entry per modality; ``best_epoch`` (:func:`chosen_epoch`); ``acted`` (how many epochs,
    ``None`` without MILES), ``acted_epochs`` and ``slowed_<m>``; ``fused_last`` and ``<m>_last``
    (:func:`heads_at_last_epoch`); ``max_delta``. The gap needs the study's dominant order, so
    callers add it with :func:`signed_gap`.
    """
    data = _as_dict(result)
    scores = data["test"] or data["val"]
    modalities = list(scores["unimodal"])
    acted = acted_epochs(data)
    slowed = slowed_epochs(data)
    last = data.get("test_last")
    probe, sliced = readout_scores(data, "probe") or {}, readout_scores(data, "slice") or {}
    row: dict[str, Any] = {
        "method": data["strategy"]["name"],
        "fusion": data.get("extra", {}).get("fusion", ""),
        "seed": data["config"].get("seed"),
        "fused": scores["fused"],
        **{m: scores["unimodal"][m] for m in modalities},
        "best_epoch": chosen_epoch(data),
        "epochs": data["epochs_run"],
        "acted": None if acted is None else len(acted),
        "acted_epochs": acted,
        **{f"slowed_{m}": None if slowed is None else len(slowed[m]) for m in modalities},
        "fused_last": last["fused"] if last else None,
        **{f"{m}_last": (last["unimodal"][m] if last else None) for m in modalities},
        "max_delta": max_delta(data),
        **{f"probe_{m}": probe.get(m) for m in modalities},
        **{f"slice_{m}": sliced.get(m) for m in modalities},
        "uses_aux_losses": data["strategy"].get("uses_aux_losses"),
    }
    return row
