"""The ``miles`` command line: every behaviour a user meets, most of them in a real subprocess
(exit status and the first line the user reads)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from miles.cli import build_parser, main
from miles.cli.common import key_value
from miles.cli.yamlio import apply_overrides, load_yaml, parse_scalar
from miles.models.fusions import available_fusions

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",
}
TINY = (
    "dataset: fsdd-mnist\n"
    "dataset_params: {max_train: 60}\n"
    "fusion: concat\n"
    "latent_dim: 8\n"
    "strategy: miles\n"
    "strategy_params: {tau: 0.1, mu: 0.5}\n"
    "trainer: {epochs: 2, lr: 1e-3, batch_size: 32}\n"
)


#: what a package leaves in site-packages (module, dist-info, helpers), by name prefix
PACKAGE_FILES = {
    "matplotlib": ("matplotlib", "mpl_toolkits", "pylab"),
    "optuna": ("optuna",),
    "yaml": ("yaml", "_yaml", "pyyaml"),
}


def without(package: str, folder: Path) -> dict[str, str]:
    """An environment in which ``package`` is not installed: ``python -S`` (no site-packages)
    with a copy of site-packages made of links to everything but that package's files."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = folder / f"site-without-{package}"
    view.mkdir(parents=True)
    for entry in site.iterdir():
        if not entry.name.lower().startswith(PACKAGE_FILES[package]):
            (view / entry.name).symlink_to(entry)
    return ENV | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), str(view)])}


