"""Every ``configs/paper/*.yaml`` parses, builds its dataset and model, and trains one step on CPU.

Each config goes through the same path ``miles train --config`` takes: ``ExperimentConfig`` ->
the registered dataset builder with the config's ``dataset_params`` -> ``build_encoders(
latent_dim)`` -> ``JointFusionModel`` -> the strategy's loss. Only the cache is a stand-in: a
miniature one (:mod:`tests.miniature`: the dataset's own array names and dtypes at reduced size,
sides cut to 32, e.g. 32 x 32 instead of 224 x 224, 32 tokens instead of 512), and, for MM-IMDb,
a small randomly initialised BERT in place of BERT-base. Encoders are randomly initialised (the
configs name no weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from miles.data import cremad, luma, mmimdb, smnist
from miles.data.base import collate_multimodal
from miles.data.prepare import prepare
from miles.data.registry import available_datasets, build_dataset
from miles.models.fusion import JointFusionModel
from miles.models.losses import head_losses
from miles.strategies.registry import build_strategy
from miles.training.experiment import ExperimentConfig
from tests.miniature import BUILD_OVERRIDES, N_TRAIN, MiniPreparer, default_preparer

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "paper"
DATASETS = ("cremad", "smnist", "luma", "mmimdb")
FUSIONS = ("concat", "sum")
#: The paper's epochs per dataset (MILES.md, "Experimental setup in the paper").
PAPER_EPOCHS = {"cremad": 200, "smnist": 50, "luma": 60, "mmimdb": 50}
PAPER_MODALITIES = {
    "cremad": {"audio", "video"},
    "smnist": {"image", "audio"},
    "luma": {"audio", "image"},
    "mmimdb": {"text", "image"},
}
CASES = [(d, f) for d in DATASETS for f in FUSIONS]
DATASET_MODULES = {"cremad": cremad, "smnist": smnist, "luma": luma, "mmimdb": mmimdb}


def _module(dataset: str) -> Any:
    """The dataset module, imported directly: a renamed or missing module fails, never skips."""
    return DATASET_MODULES[dataset]


def _load(dataset: str, fusion: str) -> tuple[dict[str, Any], ExperimentConfig]:
    path = CONFIG_DIR / f"{dataset}_{fusion}.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return raw, ExperimentConfig.from_dict(raw)


def test_every_dataset_and_fusion_has_a_config() -> None:
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert names == sorted(f"{d}_{f}.yaml" for d, f in CASES)


@pytest.mark.parametrize(("dataset", "fusion"), CASES)
def test_config_states_the_paper_setup(dataset: str, fusion: str) -> None:
    raw, config = _load(dataset, fusion)
    assert config.dataset == dataset and config.fusion == fusion
    assert config.trainer.epochs == PAPER_EPOCHS[dataset]
    assert config.trainer.optimizer == "adam"
    assert config.trainer.device == "cuda"
    assert config.strategy == "miles"
    assert config.strategy_params["tau"] == 0.2 and config.strategy_params["mu"] == 0.5
    assert "root" in config.dataset_params
    build_strategy(config.strategy, **config.strategy_params)  # the parameters are valid
    # The pair differs only in the fusion (and names): same encoders and hyper-parameters.
    other_raw, _ = _load(dataset, "sum" if fusion == "concat" else "concat")
    for key in ("dataset", "dataset_params", "latent_dim", "strategy", "strategy_params"):
        assert raw[key] == other_raw[key], key
    assert raw["trainer"] == other_raw["trainer"]


@pytest.mark.parametrize(("dataset", "fusion"), CASES)
def test_config_trains_one_step_on_cpu(
    dataset: str, fusion: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dataset == _module(dataset).NAME
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _, config = _load(dataset, fusion)
    assert dataset in available_datasets()
    real = default_preparer(dataset, tmp_path)
    assert set(real.specs()) == PAPER_MODALITIES[dataset]
    cache = tmp_path / "cache"
    prepare(MiniPreparer(real), tmp_path, cache, progress=False)

    params = {**config.dataset_params, "root": str(cache), **BUILD_OVERRIDES.get(dataset, {})}
    data = build_dataset(config.dataset, **params)
    assert set(data.modalities) == PAPER_MODALITIES[dataset]
    assert len(data.train) == N_TRAIN

    torch.manual_seed(config.trainer.seed)
    encoders = data.build_encoders(config.latent_dim)
    model = JointFusionModel(encoders, data.num_classes, config.fusion)
    assert all(size == config.latent_dim for size in model.latent_sizes.values())
    strategy = build_strategy(config.strategy, **config.strategy_params)
    model.train()
    batch = collate_multimodal([data.train[i] for i in range(len(data.train))])
    out = model(batch["inputs"], batch["lengths"] or None)
    assert out.fused.shape == (N_TRAIN, data.num_classes)
    losses = head_losses(out, batch["target"], multilabel=data.multilabel)
    loss = strategy.loss(losses, out, batch)
    assert torch.isfinite(loss)
    loss.backward()
    for name, encoder in model.encoders.items():
        params_ = [p for p in encoder.parameters() if p.requires_grad]
        assert params_, name
        missing = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{name}: no gradient for {missing[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in params_ if p.grad is not None), name
        assert any(p.grad.abs().sum() > 0 for p in params_ if p.grad is not None), name
