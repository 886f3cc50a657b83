"""How long will ``miles regime-map --part PART`` take? Measured on a small slice, then summed.

Builds the part's plan exactly as the study does (leaving out the runs already done in
``--map-out``: parts share runs), groups its distinct runs by what their cost
depends on (dataset shape, encoders, fusion, unimodal or not: noise levels, speeds and seeds
change no cost), and times each group on a slice in this process with one thread: a 1-epoch and a
3-epoch run give the cost per epoch (their difference) and per run (setup and the final test
scoring), and one read-out pass (fixed-epoch heads and probes) is timed per multimodal group.
CPU time (``time.process_time``) is used, so a busy machine inflates the estimate less than it
would inflate wall time. The expected wall time is the sum over the plan's distinct runs divided
by ``--workers``, plus one run (the tail) and the workers' start.

    OMP_NUM_THREADS=1 python benchmarks/regime_budget.py --part map --workers 2

Prints a table and writes ``--out/budget_<part>.json``. Parts that read the map's results
(remedies, fusions) need ``--map-out`` pointing at the map's output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from miles.studies import regime_parts
from miles.studies.parallel import cached_dataset
from miles.studies.readouts import Readouts
from miles.studies.regime import part_config, plan_runs
from miles.studies.runner import PlannedRun, is_done
from miles.training.experiment import run_experiment

#: dataset parameters that change numbers but not the cost of a run
FREE = (
    "image_noise",
    "image_blur",
    "image_occlusion",
    "image_label_noise",
    "image_slowdown",
    "image_train_per_class",
    "init_scale",
    "data_seed",
)
#: seconds for a worker process to start (import torch and miles), measured here once
STARTUP_S = 5.0


def cost_class(run: PlannedRun) -> str:
    c = run.config
    params = {k: v for k, v in c.dataset_params.items() if k not in FREE}
    kind = "unimodal" if c.strategy == "unimodal" else "multimodal"
    estimator = c.strategy_params.get("estimator", "heads")
    return json.dumps([c.dataset, params, c.fusion, kind, estimator], sort_keys=True)


def timed(run: PlannedRun, epochs: int, out: Path | None) -> float:
    config = dataclasses.replace(
        run.config,
        trainer=dataclasses.replace(run.config.trainer, epochs=epochs, progress=False),
        out_dir=None if out is None else str(out),
    )
    data = cached_dataset(config.dataset, config.dataset_params)
    start = time.process_time()
    run_experiment(config, data=data)
    return time.process_time() - start


def readout_cost(run: PlannedRun, folder: Path, task: Readouts) -> float:
    """Train 2 epochs into ``folder`` (fixed epoch 1 kept), then time the read-outs."""
    config = dataclasses.replace(
        run.config,
        trainer=dataclasses.replace(run.config.trainer, epochs=2, progress=False),
        out_dir=str(folder),
    )
    short = PlannedRun(config, run.ident, run.name)
    data = cached_dataset(config.dataset, config.dataset_params)
    small = dataclasses.replace(task, fixed_epoch=1)
    hook = small.epoch_hook(short)
    run_experiment(config, data=data, on_epoch_end=hook)
    result = json.loads((folder / "result.json").read_text())
    start = time.process_time()
    small.score(short, result, data)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="map")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--map-out", default="regime-out", help="where the map was written")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/regime_budget"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    if (
        args.part in ("remedies", "fusions")
        and not (Path(args.map_out) / "regime_map.json").is_file()
    ):
        # the cells these parts use come from the map's results; any two cost the same
        names = [c["name"] for c in regime_parts.map_cells()[:2]]
        regime_parts.helped_cells = lambda _out, at_most=2: (names, "assumed for the estimate")
        print(f"no map results in {args.map_out}: assuming two helped cells for the estimate")
    config = part_config(args.part, args.map_out, seeds=list(range(args.seeds)))
    epochs = config.base.trainer.epochs
    runs, _ = plan_runs(config)
    every = list({str(r.run_dir): r for r in runs}.values())
    distinct = [r for r in every if not is_done(r.run_dir)]  # runs another part already made
    if not distinct:
        print(f"part {args.part}: every run is already done in {args.map_out}")
        return
    groups: dict[str, list[PlannedRun]] = {}
    for run in distinct:
        groups.setdefault(cost_class(run), []).append(run)

    task = Readouts(config.fixed_epoch, config.probe)
    timed(distinct[0], 1, None)  # warm-up: the first run pays for lazy imports and allocations
    rows: list[dict[str, Any]] = []
    total = 0.0
    longest = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (key, members) in enumerate(groups.items()):
            sample = members[0]
            one, three = timed(sample, 1, None), timed(sample, 3, None)
            per_epoch = max((three - one) / 2, 0.0)
            per_run = max(one - per_epoch, 0.0)
            readout = (
                0.0
                if sample.config.strategy == "unimodal"
                else readout_cost(sample, Path(tmp) / f"r{i}", task)
            )
            run_s = per_run + epochs * per_epoch + readout
            longest = max(longest, run_s)
            total += run_s * len(members)
            rows.append(
                {
                    "class": json.loads(key),
                    "runs": len(members),
                    "per_epoch_s": per_epoch,
                    "per_run_s": per_run,
                    "readouts_s": readout,
                    "run_s": run_s,
                }
            )
    wall = total / args.workers + longest + STARTUP_S
    print(
        f"part {args.part}: {len(runs)} planned runs, {len(every)} distinct, "
        f"{len(every) - len(distinct)} already done in {args.map_out}, {epochs} epochs"
    )
    print("| cost class | runs | s/epoch | s/run overhead | read-outs s | s per run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dataset, params, fusion, kind, estimator = r["class"]
        name = f"{dataset} {params} {fusion} {kind} {estimator}"
        print(
            f"| {name} | {r['runs']} | {r['per_epoch_s']:.2f} | {r['per_run_s']:.2f} | "
            f"{r['readouts_s']:.2f} | {r['run_s']:.1f} |"
        )
    print(
        f"CPU time {total:.0f} s in all; on {args.workers} workers of one thread: about "
        f"{wall / 60:.0f} min ({wall:.0f} s) wall time"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"budget_{args.part}.json").write_text(
        json.dumps(
            {
                "part": args.part,
                "workers": args.workers,
                "seeds": args.seeds,
                "planned": len(runs),
                "distinct": len(distinct),
                "classes": rows,
                "cpu_s": total,
                "expected_wall_s": wall,
                "machine": platform.machine(),
                "torch": torch.__version__,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
