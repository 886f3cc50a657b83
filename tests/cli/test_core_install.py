"""``miles`` on the core install (``pip install miles-lr``: torch alone) says, in one line, which
extra installs the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: what the core install lacks (the extras' packages, and NumPy, which torch does not require)
NOT_IN_CORE = (
    "numpy",
    "torchmetrics",
    "tqdm",
    "yaml",
    "matplotlib",
    "optuna",
    "lightning",
    "transformers",
    "tensorboard",
)
#: None in sys.modules: importing the package fails, importlib.util.find_spec says "not installed"
RUN_WITHOUT = (
    "import sys\n"
    f"sys.modules.update(dict.fromkeys({NOT_IN_CORE!r}))\n"
    "from miles.cli import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize(("argv", "prog"), [([], "miles"), (["train", "--help"], "miles train")])
def test_miles_says_which_extra_in_one_line(argv: list[str], prog: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        f"{prog}: error: the miles command line needs yaml, which is not installed: "
        "pip install 'miles-lr[cli]'"
    ]
