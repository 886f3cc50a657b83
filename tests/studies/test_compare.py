"""`miles compare`: the plan, the Table II rows, resuming without re-running finished runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import miles.training.experiment as experiment
from miles.cli import main
from miles.studies.compare import CompareConfig, run_compare
from miles.studies.config import quiet_base
from miles.studies.runner import DONE

SMALL = {"max_train": 60}


def _config(tmp_path: Path, epochs: int = 1, **kw: Any) -> CompareConfig:
    base = quiet_base(epochs=epochs)
    base.dataset_params, base.latent_dim = dict(SMALL), 8
    fields: dict[str, Any] = {
        "base": base,
        "methods": ["joint", "unimodal", "mslr-k", "miles"],
        "fusions": ["concat", "sum"],
        "seeds": [0, 1],
        "sweep_lrs": [1e-3, 3e-3],
        "sweep_epochs": 1,
        "out_dir": str(tmp_path),
    }
    return CompareConfig(**(fields | kw))


def test_compare_table_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = experiment.run_experiment

    def counting(config: Any, **kw: Any) -> Any:
        calls.append(f"{config.strategy}/{config.fusion}/{config.trainer.seed}")
        return real(config, **kw)

    monkeypatch.setattr(experiment, "run_experiment", counting)
    lines: list[str] = []
    first = run_compare(_config(tmp_path), echo=lines.append)
    # unimodal runs once per modality and seed (fusion-independent), the others per fusion;
    # the unimodal LR sweep (MSLR's input) trains 2 modalities x 2 rates once
    assert sorted(c for c in calls if c.startswith("unimodal")) == [
        *["unimodal/concat/0"] * 6,
        "unimodal/concat/1",
        "unimodal/concat/1",
    ]
    # joint, mslr-k and MILES with both reset_other readings, per fusion and seed
    assert len(calls) == 4 + 4 + 2 * 2 * 4
    assert calls.count("miles/concat/0") == 2
    # progress: one line per planned run with the time left, then the table
    assert lines[0] == "4 runs planned, 0 already done, 4 to train"  # the LR sweep first
    assert "20 runs planned, 0 already done, 20 to train" in lines
    assert any(line.startswith("[1/20] seed 0 concat joint: test fused") for line in lines)
    assert any("s left)" in line for line in lines)
    rows = first["rows"]
    uni = [r for r in rows if r["method"] == "unimodal"]
    assert {r["fusion"] for r in uni} == {"concat", "sum"}  # reused under both fusions
    order = first["dominant_order"]
    means = {
        m: sum(r[m] for r in uni if r["label"] == m) / sum(1 for r in uni if r["label"] == m)
        for m in ("audio", "image")
    }
    assert order[0] == max(means, key=lambda m: means[m])
    assert first["dominant_rule"].startswith("unimodal reference")
    assert first["kind"] == "compare"
    for agg in first["aggregate"]:
        assert agg["n"] == 2  # two seeds per cell
        assert agg["gap_mean"] == pytest.approx(agg[f"{order[0]}_mean"] - agg[f"{order[1]}_mean"])
    ref = next(a for a in first["aggregate"] if a["method"] == "unimodal" and a["fusion"] == "sum")
    assert ref[f"{order[0]}_mean"] == pytest.approx(means[order[0]])
    assert ref["uses_aux_losses"] is None
    joint = next(a for a in first["aggregate"] if a["method"] == "joint")
    assert joint["uses_aux_losses"] is False
    # the imbalance diagnostic: each head against its own unimodal model, and last-epoch heads
    for m in order:
        assert joint[f"{m}_vs_unimodal_mean"] == pytest.approx(joint[f"{m}_mean"] - means[m])
        assert 0.0 <= joint[f"{m}_last_mean"] <= 1.0
    md = (tmp_path / "compare.md").read_text()
    assert "| heads vs unimodal (pp) |" in md and "| heads at last epoch |" in md
    assert "## concat fusion" in md and "## sum fusion" in md
    assert f"| {order[0]} head (dominant) |" in md and "| aux |" in md
    assert f"gap = {order[0]} head - {order[1]} head (signed" in md
    # the readouts next to the method's own heads, and what each column is
    assert f"| probe {order[0]} / {order[1]} | slice {order[0]} / {order[1]} |" in md
    assert "probe = a linear classifier trained afterwards" in md and "slice = the fused head" in md
    assert "| miles | yes |" in md and "| miles (reset_other) | yes |" in md
    for row in rows:
        if row["method"] != "unimodal":
            assert 0.0 <= row[f"probe_{order[0]}"] <= 1.0 and 0.0 <= row[f"slice_{order[1]}"] <= 1.0
    assert (tmp_path / "compare_runs.csv").read_text().count("\n") == len(rows) + 1
    table_csv = (tmp_path / "compare_table.csv").read_text().splitlines()
    assert table_csv[0].startswith("fusion,method,label,uses_aux_losses,")
    assert len(table_csv) == 1 + 2 * 5  # 4 methods (MILES twice) x 2 fusions
    for row in rows:  # one signed gap: dominant head minus the other; none for a reference
        if row["method"] == "unimodal":
            assert row["gap"] is None and row["fused"] is None
        else:
            assert row["gap"] == pytest.approx(row[order[0]] - row[order[1]])
        assert (tmp_path / row["run_dir"] / "result.json").is_file()

    # a finished compare re-run trains nothing and reproduces the tables
    calls.clear()
    again = run_compare(_config(tmp_path), echo=lambda _m: None)
    assert calls == []
    assert again["aggregate"] == first["aggregate"]

    # an interrupted run (no done.json) is the only one trained again
    done = next((tmp_path / "runs" / "sum" / "miles").glob("seed1")) / DONE
    done.unlink()
    run_compare(_config(tmp_path), echo=lambda _m: None)
    assert calls == ["miles/sum/1"]

    # the same folder under another training budget is refused, not mixed
    with pytest.raises(
        ValueError, match=r"different settings \(differs in \['base.trainer.epochs'\]: "
    ):
        run_compare(_config(tmp_path, epochs=2), echo=lambda _m: None)
    # ... but not when only the device or the progress bars differ
    other = _config(tmp_path)
    other.base.trainer.progress = True
    calls.clear()
    run_compare(other, echo=lambda _m: None)
    assert calls == []
    # more seeds may be added to a folder: only the new runs train
    calls.clear()
    run_compare(_config(tmp_path, seeds=[0, 1, 2], methods=["joint"]), echo=lambda _m: None)
    assert calls == ["joint/concat/2", "joint/sum/2"]


def test_diverged_run_is_recorded_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = experiment.run_experiment

    def diverge_miles(config: Any, **kw: Any) -> Any:
        if config.strategy == "miles":
            raise FloatingPointError("training loss became nan")
        return real(config, **kw)

    monkeypatch.setattr(experiment, "run_experiment", diverge_miles)
    cfg = _config(tmp_path, methods=["joint", "miles"], fusions=["concat"], seeds=[0])
    payload = run_compare(cfg, echo=lambda _m: None)
    failed = [r for r in payload["rows"] if r.get("failed")]
    assert [(r["method"], r["label"]) for r in failed] == [("miles", ""), ("miles", "reset_other")]
    assert "concat miles, seed 0: training loss became nan" in (tmp_path / "compare.md").read_text()
    # recorded as done: a re-run does not retry it
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("re-ran"))
    again = run_compare(cfg, echo=lambda _m: None)
    assert [r["method"] for r in again["rows"] if r.get("failed")] == ["miles", "miles"]


def test_bad_compare_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown methods"):
        _config(tmp_path, methods=["joint", "magic"])
    with pytest.raises(ValueError, match="duplicates"):
        _config(tmp_path, methods=["joint", "joint"])
    with pytest.raises(ValueError, match="fusion"):
        _config(tmp_path, fusions=["nosuch"])
    with pytest.raises(TypeError, match="ExperimentConfig"):
        _config(tmp_path, base={"epochs": 3})
    with pytest.raises(ValueError, match="seeds"):
        _config(tmp_path, seeds=[0, 0])
    for argv in (["--methods", "joint,nope"], ["--methods", ","], ["--fusion", "nosuch"]):
        with pytest.raises(SystemExit) as exc:
            main(["compare", *argv, "--out", str(tmp_path)])
        assert exc.value.code == 2  # argparse usage error, not a traceback


def test_unimodal_reference_does_not_depend_on_fusion() -> None:
    """Why compare may run the unimodal references once and show them under every fusion."""
    import torch

    from miles.data import collate_multimodal
    from miles.models import JointFusionModel
    from miles.strategies import build_strategy
    from miles.training import Trainer, TrainerConfig
    from tests.conftest import make_toy_splits

    data = make_toy_splits()
    results = {}
    for fusion in ("concat", "sum"):
        torch.manual_seed(0)
        model = JointFusionModel(data.build_encoders(8), data.num_classes, fusion)
        trainer = Trainer(
            model,
            build_strategy("unimodal", modality="weak"),
            TrainerConfig(epochs=2, progress=False),
            collate_fn=collate_multimodal,
        )
        res = trainer.fit(data.train, data.val, data.test)
        results[fusion] = (res.test["unimodal"], model.encoders["weak"].state_dict())  # type: ignore[index]
    (h1, s1), (h2, s2) = results["concat"], results["sum"]
    assert h1 == h2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_cli_compare_passes_dataset_options(tmp_path: Path) -> None:
    argv = ["compare", "--methods", "joint", "--fusion", "concat", "--seeds", "1", "--epochs", "1"]
    argv += ["--latent-dim", "8", "--dataset-option", "max_train=60", "--out", str(tmp_path)]
    assert main([*argv, "--quiet"]) == 0
    saved = json.loads((tmp_path / "compare.json").read_text())["config"]
    assert saved["base"]["dataset_params"] == {"max_train": 60} and saved["seeds"] == [0]
    assert saved["base"]["latent_dim"] == 8 and saved["base"]["trainer"]["epochs"] == 1


def test_methods_defined_for_fewer_modalities(tmp_path: Path) -> None:
    """On three modalities Greedy (two only) is left out of 'all' with a note, and refused
    before any training when named."""
    from miles.studies.compare import ALL_METHODS, Compare
    from tests.conftest import make_toy_splits

    data = make_toy_splits(("a", "b", "c"), (0.3, 1.0, 1.5), n=(40, 20, 20))
    notes: list[str] = []
    every = CompareConfig(methods=list(ALL_METHODS), out_dir=str(tmp_path / "all"))
    study = Compare(every, data, notes.append)
    study.unimodal_lrs = {"a": 1e-3, "b": 1e-3, "c": 1e-3}  # no LR sweep in a planning test
    planned = {run.ident["method"] for run in study.plan()}
    assert "greedy" not in planned and {"joint", "miles", "mla"} <= planned
    assert len(notes) == 1 and notes[0].endswith(
        "has 3 modalities; greedy (at most 2) cannot run on it, so 'all' leaves them out"
    )
    named = CompareConfig(methods=["joint", "greedy"], out_dir=str(tmp_path / "named"))
    with pytest.raises(ValueError, match=r"greedy \(at most 2\) cannot run on it: leave them out"):
        Compare(named, data, notes.append).plan()
    two = make_toy_splits(n=(40, 20, 20))
    assert {r.ident["method"] for r in Compare(named, two, notes.append).plan()} == {
        "joint",
        "greedy",
    }
