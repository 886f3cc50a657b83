"""Data-parallel training with ``torch.distributed``: who this process is and what ranks share.

The trainer runs data-parallel when a process group exists (a caller initialised one) or when the
process was started by ``torchrun`` (``WORLD_SIZE > 1`` in the environment; the trainer then
initialises the group itself, NCCL on CUDA and gloo otherwise, and tears it down after ``fit``).
Each rank then:

* trains on its part of every epoch (``DistributedSampler``, shuffled from the run's seed and the
  epoch number, so a resumed run continues exactly), through ``DistributedDataParallel``;
* validates on its own shard of the validation set (every ``world``-th sample, no padding), and
  the metrics are reduced over all ranks (``HeadMetrics`` sums its states, the losses are summed),
  so every rank takes the same decisions from the same global numbers;
* leaves the files to rank 0 (history, checkpoints, ``result.json``, loggers).

At the end of each epoch rank 0's buffers (BatchNorm statistics) are copied to every rank, and the
ranks check that their weights are still identical: a method whose gradient hook or side model
depends on the rank's own batch would otherwise train different replicas without any error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from miles.validation import check_choice

__all__ = [
    "BACKENDS",
    "Ranks",
    "ShardSampler",
    "all_gather_tensors",
    "broadcast_buffers",
    "check_replicas",
    "check_same_on_every_rank",
    "current_ranks",
    "is_main_process",
    "join_process_group",
    "launched_world_size",
    "rank_device",
    "sum_across_ranks",
]

#: ``backend`` values: ``auto`` is NCCL for CUDA devices and gloo otherwise
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its host)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when not launched by it)."""
    return _env_int("WORLD_SIZE", 1)


def current_ranks() -> Ranks:
    """The initialised process group's ranks, else those ``torchrun`` set in the environment."""
    local = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    return Ranks(_env_int("RANK", 0), launched_world_size(), local)


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not part of a distributed job."""
    return current_ranks().is_main


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """A bare ``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``); anything else is kept."""
    if ranks.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ranks.local_rank)
    return device


def join_process_group(backend: str, device: torch.device) -> bool:
    """Initialise the default process group from ``torchrun``'s environment when launched by it
    and none exists yet; True when this call created it (the caller then destroys it)."""
    check_choice("backend", backend, BACKENDS)
    if launched_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; cannot join torchrun's job")
    chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device, current_ranks()))
    dist.init_process_group(chosen)
    return True


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: an evaluation shard, without the padding a
    ``DistributedSampler`` adds (which would count some samples twice)."""

    def __init__(self, size: int, ranks: Ranks) -> None:
        self.size, self.ranks = size, ranks

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.ranks.rank, self.size, self.ranks.world_size))

    def __len__(self) -> int:
        return len(range(self.ranks.rank, self.size, self.ranks.world_size))


def sum_across_ranks(values: Tensor) -> Tensor:
    """``values`` summed over every rank (a collective; returned unchanged on one process)."""
    if current_ranks().world_size <= 1:
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out


def all_gather_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor concatenated along dim 0 over every rank, in rank order (shapes may differ
    in dim 0). Used for the validation latents the ablation estimator needs."""
    if current_ranks().world_size <= 1:
        return list(tensors)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [t.detach().cpu() for t in tensors])
    device = tensors[0].device if tensors else torch.device("cpu")
    return [torch.cat([part[i] for part in gathered]).to(device) for i in range(len(tensors))]


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank."""
    if current_ranks().world_size <= 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def check_replicas(model: nn.Module, what: str) -> None:
    """Raise on every rank when the ranks' weights differ (a fingerprint per parameter)."""
    if current_ranks().world_size <= 1:
        return
    params = [p.detach() for p in model.parameters()]
    if not params:
        return
    local = torch.stack(
        [torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]
    )
    rows: list[Tensor] = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    differ = [rank for rank, row in enumerate(rows) if not torch.equal(row, rows[0])]
    if differ:
        raise RuntimeError(
            f"the replicas' weights differ after {what} (ranks {differ} differ from rank 0): "
            "something changed the gradients or weights of one rank only, e.g. a strategy's "
            "gradient hook or side model computed from the rank's own batch. Each rank would go "
            "on training a different model; run this method on one process"
        )


def check_same_on_every_rank(value: float, what: str, hint: str) -> None:
    """Raise on every rank unless ``value`` is the same on all of them."""
    if current_ranks().world_size <= 1:
        return
    from miles.integrations.distributed import gather_floats

    values = [row[0] for row in gather_floats([float(value)])]
    if any(v != values[0] for v in values):
        raise RuntimeError(f"the ranks disagree on {what}: {values} (by rank); {hint}")
