"""`miles ablate`: value checks, mu = 1 == joint+aux bit for bit, resuming, the table's columns."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import miles.training.experiment as experiment
from miles.cli import build_parser, main
from miles.studies.ablate import (
    AblateConfig,
    compare_histories,
    parse_fixed,
    parse_values,
    run_ablation,
)
from miles.studies.config import quiet_base
from miles.studies.runner import DONE
from miles.studies.summary import display_name

SMALL = {"max_train": 60}


def _config(tmp_path: Path, epochs: int = 2, fusion: str = "concat", **kw: Any) -> AblateConfig:
    base = dataclasses.replace(
        quiet_base(epochs=epochs), dataset_params=dict(SMALL), latent_dim=8, fusion=fusion
    )
    fields: dict[str, Any] = {
        "base": base,
        "param": "mu",
        "values": [1.0, 0.5],
        "fixed": {"tau": 0.0},  # MILES decides to slow a modality after every epoch
        "seeds": [0],
        "out_dir": str(tmp_path),
    }
    return AblateConfig(**(fields | kw))


def test_value_parsing_and_validation(tmp_path: Path) -> None:
    assert parse_values("tau", "0.5, 0.3,0.2,0.1,0.0") == [0.5, 0.3, 0.2, 0.1, 0.0]
    assert parse_values("mu", [1, 0.01]) == [1.0, 0.01]
    for param, text, match in (
        ("mu", "1.0,0.0", "mu must be in"),
        ("mu", "1.5", "mu must be in"),
        ("mu", "-0.1", "mu must be in"),
        ("tau", "0.2,-0.1", "tau must be >= 0"),
        ("tau", "0.2,nan", "must be numbers"),
        ("tau", "0.2,abc", "comma-separated numbers"),
        ("tau", "0.2,0.2", "duplicates"),
        ("tau", ",", "no tau values"),
        ("lr", "0.1", "unknown parameter"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_values(param, text)
    assert parse_fixed(None) == {"tau": 0.2, "mu": 0.5}
    assert parse_fixed("mu=0.25") == {"tau": 0.2, "mu": 0.25}
    for text, match in (
        ("mu=0", "mu must be in"),
        ("tau=-1", "tau must be >= 0"),
        ("gamma=1", "unknown parameter"),
        ("tau", "KEY=VALUE"),
        ("tau=x", "not a number"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_fixed(text)
    with pytest.raises(ValueError, match="unknown parameter"):
        _config(tmp_path, param="lr")
    with pytest.raises(ValueError, match="fusion"):
        _config(tmp_path, fusion="nosuch")
    # the CLI: argparse rejects an unknown --param (usage error), a bad value is one line
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["ablate", "--param", "gamma", "--values", "1"])
    assert exc.value.code == 2
    assert main(["ablate", "--param", "mu", "--values", "1,0", "--out", str(tmp_path)]) == 2
    args = build_parser().parse_args(
        ["ablate", "--param", "tau", "--values", "0.1", "--dataset-option", "max_train=60"]
    )
    assert args.dataset_option == [("max_train", 60)] and args.dataset == "mfeat-pix-fou"


def test_mu_one_equals_joint_aux_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = experiment.run_experiment

    def counting(config: Any, **kw: Any) -> Any:
        calls.append(f"{config.strategy}/{config.strategy_params}/{config.trainer.seed}")
        return real(config, **kw)

    monkeypatch.setattr(experiment, "run_experiment", counting)
    first = run_ablation(_config(tmp_path), echo=lambda _m: None)
    # 2 unimodal + joint + joint+aux + 2 MILES values
    assert len(calls) == 6
    order = first["dominant_order"]
    agg = {display_name(a): a for a in first["aggregate"]}
    assert list(agg) == ["unimodal", "joint", "joint+aux", "mu=1", "mu=0.5"]
    # mu = 1: the recorded metrics equal joint+aux exactly, per seed and in the table
    rows = first["rows"]
    for seed in (0,):
        mine = next(r for r in rows if r["label"] == "mu=1" and r["seed"] == seed)
        ref = next(r for r in rows if r["label"] == "joint+aux" and r["seed"] == seed)
        for key in ("fused", *order, "fused_last", *(f"{m}_last" for m in order), "best_epoch"):
            assert mine[key] == ref[key], key
        assert mine["acted"] == 0  # a factor of 1 never lowers a rate
        assert mine["gap"] == pytest.approx(mine[order[0]] - mine[order[-1]])
    decisions = json.loads(
        (tmp_path / "runs" / "miles-tau0.0-mu1.0" / "seed0" / "result.json").read_text()
    )
    # not a vacuous check: MILES did decide to slow a modality, with a factor of 1
    assert decisions["history"][0]["strategy"]["decision"]["slowed"] is not None
    assert agg["mu=0.5"]["acted_mean"] >= 1
    for key, value in agg["joint+aux"].items():
        if key not in ("label", "method") and not key.startswith(("acted", "slowed")):
            assert agg["mu=1"][key] == value, key
    assert agg["mu=1"]["acted_mean"] == 0 and agg["joint+aux"]["acted_mean"] != 0  # NaN: no MILES
    (check,) = first["mu_one_checks"]
    assert check["identical"] and check["seeds_compared"] == [0]
    md = (tmp_path / "ablate_mu_tau0.0.md").read_text()
    assert "bit-identical to joint+aux in 1/1 seeds" in md
    # the columns the issue asks for: unimodal reference, heads vs it, last-epoch heads, acted
    for col in (
        f"| {order[0]} head (dominant) |",
        "| heads vs unimodal (pp) |",
        "| chosen epoch |",
        "| MILES acted |",
        f"| slowed {' / '.join(order)} |",
        "| fused at last epoch |",
        "| heads at last epoch |",
        "| unimodal |",
    ):
        assert col in md, col
    assert f"gap = {order[0]} head - {order[-1]} head (signed" in md
    header = (tmp_path / "ablate_mu_tau0.0_table.csv").read_text().splitlines()[0].split(",")
    for col in ("fused_last_mean", f"{order[1]}_last_mean", "acted_mean", "best_epoch_mean"):
        assert col in header
    assert f"{order[0]}_vs_unimodal_mean" in header
    ref_row = next(a for a in first["aggregate"] if a["method"] == "unimodal")
    uni = [r for r in rows if r["method"] == "unimodal"]
    assert ref_row[f"{order[0]}_mean"] == pytest.approx(
        next(r[order[0]] for r in uni if r["label"] == order[0])
    )

    # a finished ablation re-run trains nothing and reproduces the table
    calls.clear()
    again = run_ablation(_config(tmp_path), echo=lambda _m: None)
    assert calls == []
    assert again["aggregate"] == first["aggregate"]
    # an interrupted run (no done.json) is the only one trained again
    (tmp_path / "runs" / "miles-tau0.0-mu0.5" / "seed0" / DONE).unlink()
    run_ablation(_config(tmp_path), echo=lambda _m: None)
    assert calls == ["miles/{'tau': 0.0, 'mu': 0.5}/0"]
    # a tau ablation in the same folder reuses the shared runs (references, tau=0 mu=0.5)
    calls.clear()
    tau_cfg = _config(tmp_path, param="tau", values=[0.0, 0.3], fixed={"mu": 0.5})
    run_ablation(tau_cfg, echo=lambda _m: None)
    assert calls == ["miles/{'tau': 0.3, 'mu': 0.5}/0"]
    assert (tmp_path / "ablate_tau.md").is_file() and (tmp_path / "ablate_mu_tau0.0.md").is_file()
    # another training budget in the same folder is refused, not mixed
    with pytest.raises(ValueError, match="different settings"):
        run_ablation(_config(tmp_path, epochs=3), echo=lambda _m: None)
    assert json.loads((tmp_path / "ablate_tau.json").read_text())["kind"] == "ablate"


def test_compare_histories_reports_the_first_difference() -> None:
    hist = [{"epoch": 1, "val_fused": 0.5, "val_a": 0.4, "lr_a": 1e-3}]
    a = {"history": hist, "best_epoch": 1, "test": {"fused": 0.5}, "test_last": None}
    assert compare_histories(a, json.loads(json.dumps(a))) is None
    b = json.loads(json.dumps(a))
    b["history"][0]["lr_a"] = 5e-4  # learning rates are not validation metrics
    assert compare_histories(a, b) is None
    b["history"][0]["val_a"] = 0.4000001
    assert compare_histories(a, b) == "epoch 1: val_a 0.4 vs 0.4000001"
    c = json.loads(json.dumps(a))
    c["test"]["fused"] = 0.6
    assert compare_histories(a, c) == "test differs"
