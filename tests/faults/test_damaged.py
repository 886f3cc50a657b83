"""Every file ``miles`` reads back, truncated, overwritten with garbage or emptied: the command
stops with one line that names the file (and exit status 2), and never trains on top of it.

The files: a run's ``last.pt``, ``best.pt``, ``run_config.json`` (``miles train --resume``);
``result.json`` (``miles report`` of a run; of a compare); a compare's ``done.json``,
``compare_settings.json``, a run's ``run_config.json`` and ``last.pt`` (``miles compare``);
``compare.json`` (``miles report``); a cache's ``manifest.json``, ``progress.json``,
``splits.json`` (``miles prepare``, the dataset); ``sweep.db`` (``miles sweep``). The unimodal
learning-rate cache of MSLR is only a cache: a damaged one is named in a warning and recomputed.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from miles.cli import main
from tests.faults import helpers
from tests.faults.helpers import TOY, TRAIN_YAML

FULL = pytest.mark.faults_full


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage(data: bytes) -> bytes:
    return np.random.default_rng(len(data)).bytes(max(len(data), 64))


def _empty(_data: bytes) -> bytes:
    return b""


def _wrong_type(data: bytes) -> bytes:
    return b"[1, 2, 3]\n" if data.lstrip().startswith(b"{") else _garbage(data)


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": _truncated,
    "garbage": _garbage,
    "empty": _empty,
    "wrong type": _wrong_type,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run, a finished compare and a prepared cache, made once, copied per case."""
    helpers.register_toy_dataset()
    helpers.register_text_preparer()
    root = tmp_path_factory.mktemp("damaged")
    config = root / "run.yaml"
    config.write_text(TRAIN_YAML, encoding="utf-8")
    assert main(["train", "--config", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    assert main(_compare_argv(root / "cmp")) == 0
    raw = helpers.text_raw(root / "raw", n=40)
    assert main(["prepare", helpers.TEXT, "--raw", str(raw), "--out", str(root / "cache"),
                 "--quiet"]) == 0  # fmt: skip
    return {"run": root / "run", "cmp": root / "cmp", "cache": root / "cache", "root": root}


def _compare_argv(out: Path) -> list[str]:
    return ["compare", "--dataset", TOY, "--methods", "joint+aux,miles", "--fusion", "concat",
            "--seeds", "1", "--epochs", "2", "--lr", "0.05", "--batch-size", "32",
            "--latent-dim", "8", "--out", str(out), "--quiet"]  # fmt: skip


RUN = "runs/concat/miles/seed0"


def _train_resume(root: Path, folder: Path) -> list[str]:
    return ["train", "--config", str(root / "run.yaml"), "--out", str(folder), "--quiet",
            "--resume"]  # fmt: skip


#: file -> (which folder to copy, the file in it, the command that reads it)
CASES: dict[str, tuple[str, str, Callable[[Path, Path], list[str]]]] = {
    "train: last.pt": ("run", "last.pt", _train_resume),
    "train: best.pt": ("run", "best.pt", _train_resume),
    "train: run_config.json": ("run", "run_config.json", _train_resume),
    "report: result.json of a run": ("run", "result.json", lambda _r, f: ["report", str(f)]),
    "compare: done.json": ("cmp", f"{RUN}/done.json", lambda _r, f: _compare_argv(f)),
    "compare: result.json": ("cmp", f"{RUN}/result.json", lambda _r, f: _compare_argv(f)),
    "compare: run_config.json": ("cmp", f"{RUN}/run_config.json", lambda _r, f: _compare_argv(f)),
    "compare: compare_settings.json": (
        "cmp",
        "compare_settings.json",
        lambda _r, f: _compare_argv(f),
    ),
    "report: compare.json": ("cmp", "compare.json", lambda _r, f: ["report", str(f)]),
    "report: result.json of a compare run": (
        "cmp",
        f"{RUN}/result.json",
        lambda _r, f: ["report", str(f)],
    ),
    "prepare: manifest.json": (
        "cache",
        "manifest.json",
        lambda r, f: ["prepare", helpers.TEXT, "--raw", str(r / "raw"), "--out", str(f)],
    ),
}


def _cases() -> list[Any]:
    """Every file with every damage; in the default run, every file truncated."""
    return [
        pytest.param(case, damage, marks=() if damage == "truncated" else FULL)
        for case in CASES
        for damage in DAMAGES
    ]


@pytest.mark.parametrize(("case", "damage"), _cases())
def test_a_damaged_file_is_named_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    folders: dict[str, Path],
    case: str,
    damage: str,
) -> None:
    which, name, argv = CASES[case]
    folder = tmp_path / which
    shutil.copytree(folders[which], folder)
    if case == "train: best.pt":  # best.pt is read when the last epoch was not the best one
        assert json.loads((folder / "result.json").read_text())["best_epoch"] < 4
    path = folder / name
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.pt")}
    capsys.readouterr()
    assert main(argv(folders["root"], folder)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "damaged" in err[0], err
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.pt")} == before  # nothing trained


@pytest.mark.parametrize("damage", ["truncated", pytest.param("garbage", marks=FULL)])
def test_a_damaged_unfinished_compare_run_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folders: dict[str, Path], damage: str
) -> None:
    cmp = tmp_path / "cmp"
    shutil.copytree(folders["cmp"], cmp)
    (cmp / RUN / "done.json").unlink()  # not finished: compare resumes it from last.pt
    path = cmp / RUN / "last.pt"
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    capsys.readouterr()
    assert main(_compare_argv(cmp)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path} is damaged" in err[0] and "--overwrite" in err[0], err


@pytest.mark.parametrize("damage", ["truncated", pytest.param("garbage", marks=FULL)])
def test_a_damaged_progress_record_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folders: dict[str, Path], damage: str
) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    (out / "progress.json").write_bytes(DAMAGES[damage](b'{"identity": {"dataset": "x"}}'))
    capsys.readouterr()
    argv = ["prepare", helpers.TEXT, "--raw", str(folders["root"] / "raw"), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / 'progress.json'} is damaged" in err[0], err


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_split_of_a_cache_is_named(
    tmp_path: Path, folders: dict[str, Path], damage: str
) -> None:
    from miles.data.prepared import PreparedDataset
    from miles.fileio import DamagedFileError

    cache = tmp_path / "cache"
    shutil.copytree(folders["cache"], cache)
    path = cache / "splits.json"
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    with pytest.raises(DamagedFileError, match=str(path)):
        PreparedDataset(cache, "train")


