"""Our Trainer on two ranks (gloo, CPU, started by torchrun): one decision for all, one set of
files, exact resume; ``miles train`` under torchrun.

One ``torchrun --nproc_per_node=2`` launch runs this file as a script (:func:`_worker`): first
``miles train`` as the command line runs it (the trainer joins torchrun's job itself), then the
Trainer scenarios in a process group of the script's own. The tests read what each rank saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import (
    JointAux,
    Strategy,
    StrategyContext,
    available_strategies,
    build_strategy,
)
from miles.strategies.registry import strategy_class
from miles.training import Trainer, TrainerConfig
from miles.training import trainer as trainer_module
from miles.training.distributed import Ranks
from tests.conftest import make_toy_splits
from tests.helpers import strip_times

WORLD = 2
ROOT = Path(__file__).resolve().parents[2]
WRITERS = ("save_checkpoint", "write_history", "write_json")


class _Stop(Exception):
    pass


class _RankBiased(JointAux):
    """A gradient hook that depends on the rank: the replicas drift apart."""

    name = "rank-biased"

    def on_after_backward(self, ctx: StrategyContext, output: Any, batch: Any) -> None:
        for p in ctx.model.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 + dist.get_rank())


def _fit(
    strategy: Strategy, out_dir: Path | None, *, epochs: int, stop_after: int = 0, **kw: Any
) -> tuple[Any, JointFusionModel]:
    data = make_toy_splits(n=(120, 44, 40))  # the same data on every rank (seeded)
    torch.manual_seed(dist.get_rank())  # different initial weights: DDP makes them rank 0's
    model = JointFusionModel(data.build_encoders(8), data.num_classes)

    def stop(row: dict[str, Any]) -> None:
        if row["epoch"] == stop_after:
            raise _Stop

    cfg = TrainerConfig(epochs=epochs, lr=1e-2, batch_size=16, progress=False, **kw)
    trainer = Trainer(
        model, strategy, cfg, out_dir=out_dir, collate_fn=collate_multimodal, on_epoch_end=stop
    )
    resume = out_dir is not None and stop_after == 0
    return trainer.fit(data.train, data.val, data.test, resume=resume), model


def _rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"decision": r["strategy"]["decision"], **{k: v for k, v in r.items() if k[:3] == "lr_"}}
        for r in history
    ]


CONFIG = (
    "dataset: toy-ddp\nlatent_dim: 8\nstrategy: miles\nstrategy_params: {tau: 0.02}\n"
    "trainer: {epochs: 2, lr: 0.01, batch_size: 16}\n"
)


def _miles_train(tmp: Path, rank: int) -> int:
    """``miles train`` as torchrun runs it, this rank's output kept in a file."""
    from miles.cli import main
    from miles.data.registry import available_datasets, register_dataset

    if "toy-ddp" not in available_datasets():
        register_dataset("toy-ddp")(lambda: make_toy_splits(n=(96, 32, 32)))
    (tmp / "run.yaml").write_text(CONFIG, encoding="utf-8")
    argv = [
        "train",
        "--config",
        str(tmp / "run.yaml"),
        "--out",
        str(tmp / "cli"),
        "--backend",
        "gloo",
    ]
    with (tmp / f"cli{rank}.txt").open("w") as fh, contextlib.redirect_stdout(fh):
        return main(argv)


