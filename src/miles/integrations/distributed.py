"""Every rank of a ``torch.distributed`` job must take the same MILES decision.

Data-parallel replicas stay identical only if every rank applies the same learning rates. MILES
decides from validation metrics, and metrics computed by hand on each rank's validation shard
differ from rank to rank. Before deciding, :class:`miles.scheduler.MILES` therefore gathers the
metrics of every rank (one ``all_gather`` of a few floats) and, by its ``sync`` option:

* ``"check"`` (default): raises the same clear error on every rank when they differ, naming the
  ranks and their values. Metrics reduced over the whole validation set (``miles.HeadMetrics``,
  Lightning's ``sync_dist=True``, the HF ``Trainer``'s gathered predictions) agree exactly.
* ``"broadcast"``: every rank decides from rank 0's metrics.
* ``"off"``: no communication (your metrics are identical by construction, or MILES runs on one
  rank only).

Without an initialized process group of two or more ranks, nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from miles.validation import check_choice, check_str

__all__ = ["SYNC_MODES", "check_sync", "gather_floats", "world_size"]

#: What MILES does with the metrics of several ranks, see the module docstring.
SYNC_MODES: tuple[str, ...] = ("check", "broadcast", "off")


def check_sync(sync: Any) -> str:
    """Validate a ``sync`` option."""
    return check_choice("sync", check_str("sync", sync), SYNC_MODES)


def world_size(process_group: Any = None) -> int:
    """Ranks in ``process_group`` (the default group if None); 1 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(process_group))


def _device(process_group: Any) -> torch.device:
    """NCCL only moves CUDA tensors; every other backend takes CPU tensors."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_floats(values: Sequence[float], process_group: Any = None) -> list[list[float]]:
    """Every rank's ``values`` (same length on every rank), in rank order, as float64.

    A collective: every rank of ``process_group`` must call it.
    """
    device = _device(process_group)
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    rows = [torch.empty_like(local) for _ in range(world_size(process_group))]
    dist.all_gather(rows, local, group=process_group)
    return [[float(v) for v in row.cpu().tolist()] for row in rows]
