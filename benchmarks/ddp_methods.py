"""Which balancing methods train data-parallel: every registered method on two gloo processes.

One ``torchrun --nproc_per_node=2`` launch (CPU, gloo) trains every registered strategy for two
epochs on the toy task of the strategy contract test, with that test's settings for the method
(``tests/strategies/test_contract.py``, ``EXAMPLES``), under ``DistributedDataParallel``. Each
process records whether its fit finished, the error it stopped with, and a checksum of its
final weights; the table sorts the methods into:

* **identical**: both processes finished with the same weights (the trainer's own replica check
  also ran at every epoch end);
* **replica check**: stopped by the trainer's end-of-epoch replica check (a gradient hook or side
  model that depends on the process's own batch);
* **error**: stopped by another error (often DDP's own), quoted.

A method that DDP stops because some parameters got no gradient is tried again with the trainer's
``find_unused_parameters=True``, and both attempts are reported.

This is a correctness check, not a timing: it runs anywhere (``OMP_NUM_THREADS=1`` per process).

    PYTHONPATH=src:. python benchmarks/ddp_methods.py --out benchmarks/results/ddp_methods
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
EPOCHS = 2
REPLICA_CHECK = "replicas"  # a word of the trainer's replica-check message
UNUSED = "find_unused_parameters"  # a word of the trainer's message on unused parameters
#: a process left waiting in a collective (its peer stopped elsewhere) gives up after this
TIMEOUT = datetime.timedelta(seconds=120)


def _fit(name: str, unused: bool | None) -> dict[str, Any]:
    """Train ``name`` for two epochs in the current process group; what happened.

    ``unused``: the trainer's ``find_unused_parameters`` (``None``: as the method declares)."""
    import torch
    import torch.distributed as dist
    from tests.conftest import make_toy_splits
    from tests.strategies.test_contract import EXAMPLES

    from miles.data import collate_multimodal
    from miles.models import JointFusionModel
    from miles.strategies import build_strategy
    from miles.training import Trainer, TrainerConfig

    example = EXAMPLES[name]
    data = make_toy_splits(n=(128, 48, 48))  # the same data on every process (seeded)
    torch.manual_seed(dist.get_rank())  # DDP makes every process start from rank 0's weights
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    config = TrainerConfig(
        epochs=EPOCHS,
        lr=1e-2,
        batch_size=16,
        optimizer=example.optimizer,
        progress=False,
        find_unused_parameters=unused,
    )
    strategy = build_strategy(name, **example.params)
    trainer = Trainer(model, strategy, config, collate_fn=collate_multimodal)
    try:
        trainer.fit(data.train, data.val, data.test)
    except Exception as exc:  # recorded and sorted: the point of this script
        return {"finished": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
    weights = [float(p.detach().double().sum()) for p in model.parameters()]
    return {"finished": True, "weights": weights}


def worker(out: Path, names: list[str]) -> None:
    """One process of the torchrun job: every method in turn, each in a fresh process group."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results: dict[str, Any] = {}
    attempt = 0
    for name in names:
        for unused in (None, True):
            store = f"file://{out / f'store-{attempt}'}"
            attempt += 1
            dist.init_process_group(
                "gloo", init_method=store, rank=rank, world_size=WORLD, timeout=TIMEOUT
            )
            try:
                result = _fit(name, unused)
                # retried only when DDP asked for find_unused_parameters on some process
                asked = torch.tensor(int(not result["finished"] and UNUSED in result["error"]))
                dist.all_reduce(asked, op=dist.ReduceOp.MAX)
            finally:
                dist.destroy_process_group()
            results.setdefault(name, {})["default" if unused is None else "unused"] = result
            if not asked.item():
                break
        print(f"rank {rank}: {name}: {sorted(results[name])}", flush=True)
    (out / f"rank{rank}.json").write_text(json.dumps(results), encoding="utf-8")


def verdict(zero: dict[str, Any], one: dict[str, Any]) -> tuple[str, str]:
    """(class, detail) of one attempt from both processes' records."""
    if zero["finished"] and one["finished"]:
        if zero["weights"] == one["weights"]:
            return "identical", ""
        return "different weights", "finished, but the processes' weights differ"
    error = zero.get("error") or one.get("error") or ""
    if REPLICA_CHECK in error:
        return "replica check", error.split("\n")[0]
    return "error", error.split("\n")[0]


def describe(zero: dict[str, Any], one: dict[str, Any]) -> dict[str, Any]:
    """Each attempt of one method (as declared; with ``find_unused_parameters`` if DDP asked)."""
    return {
        attempt: dict(zip(("result", "detail"), verdict(zero[attempt], one[attempt]), strict=True))
        for attempt in zero
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated (default: every registered one)")
    parser.add_argument("--out", type=Path, help="write ddp_methods.json here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:  # inside torchrun
        worker(args.worker, args.methods.split(","))
        return
    from miles.strategies import available_strategies

    names = args.methods.split(",") if args.methods else sorted(available_strategies())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    with tempfile.TemporaryDirectory(prefix="miles-ddp-methods-") as tmp:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={WORLD}", __file__, "--worker", tmp, "--methods", ",".join(names),
        ]  # fmt: skip
        run = subprocess.run(command, env=env, cwd=tmp, check=False, timeout=3600)
        if run.returncode != 0:
            sys.exit(f"the torchrun job failed (exit {run.returncode})")
        zero, one = (
            json.loads(Path(tmp, f"rank{r}.json").read_text(encoding="utf-8")) for r in range(WORLD)
        )
    rows = {name: describe(zero[name], one[name]) for name in names}
    print("| method | as declared | with find_unused_parameters |\n|---|---|---|")
    for name, attempts in rows.items():
        cells = [
            f"{a['result']}: {a['detail']}" if a["detail"] else a["result"]
            for a in (attempts["default"], attempts.get("unused"))
            if a is not None
        ]
        print(f"| {name} | {' | '.join(cells + ['-'] * (2 - len(cells)))} |")
    if args.out is not None:
        import torch

        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "torch": torch.__version__,
            "world_size": WORLD,
            "epochs": EPOCHS,
            "methods": rows,
        }
        path = args.out / "ddp_methods.json"
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
