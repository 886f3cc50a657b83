"""In-house ResNets (torch only) with torchvision's parameter names, used as the paper's encoders.

torchvision has no build for the torch this project pins, yet users hold torchvision-format
checkpoints (ImageNet weights, their own fine-tuned encoders). These modules therefore reproduce
torchvision's module tree *exactly* (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, blocks
``layerK.i.conv1/bn1/conv2/bn2[/conv3/bn3]``, shortcuts ``layerK.0.downsample.0`` (1x1 conv) and
``.1`` (BN)), so a torchvision ``state_dict`` loads with :func:`load_pretrained`.

Differences from torchvision, all deliberate:

* ``forward`` returns the globally average-pooled features ``(B, out_features)``; the
  classifier is not applied. ``fc`` exists as ``nn.Identity`` (no parameters) so code that reads
  ``model.fc`` keeps working, and :func:`load_pretrained` drops ``fc.*`` keys from checkpoints by
  default: the joint-fusion model adds its own heads.
* ``in_channels`` sets ``conv1``'s input channels (1 for spectrograms and MNIST digits). A
  3-channel pretrained ``conv1`` is adapted to 1 channel by summing over RGB (``adapt_conv1="sum"``,
  the default: a grey image replicated to RGB gives the same activations) or averaging
  (``"mean"``), or rejected (``"error"``).
* ``stem="small"`` replaces the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max pool, a 4x
  reduction meant for 224x224 inputs) by a 3x3 stride-1 conv and no pool, for 28x28 .. 96x96 inputs.
  Its ``conv1.weight`` is 3x3, so ImageNet weights do not fit it (a shape-mismatch error names it).
* Fewer than four stages are allowed (``layers`` of length 1..4); stage ``k`` has
  ``width * 2**(k-1)`` channels, as in torchvision.

Depth names count weighted layers (convolutions on the main path plus the ``fc`` the original
network ends with; shortcut 1x1 convs are not counted, as in He et al. 2016):

* :func:`resnet18` / :func:`resnet50`: torchvision's definitions (BasicBlock [2,2,2,2] /
  Bottleneck [3,4,6,3]), ImageNet stem. CREMA-D and MM-IMDb encoders.
* :func:`resnet10`: BasicBlock [1,1,1,1], ImageNet stem (1 + 4x2 + 1 = 10), the common definition
  (the 2D counterpart of MedicalNet's 3D ResNet-10, Chen et al. 2019). The paper does not define it
  for S-MNIST's 28x28 digits; with the ImageNet stem a 28x28 input reaches layer4 at 1x1, which
  works (adaptive pooling) but wastes resolution, hence the ``stem`` option (default ``"imagenet"``
  so torchvision-format ResNet-10 checkpoints load).
* :func:`resnet6`: our definition, since the paper does not give one: a small stem (3x3 conv,
  stride 1) and two BasicBlock stages of one block each at 64 and 128 channels (1 + 2x2 + 1 = 6),
  ``out_features`` 128. Sized for LUMA's 96x96 inputs; stage 2 downsamples to 48x48. Keeping full
  resolution costs ~1.2 GMACs per 96x96 image (two thirds of ResNet-18 at 224x224);
  ``stem="imagenet"`` cuts that ~16x but then no longer matches this definition.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from miles.validation import check_choice, check_positive_int

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "load_pretrained",
    "resnet6",
    "resnet10",
    "resnet18",
    "resnet50",
]

Stem = Literal["imagenet", "small"]
Adapt = Literal["sum", "mean", "error"]
ADAPT_MODES = ("sum", "mean", "error")


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (torchvision's ``BasicBlock``, same names)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, "ResNet v1.5" as torchvision) -> 1x1 convs with a residual."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """A ResNet feature extractor: stem, 1..4 residual stages, global average pool.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, 1 to 4 stages (``[2, 2, 2, 2]`` is ResNet-18).
        in_channels: input channels of ``conv1`` (3 for RGB, 1 for spectrograms / digits).
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool) or ``"small"`` (3x3/1 conv, no pool).
        width: channels of the first stage (64 in torchvision); stage k has ``width * 2**(k-1)``.
        zero_init_residual: zero the last BN of each block (torchvision's option; off by default).

    ``forward(x)`` takes ``(B, in_channels, H, W)`` (or ``(B, H, W)`` when ``in_channels == 1``)
    and returns ``(B, out_features)``.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        in_channels: int = 3,
        stem: Stem = "imagenet",
        width: int = 64,
        *,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        layers = list(layers)
        if not 1 <= len(layers) <= 4 or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers
        ):
            raise ValueError(
                f"layers must be 1 to 4 positive ints (blocks per stage), got {layers}"
            )
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        check_choice("stem", stem, ("imagenet", "small"))
        self.block = block
        self.layers = tuple(layers)
        self.in_channels = in_channels
        self.stem = stem
        self.width = width
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(
                in_channels, width, kernel_size=7, stride=2, padding=3, bias=False
            )
        else:
            self.conv1 = nn.Conv2d(
                in_channels, width, kernel_size=3, stride=1, padding=1, bias=False
            )
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            if stem == "imagenet"
            else nn.Identity()
        )
        for i, n in enumerate(layers):
            stage = self._make_layer(block, width * 2**i, n, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.out_features = width * 2 ** (len(layers) - 1) * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def stages(self) -> list[nn.Module]:
        """The residual stages in order (``layer1`` .. ``layerN``)."""
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.layers))]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(
    block: Block,
    layers: Sequence[int],
    in_channels: int,
    pretrained: str | os.PathLike[str] | None,
    stem: Stem,
    width: int,
    adapt_conv1: Adapt,
) -> ResNet:
    model = ResNet(block, layers, in_channels=in_channels, stem=stem, width=width)
    if pretrained is not None:
        load_pretrained(model, pretrained, adapt_conv1=adapt_conv1)
    return model


