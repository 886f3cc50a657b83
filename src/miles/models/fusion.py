"""Joint-fusion model: an encoder and an auxiliary linear head per modality, one fused linear head.

The auxiliary heads are what MILES reads (``u_m`` compares the fused head with the other heads), so
they are part of the model rather than bolted on by a training loop. They cost nothing at inference:
``forward`` returns them, and a deployment can simply ignore them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from miles.models.fusions import Fusion, available_fusions, build_fusion
from miles.validation import check_bool, check_positive_int

#: names registered when this module was imported; kept for compatibility, prefer
#: :func:`miles.models.fusions.available_fusions` (it also lists fusions registered later)
FUSIONS = tuple(available_fusions())


@dataclass
class FusionOutput:
    """What a forward pass returns: fused logits, per-modality head logits and the latents."""

    fused: Tensor
    unimodal: dict[str, Tensor]
    latents: dict[str, Tensor]


def encoder_out_features(name: str, encoder: nn.Module) -> int:
    """Read the latent size an encoder declares (``out_features``), with a clear error if absent."""
    size = getattr(encoder, "out_features", None)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise TypeError(
            f"encoder {name!r} ({type(encoder).__name__}) must declare a positive int attribute "
            f"'out_features' (its latent size), got {size!r}"
        )
    return size


def check_disjoint_parameters(modules: Mapping[str, Iterable[nn.Parameter]]) -> None:
    """Raise if one parameter belongs to two named parts.

    Shared or tied weights across modalities would let one modality's learning rate leak into the
    other's, which silently breaks per-modality schedules such as MILES.
    """
    owner: dict[int, str] = {}
    for name, params in modules.items():
        for p in params:
            seen = owner.get(id(p))
            if seen is not None and seen != name:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is shared (or tied) between {seen!r} "
                    "and "
                    f"{name!r}; per-modality learning rates need disjoint parameters"
                )
            owner[id(p)] = name


class JointFusionModel(nn.Module):
    """Encoders -> latents -> fusion module (owns the fused linear head), plus unimodal heads.

    Args:
        encoders: ``{modality: module}``; each module declares ``out_features`` and maps its input
            (and, for variable-length inputs, a ``lengths`` tensor) to ``(batch, out_features)``.
        num_classes: number of outputs of every head.
        fusion: a registered fusion name (``"concat"``: latents concatenated in modality order;
            ``"sum"``: equal sizes, added; see :func:`miles.models.fusions.available_fusions`) or a
            :class:`~miles.models.fusions.Fusion` built for these latent sizes and classes.
        detach_unimodal_heads: train the unimodal heads on detached latents, so they can be
            reported without their losses touching the encoders (vanilla joint training).

    ``state_dict()`` holds tensors only (safetensors can store it): which modalities are frozen is
    the boolean buffer ``frozen_mask``, one entry per modality.
    """

    frozen_mask: Tensor

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_classes: int,
        fusion: str | Fusion = "concat",
        *,
        detach_unimodal_heads: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(encoders, Mapping) or len(encoders) == 0:
            raise ValueError("encoders must be a non-empty mapping {modality name: nn.Module}")
        check_positive_int("num_classes", num_classes)
        check_bool("detach_unimodal_heads", detach_unimodal_heads)
        if not isinstance(fusion, (str, Fusion)):
            raise TypeError(
                f"fusion must be a registered name {available_fusions()} or a Fusion module, got "
                f"{type(fusion).__name__}"
            )
        sizes: dict[str, int] = {}
        for name, enc in encoders.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(
                    f"modality names must be non-empty strings without '.', got {name!r}"
                )
            if not isinstance(enc, nn.Module):
                raise TypeError(f"encoder {name!r} must be an nn.Module, got {type(enc).__name__}")
            sizes[name] = encoder_out_features(name, enc)
        check_disjoint_parameters({n: list(e.parameters()) for n, e in encoders.items()})
        self.num_classes = num_classes
        self.detach_unimodal_heads = detach_unimodal_heads
        self.latent_sizes = dict(sizes)
        self.encoders = nn.ModuleDict(dict(encoders))
        # the unimodal heads first, then the fused head: the order parameters are created (and
        # the global RNG is drawn) in, which seeded results depend on
        self.heads = nn.ModuleDict({n: nn.Linear(d, num_classes) for n, d in sizes.items()})
        self.register_buffer("frozen_mask", torch.zeros(len(sizes), dtype=torch.bool))
        self._frozen: set[str] = set()
        self.fusion: Fusion
        self.set_fusion(fusion)
        self.register_load_state_dict_post_hook(_apply_loaded_freezes)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in the order the fused head sees them."""
        return tuple(self.encoders.keys())

    @property
    def fused_head(self) -> nn.Linear:
        """The fused linear head (owned by ``self.fusion``); ``NotImplementedError`` for a fusion
        without one (e.g. branch heads averaged)."""
        if not self.fusion.has_fused_head:
            raise NotImplementedError(
                f"fusion {self.fusion.name or type(self.fusion).__name__!r} has no single fused "
                "linear head"
            )
        return self.fusion.head

    def set_fusion(self, fusion: str | Fusion, **params: Any) -> None:
        """Use ``fusion`` (a registered name, built with ``params``, or a built
        :class:`~miles.models.fusions.Fusion`) from now on.

        Balancing methods whose prediction is not one linear head call it in ``configure_model``
        (MLA's uncertainty-weighted shared head, ReconBoost's boosted sum, Greedy's MMTM). When the
        fusion computes each modality's own logits (``owns_unimodal``) the model reports them as
        its unimodal outputs and freezes its auxiliary heads, which are then unused.
        """
        if isinstance(fusion, str):
            fusion = build_fusion(fusion, self.latent_sizes, self.num_classes, **params)
        elif not isinstance(fusion, Fusion):
            raise TypeError(
                f"fusion must be a registered name {available_fusions()} or a Fusion module, got "
                f"{type(fusion).__name__}"
            )
        elif params:
            raise TypeError(f"parameters {sorted(params)} apply to a fusion built by name only")
        else:
            _check_fusion_fits(fusion, self.latent_sizes, self.num_classes)
        device = next(self.heads.parameters()).device
        self.fusion = fusion.to(device)
        for name, head in self.heads.items():
            if name not in self._frozen:
                head.requires_grad_(not fusion.owns_unimodal)

    def encode(
        self, inputs: Mapping[str, Tensor], lengths: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Run every encoder; ``lengths[m]`` is passed to encoder ``m`` when given."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ValueError(
                f"inputs lack modalities {missing}; model expects {list(self.modalities)}"
            )
        lengths = lengths or {}
        latents: dict[str, Tensor] = {}
        for name, enc in self.encoders.items():
            if name in lengths:
                latents[name] = enc(inputs[name], lengths[name])
            else:
                latents[name] = enc(inputs[name])
        return latents

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        """The fused head's input, as the fusion builds it (e.g. concatenated latents)."""
        return self.fusion.fuse(latents)

    def fused_logits(self, latents: Mapping[str, Tensor]) -> Tensor:
        """The multimodal prediction from (possibly edited) latents, e.g. for ablation estimates."""
        out: Tensor = self.fusion(latents)
        return out

    def unimodal_logits(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each auxiliary head on its own modality's latent, or the fusion's own per-modality
        logits when it computes them (``fusion.owns_unimodal``)."""
        if self.fusion.owns_unimodal:
            return self.fusion.unimodal_logits(latents)
        out = {}
        for name, head in self.heads.items():
            z = latents[name].detach() if self.detach_unimodal_heads else latents[name]
            out[name] = head(z)
        return out

    def forward(
        self, inputs: Mapping[str, Tensor], lengths: Mapping[str, Tensor] | None = None
    ) -> FusionOutput:
        latents = self.encode(inputs, lengths)
        if self.fusion.owns_unimodal:
            fused, unimodal = self.fusion.forward_with_unimodal(latents)
            return FusionOutput(fused, unimodal, latents)
        return FusionOutput(self.fused_logits(latents), self.unimodal_logits(latents), latents)

    # -- freezing (used by strategies such as modality-specific early stopping) --------------------
    @property
    def frozen_modalities(self) -> frozenset[str]:
        return frozenset(self._frozen)

    def freeze(self, modality: str, *, include_head: bool = True) -> None:
        """Stop updating an encoder: no gradients and BatchNorm statistics fixed (eval mode)."""
        if modality not in self.encoders:
            raise ValueError(f"unknown modality {modality!r}; model has {list(self.modalities)}")
        self._frozen.add(modality)
        with torch.no_grad():
            self.frozen_mask[self.modalities.index(modality)] = True
        modules: list[nn.Module] = [self.encoders[modality]]
        if include_head:
            modules.append(self.heads[modality])
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> JointFusionModel:
        """``nn.Module.train``, but frozen encoders stay in eval mode (BatchNorm stats fixed)."""
        super().train(mode)
        for name in self._frozen:
            self.encoders[name].eval()
            self.heads[name].eval()
        return self


def _check_fusion_fits(fusion: Fusion, sizes: Mapping[str, int], num_classes: int) -> None:
    """A fusion built by the caller must read these latents, in this order, for these classes."""
    if list(fusion.latent_sizes.items()) != list(sizes.items()):
        raise ValueError(
            f"the fusion was built for latents {fusion.latent_sizes}, the encoders give "
            f"{dict(sizes)}"
        )
    if fusion.num_classes != num_classes:
        raise ValueError(f"the fusion has {fusion.num_classes} classes, the model {num_classes}")


def _apply_loaded_freezes(model: nn.Module, incompatible: Any) -> None:
    """After ``load_state_dict``: freeze what the loaded ``frozen_mask`` marks.

    Freezing is one-way: a modality frozen before the load stays frozen (its mask entry is set
    back), as parameters without gradients cannot be told from ones the user froze on purpose.
    """
    assert isinstance(model, JointFusionModel)
    flags = model.frozen_mask.tolist()
    for name, flag in zip(model.modalities, flags, strict=True):
        if flag and name not in model._frozen:
            model.freeze(name)
    with torch.no_grad():
        for name in model._frozen:
            model.frozen_mask[model.modalities.index(name)] = True
