"""The README's promises: its Python example runs, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_python_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert "[" in capsys.readouterr().out  # it printed LRs


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    match = re.search(r"\*\*\(2\)[^\n]*\n+```bash\n(.*?)\n```", README, flags=re.S)
    assert match, "README lacks the test command block"
    test_cmd = match.group(1).split("&&")[-1].strip()
    assert test_cmd == "python -m pytest -q"
    assert test_cmd in ci.splitlines()
    assert "miles demo" in README
