"""Issue 12's seventeen causes, one test each (``test_cNN_*``), each failing before the fix.

Cause 3 (sweep workers starting together on a fresh SQLite database) is tested with the sweep's
storage; cause 14 (the scheduler's ``load_state_dict`` and metric scales) by
``tests/test_scheduler_inputs.py``. Both are listed in ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from miles.cli import main
from miles.studies.compare import CompareConfig, run_compare
from miles.studies.config import quiet_base
from tests.faults import helpers
from tests.faults.helpers import TOY, TRAIN_YAML, fork


def _config(tmp_path: Path, text: str = TRAIN_YAML) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _train(
    capsys: pytest.CaptureFixture[str], config: Path, out: Path, *args: str
) -> tuple[int, str]:
    """``miles train`` in this process: its exit status and stderr."""
    capsys.readouterr()
    code = main(["train", "--config", str(config), "--out", str(out), "--quiet", *args])
    return code, capsys.readouterr().err


def _one_line_error(err: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("miles "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _compare_config(out: Path | str, **changes: Any) -> CompareConfig:
    base = quiet_base(epochs=2, lr=5e-2, batch_size=32)
    base.dataset, base.latent_dim = TOY, 8
    fields: dict[str, Any] = {
        "base": base,
        "methods": ["joint+aux", "miles"],
        "fusions": ["concat"],
        "seeds": [0],
        "out_dir": str(out),
    }
    return CompareConfig(**(fields | changes))


def _quiet(_line: str) -> None:
    pass


# -- 1. resume never checked the config ------------------------------------------------------------


def test_c01_resume_under_other_settings_is_refused_naming_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = _config(tmp_path), tmp_path / "out"
    assert _train(capsys, config, out)[0] == 0
    before = (out / "result.json").read_bytes()
    changed = [
        "--set", "trainer.lr=0.1",
        "--set", "strategy_params.tau=0.4",
        "--set", "trainer.seed=3",
        "--set", "trainer.batch_size=16",
        "--set", "trainer.epochs=5",
    ]  # fmt: skip
    code, err = _train(capsys, config, out, "--resume", *changed)
    assert code == 2
    line = _one_line_error(err, "trainer.lr 0.05 -> 0.1", "strategy_params.tau 0.05 -> 0.4")
    for key in ("trainer.seed", "trainer.batch_size", "trainer.epochs"):
        assert key in line
    assert "--force" in line and "--overwrite" in line
    assert (out / "result.json").read_bytes() == before  # nothing was trained or written
    # the rare intended case: --force resumes, and the result says what changed when
    code, err = _train(capsys, config, out, "--resume", "--force", "--set", "trainer.epochs=6")
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["epochs_run"] == 6 and result["config"]["epochs"] == 6
    assert result["extra"]["settings_changes"] == [
        {"differs": ["trainer.epochs"], "previous": {"trainer.epochs": 4}}
    ]


# -- 2. a new run silently overwrote another -------------------------------------------------------


def test_c02_a_new_run_refuses_a_folder_holding_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = _config(tmp_path), tmp_path / "out"
    assert _train(capsys, config, out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, err = _train(capsys, config, out, "--set", "trainer.lr=0.02")
    assert code == 2
    _one_line_error(err, f"{out} holds another run", "trainer.lr 0.05 -> 0.02", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # a folder holding anything else is refused too (only a run's files are ever deleted)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    code, err = _train(capsys, config, other)
    assert code == 2 and "is not empty (it holds todo.txt)" in err

    # --overwrite, killed in its first epoch: the old result never sits next to new checkpoints
    def overwrite() -> int:
        helpers.arm("after-rename", 2)  # the settings record, then the first last.pt
        return main(["train", "--config", str(config), "--out", str(out), "--quiet",
                     "--overwrite", "--set", "trainer.lr=0.02"])  # fmt: skip

    assert fork(overwrite, tmp_path / "child.log").wait() == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "last.pt",
        "run_config.json",
    ]
    record = json.loads((out / "run_config.json").read_text())
    assert record["settings"]["trainer"]["lr"] == 0.02


# -- 4. folder identity depended on how --out was spelled ------------------------------------------


def test_c04_a_compare_folder_is_the_same_however_spelled_or_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = run_compare(_compare_config("cmp"), echo=_quiet, show=_quiet)
    assert first["runs_trained"] == 3  # joint+aux, and MILES under both readings
    again = run_compare(_compare_config(tmp_path / "cmp"), echo=_quiet, show=_quiet)
    assert again["runs_trained"] == 0 and again["rows"] == first["rows"]
    shutil.move(tmp_path / "cmp", tmp_path / "moved")
    moved = run_compare(_compare_config("moved"), echo=_quiet, show=_quiet)
    assert moved["runs_trained"] == 0 and moved["rows"] == first["rows"]


def test_c04_a_moved_sweep_folder_is_the_same_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("optuna")
    import optuna

    from miles.studies.sweep import SweepConfig, run_sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    monkeypatch.chdir(tmp_path)
    base = quiet_base(epochs=1, batch_size=32)
    base.dataset, base.latent_dim = TOY, 8

    def sweep(out: str) -> dict[str, Any]:
        config = SweepConfig(base=base, method="miles", trials=2, rerun_seeds=1, out_dir=out)
        return run_sweep(config, echo=_quiet, show=_quiet)

    first = sweep("sw")
    shutil.move(tmp_path / "sw", tmp_path / "moved")
    again = sweep(str(tmp_path / "moved"))
    assert again["runs_trained"] == 0
    assert again["best"] == first["best"] and again["rows"] == first["rows"]


# -- 5. fixed NAME.tmp names and no lock -----------------------------------------------------------


def test_c05_a_second_train_in_a_busy_folder_names_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = _config(tmp_path), tmp_path / "out"

    def long_run() -> int:
        return main(["train", "--config", str(config), "--out", str(out), "--quiet",
                     "--set", "trainer.epochs=100000"])  # fmt: skip

    child = fork(long_run, tmp_path / "child.log")
    try:
        deadline = time.monotonic() + 60
        while not (out / "last.pt").is_file():  # it is training now
            assert time.monotonic() < deadline, child.output()
            time.sleep(0.05)
        code, err = _train(capsys, config, out, "--resume")  # the lock is checked first
        assert code == 1
        _one_line_error(err, f"run folder {out} is in use by process {child.pid} on ")
    finally:
        child.kill()


def _save_many(path: Path, n: int) -> int:
    from miles.training.checkpoint import save_checkpoint

    for i in range(n):
        save_checkpoint(path, {"i": i, "pid": os.getpid(), "x": torch.zeros(256)})
    return 0


def test_c05_two_writers_of_one_file_never_share_a_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    children = [fork(lambda: _save_many(path, 150), tmp_path / f"w{i}.log") for i in range(2)]
    for child in children:
        assert child.wait() == 0, child.output()
    assert torch.load(path, weights_only=True)["i"] == 149
    assert helpers.temp_files(tmp_path) == []


# -- 6. disk full: torch-internal error, partial last.pt.tmp left ----------------------------------


def test_c06_disk_full_says_no_space_and_leaves_no_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.faults.test_disk import full_disk_run

    full_disk_run(tmp_path, capsys)


# -- 7. config checks ------------------------------------------------------------------------------

CONFIG_CASES = {
    "empty file": ("", "is empty"),
    "empty mapping": ("{}\n", "sets nothing"),
    "duplicate trainer": (
        f"dataset: {TOY}\ntrainer: {{epochs: 1}}\ntrainer: {{epochs: 2}}\n",
        "duplicate key 'trainer'",
    ),
    "progress no": (TRAIN_YAML.replace("batch_size: 32}", 'batch_size: 32, progress: "no"}'),
                    "progress must be a bool"),
    "strategy_params list": (
        TRAIN_YAML.replace("strategy_params: {tau: 0.05}", "strategy_params: [0.05]"),
        "strategy_params must be a mapping",
    ),
    "dataset_params list": (f"dataset: {TOY}\ndataset_params: [1]\n",
                            "dataset_params must be a mapping"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_c07_config_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    text, message = CONFIG_CASES[case]
    code, err = _train(capsys, _config(tmp_path, text), tmp_path / "out")
    assert code == 2
    _one_line_error(err, message)
    assert not (tmp_path / "out" / "last.pt").exists()


# -- 8. damaged files gave raw errors without their name -------------------------------------------


@pytest.fixture(scope="module")
def finished_compare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    helpers.register_toy_dataset()
    out = tmp_path_factory.mktemp("compare") / "cmp"
    run_compare(_compare_config(out), echo=_quiet, show=_quiet)
    return out


RUN = "runs/concat/miles/seed0"
DAMAGED = {
    "compare: result.json": (f"{RUN}/result.json", b'{"best_epoch": 2, "trunc', "compare"),
    "compare: done.json": (f"{RUN}/done.json", b'{"finished": tr', "compare"),
    "compare: run_config.json": (f"{RUN}/run_config.json", b"\x00\x01garbage", "compare"),
    "compare: compare_settings.json": ("compare_settings.json", b"", "compare"),
    "report: result.json": (f"{RUN}/result.json", b"[1, 2]", "report"),
    "report: compare.json": ("compare.json", b'{"kind": "compare", "rows": [', "report"),
}


def _compare_argv(out: Path) -> list[str]:
    """``miles compare`` as :func:`_compare_config` describes it."""
    return ["compare", "--dataset", TOY, "--methods", "joint+aux,miles", "--fusion", "concat",
            "--seeds", "1", "--epochs", "2", "--lr", "0.05", "--batch-size", "32",
            "--latent-dim", "8", "--out", str(out), "--quiet"]  # fmt: skip


def _compare_here(tmp_path: Path, finished_compare: Path, command: str) -> Path:
    """A finished compare to damage: trained where it is (a compare re-run must find its own
    folder), or a copy for ``miles report``."""
    out = tmp_path / "cmp"
    if command == "compare":
        run_compare(_compare_config(out), echo=_quiet, show=_quiet)
    else:
        shutil.copytree(finished_compare, out)
    return out


@pytest.mark.parametrize("case", list(DAMAGED))
def test_c08_a_damaged_file_names_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], finished_compare: Path, case: str
) -> None:
    name, content, command = DAMAGED[case]
    out = _compare_here(tmp_path, finished_compare, command)
    (out / name).write_bytes(content)
    capsys.readouterr()
    argv = _compare_argv(out) if command == "compare" else ["report", str(out)]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, str(out / name), "damaged")


def test_c08_an_empty_history_names_its_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], finished_compare: Path
) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(finished_compare, out)
    path = out / RUN / "result.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps(result | {"history": []}))
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    _one_line_error(capsys.readouterr().err, str(path), "history")


def test_c08_a_garbage_sweep_database_names_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optuna")
    out = tmp_path / "sw"
    out.mkdir()
    (out / "sweep.db").write_bytes(np.random.default_rng(0).bytes(3000))
    capsys.readouterr()
    argv = ["sweep", "--dataset", TOY, "--method", "miles", "--trials", "1", "--epochs", "1",
            "--latent-dim", "8", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, str((out / "sweep.db").resolve()), "SQLite")
    (out / "sweep.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)  # header, then junk
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "sweep.db is damaged")


def test_c08_a_checkpoint_missing_one_key_names_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = _config(tmp_path), tmp_path / "out"
    assert _train(capsys, config, out)[0] == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, out / "last.pt")
    code, err = _train(capsys, config, out, "--resume")
    assert code == 2
    _one_line_error(err, f"{out / 'last.pt'} is damaged", "lacks ['optimizer']", "--overwrite")


# -- 9. a corrupt best.pt's advice did not work ----------------------------------------------------


def test_c09_the_advice_for_a_corrupt_best_checkpoint_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = _config(tmp_path), tmp_path / "out"
    assert _train(capsys, config, out)[0] == 0
    result = json.loads((out / "result.json").read_text())
    assert result["best_epoch"] < result["epochs_run"]  # best.pt is needed to resume
    (out / "best.pt").write_bytes(b"garbage")
    code, err = _train(capsys, config, out, "--resume")
    assert code == 2
    line = _one_line_error(err, str(out / "best.pt"))
    # follow the advice, whatever it is
    if "delete it" in line:
        (out / "best.pt").unlink()
        code, err = _train(capsys, config, out, "--resume")
    else:
        assert "--overwrite" in line
        code, err = _train(capsys, config, out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "result.json").read_text())["test"] == result["test"]


# -- 10. --resume with another strategy ------------------------------------------------------------


def test_c10_resume_with_another_strategy_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, out = _config(tmp_path), tmp_path / "out"
    assert _train(capsys, config, out)[0] == 0
    code, err = _train(
        capsys, config, out, "--resume", "--set", "strategy=joint+aux", "--set",
        "strategy_params={}",
    )  # fmt: skip
    assert code == 2
    _one_line_error(err, "strategy miles -> joint+aux", "'strategy'")


# -- 11. prepare --skip-bad with every sample unreadable exited 0 ----------------------------------


def test_c11_prepare_with_every_sample_unreadable_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    helpers.register_text_preparer()
    raw = helpers.text_raw(tmp_path / "raw", n=10, bad=range(10))  # 2 numbers each, 4 expected
    capsys.readouterr()
    argv = ["prepare", helpers.TEXT, "--raw", str(raw), "--out", str(tmp_path / "cache"),
            "--skip-bad", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "every one of the 10 samples is unreadable")
    assert not (tmp_path / "cache" / "manifest.json").exists()


# -- 12. an all-NaN S-MNIST audio file -------------------------------------------------------------


def test_c12_an_all_nan_audio_file_is_named_with_its_nans(tmp_path: Path) -> None:
    from miles.data.prepare import RawDataError, prepare
    from miles.data.smnist import FILES, SMNISTPreparer
    from tests.data.test_smnist import _make_raw

    raw = _make_raw(tmp_path)
    path = raw / FILES["train"][1]
    audio = np.load(path)
    audio[:] = np.nan
    np.save(path, audio)
    for skip_bad in (False, True):
        with pytest.raises(RawDataError, match=r"data_sp_train\.npy: every one of its 40 MFCC "
                           r"rows holds NaN"):  # fmt: skip
            prepare(SMNISTPreparer(sizes=[16, 4, 4]), raw, tmp_path / f"o{skip_bad}",
                    skip_bad=skip_bad, progress=False)  # fmt: skip
    # a few NaN rows are only those rows (skipped when asked), not one merged "utterance"
    audio = np.load(raw / FILES["test"][1])
    np.save(path, np.random.default_rng(1).normal(size=(40, 507)).astype(np.float32))
    audio[[1, 4]] = np.nan
    np.save(raw / FILES["test"][1], audio)
    manifest = prepare(SMNISTPreparer(sizes=[16, 4, 1.0]), raw, tmp_path / "some",
                       skip_bad=True, progress=False)  # fmt: skip
    assert sorted(manifest["skipped"]) == ["test/00001", "test/00004"]


# -- 13. miles report silently dropped a missing run -----------------------------------------------


def test_c13_report_says_when_a_run_folder_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], finished_compare: Path
) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(finished_compare, out)
    shutil.rmtree(out / RUN)
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: 1 of 3 run folders hold no result.json (moved or deleted: {RUN})" in err
    page = (out / "report" / "report.md").read_text()
    assert f"1 of 3 run folders hold no result.json (moved or deleted: {RUN})" in page


# -- 15. best.pt and last.pt were never checked against each other ---------------------------------


def test_c15_a_best_checkpoint_from_another_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    assert _train(capsys, config, tmp_path / "a")[0] == 0
    assert _train(capsys, config, tmp_path / "b", "--set", "trainer.seed=1")[0] == 0
    shutil.copy(tmp_path / "b" / "best.pt", tmp_path / "a" / "best.pt")
    code, err = _train(capsys, config, tmp_path / "a", "--resume")
    assert code == 2
    _one_line_error(err, f"{tmp_path / 'a' / 'best.pt'} is damaged", "another run")


def test_c15_a_stale_best_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older best.pt of the same run (e.g. restored from a backup) does not match last.pt."""
    config, out = _config(tmp_path), tmp_path / "out"
    assert _train(capsys, config, out, "--set", "trainer.epochs=1")[0] == 0
    stale = (out / "best.pt").read_bytes()  # epoch 1's
    code, _ = _train(capsys, config, out, "--resume", "--force", "--set", "trainer.epochs=4")
    assert code == 0
    assert json.loads((out / "result.json").read_text())["best_epoch"] == 2
    (out / "best.pt").write_bytes(stale)
    code, err = _train(capsys, config, out, "--resume", "--set", "trainer.epochs=4")
    assert code == 2
    _one_line_error(err, "best.pt is damaged", "holds epoch 1 but last.pt says the best epoch is 2")


