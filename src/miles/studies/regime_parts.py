"""The cells and methods of the regime map and of its parts (``miles regime-map --part``).

A *cell* is a setting of the data (a dataset, its parameters, where it sits on the map's grid, and
optionally its own fusion); a *method* is a registered strategy with parameters under a label.
Each part is a preset of cells and methods; the parts that study "the cells where MILES helped"
read the map's results with :func:`helped_cells`, a rule fixed before the map was run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from miles.studies.checks import check_fusions
from miles.validation import check_str

__all__ = [
    "BASELINE",
    "DATASET",
    "EPOCHS",
    "IMAGE",
    "INFORMATIVENESS_CELL",
    "KIND",
    "MAP_METHODS",
    "MAP_NOISE",
    "MAP_SPEED",
    "PARTS",
    "SEEDS",
    "SLOW_CELL",
    "Cell",
    "Method",
    "helped_cells",
    "map_cell",
    "map_cells",
]

KIND = "regime"
DATASET = "fsdd-mnist-regime"
EPOCHS = 30
SEEDS = (0, 1, 2, 3, 4)
#: every regime cell's images: 14 x 14 (a CNN step is about 4x cheaper than at 28 x 28)
IMAGE = {"image_size": 14}
#: the map's axes: pixel noise on the images (the unimodal gap) and the image encoder's speed
MAP_NOISE = (0.0, 0.5, 0.75, 1.0)
MAP_SPEED = (1.0, 0.3, 0.1)
BASELINE = "joint+aux"


# -- cells and methods -----------------------------------------------------------------------------


T = TypeVar("T")


def _from_mapping(cls: type[T], raw: Any, kind: str) -> T:
    """A ``cls`` from its fields as a mapping (unknown keys refused), or ``raw`` if it is one."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise TypeError(f"a {kind} must be a mapping, got {raw!r}")
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - fields)
    if unknown:
        name = raw.get("name", raw.get("label"))
        raise ValueError(f"{kind} {name!r} has unknown keys {unknown}; known: {sorted(fields)}")
    return cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()})


@dataclass(frozen=True)
class Cell:
    """One setting of the data: a dataset and its parameters, where it sits on the map (``row``,
    ``column``: empty when it is not on a grid) and, optionally, its own fusion."""

    name: str
    dataset: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    row: str = ""
    column: str = ""
    fusion: str | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | Cell) -> Cell:
        cell = _from_mapping(cls, raw, "cell")
        check_str("cell name", cell.name)
        check_str("cell dataset", cell.dataset)
        if cell.fusion is not None:
            check_fusions([cell.fusion])
        return cell


@dataclass(frozen=True)
class Method:
    """A registered strategy with its parameters, under a label (``miles tau=0.1``)."""

    label: str
    strategy: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def needs_references(self) -> bool:
        """Reference-aware MILES whose unimodal references come from this study's own runs."""
        return self.params.get("reference") == "unimodal" and "references" not in self.params

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | Method) -> Method:
        method = _from_mapping(cls, raw, "method")
        check_str("method label", method.label)
        check_str("method strategy", method.strategy)
        from miles.strategies import available_strategies, build_strategy

        if method.strategy not in available_strategies():
            raise ValueError(f"method {method.label!r}: unknown strategy {method.strategy!r}")
        params = dict(method.params)
        if method.needs_references:  # checked with stand-in references; the real ones come later
            params["references"] = {"a": 1.0}
        build_strategy(method.strategy, **params)  # bad parameters fail before any training
        return method


def _method(label: str, strategy: str, **params: Any) -> dict[str, Any]:
    return {"label": label, "strategy": strategy, "params": params}


def _miles(tau: float = 0.2, extra: str = "", **params: Any) -> dict[str, Any]:
    label = f"miles tau={tau:g}" + (f" {extra}" if extra else "")
    return _method(label, "miles", tau=tau, **params)


def _regime_cell(name: str, *, row: str = "", column: str = "", **params: float) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": DATASET,
        "params": {**IMAGE, **params},
        "row": row,
        "column": column,
    }


def map_cells() -> list[dict[str, Any]]:
    """The 12 cells of the map: noise level (rows) x image-encoder speed (columns)."""
    return [
        _regime_cell(
            f"noise{noise:g}-speed{speed:g}",
            row=f"noise {noise:g}",
            column=f"speed x{speed:g}",
            image_noise=noise,
            image_slowdown=speed,
        )
        for noise in MAP_NOISE
        for speed in MAP_SPEED
    ]


def map_cell(name: str) -> dict[str, Any]:
    """The map's cell called ``name`` (``ValueError`` listing the names otherwise)."""
    for cell in map_cells():
        if cell["name"] == name:
            return cell
    raise ValueError(f"no map cell {name!r}; cells: {[c['name'] for c in map_cells()]}")


#: the map's methods: the references of the issue and MILES at two thresholds
MAP_METHODS = (
    _method("joint", "joint"),
    _method(BASELINE, BASELINE),
    _miles(0.2),
    _miles(0.1),
)
#: the cell where the two modalities differ in how informative they are, not in speed
INFORMATIVENESS_CELL = "noise1-speed1"
#: a slow weak modality with a moderate gap
SLOW_CELL = "noise0.5-speed0.1"


