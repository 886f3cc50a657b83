"""``miles regime-map``: where does MILES matter? A measured map of imbalance regimes.

On the offline tasks MILES ties joint+aux: the auxiliary losses already bring the weak head close
to its unimodal model. This study controls the imbalance instead of taking it as it comes: on
``fsdd-mnist-regime`` (:mod:`miles.data.regime`) the image modality is weakened by seeded
manipulations of the real data, and a grid of *cells* crosses the unimodal gap (pixel noise on the
images) with the relative learning speed (a slowed-down image encoder). In every cell, every
method runs with the same seeds, and the unimodal references say how far each modality gets
alone.

Per run (numbers from :mod:`miles.results`): the fused metric, every head at the chosen and at
the last epoch, the chosen epoch, the epochs MILES acted; and from :mod:`miles.studies.readouts`:
every head at a fixed epoch and the post-hoc linear probes. Per cell: the unimodal references,
their gap and the epochs each needs to reach 95 % of its best validation value (the learning
speed), and paired comparisons over seeds (:mod:`miles.studies.paired`: mean difference, its
spread, the exact sign-flip test) of each MILES setting against joint+aux on every quantity. The
heat map shows MILES minus joint+aux on the weak head, with the cells where every seed agrees
(the smallest p five seeds can give) framed.

Parts (``--part``), each a preset of cells and methods written to ``regime_<part>.*``:

- ``map``: 12 cells (image noise 0, 0.5, 0.75, 1.0 x image-encoder speed 1, 0.3, 0.1), joint,
  joint+aux, MILES at tau 0.2 and 0.1;
- ``estimators`` (N > 2): mfeat-3view and two 3-modality regime cells, MILES with the heads, the
  ablation and the pairwise rule;
- ``init``: MILES and joint+aux at initial weight scales 0.5, 1, 2 in two cells;
- ``remedies``: warm-up, smoothing, hysteresis, a minimum duration and the reference-aware
  variants, in the large-gap cell (two modalities that differ in how informative they are, not in
  speed) and in the cells where MILES helped on the map;
- ``fusions``: MILES and joint+aux with the gated, FiLM and attention fusions in the cells where
  MILES helped with concat on the map.

The grid was fixed before any MILES run: the noise levels from the image's unimodal accuracy alone
(96, 89 and 65 % at 14 x 14 pixels for noise 0, 0.5 and 1.0, one seed; 0.75 was added between
0.5 and 1.0 without a run of its own; audio: 98 %), the speeds from the
unimodal image curves (at 0.1 the image encoder is still improving after 20 epochs), and 30 epochs
as a budget that fits the 90 minutes, not as a convergence point: the slowest image references
still improve at the end (one seed of the noise 0.5, speed 0.1 reference chose epoch 29 of 30),
which is part of that regime. Runs go through the shared run loop
(:func:`miles.studies.parallel.run_parallel`): resumable, ``workers`` processes of one thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from miles.report.document import Document, Table
from miles.report.tables import Column, aggregate, pm
from miles.results import dominant_order
from miles.studies.checks import check_seeds
from miles.studies.config import StudyConfig, quiet_base
from miles.studies.paired import paired_test, significance_level
from miles.studies.parallel import cached_dataset, run_parallel
from miles.studies.readouts import Readouts, load_readouts
from miles.studies.regime_parts import (
    BASELINE,
    DATASET,
    EPOCHS,
    IMAGE,
    KIND,
    MAP_METHODS,
    PARTS,
    SEEDS,
    Cell,
    Method,
    map_cells,
)
from miles.studies.runner import PlannedRun, RunBatch, RunOutcome
from miles.studies.study import Study, run_study
from miles.studies.summary import REFERENCE, Summary, summarize, summary_table
from miles.training.experiment import ExperimentConfig
from miles.validation import check_bool, check_int, check_positive_int, check_str

__all__ = [
    "HEATMAP_CAPTION",
    "SPEED_SHARE",
    "RegimeConfig",
    "RegimeStudy",
    "RegimeSummary",
    "demo_config",
    "part_config",
    "run_regime",
]

#: a head's learning speed: the first epoch its validation metric reaches this share of its best
SPEED_SHARE = 0.95


def _regime_base() -> ExperimentConfig:
    base = quiet_base(epochs=EPOCHS)
    base.dataset = DATASET
    base.dataset_params = dict(IMAGE)
    return base


@dataclass
class RegimeConfig(StudyConfig):
    """Every method in every cell, for every seed, plus each cell's unimodal references.

    ``base`` gives the trainer, latent size and fusion (a cell's own dataset, parameters and
    fusion replace base's); ``comparisons`` are ``[a, b]`` label pairs compared over seeds
    (default: every MILES label against joint+aux); ``fixed_epoch`` is the common epoch every
    method is also read at (default: half the epochs); ``workers`` the processes (one thread
    each); ``note`` says how the cells were chosen, ``axes`` names the heat map's rows and
    columns.
    """

    base: ExperimentConfig = field(default_factory=_regime_base)
    part: str = "map"
    cells: list[dict[str, Any]] = field(default_factory=map_cells)
    methods: list[dict[str, Any]] = field(default_factory=lambda: list(MAP_METHODS))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    comparisons: list[list[str]] = field(default_factory=list)
    fixed_epoch: int | None = None
    probe: bool = True
    references: bool = True
    workers: int = 2
    note: str = ""
    axes: list[str] = field(default_factory=lambda: ["cell", "setting"])
    out_dir: str = "regime-out"

    EXTENDABLE: ClassVar[tuple[str, ...]] = ("seeds", "workers", "out_dir", "note", "axes")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_str("part", self.part)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.part):
            raise ValueError(
                f"part must be a plain name (letters, digits, - and _), got {self.part!r}"
            )
        cells = [Cell.parse(c) for c in self.cells]
        methods = [Method.parse(m) for m in self.methods]
        self.cells = [dataclasses.asdict(c) for c in cells]
        self.methods = [dataclasses.asdict(m) for m in methods]
        for kind, names in (
            ("cell", [c.name for c in cells]),
            ("method", [m.label for m in methods]),
        ):
            if not names:
                raise ValueError(f"a regime study needs at least one {kind}")
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be distinct, got {names}")
        self.seeds = check_seeds(self.seeds)
        labels = [m.label for m in methods]
        if not self.comparisons:
            self.comparisons = [
                [m.label, BASELINE] for m in methods if m.strategy == "miles" and BASELINE in labels
            ]
        for pair in self.comparisons:
            if len(pair) != 2 or any(p not in labels for p in pair):
                raise ValueError(f"comparison {pair} must name two of the methods {labels}")
        epochs = self.base.trainer.epochs
        if self.fixed_epoch is None:
            self.fixed_epoch = max(1, epochs // 2)
        check_int("fixed_epoch", self.fixed_epoch, minimum=1, maximum=epochs)
        check_bool("probe", self.probe)
        check_bool("references", self.references)
        check_positive_int("workers", self.workers)

    @property
    def cell_list(self) -> list[Cell]:
        return [Cell.parse(c) for c in self.cells]

    @property
    def method_list(self) -> list[Method]:
        return [Method.parse(m) for m in self.methods]

    @property
    def stem(self) -> str:
        return f"{KIND}_{self.part}"


def demo_config(cell: str, out_dir: str, *, seed: int = 0, workers: int = 2) -> RegimeConfig:
    """One cell of the map for one seed, with the map's settings (``miles demo --regime``): its
    runs are the map's runs of that seed, number for number."""
    from miles.studies.regime_parts import map_cell

    return RegimeConfig(
        part="demo",
        cells=[map_cell(cell)],
        seeds=[seed],
        workers=workers,
        out_dir=out_dir,
        note=f"One cell of the map ({cell}), seed {seed}: `miles demo --regime {cell}`.",
    )


def part_config(part: str, out_dir: str, **fields: Any) -> RegimeConfig:
    """The preset of ``part`` (see :data:`PARTS`) in ``out_dir``; ``fields`` override it (e.g.
    ``seeds``, ``workers``, ``base``)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose from {list(PARTS)}")
    preset = PARTS[part](out_dir)
    return RegimeConfig(part=part, out_dir=out_dir, **(preset | fields))


# -- planning --------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "run"


def run_folder(root: Path, label: str, config: ExperimentConfig) -> Path:
    """``root/runs/<label>-<hash>/seed<k>``: the hash covers everything but the seed (and the
    settings that change no number), so two cells or parts planning the same run share it."""
    settings = config.to_dict()
    settings.pop("out_dir", None)
    trainer = dict(settings["trainer"])
    for key in ("seed", "device", "progress"):
        trainer.pop(key, None)
    settings["trainer"] = trainer
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return root / "runs" / f"{_slug(label)}-{digest}" / f"seed{config.trainer.seed}"


def _modalities(dataset: str, params: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(cached_dataset(dataset, params).modalities)


def _reference_params(dataset: str, params: Mapping[str, Any], modality: str) -> dict[str, Any]:
    """The parameters a unimodal reference of ``modality`` depends on: a dataset module may say
    with ``reference_params(params, modality)``; otherwise all of them."""
    from miles.data.registry import dataset_builder

    module = importlib.import_module(dataset_builder(dataset).__module__)
    narrow = getattr(module, "reference_params", None)
    return dict(params) if narrow is None else dict(narrow(dict(params), modality))


def plan_runs(config: RegimeConfig) -> tuple[list[PlannedRun], set[int]]:
    """Every run (seed-major, then cell, references first) and the indices of the runs whose
    unimodal references come from this plan (reference-aware MILES)."""
    root = Path(config.out_dir)
    runs: list[PlannedRun] = []
    waiting: set[int] = set()
    fusion = config.base.fusion
    for seed in config.seeds:
        for cell in config.cell_list:
            cell_fusion = cell.fusion or fusion
            ident = {"cell": cell.name, "fusion": cell_fusion, "seed": seed}
            if config.references:
                for m in _modalities(cell.dataset, cell.params):
                    exp = config.run_config(
                        dataset=cell.dataset,
                        dataset_params=_reference_params(cell.dataset, cell.params, m),
                        fusion=fusion,  # a unimodal model never trains the fusion
                        strategy=REFERENCE,
                        strategy_params={"modality": m},
                        seed=seed,
                    )
                    exp.out_dir = str(run_folder(root, f"unimodal-{m}", exp))
                    name = f"seed {seed} {cell.name} unimodal {m}"
                    runs.append(PlannedRun(exp, ident | {"method": REFERENCE, "label": m}, name))
            for method in config.method_list:
                exp = config.run_config(
                    dataset=cell.dataset,
                    dataset_params=dict(cell.params),
                    fusion=cell_fusion,
                    strategy=method.strategy,
                    strategy_params=dict(method.params),
                    seed=seed,
                )
                exp.out_dir = str(run_folder(root, method.label, exp))
                if method.needs_references:
                    waiting.add(len(runs))
                name = f"seed {seed} {cell.name} {method.label}"
                ident_m = ident | {"method": method.strategy, "label": method.label}
                runs.append(PlannedRun(exp, ident_m, name))
    return runs, waiting


def _with_references(run: PlannedRun, refs: Mapping[str, float], root: Path) -> PlannedRun:
    """A reference-aware run given its cell's unimodal references (and its own run folder)."""
    exp = dataclasses.replace(
        run.config, strategy_params={**run.config.strategy_params, "references": dict(refs)}
    )
    exp.out_dir = str(run_folder(root, run.ident["label"], exp))
    return PlannedRun(exp, dict(run.ident), run.name)


# -- per-run numbers -------------------------------------------------------------------------------


def epochs_to_share(history: Sequence[Mapping[str, Any]], key: str) -> int | None:
    """The first epoch whose validation ``key`` reaches :data:`SPEED_SHARE` of its best value."""
    values = [(int(r["epoch"]), float(r[key])) for r in history if r.get(key) is not None]
    if not values:
        return None
    best = max(v for _, v in values)
    return next(e for e, v in values if v >= SPEED_SHARE * best)


def _row(outcome: RunOutcome, root: Path) -> dict[str, Any]:
    """The run's row: identifiers and :func:`miles.results.run_row`, its read-outs, and each
    trained head's learning speed."""
    row = outcome.row(root)
    result = outcome.result
    if result is None:
        return row
    modalities = list(result["val"]["unimodal"])
    own = [row["label"]] if row["method"] == REFERENCE else modalities
    for m in own:
        row[f"epochs95_{m}"] = epochs_to_share(result["history"], f"val_{m}")
    readouts = load_readouts(outcome.run.run_dir)
    if readouts:
        fixed = readouts.get("test_fixed")
        row["fused_fixed"] = fixed["fused"] if fixed else None
        for m in modalities:
            row[f"{m}_fixed"] = fixed["unimodal"][m] if fixed else None
            for which, suffix in (("chosen", ""), ("last", "_last"), ("fixed", "_fixed")):
                probe = readouts.get("probe", {}).get(which)
                row[f"{m}_probe{suffix}"] = probe[m] if probe else None
    return row


# -- the aggregate step ----------------------------------------------------------------------------


#: what the paired tests compare, by name: ``(row key of the weak/dominant head or a plain key)``
QUANTITIES: dict[str, Callable[[Sequence[str]], str]] = {
    "weak head": lambda o: o[-1],
    "weak head, last epoch": lambda o: f"{o[-1]}_last",
    "weak head, fixed epoch": lambda o: f"{o[-1]}_fixed",
    "weak probe": lambda o: f"{o[-1]}_probe",
    "weak probe, last epoch": lambda o: f"{o[-1]}_probe_last",
    "dominant head": lambda o: o[0],
    "dominant head, last epoch": lambda o: f"{o[0]}_last",
    "fused": lambda o: "fused",
    "fused, last epoch": lambda o: "fused_last",
    "chosen epoch": lambda o: "best_epoch",
}
#: quantities that are not metrics in [0, 1] (shown as they are, not in points)
COUNTS = ("chosen epoch",)


@dataclass
class RegimeSummary(Summary):
    """:class:`~miles.studies.summary.Summary` over every cell, plus each cell's description
    (order, references, gap, speeds) and the paired tests."""

    cells: list[dict[str, Any]] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)


