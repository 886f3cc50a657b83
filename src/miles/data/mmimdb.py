"""MM-IMDb (Arevalo et al., "Gated Multimodal Units for Information Fusion", ICLR-W 2017).

Multilabel movie-genre classification from the plot (text) and the poster (image): 25,959 movies,
23 genres, official split 15,552 / 2,608 / 7,799 (train / dev / test).

Raw layout (the authors' ``mmimdb.tar.gz``; ``--raw`` is the folder holding ``split.json``, or its
parent holding ``mmimdb/``)::

    mmimdb/
      split.json             {"train": [ids], "dev": [ids], "test": [ids]}
      dataset/<id>.json      IMDb metadata: "plot" (list of strings), "genres" (list), "title", ...
      dataset/<id>.jpeg      the poster

Preprocessing (``miles prepare mmimdb --raw DIR --out DIR --option tokenizer=PATH``):

* text: the plot is tokenized for BERT with a tokenizer loaded **only** from the local folder
  ``tokenizer`` (e.g. a copy of ``bert-base-uncased``; required). When a movie has several plots,
  ``plot="longest"`` (default) takes the longest, as the authors' ``make_dataset.py`` and the MMF /
  MMBT loaders do; ``"first"`` takes the first; ``"join"`` joins all with a space. No other text
  normalisation: the tokenizer does it (lower-casing for uncased BERT). ``[CLS] plot [SEP]`` is cut
  to ``max_length`` tokens (default 512, BERT's limit, so nearly every plot is kept whole) and
  right-padded. Stored as ``text`` ``(2, max_length)`` int64: row 0 the ids, row 1 the attention
  mask, because the fusion model passes one tensor per modality
  (:class:`miles.models.text.BertTextEncoder` splits it).
* image: the poster, converted to RGB, resized with bicubic filtering and made square by
  ``image_fit="crop"`` (default: shorter side to ``size``, centre crop, as the authors'
  ``resize_and_crop_image`` and the MMBT ``Resize + CenterCrop`` do) or ``"pad"`` (longer side to
  ``size``, centred on black, nothing cut). Stored as ``image`` ``(3, size, size)`` uint8 (default
  ``size`` 224, ResNet-50's input); the poster encoder
  (:class:`~miles.models.wrappers.ProjectedEncoder`) scales to [0, 1] and applies the ImageNet
  mean/std that torchvision-format ResNet-50 weights expect.
* labels: multi-hot float32 ``(23,)`` over :data:`GENRES` (the authors' 23 most frequent genres, in
  their order, i.e. the ``target_names`` of the official ``multimodal_imdb.hdf5``). Other IMDb
  genres in a json (e.g. ``News``, ``Adult``, ``Reality-TV``, ``Talk-Show``) are ignored; a movie
  with none of the 23 is an error naming its json (every movie of the official split has one, as
  the split was built from them), or is skipped with ``skip_bad``.
* split: ``split.json`` exactly (``dev`` becomes our ``val``). Ids listed there whose json or jpeg
  is missing, unreadable or truncated raise :class:`~miles.data.prepare.RawDataError` naming the
  file, or are skipped (and counted in the manifest) with ``skip_bad``.

Not verified against the release itself (not downloadable here): whether split.json ids are
strings (assumed, e.g. ``"0000008"``; ints are accepted and tried as written, then zero-padded to 7
digits); whether any json stores ``plot`` as a plain string (accepted as one plot).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from miles.data.base import DatasetSplits
from miles.data.prepare import (
    ArraySpec,
    Preparer,
    RawDataError,
    RawItem,
    register_preparer,
)
from miles.data.prepared import prepared_splits
from miles.data.registry import register_dataset
from miles.validation import check_choice, check_int, check_positive_int

__all__ = [
    "GENRES",
    "OFFICIAL_SIZES",
    "MMIMDbPreparer",
    "build_encoders",
    "build_mmimdb",
]

log = logging.getLogger(__name__)

NAME = "mmimdb"
#: The 23 genres, most frequent first: the order of the official hdf5's ``target_names``.
GENRES: tuple[str, ...] = (
    "Drama",
    "Comedy",
    "Romance",
    "Thriller",
    "Crime",
    "Action",
    "Adventure",
    "Horror",
    "Documentary",
    "Mystery",
    "Sci-Fi",
    "Fantasy",
    "Family",
    "Biography",
    "War",
    "History",
    "Music",
    "Animation",
    "Musical",
    "Western",
    "Sport",
    "Short",
    "Film-Noir",
)
NUM_CLASSES = len(GENRES)
OFFICIAL_SIZES = {"train": 15_552, "val": 2_608, "test": 7_799}
_SPLIT_KEYS = {"train": "train", "val": "dev", "test": "test"}  # ours -> split.json's
PLOTS = ("longest", "first", "join")
IMAGE_FITS = ("crop", "pad")
F1_METRICS = ("f1_micro", "f1_macro")
_PROBE = "Ünïcode CAFÉ Test-case, 123 words & ##pieces; naïve ROBOT"


def _load_tokenizer(path: str) -> Any:
    """A tokenizer from a local folder only, with errors that name the folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer folder {path} does not exist (give --option tokenizer=PATH, a local folder "
            "with a BERT tokenizer such as bert-base-uncased's vocab.txt + tokenizer_config.json)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError variants
        raise ValueError(f"{path}: cannot load a tokenizer from this folder ({exc})") from exc


def _tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's output: its vocabulary and normalisation, not its path.

    The path is left out of the recorded options so a moved tokenizer folder still resumes a
    cache; a different vocabulary or casing changes the fingerprint and is refused.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    probe = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    digest = hashlib.sha256(
        json.dumps({"vocab": vocab, "probe": probe}, ensure_ascii=True).encode()
    ).hexdigest()
    return {"vocab_size": len(vocab), "sha256": digest}  # no class name: it varies by version


def _pick_plot(plots: Any, how: str) -> str:
    if isinstance(plots, str):
        plots = [plots]
    texts = [p.strip() for p in plots if isinstance(p, str) and p.strip()]
    if not texts:
        return ""
    if how == "first":
        return texts[0]
    if how == "join":
        return " ".join(texts)
    return max(texts, key=len)  # first of the longest on ties, as numpy's argmax


def fit_image(image: Any, size: int, fit: str) -> np.ndarray:
    """A PIL image as a ``(3, size, size)`` uint8 array, centre-cropped or padded to a square."""
    from PIL import Image

    rgb = image.convert("RGB")
    w, h = rgb.size
    if fit == "crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        resized = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        square = resized.crop((left, top, left + size, top + size))
    else:
        scale = size / max(w, h)
        nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
        square = Image.new("RGB", (size, size), (0, 0, 0))
        square.paste(
            rgb.resize((nw, nh), Image.Resampling.BICUBIC), ((size - nw) // 2, (size - nh) // 2)
        )
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))


