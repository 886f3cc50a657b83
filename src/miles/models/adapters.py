"""A Hugging Face tower (text, vision or audio) as a fusion encoder: pooled output, CLS or mean.

:class:`~miles.models.fusion.JointFusionModel` needs each encoder to map its input to
``(batch, out_features)`` and to declare ``out_features``. HF models return a ``ModelOutput`` with
``last_hidden_state`` (and often ``pooler_output``) and take keyword inputs (``input_ids``,
``pixel_values``, ``input_values``). :class:`HFEncoder` bridges the two, reading the latent size
from the model's config, so no ``out_features`` has to be set by hand. It needs torch only: it
relies on the outputs' field names, not on ``transformers`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["POOLINGS", "HFEncoder"]

#: ``"pooler"``: the model's ``pooler_output`` (BERT's tanh-projected CLS, CLIP's post-layernorm
#: CLS, a ResNet's global pool); ``"cls"``: the first token of ``last_hidden_state``; ``"mean"``:
#: the mean of ``last_hidden_state`` over the positions the attention mask keeps.
POOLINGS = ("pooler", "cls", "mean")

#: Config attributes that hold a transformer's hidden size, in the order they are tried.
_WIDTH_ATTRIBUTES = ("hidden_size", "d_model", "dim", "embed_dim")


def _config_width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"{type(model).__name__} has no .config to read its hidden size from; pass "
            "out_features="
        )
    for attribute in _WIDTH_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    sizes = getattr(config, "hidden_sizes", None)  # convolutional backbones (ResNet, ConvNeXt)
    if isinstance(sizes, (list, tuple)) and sizes and isinstance(sizes[-1], int):
        return int(sizes[-1])
    raise TypeError(
        f"cannot find the hidden size of {type(config).__name__} (none of "
        f"{[*_WIDTH_ATTRIBUTES, 'hidden_sizes']}); pass out_features="
    )


def _field(output: Any, name: str) -> Any:
    """A ``ModelOutput`` field by name (attribute or key), or None."""
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


class HFEncoder(nn.Module):
    """Wrap a Hugging Face model (``BertModel``, ``CLIPVisionModel``, ``Wav2Vec2Model``, ...).

    Args:
        model: the tower; its ``config`` gives the latent size (``hidden_size``, ``d_model``,
            ``dim``, ``embed_dim`` or ``hidden_sizes[-1]``) unless ``out_features`` is given.
        pooling: one of :data:`POOLINGS`.
        out_features: the pooled size, when the config does not tell it.
        latent_dim: add a ``Linear`` to this size (e.g. equal sizes for sum fusion).
        input_name: the keyword a tensor input is passed as (default: the model's
            ``main_input_name``, e.g. ``input_ids``, ``pixel_values``, ``input_values``).

    ``forward(x, lengths=None)``: ``x`` is a tensor (passed as ``input_name``) or a dict of the
    model's keyword inputs (``{"input_ids": ..., "attention_mask": ...}``). ``lengths`` (as
    :class:`JointFusionModel` passes for variable-length inputs) builds the attention mask of a
    padded tensor input. The tower's parameters live under ``model.``.
    """

    def __init__(
        self,
        model: nn.Module,
        pooling: str = "pooler",
        *,
        out_features: int | None = None,
        latent_dim: int | None = None,
        input_name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        for label, size in (("out_features", out_features), ("latent_dim", latent_dim)):
            if size is not None and (
                isinstance(size, bool) or not isinstance(size, int) or size < 1
            ):
                raise ValueError(f"{label} must be a positive int or None, got {size!r}")
        self.model = model
        self.pooling = pooling
        self.width = out_features if out_features is not None else _config_width(model)
        self.input_name = input_name or getattr(model, "main_input_name", None) or "input_ids"
        size = self.width if latent_dim is None else latent_dim
        self.proj: nn.Module = nn.Identity() if size == self.width else nn.Linear(self.width, size)
        self.out_features = size

    def _inputs(self, x: Tensor | Mapping[str, Tensor], lengths: Tensor | None) -> dict[str, Any]:
        if isinstance(x, Mapping):
            kwargs = dict(x)
        elif isinstance(x, Tensor):
            kwargs = {self.input_name: x}
        else:
            raise TypeError(f"input must be a tensor or a dict of tensors, got {type(x).__name__}")
        if lengths is not None and "attention_mask" not in kwargs:
            steps = kwargs[self.input_name].shape[1]
            positions = torch.arange(steps, device=lengths.device)
            kwargs["attention_mask"] = (positions[None, :] < lengths[:, None]).long()
        return kwargs

    def _mean(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            return hidden.mean(dim=1)
        if mask.shape[1] != hidden.shape[1]:
            # audio towers mask samples, not frames: map the mask through the feature extractor
            to_frames = getattr(self.model, "_get_feature_vector_attention_mask", None)
            if to_frames is None:
                raise ValueError(
                    f"attention mask has {mask.shape[1]} positions but the hidden states have "
                    f"{hidden.shape[1]}; cannot mean-pool ({type(self.model).__name__})"
                )
            mask = to_frames(hidden.shape[1], mask)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def forward(self, x: Tensor | Mapping[str, Tensor], lengths: Tensor | None = None) -> Tensor:
        kwargs = self._inputs(x, lengths)
        output = self.model(**kwargs)
        if self.pooling == "pooler":
            pooled = _field(output, "pooler_output")
            if pooled is None:
                raise ValueError(
                    f"{type(self.model).__name__} returns no pooler_output; use pooling='cls' or "
                    "pooling='mean'"
                )
            pooled = pooled.flatten(1)  # (B, C, 1, 1) for convolutional backbones
        else:
            hidden = _field(output, "last_hidden_state")
            if hidden is None or hidden.ndim != 3:
                raise ValueError(
                    f"{type(self.model).__name__} returns no (batch, tokens, features) "
                    f"last_hidden_state for pooling={self.pooling!r}; use pooling='pooler'"
                )
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                pooled = self._mean(hidden, kwargs.get("attention_mask"))
        if pooled.shape[-1] != self.width:
            raise ValueError(
                f"the pooled output has {pooled.shape[-1]} features, not the {self.width} read "
                "from the config; pass out_features="
            )
        out: Tensor = self.proj(pooled)
        return out
