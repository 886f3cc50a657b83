"""The README's promises: its Python examples run, and its test command is the one CI runs.

Every ```python block runs in-process, except blocks that start with ``# run with torchrun``,
which run under ``torchrun`` with two CPU ranks (gloo). The own-loop example also runs with every
optional dependency hidden: it must work on ``pip install miles-lr`` (torch alone).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TORCHRUN = "# run with torchrun"

#: What ``pip install miles-lr`` does not install.
OPTIONAL = ("torchmetrics", "lightning", "pytorch_lightning", "transformers", "tqdm", "yaml")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def section(title: str) -> str:
    """The first python block of the README section with this heading (up to the next one)."""
    lines = README.splitlines(keepends=True)
    heading = [
        i for i, line in enumerate(lines) if re.fullmatch(rf"#+ {re.escape(title)}\s*", line)
    ]
    assert heading, f"README has no section {title!r}"
    body, in_code = [], False
    for line in lines[heading[0] + 1 :]:
        if line.startswith("```"):
            in_code = not in_code
        elif line.startswith("#") and not in_code:
            break  # the next heading (a '#' inside a code block is a comment)
        body.append(line)
    blocks = re.findall(r"```python\n(.*?)```", "".join(body), flags=re.S)
    assert blocks, f"README section {title!r} has no python example"
    return str(blocks[0])


def test_every_python_example_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    blocks = [b for b in python_blocks() if not b.startswith(TORCHRUN)]
    assert len(blocks) >= 3, "README lost its examples"
    for code in blocks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the frameworks' own notices on a tiny CPU run
            exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "[" in out  # the own loop printed LRs
    assert "'miles/delta'" in out  # the Lightning and HF examples printed a decision


def test_own_loop_example_runs_on_the_core_install(tmp_path: Path) -> None:
    # None in sys.modules: `import tqdm` fails and importlib.util.find_spec says "not installed"
    blocker = textwrap.dedent(
        f"""
        import sys

        sys.modules.update(dict.fromkeys({OPTIONAL!r}))
        """
    )
    script = tmp_path / "own_loop.py"
    script.write_text(blocker + section("MILES in your own training loop"), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 3  # one line per epoch


def test_several_gpus_example_runs_under_torchrun(tmp_path: Path) -> None:
    code = section("On several GPUs")
    assert code.startswith(TORCHRUN)
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "logs"  # one stdout file per rank: their prints do not interleave
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("--log-dir", str(logs), "--redirects", "3", str(script)),
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    by_rank = {}
    for rank in (0, 1):
        (stdout,) = logs.glob(f"*/attempt_0/{rank}/stdout.log")
        lines = stdout.read_text(encoding="utf-8").splitlines()
        assert all(line.startswith(f"rank {rank} epoch ") for line in lines), lines
        by_rank[rank] = [line.split(" ", 2)[2] for line in lines]
    assert len(by_rank[0]) == 3
    assert by_rank[0] == by_rank[1]  # the same decision and LRs on both ranks, every epoch


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    match = re.search(r"\*\*\(2\)[^\n]*\n+```bash\n(.*?)\n```", README, flags=re.S)
    assert match, "README lacks the test command block"
    test_cmd = match.group(1).split("&&")[-1].strip()
    assert test_cmd == "python -m pytest -q"
    assert test_cmd in ci.splitlines()
    assert "miles demo" in README
