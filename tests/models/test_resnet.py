"""In-house ResNets: torchvision parameter names, shapes, pretrained loading and its errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from miles.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    load_pretrained,
    resnet6,
    resnet10,
    resnet18,
    resnet50,
)

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in _BN]


def _torchvision_resnet18_keys() -> list[str]:
    """torchvision's ``resnet18().state_dict()`` keys in order, written out from its structure.

    Stem ``conv1``/``bn1``; four stages of two BasicBlocks (``conv1, bn1, conv2, bn2``); the first
    block of stages 2-4 has ``downsample.0`` (1x1 conv) and ``downsample.1`` (BN); then ``fc``.
    """
    keys = ["conv1.weight", *_bn("bn1")]
    for stage in (1, 2, 3, 4):
        for block in (0, 1):
            p = f"layer{stage}.{block}"
            keys += [f"{p}.conv1.weight", *_bn(f"{p}.bn1"), f"{p}.conv2.weight", *_bn(f"{p}.bn2")]
            if stage > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return [*keys, "fc.weight", "fc.bias"]


def test_resnet18_state_dict_keys_match_torchvision() -> None:
    expected = _torchvision_resnet18_keys()
    assert len(expected) == 122  # torchvision resnet18: 62 parameters + 60 BN buffers
    got = list(resnet18().state_dict())
    assert got == [k for k in expected if not k.startswith("fc.")]  # fc is an Identity here
    for key in (
        "layer2.0.downsample.0.weight",
        "layer4.1.bn2.running_var",
        "layer1.0.conv1.weight",
        "layer3.0.downsample.1.num_batches_tracked",
    ):
        assert key in got
    assert "layer1.0.downsample.0.weight" not in got


def test_resnet50_structure_matches_torchvision() -> None:
    model = resnet50()
    sd = model.state_dict()
    assert len(sd) == 320 - 2  # torchvision resnet50 minus fc.weight / fc.bias
    # torchvision ResNet-50 has 25,557,032 parameters, of which fc holds 2048 * 1000 + 1000.
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 - 2_049_000
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride on the 3x3 (v1.5)
    assert dict(model.named_modules())["layer2.0.conv2"].stride == (2, 2)
    assert sd["layer4.2.bn3.running_var"].shape == (2048,)
    # torchvision ResNet-18: 11,689,512 parameters, fc 512 * 1000 + 1000.
    assert sum(p.numel() for p in resnet18().parameters()) == 11_689_512 - 513_000


@pytest.mark.parametrize(
    ("factory", "out", "size"),
    [(resnet18, 512, 32), (resnet10, 512, 28), (resnet6, 128, 32), (resnet50, 2048, 32)],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_factory_shapes(factory: Callable[..., ResNet], out: int, size: int, channels: int) -> None:
    torch.manual_seed(0)
    model = factory(in_channels=channels)
    assert model.out_features == out
    assert model.conv1.in_channels == channels
    y = model(torch.randn(2, channels, size, size))
    assert y.shape == (2, out)
    assert torch.isfinite(y).all()


def test_resnet6_and_resnet10_definitions() -> None:
    r6 = resnet6()
    assert r6.layers == (1, 1) and r6.block is BasicBlock and r6.stem == "small"
    assert r6.conv1.kernel_size == (3, 3) and r6.conv1.stride == (1, 1)
    assert not hasattr(r6, "layer3")
    main_convs = [n for n, m in r6.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len([n for n in main_convs if "downsample" not in n]) + 1 == 6  # + the original fc
    r10 = resnet10()
    assert r10.layers == (1, 1, 1, 1) and r10.stem == "imagenet"
    convs = [n for n, m in r10.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len([n for n in convs if "downsample" not in n]) + 1 == 10
    assert resnet10(stem="small")(torch.randn(1, 3, 28, 28)).shape == (1, 512)


def test_single_channel_accepts_bhw_and_rejects_wrong_channels() -> None:
    model = resnet6(in_channels=1).eval()
    x = torch.randn(2, 20, 20)
    assert torch.allclose(model(x), model(x.unsqueeze(1)))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(2, 3, 20, 20))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="layers"):
        ResNet(BasicBlock, [])
    with pytest.raises(ValueError, match="layers"):
        ResNet(BasicBlock, [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="stem"):
        ResNet(BasicBlock, [1], stem="cifar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_channels"):
        ResNet(Bottleneck, [1], in_channels=0)
    with pytest.raises(TypeError, match="block"):
        ResNet(torch.nn.Linear, [1])  # type: ignore[arg-type]


def _randomise_bn(model: torch.nn.Module) -> None:
    """Make BN buffers non-default so a round trip really tests that they load."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)