def _spy_on_writes(writes: list[str]) -> None:
    for name in WRITERS:  # count the file writes each rank makes
        real = getattr(trainer_module, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            writes.append(_name)
            return _real(*args, **kwargs)

        setattr(trainer_module, name, spy)


def _worker(tmp: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    out: dict[str, Any] = {"cli": _miles_train(tmp, rank)}
    assert not dist.is_initialized()  # the trainer tore down the group it created
    # a group of the script's own (torchrun's store holds the keys of the trainer's group)
    world = int(os.environ["WORLD_SIZE"])
    store = f"file://{tmp / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    writes: list[str] = []
    _spy_on_writes(writes)
    try:
        full, model = _fit(build_strategy("miles", tau=0.02), tmp / "full", epochs=4)
        out["full"] = strip_times(full.history)
        out["weights"] = [float(p.detach().double().sum()) for p in model.parameters()]
        out["test"] = full.test
        with contextlib.suppress(_Stop):
            _fit(build_strategy("miles", tau=0.02), tmp / "part", epochs=4, stop_after=2)
        try:  # rank 1 does not see rank 0's last.pt (as on a file system of its own)
            unshared = tmp / ("part" if rank == 0 else "elsewhere")
            _fit(build_strategy("miles", tau=0.02), unshared, epochs=4)
        except RuntimeError as exc:
            out["unshared"] = str(exc)
        resumed, _ = _fit(build_strategy("miles", tau=0.02), tmp / "part", epochs=4)
        out["resumed"] = strip_times(resumed.history)
        out["writes"] = writes
        unimodal, _ = _fit(build_strategy("unimodal", modality="weak"), None, epochs=1)
        out["unimodal"] = unimodal.history[0]["val_weak"]
        try:
            _fit(_RankBiased(), None, epochs=1)
        except RuntimeError as exc:
            out["drift"] = str(exc)
        try:  # a method that declares it cannot run data-parallel is refused before training
            _fit(build_strategy("mla"), None, epochs=1)
        except ValueError as exc:
            out["single_process"] = str(exc)
    finally:
        dist.destroy_process_group()
    (tmp / f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("ddp-trainer")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         __file__, str(tmp)],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return tmp, [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_every_rank_takes_the_same_decisions(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, (zero, one) = ranks
    assert _rows(zero["full"]) == _rows(one["full"])  # decisions and LRs, every epoch
    assert zero["full"] == one["full"]  # and every reduced number of the history
    assert zero["weights"] == one["weights"] and zero["test"] == one["test"]
    slowed = [r["decision"]["slowed"] for r in _rows(zero["full"])]
    assert any(slowed), slowed  # MILES acted
    assert len({r["lr_strong"] for r in zero["full"]} | {r["lr_weak"] for r in zero["full"]}) > 1


def test_rank_zero_alone_writes_one_set_of_files(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    tmp, (zero, one) = ranks
    assert one["writes"] == []
    assert zero["writes"].count("write_json") == 2  # result.json of each finished fit
    files = sorted(p.name for p in (tmp / "full").iterdir())
    # the run folder's lock and settings record (miles.training.run_folder), and the run's files
    assert files == [
        ".lock", "best.pt", "history.csv", "history.json", "last.pt", "result.json",
        "run_config.json",
    ]  # fmt: skip
    saved = json.loads((tmp / "full" / "result.json").read_text())
    assert strip_times(saved["history"]) == zero["full"]


def test_a_resumed_distributed_run_is_the_uninterrupted_one(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (zero, one) = ranks
    assert zero["resumed"] == zero["full"] and one["resumed"] == one["full"]
    for rank in (zero, one):
        assert rank["unshared"].startswith(
            "the ranks disagree on the epoch to start from: [3.0, 1.0] (by rank)"
        )


def test_unused_parameters_and_drifting_replicas(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (zero, one) = ranks
    assert zero["unimodal"] == one["unimodal"]  # the fused head gets no gradient: still trains
    for rank in (zero, one):
        assert "the replicas' weights differ after epoch 1's training" in rank["drift"]


def test_a_single_process_method_is_refused(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    _, (zero, one) = ranks
    for rank in (zero, one):
        assert rank["single_process"].startswith("mla cannot run data-parallel: it runs one")


@pytest.mark.parametrize(
    "name", sorted(n for n in available_strategies() if strategy_class(n).single_process)
)
def test_every_single_process_method_names_its_reason(name: str) -> None:
    """The refusal comes before DDP wraps the model, with the method's own reason."""
    data = make_toy_splits(n=(16, 8, 8))
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    trainer = Trainer(model, build_strategy(name), TrainerConfig(epochs=1, progress=False))
    reason = strategy_class(name).single_process
    with pytest.raises(ValueError, match=f"^{name} cannot run data-parallel: ") as caught:
        trainer._wrap(model, Ranks(rank=0, world_size=2))
    assert reason is not None and reason in str(caught.value)


def test_miles_train_under_torchrun(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    """Two processes train one run: one line per epoch, one result, one set of files."""
    tmp, (zero, one) = ranks
    assert zero["cli"] == one["cli"] == 0
    lines = (tmp / "cli0.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    assert sum(line.startswith("wrote ") for line in lines) == 1
    assert (tmp / "cli1.txt").read_text() == ""  # rank 1 trains silently
    files = sorted(p.name for p in (tmp / "cli").iterdir())
    assert files == [
        ".lock", "best.pt", "config.json", "history.csv", "history.json", "last.pt",
        "result.json", "run_config.json",
    ]  # fmt: skip


if __name__ == "__main__":  # run by torchrun from the `ranks` fixture
    _worker(Path(sys.argv[1]))
