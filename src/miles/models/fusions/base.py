"""The fusion interface and its registry: how latents become the fused prediction.

A :class:`Fusion` owns the fused linear head. It maps the latents ``{modality: (batch, d_m)}`` to
the fused logits, in two steps a subclass controls: :meth:`Fusion.fuse` builds the head's input
and :meth:`Fusion.fused_features` says how wide it is. Fusions whose logits are a sum of one term
per modality also define :meth:`Fusion.modality_logits`, each modality's additive share, which
OGM's scores and the fused-head slice readout read. A new fusion is one file: subclass, implement
those methods, decorate with ``@register_fusion("name")``; ``JointFusionModel(..., fusion="name")``
then builds it.

Some methods predict with something other than one linear head over the fused latents: a head that
every modality shares, read out per modality and combined (MLA's uncertainty-weighted sum,
ReconBoost's boosted sum), or one branch head per modality averaged (Greedy's MMTM model). Such a
fusion subclasses :class:`PerModalityFusion`: it computes each modality's own logits, which the
model then reports as its unimodal outputs in place of its auxiliary heads, and combines them into
the fused logits. A strategy installs it with
:meth:`~miles.models.fusion.JointFusionModel.set_fusion` in ``configure_model``, so training,
evaluation and every table read the method's own readouts with no other change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from miles.registry import Registry
from miles.validation import check_mapping, check_positive_int

__all__ = [
    "Fusion",
    "PerModalityFusion",
    "available_fusions",
    "build_fusion",
    "fusion_class",
    "register_fusion",
]


class Fusion(nn.Module):
    """Latents -> fused logits through one linear head (``self.head``).

    Args:
        latent_sizes: ``{modality: latent size}`` in the order the head reads the modalities.
        num_classes: outputs of the head.

    The head is created here, so building a fusion draws from the global RNG exactly as
    ``nn.Linear(fused_features, num_classes)`` does (the model builds it after the unimodal
    heads: weights are reproducible across versions for a given seed).
    """

    #: registered name (set by :func:`register_fusion`)
    name: ClassVar[str] = ""
    #: the fusion computes each modality's own logits (:meth:`unimodal_logits`); the model reports
    #: them in place of its auxiliary heads (see :class:`PerModalityFusion`)
    owns_unimodal: ClassVar[bool] = False
    #: the fusion predicts through one linear head, ``self.head`` (False: e.g. branch heads
    #: averaged; ``JointFusionModel.fused_head`` then raises)
    has_fused_head: ClassVar[bool] = True

    head: nn.Linear

    def __init__(self, latent_sizes: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        self.latent_sizes = check_mapping("latent_sizes", latent_sizes, check_positive_int)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if self.has_fused_head:
            self.head = nn.Linear(self.fused_features(self.latent_sizes), self.num_classes)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in the order the head reads them."""
        return tuple(self.latent_sizes)

    # -- what a subclass defines ------------------------------------------------------------------
    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        """Width of the head's input for these latent sizes (``ValueError`` if unsupported)."""
        raise NotImplementedError(f"{type(self).__name__} must define fused_features")

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        """The head's input ``(batch, fused_features)`` from the latents."""
        raise NotImplementedError(f"{type(self).__name__} must define fuse")

    def modality_logits(self, latents: Mapping[str, Tensor], modality: str) -> Tensor:
        """``modality``'s additive share of the fused logits (the shares add up to them).

        Only defined when the fused logits are a sum of one term per modality; the head's bias is
        split evenly between the modalities (as OGM's authors do).
        """
        raise NotImplementedError(
            f"fusion {self.name or type(self).__name__!r} is not additive: its fused logits do not "
            "split into one share per modality, which OGM and the fused-head slice readout need; "
            "use an additive fusion such as 'concat' or 'sum'"
        )

    def unimodal_logits(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's own logits, for fusions that compute them (``owns_unimodal``)."""
        raise NotImplementedError(
            f"fusion {self.name or type(self).__name__!r} has no per-modality logits of its own; "
            "the model's auxiliary heads give them"
        )

    def forward_with_unimodal(
        self, latents: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The fused logits and :meth:`unimodal_logits`, computed once (``owns_unimodal``)."""
        return self(latents), self.unimodal_logits(latents)

    # -- shared ----------------------------------------------------------------------------------
    def forward(self, latents: Mapping[str, Tensor]) -> Tensor:
        self._check_latents(latents)
        out: Tensor = self.head(self.fuse(latents))
        return out

    def _check_latents(self, latents: Mapping[str, Tensor]) -> None:
        missing = [m for m in self.modalities if m not in latents]
        if missing:
            raise ValueError(
                f"latents lack modalities {missing}; fusion reads {list(self.modalities)}"
            )

    def _linear_share(self, latent: Tensor, weight: Tensor) -> Tensor:
        """``latent W^T + b / N``: one modality's term of an additive linear fusion."""
        out = latent @ weight.T
        bias = self.head.bias
        return out + bias / len(self.latent_sizes) if bias is not None else out

    def _check_modality(self, modality: str) -> None:
        if modality not in self.latent_sizes:
            raise ValueError(f"unknown modality {modality!r}; fusion reads {list(self.modalities)}")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, latent_sizes={self.latent_sizes}"


class PerModalityFusion(Fusion):
    """A fusion that predicts from each modality's own logits, combined (``owns_unimodal``).

    Subclasses define :meth:`unimodal_logits` (e.g. a head shared by every modality, read on each
    latent) and :meth:`combine` (how those logits make the fused prediction). The model reports
    the per-modality logits as its unimodal outputs, so the heads column of every table is the
    method's own unimodal readout, and its auxiliary heads are frozen, unused.
    """

    owns_unimodal = True

    def combine(self, logits: Mapping[str, Tensor]) -> Tensor:
        """The fused logits from every modality's logits."""
        raise NotImplementedError(f"{type(self).__name__} must define combine")

    def forward_with_unimodal(
        self, latents: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_latents(latents)
        logits = self.unimodal_logits(latents)
        return self.combine(logits), logits

    def forward(self, latents: Mapping[str, Tensor]) -> Tensor:
        return self.forward_with_unimodal(latents)[0]


F = TypeVar("F", bound=type[Fusion])
_FUSIONS: Registry[type[Fusion]] = Registry("fusion")


def register_fusion(name: str) -> Callable[[F], F]:
    """Class decorator: make a :class:`Fusion` buildable by ``name`` (sets ``cls.name``)."""
    add = _FUSIONS.register(name)

    def decorate(cls: F) -> F:
        if not (isinstance(cls, type) and issubclass(cls, Fusion)):
            raise TypeError(f"register_fusion({name!r}) needs a Fusion subclass, got {cls!r}")
        add(cls)
        cls.name = name
        return cls

    return decorate


def fusion_class(name: str) -> type[Fusion]:
    """The registered class; an unknown name lists the available ones."""
    return _FUSIONS.get(name)


def build_fusion(
    name: str, latent_sizes: Mapping[str, int], num_classes: int, **params: Any
) -> Fusion:
    """Instantiate the fusion registered as ``name`` for these latents and classes."""
    return fusion_class(name)(latent_sizes, num_classes, **params)


def available_fusions() -> list[str]:
    """Registered fusion names, sorted."""
    return _FUSIONS.names()