def test_round_trip_with_wrappers_prefix_and_fc(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = resnet18()
    _randomise_bn(src)
    sd = src.state_dict()
    # As a torchvision checkpoint would have it: with a classifier, saved from DataParallel,
    # wrapped under "state_dict", and without num_batches_tracked (old torchvision files).
    full = {f"module.{k}": v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    full["module.fc.weight"] = torch.randn(1000, 512)
    full["module.fc.bias"] = torch.randn(1000)
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": full, "epoch": 3}, path)
    torch.manual_seed(1)
    dst = resnet18(pretrained=path).eval()
    src.eval()
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(src(x), dst(x))
    # {"model": ...} wrapper and a raw state_dict both load too.
    torch.save({"model": sd}, tmp_path / "m.pt")
    assert load_pretrained(resnet18(), tmp_path / "m.pt") == []
    torch.save(sd, tmp_path / "raw.pt")
    assert load_pretrained(resnet18(), str(tmp_path / "raw.pt")) == []


def test_three_to_one_channel_adaptation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = resnet6(in_channels=3).eval()
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    grey = torch.randn(2, 1, 24, 24)
    summed = resnet6(in_channels=1, pretrained=path).eval()
    assert torch.allclose(
        summed.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True)
    )  # a grey image replicated to RGB gives the same features
    assert torch.allclose(summed(grey), rgb(grey.expand(2, 3, 24, 24)), atol=1e-5)
    mean = resnet6(in_channels=1, pretrained=path, adapt_conv1="mean")
    assert torch.allclose(mean.conv1.weight, rgb.conv1.weight.mean(dim=1, keepdim=True))
    with pytest.raises(ValueError, match=r"conv1\.weight has 3 input channels.*adapt_conv1"):
        resnet6(in_channels=1, pretrained=path, adapt_conv1="error")
    with pytest.raises(ValueError, match="only 3 -> 1"):
        resnet6(in_channels=2, pretrained=path)


def _small(layers: list[int], stem: str = "imagenet") -> ResNet:
    return ResNet(BasicBlock, layers, stem=stem, width=8)  # type: ignore[arg-type]


def test_errors_on_missing_corrupt_and_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        resnet6(pretrained=tmp_path / "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match=r"corrupt\.pt.*cannot read"):
        load_pretrained(_small([1]), bad)
    good = tmp_path / "two.pt"
    torch.save(_small([2, 2]).state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"truncated\.pt"):
        load_pretrained(_small([2, 2]), truncated)
    not_sd = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_sd)
    with pytest.raises(ValueError, match="state_dict"):
        load_pretrained(_small([1]), not_sd)
    # Deeper weights into a shallower net: layer*.1.* are unexpected.
    with pytest.raises(ValueError, match=r"unexpected keys.*layer1\.1\.conv1\.weight"):
        load_pretrained(_small([1, 1]), good)
    # Shallower weights into a deeper net: layer*.1.* are missing; non-strict loads the rest.
    one = tmp_path / "one.pt"
    torch.save(_small([1, 1]).state_dict(), one)
    with pytest.raises(ValueError, match=r"missing keys.*layer1\.1\.conv1\.weight"):
        load_pretrained(_small([2, 2]), one)
    skipped = load_pretrained(_small([2, 2]), one, strict=False)
    assert "layer2.1.bn2.running_var" in skipped and "conv1.weight" not in skipped
    # ImageNet-stem weights (7x7 conv1) do not fit the small stem.
    with pytest.raises(ValueError, match=r"shape mismatch.*conv1\.weight"):
        load_pretrained(_small([1, 1], stem="small"), one)
    with pytest.raises(ValueError, match="adapt_conv1"):
        load_pretrained(_small([1, 1]), one, adapt_conv1="avg")  # type: ignore[arg-type]