def resnet18(
    in_channels: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    stem: Stem = "imagenet",
    adapt_conv1: Adapt = "sum",
) -> ResNet:
    """ResNet-18 (BasicBlock [2, 2, 2, 2]), ``out_features`` 512; weights from a local file."""
    return _build(BasicBlock, [2, 2, 2, 2], in_channels, pretrained, stem, 64, adapt_conv1)


def resnet50(
    in_channels: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    stem: Stem = "imagenet",
    adapt_conv1: Adapt = "sum",
) -> ResNet:
    """ResNet-50 (Bottleneck [3, 4, 6, 3]), ``out_features`` 2048; weights from a local file."""
    return _build(Bottleneck, [3, 4, 6, 3], in_channels, pretrained, stem, 64, adapt_conv1)


def resnet10(
    in_channels: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    stem: Stem = "imagenet",
    adapt_conv1: Adapt = "sum",
) -> ResNet:
    """ResNet-10 (BasicBlock [1, 1, 1, 1]: conv1 + 4 blocks x 2 convs + fc = 10), 512 features."""
    return _build(BasicBlock, [1, 1, 1, 1], in_channels, pretrained, stem, 64, adapt_conv1)


def resnet6(
    in_channels: int = 3,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    stem: Stem = "small",
    adapt_conv1: Adapt = "sum",
) -> ResNet:
    """ResNet-6, our definition: small stem + BasicBlock [1, 1] at 64, 128 channels.

    conv1 + 2 blocks x 2 convs + fc = 6 weighted layers; ``out_features`` 128. The paper names a
    ResNet-6 for LUMA's 96x96 inputs without defining it; see the module docstring.
    """
    return _build(BasicBlock, [1, 1], in_channels, pretrained, stem, 64, adapt_conv1)


def _extract_state_dict(obj: object, path: str) -> dict[str, Tensor]:
    """Accept a raw state_dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{path}: expected a state_dict (a non-empty mapping of names to tensors), or one "
            f"under 'state_dict' or 'model'; got {type(obj).__name__}"
        )
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise ValueError(
                f"{path}: entry {k!r} is not a (str name -> tensor) pair ({type(v).__name__})"
            )
        while k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v
    return out


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    adapt_conv1: Adapt = "sum",
    drop_prefixes: Sequence[str] = ("fc.",),
) -> list[str]:
    """Load a local torchvision-format checkpoint into ``model``; never downloads.

    The file is read with ``torch.load(weights_only=True)`` (no pickled code runs). A raw
    ``state_dict`` or one under ``"state_dict"`` / ``"model"`` is accepted; ``module.`` prefixes
    (DataParallel / DDP) are stripped; keys starting with ``drop_prefixes`` (the classifier ``fc.``
    by default, which these feature extractors do not have) are ignored. ``num_batches_tracked``
    buffers absent from the file are tolerated (old torchvision checkpoints lack them).

    A 3-channel ``conv1.weight`` loaded into a model with ``in_channels == 1`` is summed
    (``adapt_conv1="sum"``) or averaged (``"mean"``) over its input channels, or refused
    (``"error"``). Any other shape mismatch is an error naming the key.

    With ``strict`` (default) missing or unexpected keys raise a ``ValueError`` that lists them;
    otherwise matching keys load and the skipped ones are returned. Returns the model keys that were
    not loaded (when strict, at most the tolerated ``num_batches_tracked`` buffers).
    """
    check_choice("adapt_conv1", adapt_conv1, ADAPT_MODES)
    spath = os.fspath(path)
    if not os.path.isfile(spath):
        raise FileNotFoundError(f"pretrained weights not found: {spath} (give a local file path)")
    try:
        raw = torch.load(spath, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a torch file
        raise ValueError(f"{spath}: cannot read as a torch checkpoint ({exc})") from exc
    state = _extract_state_dict(raw, spath)
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in drop_prefixes)}

    own = model.state_dict()
    conv1 = state.get("conv1.weight")
    target = own.get("conv1.weight")
    if (
        conv1 is not None
        and target is not None
        and conv1.dim() == 4
        and conv1.shape[1] != target.shape[1]
        and conv1.shape[0] == target.shape[0]
        and conv1.shape[2:] == target.shape[2:]
    ):
        if target.shape[1] == 1 and adapt_conv1 != "error":
            reduced = conv1.sum(dim=1, keepdim=True)
            state["conv1.weight"] = reduced if adapt_conv1 == "sum" else reduced / conv1.shape[1]
        else:
            raise ValueError(
                f"{spath}: conv1.weight has {conv1.shape[1]} input channels, the model has "
                f"{target.shape[1]}"
                + (" (adapt_conv1='error')" if target.shape[1] == 1 else "; only 3 -> 1 adapts")
            )

    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(f"{spath}: shape mismatch for " + "; ".join(mismatched))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        raise ValueError(f"{spath}: checkpoint does not match the model: " + "; ".join(parts))
    loadable = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(loadable, strict=False)
    return [k for k in own if k not in loadable]