# -- 16. no fsync ----------------------------------------------------------------------------------


def test_c16_checkpoints_are_synced_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from miles.training.checkpoint import save_checkpoint

    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        calls.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"x": torch.ones(3)})
    kinds = [kind for kind, _ in calls]
    assert kinds == ["fsync", "rename", "fsync"], calls
    assert calls[0][1].startswith(str(tmp_path / ".last.pt.")) and calls[0][1].endswith(".tmp")
    assert calls[1][1] == str(target) and calls[2][1] == str(tmp_path)


# -- 17. tracebacks for user errors; Ctrl-C hints --------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_c17_user_errors_are_one_line_in_train_compare_and_prepare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], finished_compare: Path
) -> None:
    config, out = _config(tmp_path), tmp_path / "out"
    assert _train(capsys, config, out)[0] == 0
    (out / "last.pt").write_bytes(b"not a checkpoint")
    code, err = _train(capsys, config, out, "--resume")
    assert code == 2
    _one_line_error(err, f"{out / 'last.pt'} is damaged")
    # compare: an unfinished run whose checkpoint is damaged
    cmp = _compare_here(tmp_path, finished_compare, "compare")
    (cmp / RUN / "done.json").unlink()
    (cmp / RUN / "last.pt").write_bytes(b"\x80\x04garbage")
    capsys.readouterr()
    assert main(_compare_argv(cmp)) == 2
    _one_line_error(capsys.readouterr().err, f"{cmp / RUN / 'last.pt'} is damaged")
    # prepare: a cache folder whose manifest is not one
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("[1, 2]")
    raw = tmp_path / "raw"
    raw.mkdir()
    capsys.readouterr()
    assert main(["prepare", "smnist", "--raw", str(raw), "--out", str(cache), "--quiet"]) == 2
    _one_line_error(capsys.readouterr().err, f"{cache / 'manifest.json'} is damaged")


@pytest.mark.parametrize("command", ["train", "compare", "prepare"])
def test_c17_ctrl_c_says_how_to_resume(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    """(Already true before the fix: the issue 8 CLI prints the hint; kept as a regression.)"""
    import miles.data.prepare
    import miles.studies.study
    import miles.training.experiment

    def interrupt(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(miles.training.experiment, "run_experiment", interrupt)
    monkeypatch.setattr(miles.studies.study, "run_study", interrupt)
    monkeypatch.setattr(miles.data.prepare, "prepare", interrupt)
    argv = {
        "train": ["train", "--config", str(_config(tmp_path)), "--out", str(tmp_path / "o")],
        "compare": ["compare", "--dataset", TOY, "--out", str(tmp_path / "c")],
        "prepare": ["prepare", "smnist", "--raw", str(tmp_path), "--out", str(tmp_path / "p")],
    }[command]
    capsys.readouterr()
    assert main(argv) == 130
    hint = {"train": "with --resume", "compare": "run the same command", "prepare": "same command"}
    _one_line_error(capsys.readouterr().err, "interrupted; re-", hint[command])
