"""``import miles`` and the scheduler's functional API need torch alone.

Checked in a fresh interpreter: using the core API imports none of the optional dependencies
(torchmetrics, matplotlib, PyYAML, tqdm) beyond what torch itself loads. numpy is not checked:
torch's own optimizer machinery imports it when present.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_core_api_without_optional_dependencies() -> None:
    code = textwrap.dedent(
        """
        import sys
        import torch
        from torch import nn
        torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)  # what torch itself loads
        before = set(sys.modules)
        import miles
        enc = {"a": nn.Linear(3, 4), "b": nn.Linear(2, 4)}
        model = miles.JointFusionModel(enc, num_classes=2)
        opt = torch.optim.SGD(miles.modality_param_groups(model), lr=0.1)
        sched = miles.MILES(opt)
        d = sched.step(fused=0.9, unimodal={"a": 0.85, "b": 0.3})
        assert d.slowed == "a", d
        assert miles.conditional_utilization(0.9, {"a": 0.85, "b": 0.3})["a"] > 0.6
        assert miles.imbalance({"a": 0.1, "b": 0.5}) == 0.4
        optional = {"torchmetrics", "matplotlib", "yaml", "tqdm"}
        loaded = sorted(m for m in optional if m in sys.modules and m not in before)
        assert not loaded, f"core API imported optional dependencies: {loaded}"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
