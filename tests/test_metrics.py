"""HeadMetrics checked by hand; the ablation estimator on a model that needs one modality."""

from __future__ import annotations

import pytest
import torch
import torchmetrics
from torch import nn

from miles.metrics import HeadMetrics, ablated_fused_scores, make_metric
from miles.models import FusionOutput, JointFusionModel
from miles.models.encoders import MLPEncoder


def test_head_metrics_accuracy_by_hand() -> None:
    metrics = HeadMetrics(["a", "b"], num_classes=3)
    target = torch.tensor([0, 1, 2, 1])
    eye = torch.eye(3)
    fused = eye[torch.tensor([0, 1, 2, 0])]  # 3/4 right
    a = eye[torch.tensor([0, 0, 0, 0])]  # 1/4
    b = eye[torch.tensor([0, 1, 2, 1])]  # 4/4
    metrics.update(FusionOutput(fused[:2], {"a": a[:2], "b": b[:2]}, {}), target[:2])
    metrics.update(FusionOutput(fused[2:], {"a": a[2:], "b": b[2:]}, {}), target[2:])
    scores = metrics.compute()
    assert scores.fused == pytest.approx(0.75)
    assert scores.unimodal == pytest.approx({"a": 0.25, "b": 1.0})
    assert scores.as_step_kwargs() == {"fused": scores.fused, "unimodal": scores.unimodal}
    metrics.reset()
    metrics.update(FusionOutput(a, {"a": a, "b": a}, {}), target)
    assert metrics.compute().fused == pytest.approx(0.25)


def test_multilabel_f1_micro_by_hand() -> None:
    metrics = HeadMetrics(["a"], num_classes=3, metric="f1_micro", multilabel=True)
    target = torch.tensor([[1, 0, 1], [0, 1, 0]])
    logits = torch.tensor([[5.0, -5.0, -5.0], [5.0, 5.0, -5.0]])  # tp=2, fp=1, fn=1
    metrics.update(FusionOutput(logits, {"a": logits}, {}), target)
    assert metrics.compute().fused == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_unknown_metric_and_missing_head() -> None:
    with pytest.raises(ValueError, match="metric"):
        make_metric("auc", 3)
    metrics = HeadMetrics(["a", "b"], 3)
    with pytest.raises(ValueError, match="unimodal head 'b'"):
        metrics.update(
            FusionOutput(torch.zeros(1, 3), {"a": torch.zeros(1, 3)}, {}), torch.tensor([0])
        )


def test_ablation_estimator_finds_the_modality_the_head_uses() -> None:
    model = JointFusionModel({"a": MLPEncoder(2, 2), "b": MLPEncoder(2, 2)}, 2)
    with torch.no_grad():  # fused head reads only a's first latent unit
        model.fused_head.weight.zero_()
        model.fused_head.bias.zero_()
        model.fused_head.weight[0, 0] = -1.0
        model.fused_head.weight[1, 0] = 1.0
    target = torch.tensor([0, 1, 0, 1])
    latents = {
        "a": torch.tensor([[-1.0, 0], [1, 0], [-2, 0], [2, 0]]),
        "b": torch.randn(4, 2),
    }
    metric = make_metric("accuracy", 2)
    scores = ablated_fused_scores(model, latents, target, metric, fill="zeros")
    assert scores["b"] == 1.0  # removing b changes nothing
    assert scores["a"] == 0.5  # removing a: constant prediction, chance on balanced targets
    mean_scores = ablated_fused_scores(model, latents, target, metric, fill="mean")
    assert mean_scores == scores  # a's mean latent is 0 here too
    with pytest.raises(ValueError, match="fill"):
        ablated_fused_scores(model, latents, target, metric, fill="noise")


def test_metrics_move_with_module() -> None:
    metrics = HeadMetrics(["a"], 2)
    assert isinstance(metrics, nn.Module)
    assert metrics.to(torch.device("cpu")) is metrics


def test_update_logits_still_works_but_is_deprecated() -> None:
    metrics = HeadMetrics(["a", "b"], num_classes=2)
    target = torch.tensor([0, 1])
    good, bad = torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([[0.0, 1], [1, 0]])
    with pytest.deprecated_call(match="update"):
        metrics.update_logits(good, {"a": bad, "b": good}, target)
    scores = metrics.compute()
    assert (scores.fused, scores.unimodal) == (1.0, {"a": 0.0, "b": 1.0})
    with pytest.raises(ValueError, match="'b'"), pytest.deprecated_call():
        metrics.update_logits(good, {"a": bad}, target)


def test_dict_outputs_from_any_model() -> None:
    metrics = HeadMetrics(["a", "b"], num_classes=2)
    target = torch.tensor([0, 1])
    good, bad = torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([[0.0, 1], [1, 0]])
    metrics.update({"loss": torch.tensor(0.3), "fused": good, "a": bad, "b": good}, target)
    scores = metrics.compute()
    assert (scores.fused, scores.unimodal) == (1.0, {"a": 0.0, "b": 1.0})
    assert scores.as_log_dict("val/") == {"val/fused": 1.0, "val/head/a": 0.0, "val/head/b": 1.0}
    with pytest.raises(ValueError, match="no 'fused' logits"):
        metrics.update({"a": good, "b": good}, target)
    with pytest.raises(TypeError, match="FusionOutput or a dict"):
        metrics.update(good, target)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fused"):
        HeadMetrics(["fused", "a"], 2)


def test_a_real_torchmetrics_metric() -> None:
    metrics = HeadMetrics(["a", "b"], num_classes=2)
    assert isinstance(metrics, torchmetrics.Metric)
    target = torch.tensor([0, 1, 1, 0])
    eye = torch.eye(2)
    batch_one = {"fused": eye[[0, 1]], "a": eye[[0, 0]], "b": eye[[1, 1]]}
    batch_two = {"fused": eye[[0, 0]], "a": eye[[1, 1]], "b": eye[[1, 1]]}
    first = metrics(batch_one, target[:2])  # forward: this batch's scores, and accumulates
    assert (first.fused, first.unimodal) == (1.0, {"a": 0.5, "b": 0.5})
    second = metrics(batch_two, target[2:])
    assert (second.fused, second.unimodal) == (0.5, {"a": 0.5, "b": 0.5})
    total = metrics.compute()
    assert (total.fused, total.unimodal) == (0.75, {"a": 0.5, "b": 0.5})
    metrics.reset()
    metrics.update(batch_one, target[:2])
    assert metrics.compute().fused == 1.0


def test_torchmetrics_options_reach_every_head() -> None:
    def no_sync(result: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        return [result]

    metrics = HeadMetrics(
        ["a", "b"], 3, "f1_macro", sync_on_compute=False, dist_sync_fn=no_sync, process_group=None
    )
    children = [metrics.fused, *metrics.heads.values()]
    assert all(m.sync_on_compute is False and m.dist_sync_fn is no_sync for m in children)
    with pytest.raises(ValueError):
        HeadMetrics(["a", "b"], 3, not_an_option=1)