def miles(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m miles ARGS`` in a fresh interpreter (``env``: e.g. :func:`without`)."""
    flags = ["-S"] if env is not None else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "miles", *args],
        capture_output=True,
        text=True,
        env=env or ENV,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def test_version() -> None:
    from importlib.metadata import version

    out = miles("--version")  # also: python -m miles
    assert out.returncode == 0 and first_line(out.stdout) == f"miles {version('miles-lr')}"


def test_every_help_shows_the_defaults() -> None:
    out = miles("compare", "--help")
    assert out.returncode == 0 and first_line(out.stdout).startswith("usage: miles compare ")
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert (
        "(default: concat,sum)" in text and "--epochs EPOCHS epochs per run (default: 10)" in text
    )
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        text = command.format_help()
        for action in command._actions:
            default = action.default
            if not action.option_strings or default in (None, False, [], argparse.SUPPRESS):
                continue
            assert f"(default: {default})" in " ".join(text.split()), (name, action.dest)


def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    out = miles("compare", "--fusion", "nosuch")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "miles compare: error: argument --fusion: unknown fusions ['nosuch']; available: "
        f"{available_fusions()} (see 'miles compare --help')"
    ]
    with pytest.raises(SystemExit) as exc:
        main(["nosuch"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("miles: error: argument command: invalid choice")


CONFIG_ERRORS = [
    (None, "config file {path} not found"),  # a missing file
    ("", "config file {path} is empty"),
    ("dataset: fsdd-mnist\nepochs: 3\n", "unknown config keys ['epochs']"),
    ("dataset: fsdd-mnist\ndataset: mfeat\n", "{path}, line 2: duplicate key 'dataset'"),
    ("trainer: {lr: -1}\n", "lr must be a finite number > 0, got -1"),  # a bad value
    ("trainer: 3\n", "config key 'trainer' must be a mapping"),  # a bad type
    ("[1, 2]\n", "config file {path} must hold a mapping"),
]


@pytest.mark.parametrize(("config", "message"), CONFIG_ERRORS[:2])
def test_config_errors_are_one_line(tmp_path: Path, config: str | None, message: str) -> None:
    path = tmp_path / "run.yaml"
    if config is not None:
        path.write_text(config, encoding="utf-8")
    out = miles("train", "--config", str(path), "--out", str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [f"miles train: error: {message.format(path=path)}"] or (
        out.stderr.startswith(f"miles train: error: {message.format(path=path)}")
        and len(out.stderr.splitlines()) == 1
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("config", "message"), CONFIG_ERRORS[2:])
def test_more_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, message: str
) -> None:
    """The same path in-process (a subprocess per case would only cost time)."""
    path = tmp_path / "run.yaml"
    path.write_text(config, encoding="utf-8")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"miles train: error: {message.format(path=path)}")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("dataset: fsdd-mnist\nepochs: 3\n", encoding="utf-8")
    out = miles("train", "--config", str(path), "--debug")
    assert out.returncode == 1
    assert first_line(out.stderr) == "Traceback (most recent call last):"
    assert out.stderr.splitlines()[-1].startswith("ValueError: unknown config keys")


def test_yaml_reads_numbers_the_yaml_1_2_way() -> None:
    assert load_yaml("lr: 1e-3\nwd: 5E-4\nx: .5\nn: 3\ns: abc\ni: -.inf\n") == {
        "lr": 0.001,
        "wd": 0.0005,
        "x": 0.5,
        "n": 3,
        "s": "abc",
        "i": float("-inf"),
    }
    import yaml

    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # what PyYAML alone would give
    assert parse_scalar("1e-3") == 0.001 and parse_scalar("null") is None
    assert key_value("max-train=60") == ("max_train", 60)
    assert key_value("trainer.lr=3e-3") == ("trainer.lr", 0.003)
    for bad in ("frame", "=3"):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
            key_value(bad)
    raw = apply_overrides({"trainer": {"lr": 1}}, [("trainer.lr", 2), ("strategy_params.tau", 0)])
    assert raw == {"trainer": {"lr": 2}, "strategy_params": {"tau": 0}}
    with pytest.raises(ValueError, match=r"trainer\.lr is 2, not a mapping"):
        apply_overrides(raw, [("trainer.lr.x", 1)])


def test_train_prints_each_epochs_decision_and_takes_overrides(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(TINY, encoding="utf-8")
    out_dir = tmp_path / "out"
    out = miles(
        "train",
        "--config",
        str(config),
        "--out",
        str(out_dir),
        "--set",
        "trainer.lr=3e-3",
        "--set",
        "strategy_params.tau=0",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("epoch 1/2: val fused ")
    assert "; MILES u audio " in lines[0] and " delta " in lines[0] and " -> " in lines[0]
    assert lines[1].startswith("epoch 2/2: ")
    assert any(line.startswith("| miles |") for line in lines)
    result = json.loads((out_dir / "result.json").read_text())
    assert result["config"]["lr"] == 0.003 and result["strategy"]["tau"] == 0.0
    # tau = 0 slows the leading modality after epoch 1: the line says which, and the new rates
    decision = result["history"][0]["strategy"]["decision"]
    assert f"-> slowed {decision['slowed']}: next epoch lr " in lines[0]


def test_set_below_a_value_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(TINY, encoding="utf-8")
    assert main(["train", "--config", str(config), "--set", "trainer.lr.x=1"]) == 2
    assert first_line(capsys.readouterr().err) == (
        "miles train: error: --set trainer.lr.x: trainer.lr is 0.001, not a mapping to set a key in"
    )


def test_train_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(TINY, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    first = json.loads((out / "result.json").read_text())
    printed = capsys.readouterr().out
    assert "epoch 1/2" not in printed and "| miles |" in printed  # --quiet: the result only
    # resuming a finished run trains nothing more and reproduces the result
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet", "--resume"]) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["test"] == first["test"] and again["history"] == first["history"]
    assert main(["train", "--config", str(config), "--resume"]) == 2
    assert "--resume needs an output folder" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(TINY, encoding="utf-8")
    args = ["train", "--config", str(config), "--out", str(tmp_path / "o")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "miles", *args, "--set", "trainer.epochs=1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        # Ctrl-C as in a terminal, even when the tests run as a background job (which starts
        # with SIGINT ignored, and a child would inherit that)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("epoch 1/1000")  # training has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert first_line(err) == (
        "miles train: interrupted; re-run the same command with --resume to continue from the "
        "last epoch"
    )


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [
        (["demo", "--epochs", "1"], "matplotlib", "plot"),
        (["sweep", "--method", "miles"], "optuna", "sweep"),
    ],
)
def test_missing_extras_stop_before_any_work(
    tmp_path: Path, argv: list[str], module: str, extra: str
) -> None:
    out = miles(*argv, "--out", str(tmp_path / "out"), env=without(module, tmp_path))
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"miles {argv[0]}: error: this command needs {module}, which is not installed: "
        f"pip install 'miles-lr[{extra}]'"
    ]
    assert not (tmp_path / "out").exists()


def test_missing_yaml_names_the_cli_extra(tmp_path: Path) -> None:
    out = miles("list", env=without("yaml", tmp_path))
    assert out.returncode == 2, out.stderr
    assert first_line(out.stderr) == (
        "miles list: error: the miles command line needs yaml, which is not installed: "
        "pip install 'miles-lr[cli]'"
    )


def test_plugin_registers_a_strategy(tmp_path: Path) -> None:
    (tmp_path / "myplug.py").write_text(
        "from miles.strategies import Strategy, register_strategy\n\n"
        "@register_strategy('my-method')\n"
        "class MyMethod(Strategy):\n"
        "    name = 'my-method'\n",
        encoding="utf-8",
    )
    out = miles("list", "--plugin", "myplug.py", cwd=tmp_path)  # a file, after the command
    assert out.returncode == 0, out.stderr
    assert "my-method" in out.stdout.splitlines()[2]  # the strategies line
    # the plugin is imported before the arguments are checked: its name is a valid method
    out = miles("--plugin", "myplug", "compare", "--methods", "my-method,nope", cwd=tmp_path)
    assert out.returncode == 2 and "unknown methods ['nope']" in first_line(out.stderr)


def test_missing_plugin_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--plugin", "no_such_module", "list"]) == 2
    assert first_line(capsys.readouterr().err) == (
        "miles list: error: cannot import plugin 'no_such_module': ModuleNotFoundError: No "
        "module named 'no_such_module'"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["demo"],
        ["compare"],
        ["ablate", "--param", "tau", "--values", "0.1"],
        ["sweep", "--method", "miles"],
    ],
)
def test_every_training_command_takes_device(argv: list[str]) -> None:
    from miles.cli.common import base_config

    args = build_parser().parse_args([*argv, "--device", "cuda:1"])
    assert base_config(args).trainer.device == "cuda:1"
    train = build_parser().parse_args(["train", "--config", "x.yaml", "--device", "cuda:1"])
    assert train.device == "cuda:1"


def test_demo_one_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--epochs", "1", "--methods", "joint,miles", "--out", str(tmp_path)]
    assert main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    order = results["dominant_order"]
    header = (
        f"| fusion | method | fused | {order[0]} head (dominant) | {order[1]} head | gap | "
        f"probe {order[0]} / {order[1]} | slice {order[0]} / {order[1]} | chosen epoch | "
        "MILES acted |"
    )
    assert header in printed and (tmp_path / "results.md").read_text() in printed
    assert "runs planned" not in printed  # --quiet: the results only
    assert len(results["rows"]) == 4
    assert {(r["fusion"], r["method"]) for r in results["rows"]} == {
        (f, m) for f in ("concat", "sum") for m in ("joint", "miles")
    }
    for row in results["rows"]:
        assert 0.0 <= row["fused"] <= 1.0 and row["best_epoch"] == 1
        assert row["gap"] == pytest.approx(row[order[0]] - row[order[1]])  # signed
        assert (row["acted"] is None) == (row["method"] != "miles")
    png = tmp_path / "learning_dynamics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # with 1 epoch no MILES decision can change training: acted is 0 and the warning says so
    for fusion in ("concat", "sum"):
        row = next(r for r in results["rows"] if r["fusion"] == fusion and r["method"] == "miles")
        assert row["acted"] == 0
        assert f"MILES never acted in {fusion}/miles" in printed


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fsdd-mnist" in out and "miles" in out and "joint+aux" in out
    assert "fusions:      " + ", ".join(available_fusions()) in out
    assert "report kinds: ablate, compare, demo, regime, run, sweep" in out
