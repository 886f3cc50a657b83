"""MM-IMDb: a miniature copy in the official layout (json + jpeg + split.json) through prepare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from PIL import Image

import miles.data.mmimdb as mmimdb  # registers "mmimdb"
from miles.data.mmimdb import GENRES, MMIMDbPreparer, build_mmimdb
from miles.data.prepare import RawDataError, build_preparer, prepare, verify

WORDS = [
    *("a", "man", "woman", "the", "in", "of", "love", "war", "city"),
    *("story", "his", "her", "finds", "lost", "home", "dark", "night"),
]
SPLIT = {"train": [f"{i:07d}" for i in range(1, 8)], "dev": ["0000008", "0000009"]}
SPLIT["test"] = ["0000010", "0000011", "0000012"]
RED, BLUE = (220, 20, 20), (20, 20, 220)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT tokenizer folder as bert-base-uncased ships it: vocab.txt + tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _movie(i: int) -> dict[str, Any]:
    genres = [GENRES[i % 23], GENRES[(3 * i) % 23]]
    if i % 4 == 0:
        genres.append("News")  # not one of the 23: ignored
    short = " ".join(WORDS[i % 5 : i % 5 + 2])
    long = " ".join(WORDS[j % len(WORDS)] for j in range(i, i + 4 + i % 3))
    return {"title": f"Movie {i}", "genres": genres, "plot": [short, long.upper()]}


def _poster(path: Path, i: int) -> None:
    """Top half red, bottom half blue; sizes differ per movie (portrait, landscape, square)."""
    w, h = [(20, 40), (40, 24), (30, 30)][i % 3]
    image = Image.new("RGB", (w, h), BLUE)
    image.paste(Image.new("RGB", (w, h // 2), RED), (0, 0))
    image.save(path, format="JPEG", quality=95)


def _raw(tmp_path: Path, nested: bool = False) -> Path:
    top = tmp_path / "raw"
    base = top / "mmimdb" if nested else top
    (base / "dataset").mkdir(parents=True)
    for ids in SPLIT.values():
        for key in ids:
            i = int(key)
            (base / "dataset" / f"{key}.json").write_text(json.dumps(_movie(i)), encoding="utf-8")
            _poster(base / "dataset" / f"{key}.jpeg", i)
    (base / "dataset" / "0000099.json").write_text(json.dumps(_movie(99)))  # not in the split
    (base / "split.json").write_text(json.dumps(SPLIT), encoding="utf-8")
    return top


def _preparer(tokenizer_dir: Path, **options: Any) -> MMIMDbPreparer:
    return MMIMDbPreparer(tokenizer=str(tokenizer_dir), **{"max_length": 12, "size": 16, **options})


def test_prepare_reads_the_official_layout(tmp_path: Path, tokenizer_dir: Path) -> None:
    raw = _raw(tmp_path, nested=True)  # --raw may also be the folder holding mmimdb/
    manifest = prepare(_preparer(tokenizer_dir), raw, tmp_path / "out", progress=False)
    assert manifest["sizes"] == {"train": 7, "val": 2, "test": 3}  # split.json, dev -> val
    assert manifest["keys"] == [k for ids in SPLIT.values() for k in ids]
    assert manifest["modalities"] == ["text", "image"]
    assert manifest["options"]["genres"] == list(GENRES) and len(GENRES) == 23
    verify(tmp_path / "out")

    data = build_mmimdb(tmp_path / "out", check=True)
    assert (data.num_classes, data.multilabel, data.metric) == (23, True, "f1_micro")
    assert data.modalities == ("text", "image") and data.info["genres"] == list(GENRES)
    assert build_mmimdb(tmp_path / "out", metric="f1_macro").metric == "f1_macro"
    with pytest.raises(ValueError, match="accuracy"):
        build_mmimdb(tmp_path / "out", metric="accuracy")

    item = data.val[1]  # movie 9
    text, image, target = item["inputs"]["text"], item["inputs"]["image"], item["target"]
    assert text.shape == (2, 12) and text.dtype == torch.int64
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert target.shape == (23,) and target.dtype == torch.float32
    expected = torch.zeros(23)
    expected[[9 % 23, 27 % 23]] = 1  # GENRES[9], GENRES[27 % 23]; no "News" for movie 9
    torch.testing.assert_close(target, expected)
    assert data.train[3]["target"].sum() == 2  # movie 4 also lists "News", which is ignored

    # the longest plot, lower-cased by the uncased tokenizer, between [CLS] and [SEP], padded
    longest = _movie(9)["plot"][1].lower().split()
    ids = [2, *(5 + WORDS.index(w) for w in longest), 3]
    assert text[0, : len(ids)].tolist() == ids and text[0, len(ids) :].eq(0).all()
    assert text[1].tolist() == [1] * len(ids) + [0] * (12 - len(ids))


def test_poster_is_centre_cropped_or_padded(tmp_path: Path, tokenizer_dir: Path) -> None:
    raw = _raw(tmp_path)
    prepare(_preparer(tokenizer_dir), raw, tmp_path / "crop", progress=False)
    prepare(_preparer(tokenizer_dir, image_fit="pad"), raw, tmp_path / "pad", progress=False)
    crop = np.load(tmp_path / "crop" / "image.npy")[0].astype(int)  # movie 1: 40x24 landscape
    pad = np.load(tmp_path / "pad" / "image.npy")[0].astype(int)
    # crop: height 24 -> 16, width 40 -> 27, centre 16 columns: red top rows, blue bottom rows
    assert np.abs(crop[:, 2, 8] - RED).max() < 40 and np.abs(crop[:, 13, 8] - BLUE).max() < 40
    # pad: width 40 -> 16, height 24 -> 10 centred: black bands of 3 rows above and below
    assert pad[:, :3].max() == 0 and pad[:, 13:].max() == 0
    assert np.abs(pad[:, 4, 8] - RED).max() < 40 and np.abs(pad[:, 11, 8] - BLUE).max() < 40
    portrait = np.load(tmp_path / "pad" / "image.npy")[2].astype(int)  # movie 3: 20x40
    assert portrait[:, :, :4].max() == 0 and portrait[:, :, 12:].max() == 0


def test_cache_is_reused_and_other_options_refused(tmp_path: Path, tokenizer_dir: Path) -> None:
    raw = _raw(tmp_path)
    first = prepare(_preparer(tokenizer_dir), raw, tmp_path / "out", progress=False)
    stamp = (tmp_path / "out" / "text.npy").stat().st_mtime_ns

    class Counting(MMIMDbPreparer):
        calls = 0

        def process(self, item: Any) -> dict[str, np.ndarray]:
            Counting.calls += 1
            return super().process(item)

    again = prepare(Counting(str(tokenizer_dir), max_length=12, size=16), raw, tmp_path / "out")
    assert again == first and Counting.calls == 0
    assert (tmp_path / "out" / "text.npy").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        prepare(_preparer(tokenizer_dir, plot="first"), raw, tmp_path / "out", progress=False)


def test_interrupted_prepare_resumes(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _raw(tmp_path)
    original = MMIMDbPreparer.process
    calls = {"n": 0}

    def flaky(self: MMIMDbPreparer, item: Any) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(self, item)

    monkeypatch.setattr(MMIMDbPreparer, "process", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(_preparer(tokenizer_dir), raw, tmp_path / "out", progress=False, chunk=4)
    calls["n"] = -100  # no more interruptions
    prepare(_preparer(tokenizer_dir), raw, tmp_path / "out", progress=False, chunk=4)
    assert calls["n"] == -100 + 12 - 4  # only the uncommitted movies were decoded again
    monkeypatch.setattr(MMIMDbPreparer, "process", original)
    prepare(_preparer(tokenizer_dir), raw, tmp_path / "ref", progress=False)
    for name in ("text.npy", "image.npy", "labels.npy", "splits.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def _damage(raw: Path) -> dict[str, Path]:
    folder = raw / "dataset"
    jpeg = folder / "0000003.jpeg"
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])  # truncated JPEG
    (folder / "0000005.jpeg").write_bytes(b"not a jpeg at all")
    (folder / "0000008.json").unlink()
    nogenre = folder / "0000011.json"
    nogenre.write_text(json.dumps({"genres": ["News", "Talk-Show"], "plot": ["a man"]}))
    (folder / "0000010.jpeg").unlink()
    return {
        "nojpeg": folder / "0000010.jpeg",
        "truncated": jpeg,
        "garbage": folder / "0000005.jpeg",
        "missing": folder / "0000008.json",
        "nogenre": nogenre,
    }


def test_bad_files_are_named_or_skipped(tmp_path: Path, tokenizer_dir: Path) -> None:
    raw = _raw(tmp_path)
    bad = _damage(raw)
    # one at a time, each error names its file
    for key, path in bad.items():
        pristine = _raw(tmp_path / key)
        target = pristine / "dataset" / path.name
        if path.exists():
            target.write_bytes(path.read_bytes())
        else:
            target.unlink()
        with pytest.raises(RawDataError) as info:
            prepare(_preparer(tokenizer_dir), pristine, tmp_path / key / "out", progress=False)
        assert info.value.path == str(target), key
    manifest = prepare(
        _preparer(tokenizer_dir), raw, tmp_path / "out", progress=False, skip_bad=True
    )
    assert sorted(manifest["skipped"]) == ["0000003", "0000005", "0000008", "0000010", "0000011"]
    assert manifest["sizes"] == {"train": 5, "val": 1, "test": 1}
    assert "truncated" in manifest["skipped"]["0000003"]
    assert "missing poster" in manifest["skipped"]["0000010"]
    data = build_mmimdb(tmp_path / "out")
    assert len(data.train) == 5 and all(data.train[i]["target"].sum() > 0 for i in range(5))


def test_layout_and_option_errors(tmp_path: Path, tokenizer_dir: Path) -> None:
    raw = _raw(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        MMIMDbPreparer(tokenizer=str(tmp_path / "no-such-tokenizer"))
    with pytest.raises(ValueError, match="tokenizer=PATH"):
        MMIMDbPreparer()
    with pytest.raises(ValueError, match="model_max_length"):
        _preparer(tokenizer_dir, max_length=65)
    for bad in ({"plot": "last"}, {"image_fit": "stretch"}, {"size": 0}, {"max_length": 1}):
        with pytest.raises(ValueError):
            _preparer(tokenizer_dir, **bad)
    assert isinstance(
        build_preparer("mmimdb", tokenizer=str(tokenizer_dir), max_length=12), MMIMDbPreparer
    )

    numeric = {k: [int(i) for i in ids] for k, ids in SPLIT.items()}  # ids saved as numbers
    (raw / "split.json").write_text(json.dumps(numeric))
    assert [it.key for it in _preparer(tokenizer_dir).scan(raw)][:2] == ["0000001", "0000002"]
    split = json.loads(json.dumps(SPLIT))
    split["test"].append("0000001")
    (raw / "split.json").write_text(json.dumps(split))
    with pytest.raises(RawDataError, match="0000001 is listed in both train and test"):
        _preparer(tokenizer_dir).scan(raw)
    (raw / "split.json").unlink()
    with pytest.raises(RawDataError, match=r"split\.json"):
        _preparer(tokenizer_dir).scan(raw)


def test_encoders_run_forward_and_backward(tmp_path: Path, tokenizer_dir: Path) -> None:
    from miles.data.base import collate_multimodal
    from miles.models.fusion import JointFusionModel

    prepare(_preparer(tokenizer_dir, size=32), _raw(tmp_path), tmp_path / "out", progress=False)
    tiny = {
        "vocab_size": 30,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 16,
    }
    data = build_mmimdb(tmp_path / "out", bert_config=tiny)
    torch.manual_seed(0)
    encoders = data.build_encoders(8)
    assert {m: e.out_features for m, e in encoders.items()} == {"text": 8, "image": 8}
    model = JointFusionModel(encoders, data.num_classes, "sum")
    batch = collate_multimodal([data.train[i] for i in range(2)])
    out = model(batch["inputs"])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.fused, batch["target"])
    loss.backward()
    assert out.fused.shape == (2, 23)
    assert model.encoders["image"].backbone.conv1.weight.grad is not None
    assert model.encoders["text"].bert.embeddings.word_embeddings.weight.grad is not None
    native = build_mmimdb(tmp_path / "out", bert_config=tiny, project=False).build_encoders(8)
    assert {m: e.out_features for m, e in native.items()} == {"text": 16, "image": 2048}


def test_without_bert_path_a_random_bert_base_is_built_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import miles.models.resnet as resnet
    import miles.models.text as text

    seen: dict[str, Any] = {}

    class Stub(torch.nn.Module):
        out_features = 4

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__()
            seen.update(kwargs)

    monkeypatch.setattr(text, "BertTextEncoder", Stub)  # a real BERT-base is slow to build
    monkeypatch.setattr(resnet, "resnet50", lambda *a, **k: Stub())
    with pytest.warns(UserWarning, match="randomly initialised BERT-base"):
        mmimdb.build_encoders(None)
    assert seen["config"] == {}  # BertConfig() defaults: the BERT-base architecture
    with pytest.raises(ValueError, match="not both"):
        mmimdb.build_encoders(None, bert_path="x", bert_config={})
