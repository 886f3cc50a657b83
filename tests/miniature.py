"""Miniature prepared caches of the paper's datasets, for CPU tests (no raw data needed).

A :class:`MiniPreparer` writes random arrays with a dataset's own array names, dtypes and label
spec (from its default :class:`Preparer`) at reduced size (sides cut to 32) through the real
``prepare`` driver; :func:`build_miniature` then builds the registered dataset from that cache
(for MM-IMDb with a small randomly initialised BERT in place of BERT-base).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from miles.data.base import DatasetSplits
from miles.data.prepare import ArraySpec, Preparer, RawItem, build_preparer, prepare
from miles.data.registry import build_dataset

MAX_SIDE = 32  # reduced input size: every cached dim above this is cut to it
N_SAMPLES, N_TRAIN = 8, 4
#: The miniature's class names (LUMA reads its kept classes from the manifest's "extra").
KEY_CLASSES = ("cat", "dog")
SMALL_BERT = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
#: Per dataset: builder arguments replaced for the CPU tests (beyond ``root``).
BUILD_OVERRIDES: dict[str, dict[str, Any]] = {
    "mmimdb": {"bert_path": None, "bert_config": SMALL_BERT}
}


def tokenizer_dir(tmp_path: Path) -> Path:
    """A local BERT tokenizer folder (vocab.txt + tokenizer_config.json), as mmimdb requires."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "movie", "plot"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def default_preparer(dataset: str, tmp_path: Path) -> Preparer:
    options: dict[str, Any] = {}
    if dataset == "mmimdb":
        options["tokenizer"] = str(tokenizer_dir(tmp_path))
    return build_preparer(dataset, **options)


def _reduced(spec: ArraySpec) -> ArraySpec:
    return ArraySpec(tuple(min(d, MAX_SIDE) for d in spec.shape), spec.dtype)


class MiniPreparer(Preparer):
    """Random arrays with the real preparer's names, dtypes and label spec, at reduced size."""

    def __init__(self, real: Preparer) -> None:
        self.name = real.name  # type: ignore[misc]  # the builders check the cache's dataset name
        self._specs = {m: _reduced(s) for m, s in real.specs().items()}
        self._label = real.label_spec()

    def options(self) -> dict[str, Any]:
        return {"test": "miniature"}

    def specs(self) -> dict[str, ArraySpec]:
        return self._specs

    def label_spec(self) -> ArraySpec:
        return self._label

    def scan(self, raw: Path) -> list[RawItem]:
        items = []
        for i in range(N_SAMPLES):
            if self._label.shape:  # multilabel: a multi-hot row with at least one positive
                label: Any = (np.arange(self._label.shape[0]) % (i + 2) == 0).astype(np.float32)
            else:
                label = i % len(KEY_CLASSES)
            items.append(RawItem(f"{KEY_CLASSES[i % len(KEY_CLASSES)]}_{i:04d}", label, {}))
        return items

    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        # a pure function of the sample (as Preparer.process must be): seeded by its number
        rng = np.random.default_rng(int(item.key.rsplit("_", 1)[1]))
        out: dict[str, np.ndarray] = {}
        for m, spec in self._specs.items():
            if m == "text":  # (2, L): token ids, then the attention mask (a padded tail)
                ids = rng.integers(5, SMALL_BERT["vocab_size"], size=spec.shape[1:])
                mask = np.ones(spec.shape[1:], dtype=np.int64)
                mask[spec.shape[-1] // 2 :] = 0
                out[m] = np.stack([ids * mask, mask]).astype(spec.dtype)
            elif np.issubdtype(np.dtype(spec.dtype), np.integer):
                out[m] = rng.integers(0, 256, size=spec.shape).astype(spec.dtype)
            else:
                out[m] = rng.standard_normal(spec.shape).astype(spec.dtype)
        return out

    def manifest_extra(self, items: Sequence[RawItem]) -> dict[str, Any]:
        return {"classes": list(KEY_CLASSES)}

    def split(self, items: Sequence[RawItem]) -> dict[str, list[int]]:
        n = len(items)
        return {
            "train": list(range(N_TRAIN)),
            "val": list(range(N_TRAIN, (n + N_TRAIN) // 2)),
            "test": list(range((n + N_TRAIN) // 2, n)),
        }


def build_miniature(dataset: str, tmp_path: Path, **params: Any) -> DatasetSplits:
    """Prepare a miniature cache of ``dataset`` under ``tmp_path`` and build the dataset from it."""
    cache = tmp_path / "cache"
    prepare(MiniPreparer(default_preparer(dataset, tmp_path)), tmp_path, cache, progress=False)
    return build_dataset(
        dataset, **{**params, "root": str(cache), **BUILD_OVERRIDES.get(dataset, {})}
    )
