"""`miles prepare --workers N` on the paper datasets' miniature raw copies (the real preparers:
WAV and FLV decoding, CIFAR pickles, JPEG posters, tokenizers): the cache, its checksums and the
manifest are the same byte for byte with 1 and 2 decoding processes."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from miles.cli import main
from miles.data.prepare import Preparer, prepare, verify
from tests.miniature import tokenizer_dir


def _cremad(tmp_path: Path) -> tuple[Path, Preparer]:
    from miles.data.cremad import CremadPreparer
    from tests.data.test_cremad import SMALL, make_raw

    return make_raw(tmp_path / "CREMA-D"), CremadPreparer(**SMALL)


def _smnist(tmp_path: Path) -> tuple[Path, Preparer]:
    from miles.data.smnist import SMNISTPreparer
    from tests.data.test_smnist import _make_raw

    return _make_raw(tmp_path), SMNISTPreparer(sizes=[16, 4, 4])


def _luma(tmp_path: Path) -> tuple[Path, Preparer]:
    from tests.data.test_luma import make_raw, small

    return make_raw(tmp_path), small()


def _mmimdb(tmp_path: Path) -> tuple[Path, Preparer]:
    from miles.data.mmimdb import MMIMDbPreparer
    from tests.data.test_mmimdb import _raw

    preparer = MMIMDbPreparer(tokenizer=str(tokenizer_dir(tmp_path)), max_length=12, size=16)
    return _raw(tmp_path), preparer


#: dataset -> (its miniature raw copy and preparer, the modules its test data needs)
RAW_COPIES: dict[str, tuple[Callable[[Path], tuple[Path, Preparer]], tuple[str, ...]]] = {
    "cremad": (_cremad, ("soundfile", "av")),
    "smnist": (_smnist, ()),
    "luma": (_luma, ("soundfile",)),
    "mmimdb": (_mmimdb, ("transformers", "PIL")),
}


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("dataset", sorted(RAW_COPIES))
def test_two_workers_write_the_same_cache_as_one(dataset: str, tmp_path: Path) -> None:
    make, needs = RAW_COPIES[dataset]
    absent = [m for m in needs if importlib.util.find_spec(m) is None]
    if absent:
        pytest.skip(f"{dataset}'s miniature raw copy needs {absent} installed")
    raw, preparer = make(tmp_path)
    one = prepare(preparer, raw, tmp_path / "one", progress=False, chunk=4)
    two = prepare(preparer, raw, tmp_path / "two", progress=False, chunk=4, workers=2)
    assert two == one and one["n_samples"] > 4  # more than one chunk
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    verify(tmp_path / "two")


def test_cli_workers_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("av")
    from tests.data.test_cremad import SMALL

    raw, preparer = _cremad(tmp_path)
    options = [f"--option={key}={value}" for key, value in SMALL.items()]
    argv = ["prepare", "cremad", "--raw", str(raw), "--quiet", *options]
    assert main([*argv, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    prepare(preparer, raw, tmp_path / "ref", progress=False)
    assert _files(tmp_path / "two") == _files(tmp_path / "ref")
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "zero"), "--workers", "0"])
    assert exit_.value.code == 2
    assert "--workers: expected a positive integer, got '0'" in capsys.readouterr().err
