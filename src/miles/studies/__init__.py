"""Studies: many runs planned, run or resumed, aggregated and written the same way.

Every study (``compare``, ``ablate``, ``sweep``, ``demo`` and the unimodal LR sweep MSLR needs)
is a config holding a base :class:`~miles.training.experiment.ExperimentConfig` plus the few fields
it varies, a plan of :class:`PlannedRun` s, and a document of its tables; the run loop
(:func:`run_all`), the aggregate step (:func:`summarize`) and the writers are shared:

- :mod:`miles.studies.runner`: plan -> run or resume (done markers, settings check, diverged runs
  recorded) with progress lines and ETA;
- :mod:`miles.studies.planning`: how many runs a method needs in a comparison;
- :mod:`miles.studies.summary`: dominant order, signed gaps, unimodal references, mean ± std;
- :mod:`miles.studies.compare`, :mod:`~miles.studies.ablate`, :mod:`~miles.studies.sweep`,
  :mod:`~miles.studies.demo`, :mod:`~miles.studies.lr_sweep`, :mod:`~miles.studies.regime`: the
  studies themselves (the regime map runs on worker processes, :mod:`~miles.studies.parallel`).

Every name is imported on first use, so ``import miles.studies`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from miles._lazy import lazy_attributes

_LAZY = {
    "StudyConfig": "miles.studies.config",
    "MethodPlan": "miles.studies.planning",
    "PlanContext": "miles.studies.planning",
    "method_plan": "miles.studies.planning",
    "register_plan": "miles.studies.planning",
    "PlannedRun": "miles.studies.runner",
    "RunBatch": "miles.studies.runner",
    "RunOutcome": "miles.studies.runner",
    "check_run_settings": "miles.studies.runner",
    "check_same_settings": "miles.studies.runner",
    "run_all": "miles.studies.runner",
    "run_one": "miles.studies.runner",
    "run_or_resume": "miles.studies.runner",
    "Summary": "miles.studies.summary",
    "summarize": "miles.studies.summary",
    "AblateConfig": "miles.studies.ablate",
    "run_ablation": "miles.studies.ablate",
    "CompareConfig": "miles.studies.compare",
    "run_compare": "miles.studies.compare",
    "DemoConfig": "miles.studies.demo",
    "RegimeConfig": "miles.studies.regime",
    "run_regime": "miles.studies.regime",
    "run_parallel": "miles.studies.parallel",
    "run_demo": "miles.studies.demo",
    "SweepConfig": "miles.studies.sweep",
    "run_sweep": "miles.studies.sweep",
    "sweep_unimodal_lrs": "miles.studies.lr_sweep",
}

if TYPE_CHECKING:
    from miles.studies.ablate import AblateConfig, run_ablation
    from miles.studies.compare import CompareConfig, run_compare
    from miles.studies.config import StudyConfig
    from miles.studies.demo import DemoConfig, run_demo
    from miles.studies.lr_sweep import sweep_unimodal_lrs
    from miles.studies.parallel import run_parallel
    from miles.studies.planning import MethodPlan, PlanContext, method_plan, register_plan
    from miles.studies.regime import RegimeConfig, run_regime
    from miles.studies.runner import (
        PlannedRun,
        RunBatch,
        RunOutcome,
        check_run_settings,
        check_same_settings,
        run_all,
        run_one,
        run_or_resume,
    )
    from miles.studies.summary import Summary, summarize
    from miles.studies.sweep import SweepConfig, run_sweep


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "AblateConfig",
    "CompareConfig",
    "DemoConfig",
    "MethodPlan",
    "PlanContext",
    "PlannedRun",
    "RegimeConfig",
    "RunBatch",
    "RunOutcome",
    "StudyConfig",
    "Summary",
    "SweepConfig",
    "check_run_settings",
    "check_same_settings",
    "method_plan",
    "register_plan",
    "run_ablation",
    "run_all",
    "run_compare",
    "run_demo",
    "run_one",
    "run_or_resume",
    "run_parallel",
    "run_regime",
    "run_sweep",
    "summarize",
    "sweep_unimodal_lrs",
]
