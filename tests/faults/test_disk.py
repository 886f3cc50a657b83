"""A full disk: the error says "no space left", no partial file stays, the last checkpoint is
intact, and once there is space ``--resume`` gives the uninterrupted run bit for bit.

The real case (:func:`full_disk_run`, run by ``test_causes.py::test_c06_*``) needs a small tmpfs
(``mount -t tmpfs``, root only); where it cannot be mounted it is skipped with the reason, and
the simulated cases here (the write raising ``ENOSPC``) still run.
"""

from __future__ import annotations

import errno
import math
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.cli import main
from tests.faults.helpers import TRAIN_YAML, assert_same_outputs, run_outputs, temp_files

PAGE = 4096


def _train(
    capsys: pytest.CaptureFixture[str], config: Path, out: Path, *args: str
) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["train", "--config", str(config), "--out", str(out), "--quiet", *args])
    return code, capsys.readouterr().err


@contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``where`` (skips the test where it cannot be mounted)."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(
            "a real full disk needs a small tmpfs, and `mount -t tmpfs` failed here "
            f"({mount.stderr.strip() or mount.returncode}; it needs root): the simulated full "
            "disk test covers the same guarantees"
        )
    try:
        yield where
    finally:
        # lazily: a file a failed writer left open (in a traceback) must not keep it mounted
        subprocess.run(["umount", "-l", str(where)], check=False)


def full_disk_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``miles train`` on a tmpfs that fills up at the second epoch's ``last.pt``."""
    config = tmp_path / "run.yaml"
    config.write_text(TRAIN_YAML, encoding="utf-8")
    ref = tmp_path / "ref"
    assert _train(capsys, config, ref)[0] == 0
    pages = {p.name: math.ceil(p.stat().st_size / PAGE) for p in ref.iterdir()}
    # every file of one epoch fits; a second copy of last.pt (the next epoch's) does not
    size = PAGE * (sum(pages.values()) - pages["result.json"] - pages["config.json"])
    size += PAGE * (pages["last.pt"] // 2)
    with tmpfs(tmp_path / "disk", size) as disk:
        out = disk / "run"
        code, err = _train(capsys, config, out)
        assert code == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"miles train: error: no space left on device while writing {out}/"
        ), err
        assert "the previous version of the file is intact" in lines[0]
        assert temp_files(disk) == []
        assert torch.load(out / "last.pt", weights_only=True)["epoch"] >= 1
        remount = ["mount", "-o", "remount,size=16m", str(disk)]
        subprocess.run(remount, check=True)
        code, err = _train(capsys, config, out, "--resume")
        assert code == 0, err
        assert_same_outputs(run_outputs(out), run_outputs(ref))


def test_a_simulated_full_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write from the second epoch on fails with ENOSPC, as on a disk that just filled up."""
    import miles.fileio as fileio

    config = tmp_path / "run.yaml"
    config.write_text(TRAIN_YAML, encoding="utf-8")
    ref = tmp_path / "ref"
    assert _train(capsys, config, ref)[0] == 0
    real_write = fileio._Recorder.write
    out = tmp_path / "run"

    def write(self: Any, data: Any) -> int:
        if (out / "history.csv").is_file():  # the first epoch is saved: the disk is full now
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(fileio._Recorder, "write", write)
    code, err = _train(capsys, config, out)
    assert code == 1
    assert err.startswith(f"miles train: error: no space left on device while writing {out}/")
    assert len(err.strip().splitlines()) == 1
    assert temp_files(tmp_path) == []
    saved = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert saved >= 1
    monkeypatch.setattr(fileio._Recorder, "write", real_write)  # space was freed
    assert _train(capsys, config, out, "--resume")[0] == 0
    assert_same_outputs(run_outputs(out), run_outputs(ref))


def test_a_full_disk_during_the_sync_or_the_close_is_named_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems report a full disk only when the data is flushed or synced."""
    import miles.fileio as fileio

    path = tmp_path / "x.json"
    fileio.write_json(path, {"v": 1})

    def fsync(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(fileio.DiskFullError, match=f"no space left on device while writing {path}"):
        fileio.write_json(path, {"v": 2})
    assert fileio.read_json(path) == {"v": 1}
    assert temp_files(tmp_path) == []
