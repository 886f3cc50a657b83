"""JointFusionModel: shapes, fusion rules, detached heads, freezing (incl. BatchNorm statistics)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from miles.models import JointFusionModel, head_losses
from miles.models.encoders import ImageCNN, MLPEncoder, SequenceEncoder


def _model(
    fusion: str = "concat", sizes: tuple[int, int] = (6, 6), **kw: object
) -> JointFusionModel:
    torch.manual_seed(0)
    encs = {"a": MLPEncoder(5, sizes[0]), "b": MLPEncoder(3, sizes[1])}
    return JointFusionModel(encs, num_classes=4, fusion=fusion, **kw)  # type: ignore[arg-type]


def _inputs(batch: int = 7) -> dict[str, torch.Tensor]:
    return {"a": torch.randn(batch, 5), "b": torch.randn(batch, 3)}


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_forward_shapes(fusion: str) -> None:
    model = _model(fusion)
    out = model(_inputs())
    assert out.fused.shape == (7, 4)
    assert set(out.unimodal) == {"a", "b"} and all(v.shape == (7, 4) for v in out.unimodal.values())
    assert out.latents["a"].shape == (7, 6)
    expected_in = 12 if fusion == "concat" else 6
    assert model.fused_head.in_features == expected_in


def test_concat_and_sum_fusion_values() -> None:
    model = _model("sum")
    z = {"a": torch.ones(2, 6), "b": 2 * torch.ones(2, 6)}
    assert torch.equal(model.fuse(z), 3 * torch.ones(2, 6))
    cat = _model("concat")
    assert torch.equal(cat.fuse(z), torch.cat([z["a"], z["b"]], dim=1))


def test_sum_needs_equal_sizes() -> None:
    with pytest.raises(ValueError, match="equal latent sizes"):
        _model("sum", sizes=(6, 4))


def test_bad_construction() -> None:
    with pytest.raises(TypeError, match="out_features"):
        JointFusionModel({"a": nn.ReLU(), "b": MLPEncoder(3, 4)}, 2)
    with pytest.raises(ValueError, match="fusion"):
        JointFusionModel({"a": MLPEncoder(3, 4)}, 2, fusion="nosuch")
    with pytest.raises(ValueError, match="num_classes"):
        JointFusionModel({"a": MLPEncoder(3, 4)}, 0)
    shared = MLPEncoder(3, 4)
    with pytest.raises(ValueError, match="shared"):
        JointFusionModel({"a": shared, "b": shared}, 2)
    with pytest.raises(ValueError, match="inputs lack"):
        _model()({"a": torch.randn(2, 5)})


def test_detached_heads_do_not_reach_encoders() -> None:
    model = _model(detach_unimodal_heads=True)
    out = model(_inputs())
    y = torch.randint(0, 4, (7,))
    head_losses(out, y)["a"].backward()
    assert all(p.grad is None for p in model.encoders["a"].parameters())
    assert model.heads["a"].weight.grad is not None

    attached = _model()
    out = attached(_inputs())
    head_losses(out, y)["a"].backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in attached.encoders["a"].parameters()
    )


def test_lengths_reach_sequence_encoder() -> None:
    torch.manual_seed(0)
    model = JointFusionModel({"audio": SequenceEncoder(13, 8), "image": ImageCNN(1, 8)}, 10)
    x = torch.randn(2, 9, 13)
    lengths = torch.tensor([9, 4])
    img = torch.randn(2, 1, 28, 28)
    model.eval()
    full = model({"audio": x, "image": img}, {"audio": lengths})
    short = model({"audio": x[1:, :4], "image": img[1:]}, {"audio": lengths[1:]})
    torch.testing.assert_close(full.fused[1:], short.fused, atol=1e-5, rtol=1e-5)


def test_freeze_keeps_weights_and_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    enc_a = nn.Sequential(nn.BatchNorm1d(5), MLPEncoder(5, 6))
    enc_a.out_features = 6  # type: ignore[assignment]
    model = JointFusionModel({"a": enc_a, "b": MLPEncoder(3, 6)}, 4)
    model.freeze("a")
    model.train()
    bn = model.encoders["a"][0]
    assert not bn.training and model.encoders["b"].training
    before = {k: v.clone() for k, v in model.encoders["a"].state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(_inputs())
    sum(head_losses(out, torch.randint(0, 4, (7,))).values()).backward()
    opt.step()
    after = model.encoders["a"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.frozen_modalities == frozenset({"a"})
    # frozen state survives a state_dict round trip
    enc_clone = nn.Sequential(nn.BatchNorm1d(5), MLPEncoder(5, 6))
    enc_clone.out_features = 6  # type: ignore[assignment]
    clone = JointFusionModel({"a": enc_clone, "b": MLPEncoder(3, 6)}, 4)
    clone.load_state_dict(model.state_dict())
    assert clone.frozen_modalities == frozenset({"a"})
    with pytest.raises(ValueError, match="unknown modality"):
        model.freeze("c")


def test_multilabel_loss_is_bce() -> None:
    model = _model()
    out = model(_inputs(3))
    y = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    losses = head_losses(out, y, multilabel=True)
    torch.testing.assert_close(
        losses["fused"], nn.functional.binary_cross_entropy_with_logits(out.fused, y)
    )


def test_state_dict_is_tensors_only_and_survives_safetensors_with_frozen_modalities(
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file, save_file

    model = _model()
    model.freeze("b")
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["frozen_mask"].tolist() == [False, True]
    save_file(state, str(tmp_path / "model.safetensors"))
    clone = _model()
    clone.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert clone.frozen_modalities == frozenset({"b"})
    assert not any(p.requires_grad for p in clone.encoders["b"].parameters())
    assert all(p.requires_grad for p in clone.encoders["a"].parameters())
    clone.train()
    assert not clone.encoders["b"].training and clone.encoders["a"].training
    assert all(torch.equal(v, clone.state_dict()[k]) for k, v in state.items())


def test_loading_never_unfreezes() -> None:
    """A modality frozen before a load stays frozen (and marked) whatever the loaded mask says."""
    model = _model()
    model.freeze("a")
    model.load_state_dict(_model().state_dict())
    assert model.frozen_modalities == frozenset({"a"})
    assert model.state_dict()["frozen_mask"].tolist() == [True, False]
