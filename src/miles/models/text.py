"""BERT text encoder for the joint-fusion model (MM-IMDb's plot encoder in the paper).

The fusion model hands every encoder exactly one tensor per modality, so a tokenized text travels
as one integer tensor ``(B, 2, L)``: row 0 holds the token ids, row 1 the attention mask (1 for a
real token, 0 for padding), as written by ``miles prepare mmimdb``. :class:`BertTextEncoder`
splits it again.

Weights come only from a local folder (``AutoModel.from_pretrained(path, local_files_only=True)``,
e.g. a copy of ``bert-base-uncased``), never from the network; or the model is built randomly
initialised from a ``BertConfig`` dict (tests, from-scratch runs). ``transformers`` is imported
lazily so ``import miles`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from miles.validation import check_choice, check_positive_int

__all__ = ["POOLINGS", "BertTextEncoder"]

POOLINGS = ("cls", "mean", "pooler")


class BertTextEncoder(nn.Module):
    """BERT over ``(B, 2, L)`` ids+mask, pooled to ``(B, out_features)``.

    Args:
        path: local folder of a Hugging Face BERT checkpoint (``config.json`` + weights). Exactly
            one of ``path`` and ``config`` must be given.
        config: keyword arguments of ``transformers.BertConfig`` for a randomly initialised model;
            ``{}`` gives the BERT-base architecture (768 hidden, 12 layers, 12 heads, 30,522 words).
        pooling: ``"cls"`` (last-layer hidden state of the first token, ``[CLS]``; default),
            ``"mean"`` (mean of the last-layer states over real tokens only), or ``"pooler"``
            (BERT's pre-trained ``tanh(dense([CLS]))`` pooler, as
            ``BertForSequenceClassification``). For ``cls`` and ``mean`` the pooler is dropped, so
            it holds no parameters without grads.
        freeze: keep BERT's weights fixed (``requires_grad=False``) and in eval mode (no dropout);
            the optional projection still trains.
        out_features: project the pooled state to this size with a linear layer (needed for sum
            fusion with another encoder of a different width); ``None`` or the hidden size keeps
            the hidden state as is.
        trim_padding: run BERT only up to the longest real sequence of the batch. The output is the
            same (padding is masked out of attention and the positions are absolute) and a batch
            of short plots costs far less than ``L = 512``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        pooling: str = "cls",
        freeze: bool = False,
        out_features: int | None = None,
        trim_padding: bool = True,
    ) -> None:
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        if (path is None) == (config is None):
            raise ValueError(
                "give exactly one of path (a local BERT checkpoint folder) and config "
                "(BertConfig keyword arguments for a randomly initialised model)"
            )
        if out_features is not None:
            check_positive_int("out_features", out_features)
        from transformers import AutoModel, BertConfig, BertModel

        self.bert: Any  # a transformers BertModel (typed loosely: transformers is optional)
        if path is not None:
            folder = os.fspath(path)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"BERT checkpoint folder {folder} does not exist (give a local folder holding "
                    "config.json and the weights, e.g. a copy of bert-base-uncased)"
                )
            try:
                self.bert = AutoModel.from_pretrained(folder, local_files_only=True)
            except Exception as exc:  # transformers raises OSError/ValueError/KeyError variants
                raise ValueError(f"{folder}: cannot load a BERT checkpoint ({exc})") from exc
            self.source = folder
        else:
            assert config is not None
            try:
                bert_config = BertConfig(**dict(config))
            except TypeError as exc:
                raise ValueError(f"bad BertConfig arguments {dict(config)}: {exc}") from exc
            self.bert = BertModel(bert_config, add_pooling_layer=pooling == "pooler")
            self.source = "random-init"
        if pooling == "pooler" and getattr(self.bert, "pooler", None) is None:
            raise ValueError("pooling='pooler' needs a BERT model with a pooling layer")
        if pooling != "pooler" and getattr(self.bert, "pooler", None) is not None:
            self.bert.pooler = None  # unused: keep it out of the optimizer and of DDP's checks
        self.hidden_size = int(self.bert.config.hidden_size)
        self.vocab_size = int(self.bert.config.vocab_size)
        self.max_positions = int(getattr(self.bert.config, "max_position_embeddings", 0)) or None
        self.pooling = pooling
        self.frozen = bool(freeze)
        self.trim_padding = bool(trim_padding)
        if self.frozen:
            for p in self.bert.parameters():
                p.requires_grad_(False)
            self.bert.eval()
        self.proj: nn.Module = (
            nn.Linear(self.hidden_size, out_features)
            if out_features is not None and out_features != self.hidden_size
            else nn.Identity()
        )
        self.out_features = out_features if out_features is not None else self.hidden_size

    def train(self, mode: bool = True) -> BertTextEncoder:
        super().train(mode)
        if self.frozen:
            self.bert.eval()  # a frozen encoder is a fixed feature extractor: no dropout
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(
                f"expected token ids and attention mask stacked as (B, 2, L), got {tuple(x.shape)}"
            )
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {x.dtype}")
        ids, mask = x[:, 0].long(), x[:, 1].long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}) (this BERT's vocabulary), got "
                f"[{int(ids.min())}, {int(ids.max())}]: was the cache tokenized with the "
                "tokenizer that belongs to this checkpoint?"
            )
        if self.trim_padding and mask.numel():
            keep = max(int(mask.sum(dim=1).max()), 1)
            ids, mask = ids[:, :keep], mask[:, :keep]
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise ValueError(
                f"sequences of {ids.shape[1]} tokens exceed this BERT's "
                f"{self.max_positions} positions; prepare with a smaller max_length"
            )
        out = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        if self.pooling == "pooler":
            pooled = out.pooler_output
        elif self.pooling == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            total = (out.last_hidden_state * weights).sum(dim=1)
            pooled = total / weights.sum(dim=1).clamp_min(1.0)
        result: Tensor = self.proj(pooled)
        return result

    def extra_repr(self) -> str:
        return (
            f"source={self.source!r}, pooling={self.pooling!r}, hidden={self.hidden_size}, "
            f"out_features={self.out_features}, frozen={self.frozen}"
        )
