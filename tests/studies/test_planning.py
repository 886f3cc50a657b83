"""How many runs a method needs in a comparison: a registry keyed by method name."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.strategies.registry import strategy_class
from miles.studies.ablate import AblateConfig
from miles.studies.ablate import plan_runs as plan_ablation
from miles.studies.compare import CompareConfig, plan_runs
from miles.studies.planning import (
    MethodPlan,
    PlanContext,
    comparison_runs,
    method_plan,
    register_plan,
)


def _ctx(calls: list[int]) -> PlanContext:
    def lrs() -> dict[str, float]:
        calls.append(1)
        return {"a": 1e-3, "b": 3e-3}

    return PlanContext(("a", "b"), lrs)


def test_built_in_plans() -> None:
    calls: list[int] = []
    ctx = _ctx(calls)
    assert comparison_runs("joint", ctx) == [("", {})]
    assert comparison_runs("unimodal", ctx) == [("a", {"modality": "a"}), ("b", {"modality": "b"})]
    assert method_plan("unimodal").fusion_independent
    assert not method_plan("miles").fusion_independent
    assert calls == []  # the LR sweep runs only for a method that needs it
    for mslr in ("mslr-k", "mslr-s", "mslr-d"):
        assert comparison_runs(mslr, ctx) == [("", {"unimodal_lrs": {"a": 1e-3, "b": 3e-3}})]
    assert len(calls) == 3


def test_studies_do_not_ask_the_strategies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning reads the registry here, never a strategy's own ``comparison_runs``."""
    for name in ("unimodal", "mslr-k"):
        cls = strategy_class(name)
        if hasattr(cls, "comparison_runs"):
            monkeypatch.setattr(cls, "comparison_runs", None)
    calls: list[int] = []
    config = CompareConfig(
        methods=["joint", "unimodal", "mslr-k"],
        fusions=["concat", "sum"],
        seeds=[0, 1],
        out_dir=str(tmp_path),
    )
    runs = plan_runs(config, _ctx(calls))
    # per seed: joint and mslr-k under each fusion, unimodal once per modality for both
    assert len(runs) == 2 * (2 * 2 + 2)
    uni = [r for r in runs if r.config.strategy == "unimodal"]
    assert {Path(str(r.run_dir)).parts[-3] for r in uni} == {"any-fusion"}
    assert [r.config.strategy_params for r in uni[:2]] == [{"modality": "a"}, {"modality": "b"}]
    assert calls == [1]  # one sweep, shared by every MSLR run
    ablation = plan_ablation(
        AblateConfig(values=[0.1], seeds=[0], out_dir=str(tmp_path)), ["a", "b"]
    )
    assert [r.ident["label"] for r in ablation] == ["a", "b", "joint", "joint+aux", "tau=0.1"]


def test_register_a_plan(tmp_path: Path) -> None:
    register_plan("ogm", MethodPlan(lambda ctx: [("a=0.1", {"alpha": 0.1}), ("a=1", {"alpha": 1})]))
    try:
        config = CompareConfig(
            methods=["ogm"], fusions=["concat"], seeds=[0], out_dir=str(tmp_path)
        )
        runs = plan_runs(config, _ctx([]))
        assert [r.config.strategy_params for r in runs] == [{"alpha": 0.1}, {"alpha": 1}]
        assert [r.ident["label"] for r in runs] == ["a=0.1", "a=1"]
    finally:
        register_plan("ogm", MethodPlan())
    with pytest.raises(TypeError, match="MethodPlan"):
        register_plan("ogm", lambda ctx: [])  # type: ignore[arg-type]


def test_methods_with_their_own_fusion_run_once_for_every_fusion(tmp_path: Path) -> None:
    """MLA, ReconBoost and Greedy install their own fusion: one run, shown under every fusion."""
    methods = ["mla", "reconboost", "greedy", "agm", "pmr", "mmpareto"]
    config = CompareConfig(
        methods=methods, fusions=["concat", "sum"], seeds=[0], out_dir=str(tmp_path)
    )
    runs = plan_runs(config, _ctx([]))
    count = {m: sum(r.config.strategy == m for r in runs) for m in methods}
    assert count == {"mla": 1, "reconboost": 1, "greedy": 1, "agm": 2, "pmr": 2, "mmpareto": 2}
