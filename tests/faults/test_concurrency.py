"""Two processes on one folder: started at the same instant, they never crash into each other.

Two ``miles train`` into one folder: one trains, the other is refused with one line (the folder is
in use by the first, or already holds its finished run). Two ``miles compare`` on one folder:
both finish, the second waiting for each run the first is training and then reading it, and the
tables are those of a single compare.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from miles.cli import main
from tests.faults import helpers
from tests.faults.helpers import TOY, TRAIN_YAML, fork, temp_files, timeless

FULL = pytest.mark.faults_full


def _together(tmp_path: Path, argv: list[str], n: int = 2) -> list[helpers.Child]:
    """``n`` forked children running ``miles ARGV``, released at the same instant."""
    read, write = os.pipe()
    children = []
    for i in range(n):

        def start() -> int:
            os.close(write)
            os.read(read, 1)  # wait for the start signal
            return main(argv)

        children.append(fork(start, tmp_path / f"proc{i}.log"))
    os.close(read)
    os.write(write, b"go")  # one byte each, written at once
    os.close(write)
    return children


@pytest.mark.parametrize("case", [0, *(pytest.param(i, marks=FULL) for i in range(1, 8))])
def test_two_trains_started_together_in_one_folder(tmp_path: Path, case: int) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(TRAIN_YAML, encoding="utf-8")
    out = tmp_path / "out"
    argv = ["train", "--config", str(config), "--out", str(out), "--quiet"]
    children = _together(tmp_path, argv)
    statuses = sorted(child.wait() for child in children)
    assert statuses[0] == 0, [c.output() for c in children]
    loser = next(c for c in children if c.output().count("miles train: error:"))
    assert statuses[1] in (1, 2)
    error = loser.output().strip().splitlines()
    assert len(error) == 1, error
    assert "is in use by process" in error[0] or "already holds a run" in error[0], error
    assert "Traceback" not in "".join(c.output() for c in children)
    result = json.loads((out / "result.json").read_text())
    assert result["epochs_run"] == 4 and temp_files(out) == []


def test_two_compares_started_together_share_the_work(tmp_path: Path) -> None:
    helpers.register_toy_dataset()
    argv = ["compare", "--dataset", TOY, "--methods", "joint+aux,miles", "--fusion", "concat",
            "--seeds", "2", "--epochs", "2", "--lr", "0.05", "--batch-size", "32",
            "--latent-dim", "8", "--quiet"]  # fmt: skip
    out = tmp_path / "cmp"
    children = _together(tmp_path, [*argv, "--out", str(out)])
    for child in children:
        assert child.wait() == 0, child.output()
    assert main([*argv, "--out", str(tmp_path / "alone")]) == 0
    got = timeless(json.loads((out / "compare.json").read_text()))
    want = timeless(json.loads((tmp_path / "alone" / "compare.json").read_text()))
    got["config"].pop("out_dir"), want["config"].pop("out_dir")
    assert got == want
    assert temp_files(out) == []