@pytest.mark.parametrize("damage", ["truncated", pytest.param("garbage", marks=FULL)])
def test_a_damaged_sweep_database_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    pytest.importorskip("optuna")
    out = tmp_path / "sw"
    out.mkdir()
    db = out / "sweep.db"
    con = sqlite3.connect(db)  # a real database with some pages, then damaged
    con.execute("create table t (x)")
    con.executemany("insert into t values (?)", [(str(i) * 100,) for i in range(500)])
    con.commit()
    con.close()
    db.write_bytes(DAMAGES[damage](db.read_bytes()))
    capsys.readouterr()
    argv = ["sweep", "--dataset", TOY, "--method", "miles", "--trials", "1", "--epochs", "1",
            "--latent-dim", "8", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{db.resolve()} is damaged" in err[0], err


def test_a_damaged_learning_rate_cache_is_named_and_recomputed(tmp_path: Path) -> None:
    from miles.studies.config import quiet_base
    from miles.studies.lr_sweep import sweep_unimodal_lrs

    helpers.register_toy_dataset()
    base = quiet_base(epochs=1, batch_size=32)
    base.dataset, base.latent_dim = TOY, 8
    options: dict[str, Any] = {"lrs": [1e-2], "cache_dir": tmp_path, "echo": None}
    best = sweep_unimodal_lrs(base, **options)
    (cache,) = tmp_path.glob("*.json")
    cache.write_bytes(_truncated(cache.read_bytes()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sweep_unimodal_lrs(base, **options) == best
    assert any(str(cache) in str(w.message) for w in caught)