def helped_cells(out_dir: str | Path, at_most: int = 2) -> tuple[list[str], str]:
    """The map cells where MILES helped with concat, by a rule fixed in advance; and the rule.

    Reads ``regime_map.json`` in ``out_dir``: the cells where a MILES setting beat joint+aux on
    the weak head (chosen epoch) with a marked paired test, largest mean first; when none did,
    the cells with the largest positive mean difference (and the returned rule says so).

    Raises:
        FileNotFoundError: the map has not been run into ``out_dir``.
    """
    path = Path(out_dir) / f"{KIND}_map.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: this part uses the cells where MILES helped on the map; run "
            f"`miles regime-map --part map --out {out_dir}` first"
        )
    tests = json.loads(path.read_text(encoding="utf-8"))["tests"]
    weak = [t for t in tests if t["quantity"] == "weak head" and t["b"] == BASELINE]
    best: dict[str, float] = {}
    for t in weak:
        if t["significant"] and t["mean"] > 0:
            best[t["cell"]] = max(best.get(t["cell"], -math.inf), t["mean"])
    rule = "cells where MILES beat joint+aux on the weak head with a marked paired test"
    if not best:
        for t in weak:
            if t["mean"] > 0:
                best[t["cell"]] = max(best.get(t["cell"], -math.inf), t["mean"])
        rule = (
            "no cell had a marked gain; the cells with the largest positive mean gain of MILES "
            "over joint+aux on the weak head"
        )
    chosen = sorted(best, key=lambda c: -best[c])[:at_most]
    return chosen, rule


def _preset_map(out: str) -> dict[str, Any]:
    return {
        "cells": map_cells(),
        "methods": list(MAP_METHODS),
        "axes": ["unimodal gap: image noise", "relative speed: image encoder"],
        "note": "The grid was fixed before any MILES run (see miles.studies.regime).",
    }


def _preset_estimators(out: str) -> dict[str, Any]:
    return {
        "cells": [
            {"name": "mfeat-3view", "dataset": "mfeat-3view", "params": {}},
            _regime_cell(
                "3m-clean-second", image_noise=0.5, image_slowdown=0.1, second_image_noise=0.0
            ),
            _regime_cell(
                "3m-noisy-second", image_noise=0.5, image_slowdown=0.1, second_image_noise=0.75
            ),
        ],
        "methods": [
            _method("joint", "joint"),
            _method(BASELINE, BASELINE),
            _miles(0.2, "heads"),
            _miles(0.2, "ablation", estimator="ablation"),
            _miles(0.2, "pairwise", pairwise=True),
        ],
    }


def _preset_init(out: str) -> dict[str, Any]:
    cells = []
    for name in (INFORMATIVENESS_CELL, SLOW_CELL):
        base = map_cell(name)
        for scale in (0.5, 1.0, 2.0):
            # scale 1 is the map's own cell (the same runs, trained once)
            scaled = {} if scale == 1.0 else {"init_scale": scale}
            cells.append(
                base
                | {
                    "name": f"{name} init x{scale:g}",
                    "params": {**base["params"], **scaled},
                    "row": name,
                    "column": f"init x{scale:g}",
                }
            )
    return {
        "cells": cells,
        "methods": [_method(BASELINE, BASELINE), _miles(0.2)],
        "axes": ["cell", "initial weight scale"],
    }


def _preset_remedies(out: str) -> dict[str, Any]:
    helped, rule = helped_cells(out)
    names = list(dict.fromkeys([INFORMATIVENESS_CELL, *helped]))
    return {
        "cells": [map_cell(n) for n in names],
        "methods": [
            _method(BASELINE, BASELINE),
            _miles(0.2),
            _miles(0.2, "warm-up 3", warmup=3),
            _miles(0.2, "EMA 0.5", smoothing=0.5),
            _miles(0.2, "hysteresis 0.1", release_tau=0.1),
            _miles(0.2, "min duration 3", min_duration=3),
            _miles(0.2, "ref unimodal", reference="unimodal"),
            _miles(0.2, "ref best", reference="best"),
        ],
        "note": f"Cells: {INFORMATIVENESS_CELL} (the informativeness case) and {rule}.",
    }


def _preset_fusions(out: str) -> dict[str, Any]:
    helped, rule = helped_cells(out)
    cells = []
    for name in helped:
        for fusion in ("concat", "gated", "film", "attention"):
            cell = map_cell(name)
            cells.append(
                cell | {"name": f"{name} {fusion}", "fusion": fusion, "row": name, "column": fusion}
            )
    return {
        "cells": cells,
        "methods": [_method(BASELINE, BASELINE), _miles(0.2), _miles(0.1)],
        "note": f"Cells: {rule}.",
        "axes": ["cell", "fusion"],
    }


#: each part's preset: ``out_dir -> {"cells", "methods"[, "note"]}``
PARTS: dict[str, Callable[[str], dict[str, Any]]] = {
    "map": _preset_map,
    "estimators": _preset_estimators,
    "init": _preset_init,
    "remedies": _preset_remedies,
    "fusions": _preset_fusions,
}