def _cell_modalities(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The cell's modalities, in the model's order (``run_row`` gives every run ``slowed_<m>``).

    Read from a multimodal run: a unimodal reference may be shared with a cell of fewer
    modalities (its model depends only on its own modality's data), so its row can lack some."""
    for r in rows:
        if not r.get("failed") and r.get("method") != REFERENCE:
            return [k.removeprefix("slowed_") for k in r if k.startswith("slowed_")]
    return sorted({str(r["label"]) for r in rows if r.get("method") == REFERENCE})


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _describe_cell(
    cell: Cell, rows: Sequence[Mapping[str, Any]], order: Sequence[str], rule: str
) -> dict[str, Any]:
    refs = {
        m: [r for r in rows if r.get("method") == REFERENCE and r.get("label") == m] for m in order
    }
    ref = {m: _mean(refs[m], m) for m in order}
    speed = {m: _mean(refs[m], f"epochs95_{m}") for m in order}
    ref_dom, ref_weak = ref[order[0]], ref[order[-1]]
    gap = None if ref_dom is None or ref_weak is None else ref_dom - ref_weak
    speed_dom, speed_weak = speed[order[0]], speed[order[-1]]
    ratio = None if not speed_dom or speed_weak is None else speed_weak / speed_dom
    return {
        "cell": cell.name,
        "row": cell.row,
        "column": cell.column,
        "dataset": cell.dataset,
        "params": cell.params,
        "fusion": cell.fusion,
        "order": list(order),
        "rule": rule,
        "references": ref,
        "unimodal_gap": gap,
        "epochs95": speed,
        "speed_ratio": ratio,
    }


def _tests(
    config: RegimeConfig, cell: str, rows: Sequence[Mapping[str, Any]], order: Sequence[str]
) -> list[dict[str, Any]]:
    by_label: dict[str, dict[Any, Mapping[str, Any]]] = {}
    for r in rows:
        if not r.get("failed") and r.get("method") != REFERENCE:
            by_label.setdefault(str(r["label"]), {})[r["seed"]] = r
    out = []
    for a, b in config.comparisons:
        if a not in by_label or b not in by_label:
            continue
        for quantity, key_of in QUANTITIES.items():
            key = key_of(order)
            test = paired_test(
                {s: float(r[key]) for s, r in by_label[a].items() if r.get(key) is not None},
                {s: float(r[key]) for s, r in by_label[b].items() if r.get(key) is not None},
            )
            if test.n:
                out.append(
                    {"cell": cell, "a": a, "b": b, "quantity": quantity, "key": key}
                    | test.to_dict()
                )
    return out


#: per-run values this study adds to the aggregate (``{m}`` is every modality)
EXTRA_VALUES = (
    "fused_fixed",
    "{m}_fixed",
    "{m}_probe",
    "{m}_probe_last",
    "{m}_probe_fixed",
    "epochs95_{m}",
)


def summarize_regime(rows: Sequence[Mapping[str, Any]], config: RegimeConfig) -> RegimeSummary:
    """Per cell: :func:`~miles.studies.summary.summarize` (order from the cell's own unimodal
    references), the extra read-outs' means, the cell's description and the paired tests."""
    labels = [m.label for m in config.method_list]
    rank = {"": -1} | {label: i for i, label in enumerate(labels)}
    all_rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    tests: list[dict[str, Any]] = []
    failures: list[str] = []
    first: tuple[list[str], str] | None = None
    for cell in config.cell_list:
        members = [r for r in rows if r.get("cell") == cell.name]
        if not members:
            continue
        modalities = _cell_modalities(members)
        summary = summarize(
            members,
            modalities,
            rank=lambda a: (a["method"] != REFERENCE, rank.get(a["label"] or "", 99)),
        )
        order = summary.order
        first = first or (order, summary.rule)
        values = [v.format(m=m) for v in EXTRA_VALUES for m in order] + ["fused_fixed"]
        ok = [r for r in summary.rows if not r.get("failed") and r["method"] != REFERENCE]
        extra = {(a["method"], a["label"]): a for a in aggregate(ok, ("method", "label"), values)}
        for a in summary.aggregate:
            more = extra.get((a["method"], a["label"]), {})
            table.append(
                {"cell": cell.name, "order": list(order)}
                | a
                | {k: v for k, v in more.items() if k not in ("method", "label", "n")}
            )
        all_rows.extend(summary.rows)
        failures.extend(f"{cell.name}: {f}" for f in summary.failures)
        cells.append(_describe_cell(cell, summary.rows, order, summary.rule))
        tests.extend(_tests(config, cell.name, summary.rows, order))
    order, rule = first or dominant_order([], [])  # no rows: nothing to order
    return RegimeSummary(order, rule, all_rows, table, failures, cells=cells, tests=tests)


# -- the document ---------------------------------------------------------------------------------


def _pp(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:+.1f}"


def _test_text(t: Mapping[str, Any]) -> str:
    scale, unit = (1.0, "") if t["quantity"] in COUNTS else (100.0, "")
    mean, std = scale * t["mean"], scale * t["std"]
    return f"{mean:+.1f} ± {std:.1f}{unit}"


def _verdict(t: Mapping[str, Any]) -> str:
    if not t["significant"]:
        return "tie"
    return "helps" if t["mean"] > 0 else "hurts"


def _cells_table(summary: RegimeSummary) -> Table:
    rows = []
    for c in summary.cells:
        order = c["order"]
        refs = " / ".join(pct_or_dash(c["references"][m]) for m in order)
        speeds = " / ".join(
            "-" if c["epochs95"][m] is None else f"{c['epochs95'][m]:.1f}" for m in order
        )
        ratio = "-" if c["speed_ratio"] is None else f"{c['speed_ratio']:.2f}"
        rows.append(
            [c["cell"], " > ".join(order), refs, _pp(c["unimodal_gap"]).lstrip("+"), speeds, ratio]
        )
    return Table(
        "cells: each modality's unimodal reference (test %, mean over seeds), dominant first",
        [
            "cell",
            "order (dominant first)",
            "unimodal references",
            "unimodal gap (pp)",
            f"epochs to {SPEED_SHARE:.0%} of best (val)",
            "speed ratio weak / dominant",
        ],
        rows,
    )


def pct_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _method_columns(order: Sequence[str]) -> list[Column]:
    dom, weak = order[0], order[-1]
    mid = list(order[1:-1])

    def heads(suffix: str) -> Callable[[Mapping[str, Any]], str]:
        def cell(r: Mapping[str, Any]) -> str:
            parts = [pm(r, f"{m}{suffix}") for m in order]
            return "-" if all(p == "-" for p in parts) else " / ".join(parts)

        return cell

    return [
        Column("method", lambda r: str(r.get("label") or r["method"])),
        Column("fused", lambda r: pm(r, "fused")),
        Column(f"{dom} (dominant)", lambda r: pm(r, dom)),
        *(Column(m, lambda r, m=m: pm(r, m)) for m in mid),  # type: ignore[misc]
        Column(f"{weak} (weak)", lambda r: pm(r, weak)),
        Column("chosen epoch", lambda r: pm(r, "best_epoch", percent=False)),
        Column("MILES acted", lambda r: pm(r, "acted", percent=False)),
        Column(f"slowed {dom}", lambda r: pm(r, f"slowed_{dom}", percent=False)),
        Column("heads, last epoch", heads("_last")),
        Column("heads, fixed epoch", heads("_fixed")),
        Column("probe, chosen", heads("_probe")),
        Column("probe, last", heads("_probe_last")),
        Column("n", lambda r: str(r.get("n", "-"))),
    ]


class RegimeStudy(Study[RegimeConfig]):
    """The regime map (or one of its parts): cells x methods x seeds, read-outs, paired tests."""

    kind = KIND
    config_type = RegimeConfig
    title_format = "miles regime-map, part {config.part}"
    columns = (("cell", "method", "label", "seed"), ("cell", "method", "label"))

    @property
    def stem(self) -> str:
        return self.config.stem

    def check(self) -> None:
        """Refuse a folder where this part was started under other settings (each part has its
        own settings file: the parts share one folder, and the runs they have in common)."""
        self.config.check_folder(f"{self.stem}_settings.json", f"{self.stem} in {self.out}")

    def plan(self) -> list[PlannedRun]:
        runs, self._waiting = plan_runs(self.config)
        return runs

    def execute(self, runs: list[PlannedRun]) -> RunBatch:
        """Two rounds on ``workers`` processes: every run whose settings are known, then the
        reference-aware runs with their cell's unimodal references (validation, chosen epoch,
        same seed)."""
        waiting: set[int] = getattr(self, "_waiting", set())
        task = Readouts(self.config.fixed_epoch, self.config.probe)
        ready = [r for i, r in enumerate(runs) if i not in waiting]
        first = run_parallel(ready, workers=self.config.workers, echo=self.echo, task=task)
        outcomes = dict(
            zip((i for i in range(len(runs)) if i not in waiting), first.outcomes, strict=True)
        )
        wall = first.wall_s
        if waiting:
            refs: dict[tuple[str, int], dict[str, float]] = {}
            for o in first.outcomes:
                if o.run.ident["method"] == REFERENCE and o.result is not None:
                    key = (o.run.ident["cell"], o.run.ident["seed"])
                    label = o.run.ident["label"]
                    refs.setdefault(key, {})[label] = o.result["val"]["unimodal"][label]
            second_runs = []
            for i in sorted(waiting):
                key = (runs[i].ident["cell"], runs[i].ident["seed"])
                if key not in refs:
                    raise RuntimeError(f"{runs[i].name}: its unimodal references did not finish")
                second_runs.append(_with_references(runs[i], refs[key], self.out))
            second = run_parallel(
                second_runs, workers=self.config.workers, echo=self.echo, task=task
            )
            outcomes |= dict(zip(sorted(waiting), second.outcomes, strict=True))
            wall += second.wall_s
        return RunBatch([outcomes[i] for i in range(len(runs))], wall)

    def rows(self, batch: RunBatch) -> list[dict[str, Any]]:
        return [_row(o, self.out) for o in batch.outcomes]

    @classmethod
    def aggregate(
        cls, rows: Sequence[Mapping[str, Any]], config: RegimeConfig, modalities: Sequence[str]
    ) -> Summary:
        return summarize_regime(rows, config)

    def extra(self, batch: RunBatch) -> dict[str, Any]:
        summary = summarize_regime(self.rows(batch), self.config)
        assert isinstance(summary, RegimeSummary)
        figures = []
        heat = heatmap(summary, self.config, self.out / f"{self.stem}_heatmap.png")
        if heat is not None:
            figures.append(heat)
        return {
            "cells_described": summary.cells,
            "tests": summary.tests,
            "figures": figures,
            "meta": f"Seeds {self.config.seeds}; fixed epoch {self.config.fixed_epoch}; "
            f"{self.config.workers} worker process(es).",
        }

    @classmethod
    def write_up(
        cls, doc: Document, payload: Mapping[str, Any], config: RegimeConfig, summary: Summary
    ) -> None:
        assert isinstance(summary, RegimeSummary)
        level = significance_level(len(config.seeds))
        doc.intro += [
            f"Part {config.part!r}: {len(config.cell_list)} cells x "
            f"{len(config.method_list)} methods x seeds {config.seeds}"
            + (" (+ each cell's unimodal references)" if config.references else "")
            + f"; {config.base.trainer.epochs} epochs, fusion {config.base.fusion} unless a cell "
            f"names its own. {config.note}".rstrip(),
            f"Test {payload['metric']} (%). Dominant and weak modality per cell by "
            f"{summary.rule}. Paired comparisons over seeds: mean ± sample std of the per-seed "
            f"difference (points; epochs for the chosen epoch), exact two-sided sign-flip test; "
            f"marked at p <= {level:.4g} (with {len(config.seeds)} seeds the test cannot go "
            f"lower than {2 / 2 ** len(config.seeds):.4g}: a marked result means every seed "
            "agrees in sign). Fixed epoch: " + str(config.fixed_epoch) + "; probe: a linear "
            "probe trained on the frozen encoder's training latents (see "
            "miles.studies.readouts).",
        ]
        doc.section("Cells").blocks.append(_cells_table(summary))
        stem = config.stem
        if any(c["row"] and c["column"] for c in summary.cells):
            doc.section("Heat map").paragraphs.append(
                f"![MILES minus joint+aux on the weak head]({stem}_heatmap.png)\n\n"
                f"*{HEATMAP_CAPTION}*"
            )
        results = doc.section("Results per cell")
        for c in summary.cells:
            rows = [a for a in summary.aggregate if a["cell"] == c["cell"]]
            results.blocks.append(
                summary_table(
                    f"{c['cell']}: test (%), mean ± std over seeds; heads {' / '.join(c['order'])}",
                    rows,
                    c["order"],
                    first=_method_columns(c["order"]),
                    groups=(),
                )
            )
        tests = [t for t in summary.tests]
        if tests:
            doc.section("Paired comparisons").blocks.append(
                Table(
                    "a - b per seed: mean ± std (points; the chosen epoch in epochs), exact "
                    "sign-flip p",
                    ["cell", "a", "b", "quantity", "a - b", "p", "n", "verdict"],
                    [
                        [
                            t["cell"],
                            t["a"],
                            t["b"],
                            t["quantity"],
                            _test_text(t),
                            f"{t['p']:.3g}",
                            str(t["n"]),
                            _verdict(t),
                        ]
                        for t in tests
                    ],
                )
            )
            verdicts = doc.section("Where MILES helps, hurts or ties (weak head, chosen epoch)")
            for t in tests:
                if t["quantity"] != "weak head":
                    continue
                last = _lookup(tests, t, "weak head, last epoch")
                epoch = _lookup(tests, t, "chosen epoch")
                verdicts.paragraphs.append(
                    f"- {t['cell']}: {t['a']} vs {t['b']}: {_verdict(t)} "
                    f"({_test_text(t)} pp, p = {t['p']:.3g}); at the last epoch "
                    f"{'-' if last is None else _test_text(last)} pp; chosen epoch moved "
                    f"{'-' if epoch is None else _test_text(epoch)} epochs."
                )


HEATMAP_CAPTION = (
    "MILES minus joint+aux on the weak head, test, mean over seeds (points; std below). For "
    "each MILES setting: at the epoch each run chose on validation, then at the last epoch (a "
    "common epoch). Framed: the exact sign-flip test over seeds is marked (with 5 seeds: every "
    "seed agrees in sign, the smallest p the seeds allow)."
)


def _lookup(
    tests: Sequence[Mapping[str, Any]], like: Mapping[str, Any], quantity: str
) -> Mapping[str, Any] | None:
    return next(
        (
            t
            for t in tests
            if t["cell"] == like["cell"]
            and t["a"] == like["a"]
            and t["b"] == like["b"]
            and t["quantity"] == quantity
        ),
        None,
    )


def heatmap(summary: RegimeSummary, config: RegimeConfig, path: Path) -> Path | None:
    """MILES minus joint+aux on the weak head over the grid (``None`` without a grid)."""
    grid = [c for c in summary.cells if c["row"] and c["column"]]
    if not grid or not summary.tests:
        return None
    from miles.report.plots import HeatPanel, plot_heatmaps

    rows = list(dict.fromkeys(c["row"] for c in grid))
    columns = list(dict.fromkeys(c["column"] for c in grid))
    where = {c["cell"]: (rows.index(c["row"]), columns.index(c["column"])) for c in grid}
    panels = []
    for a, b in config.comparisons:
        for quantity, when in (("weak head", "chosen epoch"), ("weak head, last epoch", "last")):
            values = [[math.nan] * len(columns) for _ in rows]
            text = [[""] * len(columns) for _ in rows]
            marked = [[False] * len(columns) for _ in rows]
            for t in summary.tests:
                if (t["a"], t["b"], t["quantity"]) != (a, b, quantity) or t["cell"] not in where:
                    continue
                r, c = where[t["cell"]]
                values[r][c] = 100 * t["mean"]
                text[r][c] = f"{100 * t['mean']:+.1f}\n±{100 * t['std']:.1f}"
                marked[r][c] = bool(t["significant"])
            panels.append(HeatPanel(f"{a} - {b}, {when}", values, text, marked))
    return plot_heatmaps(
        panels,
        rows,
        columns,
        path,
        title=f"weak head: MILES minus {BASELINE} (test, points), {config.part}",
        row_title=config.axes[0],
        column_title=config.axes[1],
        colorbar="points",
    )


def run_regime(config: RegimeConfig, **options: Any) -> dict[str, Any]:
    """Run (or resume) a regime study and write ``regime_<part>.md``, ``.json`` (``kind:
    regime``), ``_runs.csv``, ``_table.csv`` and, on a grid, ``_heatmap.png``; ``options`` as
    :func:`~miles.studies.study.run_study`. Returns what the JSON holds."""
    return run_study(RegimeStudy, config, **options)
