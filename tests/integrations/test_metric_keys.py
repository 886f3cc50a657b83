"""MetricKeys: the one rule by which the callbacks find MILES's inputs among logged metrics."""

from __future__ import annotations

import pytest
import torch

from miles.integrations.metric_keys import MetricKeys
from miles.scheduler import MILES


def scheduler() -> MILES:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "modality": m} for m in ("a", "b")]
    return MILES(torch.optim.SGD(groups, lr=0.1), tau=0.1)


def test_heads_and_ablation_read_their_keys() -> None:
    logged = {"v/f": 0.8, "v/h/a": 0.75, "v/h/b": 0.25, "v/w/a": 0.3, "v/w/b": 0.7}
    heads = MetricKeys("v/f", "v/h/{modality}", "v/w/{modality}").step(scheduler(), logged.get)
    assert (heads.estimator, heads.metrics, heads.slowed) == ("heads", {"a": 0.75, "b": 0.25}, "a")
    keys = MetricKeys("v/f", "v/h/{modality}", "v/w/{modality}", estimator="ablation")
    ablation = keys.step(scheduler(), logged.get)
    assert (ablation.estimator, ablation.metrics, ablation.slowed) == (
        "ablation",
        {"a": 0.3, "b": 0.7},
        "a",  # removing a costs the most
    )


def test_bad_keys() -> None:
    with pytest.raises(ValueError, match="estimator"):
        MetricKeys("f", "h/{modality}", "w/{modality}", estimator="probe")
    with pytest.raises(ValueError, match="head_key must contain"):
        MetricKeys("f", "val/head", "w/{modality}")
