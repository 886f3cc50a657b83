"""Two ranks (gloo, CPU, spawned): MILES takes one decision for all ranks, or refuses loudly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from miles.integrations.distributed import check_sync, gather_floats, world_size
from miles.metrics import HeadMetrics
from miles.models import JointFusionModel, head_losses, modality_param_groups
from miles.models.encoders import MLPEncoder
from miles.scheduler import MILES

WORLD = 2
EPOCHS = 3


def _data(seed: int, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A strong and a weak modality (noisy copies of class prototypes)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(2, 4, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x = {
        "strong": protos[0][y] + 0.3 * torch.randn(n, 6, generator=g),
        "weak": protos[1][y] + 2.0 * torch.randn(n, 6, generator=g),
    }
    return x, y


def _train_with_head_metrics(rank: int) -> dict[str, Any]:
    """DDP training; each rank validates on its own shard; HeadMetrics syncs the states."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = JointFusionModel({m: MLPEncoder(6, 8) for m in ("strong", "weak")}, 4)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(modality_param_groups(model), lr=0.2)
    scheduler = MILES(optimizer, tau=0.05, mu=0.5)
    x_train, y_train = _data(100 + rank, 64)  # a different training shard per rank
    x_val, y_val = _data(200 + rank, 40)  # and a different validation shard
    metrics = HeadMetrics(model.modalities, num_classes=4)
    local = HeadMetrics(model.modalities, num_classes=4, sync_on_compute=False)
    rows = []
    for _ in range(EPOCHS):
        ddp.train()
        loss = sum(head_losses(ddp(x_train), y_train).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ddp.eval()
        metrics.reset()
        local.reset()
        with torch.no_grad():
            out = ddp(x_val)
            metrics.update(out, y_val)
            local.update(out, y_val)
        decision = scheduler.step(**metrics.compute().as_step_kwargs())
        assert decision is not None
        rows.append(
            {
                "decision": decision.to_dict(),
                "lrs": [float(g["lr"]) for g in optimizer.param_groups],
                "local": local.compute().as_step_kwargs(),
            }
        )
    return {"rows": rows}


def _hand_computed(rank: int) -> dict[str, Any]:
    """A user loop whose ranks pass their own shard's accuracy: caught, or broadcast."""
    out: dict[str, Any] = {}

    def optimizer() -> torch.optim.Optimizer:
        groups = [{"params": [nn.Parameter(torch.zeros(1))], "modality": m} for m in "ab"]
        return torch.optim.SGD(groups, lr=0.1)

    mine = {"fused": 0.8, "unimodal": {"a": 0.7 if rank == 0 else 0.2, "b": 0.3}}
    checked = MILES(optimizer())
    try:
        checked.step(**mine)
    except RuntimeError as exc:
        out["error"] = str(exc)
    out["after_error"] = {"epoch": checked.last_epoch, "history": len(checked.history)}
    out["lrs_after_error"] = checked.get_last_lr()

    broadcast = MILES(optimizer(), sync="broadcast")
    decision = broadcast.step(**mine)
    assert decision is not None
    out["broadcast"] = decision.to_dict()

    bad = {"fused": math.nan if rank == 1 else 0.8, "unimodal": {"a": 0.7, "b": 0.3}}
    try:
        MILES(optimizer()).step(**bad)
    except (RuntimeError, ValueError) as exc:  # no rank may hang in the collective
        out["invalid"] = f"{type(exc).__name__}: {exc}"
    out["gathered"] = gather_floats([float(rank), 0.5])
    out["world_size"] = world_size()
    return out


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = {"head_metrics": _train_with_head_metrics(rank), "hand": _hand_computed(rank)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        # every rank done before any tears its connections down: a rank still in gloo while the
        # other destroys the group can abort (seen once in CI as SIGABRT at teardown)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_head_metrics_on_different_shards_give_one_decision(ranks: list[dict[str, Any]]) -> None:
    zero, one = (r["head_metrics"]["rows"] for r in ranks)
    assert len(zero) == len(one) == EPOCHS
    for epoch, (a, b) in enumerate(zip(zero, one, strict=True)):
        assert a["decision"] == b["decision"], epoch
        assert a["lrs"] == b["lrs"], epoch
    # the shards really differ: without the sync each rank would have seen other metrics
    assert any(a["local"] != b["local"] for a, b in zip(zero, one, strict=True))
    assert any(row["decision"]["slowed"] is not None for row in zero)  # MILES acted


def test_different_hand_computed_metrics_are_caught(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        hand = rank["hand"]
        assert "ranks [1] differ from rank 0" in hand["error"]
        assert "rank 0: fused=0.8 unimodal={'a': 0.7, 'b': 0.3}" in hand["error"]
        assert "rank 1: fused=0.8 unimodal={'a': 0.2, 'b': 0.3}" in hand["error"]
        assert "sync='broadcast'" in hand["error"]
        assert hand["after_error"] == {"epoch": 0, "history": 0}  # nothing changed
        assert hand["lrs_after_error"] == [0.1, 0.1]
        assert hand["gathered"] == [[0.0, 0.5], [1.0, 0.5]]
        assert hand["world_size"] == WORLD
    assert ranks[0]["hand"]["broadcast"] == ranks[1]["hand"]["broadcast"]
    assert ranks[0]["hand"]["broadcast"]["metrics"] == {"a": 0.7, "b": 0.3}  # rank 0's
    assert ranks[0]["hand"]["invalid"].startswith("RuntimeError: MILES step refused on rank(s) [1]")
    assert ranks[1]["hand"]["invalid"].startswith("ValueError: metric 'fused' is NaN")


def test_sync_option_is_checked() -> None:
    assert check_sync("off") == "off"
    with pytest.raises(ValueError, match="sync"):
        MILES(
            torch.optim.SGD(
                [{"params": [nn.Parameter(torch.zeros(1))], "modality": m} for m in "ab"], lr=0.1
            ),
            sync="maybe",
        )
    assert world_size() == 1  # not distributed here: nothing is communicated
