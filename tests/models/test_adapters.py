"""HFEncoder: tiny randomly initialised Hugging Face towers (no download) as fusion encoders."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from miles.models import JointFusionModel, head_losses, modality_param_groups
from miles.models.adapters import HFEncoder

transformers = pytest.importorskip("transformers")


def tiny_bert() -> Any:
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config)


def tiny_vit() -> Any:
    config = transformers.ViTConfig(
        hidden_size=10,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=8,
        patch_size=4,
        num_channels=3,
    )
    return transformers.ViTModel(config)


def test_sizes_come_from_the_config() -> None:
    text, image = HFEncoder(tiny_bert()), HFEncoder(tiny_vit(), "cls", latent_dim=12)
    assert (text.out_features, image.out_features) == (12, 12)
    assert (text.input_name, image.input_name) == ("input_ids", "pixel_values")
    model = JointFusionModel({"text": text, "image": image}, num_classes=3, fusion="sum")
    inputs = {
        "text": {"input_ids": torch.randint(0, 40, (4, 7)), "attention_mask": torch.ones(4, 7)},
        "image": torch.randn(4, 3, 8, 8),
    }
    out = model(inputs)
    assert out.fused.shape == (4, 3) and out.latents["image"].shape == (4, 12)
    loss = sum(head_losses(out, torch.tensor([0, 1, 2, 0])).values())
    loss.backward()
    groups = modality_param_groups(model)
    assert [g["modality"] for g in groups] == ["text", "image", None]
    bert_params = {id(p) for p in text.model.parameters()}
    assert bert_params <= {id(p) for p in groups[0]["params"]}


def test_poolings_by_hand() -> None:
    bert = tiny_bert().eval()
    ids = torch.randint(0, 40, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask)
        pooled = HFEncoder(bert, "pooler")({"input_ids": ids, "attention_mask": mask})
        cls = HFEncoder(bert, "cls")({"input_ids": ids, "attention_mask": mask})
        mean = HFEncoder(bert, "mean")(ids, torch.tensor([3, 5]))  # lengths build the mask
    torch.testing.assert_close(pooled, ref.pooler_output)
    torch.testing.assert_close(cls, ref.last_hidden_state[:, 0])
    hidden = ref.last_hidden_state
    torch.testing.assert_close(mean[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(mean[1], hidden[1].mean(0))


class NoConfig(nn.Module):
    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": input_ids.float().unsqueeze(-1).expand(-1, -1, 4)}


def test_clear_errors() -> None:
    with pytest.raises(TypeError, match="out_features="):
        HFEncoder(NoConfig(), "cls")
    enc = HFEncoder(NoConfig(), "pooler", out_features=4)
    with pytest.raises(ValueError, match="no pooler_output"):
        enc(torch.ones(2, 3, dtype=torch.long))
    wrong = HFEncoder(NoConfig(), "cls", out_features=6)
    with pytest.raises(ValueError, match="4 features, not the 6"):
        wrong(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="pooling"):
        HFEncoder(NoConfig(), "max", out_features=4)
    assert HFEncoder(NoConfig(), "mean", out_features=4)(torch.ones(2, 3)).shape == (2, 4)