@register_preparer(NAME)
class MMIMDbPreparer(Preparer):
    """``miles prepare mmimdb``: plots tokenized for BERT, posters as uint8 squares, 23 genres.

    Options (all recorded in the manifest; see the module docstring for why):
        tokenizer: local folder of a BERT tokenizer (required).
        max_length: tokens per plot including ``[CLS]``/``[SEP]`` (default 512).
        plot: ``"longest"`` (default), ``"first"`` or ``"join"``.
        size: poster side in pixels (default 224).
        image_fit: ``"crop"`` (default) or ``"pad"``.
    """

    def __init__(
        self,
        tokenizer: str | os.PathLike[str] | None = None,
        max_length: int = 512,
        plot: str = "longest",
        size: int = 224,
        image_fit: str = "crop",
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "mmimdb needs --option tokenizer=PATH: a local folder with the BERT tokenizer "
                "(e.g. bert-base-uncased's vocab.txt + tokenizer_config.json); nothing is "
                "downloaded"
            )
        self.max_length = check_int("max_length", max_length, minimum=2)
        self.size = check_positive_int("size", size)
        self.plot = check_choice("plot", plot, PLOTS)
        self.image_fit = check_choice("image_fit", image_fit, IMAGE_FITS)
        self.tokenizer_path = os.path.expanduser(
            os.fspath(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else str(tokenizer)
        )
        self.tokenizer = _load_tokenizer(self.tokenizer_path)
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000 and self.max_length > limit:
            raise ValueError(
                f"max_length {self.max_length} exceeds the tokenizer's model_max_length {limit} "
                f"({self.tokenizer_path})"
            )
        self._fingerprint = _tokenizer_fingerprint(self.tokenizer)

    def options(self) -> dict[str, Any]:
        return {
            "tokenizer": self._fingerprint,
            "max_length": self.max_length,
            "plot": self.plot,
            "size": self.size,
            "image_fit": self.image_fit,
            "resample": "bicubic",
            "genres": list(GENRES),
        }

    def specs(self) -> dict[str, ArraySpec]:
        return {
            "text": ArraySpec((2, self.max_length), "int64"),
            "image": ArraySpec((3, self.size, self.size), "uint8"),
        }

    def label_spec(self) -> ArraySpec:
        return ArraySpec((NUM_CLASSES,), "float32")

    @staticmethod
    def locate(raw: Path) -> Path:
        """The folder holding ``split.json`` and ``dataset/``: ``raw`` or ``raw/mmimdb``."""
        for base in (raw, raw / "mmimdb"):
            if (base / "split.json").is_file():
                if not (base / "dataset").is_dir():
                    raise RawDataError(base / "dataset", "missing folder (holds <id>.json/.jpeg)")
                return base
        raise RawDataError(
            raw / "split.json",
            "missing: expected the MM-IMDb release layout (split.json next to dataset/)",
        )

    @staticmethod
    def _read_split(path: Path) -> dict[str, list[str]]:
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RawDataError(path, f"unreadable JSON ({exc})") from exc
        if not isinstance(payload, dict):
            raise RawDataError(path, "expected an object with keys 'train', 'dev', 'test'")
        out: dict[str, list[str]] = {}
        owner: dict[str, str] = {}
        for ours, theirs in _SPLIT_KEYS.items():
            ids = payload.get(theirs)
            if not isinstance(ids, list):
                raise RawDataError(path, f"key {theirs!r} missing or not a list of ids")
            out[ours] = []
            for raw_id in ids:
                if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                    raise RawDataError(path, f"{theirs}: id {raw_id!r} is not a string")
                key = str(raw_id)
                if key in owner:
                    raise RawDataError(
                        path, f"id {key} is listed in both {owner[key]} and {theirs}"
                    )
                owner[key] = theirs
                out[ours].append(key)
        return out

    def _parse_movie(self, json_path: Path) -> tuple[tuple[int, ...], str]:
        """(genre indices, chosen plot) of one movie; RawDataError naming the json otherwise."""
        if not json_path.is_file():
            raise RawDataError(json_path, "missing (the id is listed in split.json)")
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RawDataError(json_path, f"unreadable or truncated JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise RawDataError(json_path, "expected a JSON object")
        genres = data.get("genres")
        if not isinstance(genres, list):
            raise RawDataError(json_path, "no 'genres' list")
        labels = tuple(sorted({GENRES.index(g) for g in genres if g in GENRES}))
        if not labels:
            raise RawDataError(json_path, f"none of its genres {genres} is one of the 23 classes")
        text = _pick_plot(data.get("plot"), self.plot)
        if not text:
            raise RawDataError(json_path, "no non-empty 'plot'")
        return labels, text

    def scan(self, raw: Path) -> list[RawItem]:
        """Every id of split.json in split order (train, dev, test), with its genres and plot.

        A bad movie does not stop the scan: the error is kept and raised by :meth:`process`, where
        the driver either stops with it or skips the movie (``skip_bad``).
        """
        base = self.locate(raw)
        split = self._read_split(base / "split.json")
        folder = base / "dataset"
        items: list[RawItem] = []
        problems = 0
        for ours, ids in split.items():
            for key in ids:
                stem = key
                padded = key.zfill(7)  # an id stored as a JSON number lost its leading zeros
                if not (folder / f"{key}.json").exists() and (folder / f"{padded}.json").exists():
                    stem = padded
                json_path, jpeg_path = folder / f"{stem}.json", folder / f"{stem}.jpeg"
                meta: dict[str, Any] = {"split": ours}
                labels: tuple[int, ...] = ()
                try:
                    labels, meta["text"] = self._parse_movie(json_path)
                except RawDataError as exc:
                    meta["error"] = (exc.path, exc.why)
                    problems += 1
                files = {"text": json_path, "image": jpeg_path}
                items.append(RawItem(stem, labels, files, meta=meta))
        if problems:
            log.warning("mmimdb: %d movies of split.json have a missing or bad json", problems)
        return items

    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        if "error" in item.meta:
            raise RawDataError(*item.meta["error"])
        enc = self.tokenizer(
            item.meta["text"],
            add_special_tokens=True,
            max_length=self.max_length,
            truncation=True,
            padding="max_length",
        )
        text = np.asarray([enc["input_ids"], enc["attention_mask"]], dtype=np.int64)
        return {"text": text, "image": self._poster(Path(item.files["image"]))}

    def _poster(self, path: Path) -> np.ndarray:
        from PIL import Image

        if not path.is_file():
            raise RawDataError(path, "missing poster (the id is listed in split.json)")
        try:
            with Image.open(path) as image:
                image.load()  # decode fully now: a truncated file fails here, not later
                return fit_image(image, self.size, self.image_fit)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise RawDataError(path, f"unreadable or truncated image ({exc})") from exc

    def encode_label(self, item: RawItem) -> np.ndarray:
        multi_hot = np.zeros(NUM_CLASSES, dtype=np.float32)
        multi_hot[list(item.label)] = 1.0
        return multi_hot

    def split(self, items: Sequence[RawItem]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {name: [] for name in _SPLIT_KEYS}
        for i, item in enumerate(items):
            out[item.meta["split"]].append(i)
        if (
            len(items) == sum(OFFICIAL_SIZES.values())
            and {k: len(v) for k, v in out.items()} != OFFICIAL_SIZES
        ):
            warnings.warn(
                f"split.json sizes {[len(v) for v in out.values()]} differ from the official "
                f"{list(OFFICIAL_SIZES.values())}",
                stacklevel=2,
            )
        return out


def build_encoders(
    latent_dim: int | None,
    bert_path: str | os.PathLike[str] | None = None,
    bert_config: Mapping[str, Any] | None = None,
    pretrained_image: str | os.PathLike[str] | None = None,
    *,
    pooling: str = "cls",
    freeze_text: bool = False,
) -> dict[str, nn.Module]:
    """The paper's MM-IMDb encoders: ``{"text": BERT, "image": ResNet-50}``.

    ``latent_dim`` projects both latents to that size with a linear layer (sum fusion needs equal
    sizes: BERT-base gives 768, ResNet-50 2048); ``None`` keeps the native sizes. BERT comes from
    the local folder ``bert_path``, or randomly initialised from ``bert_config`` (BertConfig
    arguments); with neither, a randomly initialised BERT-base (a warning says so). ResNet-50 loads
    ``pretrained_image`` (a local torchvision-format state_dict) when given.
    """
    from miles.models.resnet import resnet50
    from miles.models.text import BertTextEncoder
    from miles.models.wrappers import IMAGENET_MEAN, IMAGENET_STD, ProjectedEncoder

    if bert_path is not None and bert_config is not None:
        raise ValueError("give bert_path (a local checkpoint) or bert_config, not both")
    if bert_path is None and bert_config is None:
        warnings.warn(
            "mmimdb: no bert_path given; the text encoder is a randomly initialised BERT-base, "
            "not the pre-trained model of the paper",
            stacklevel=2,
        )
        bert_config = {}
    text = BertTextEncoder(
        bert_path, config=bert_config, pooling=pooling, freeze=freeze_text, out_features=latent_dim
    )
    image = ProjectedEncoder(
        resnet50(3, pretrained_image), latent_dim, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    return {"text": text, "image": image}


@register_dataset(NAME)
def build_mmimdb(
    root: str | os.PathLike[str],
    check: bool = False,
    *,
    metric: str = "f1_micro",
    bert_path: str | os.PathLike[str] | None = None,
    bert_config: Mapping[str, Any] | None = None,
    pretrained_image: str | os.PathLike[str] | None = None,
    pooling: str = "cls",
    freeze_text: bool = False,
    project: bool = True,
) -> DatasetSplits:
    """MM-IMDb over a cache made by ``miles prepare mmimdb`` (``root`` is its ``--out``).

    ``metric`` (``"f1_micro"``, default, or ``"f1_macro"``) is what model selection and MILES's
    utilisation rates use; the paper says only "F1". ``check`` re-hashes the cache first. The
    encoder arguments go to :func:`build_encoders`; ``project=False`` keeps the native latent sizes
    (768 + 2048, concatenation only) instead of projecting both to the run's ``latent_dim``.
    """
    if metric not in F1_METRICS:
        raise ValueError(
            f"metric must be one of {F1_METRICS} for multilabel MM-IMDb, got {metric!r}"
        )

    def encoders(latent_dim: int) -> dict[str, nn.Module]:
        return build_encoders(
            latent_dim if project else None,
            bert_path,
            bert_config,
            pretrained_image,
            pooling=pooling,
            freeze_text=freeze_text,
        )

    return prepared_splits(
        Path(root),
        num_classes=NUM_CLASSES,
        multilabel=True,
        metric=metric,
        build_encoders=encoders,
        check=check,
        info={"genres": list(GENRES)},
    )
