"""What the fault tests share: a toy dataset by name, forked children, seeded kill points, and the
one way two runs' outputs are compared bit for bit.

Children are *forked* from the test process (torch, the toy data and every import already there),
so a ``kill -9`` case costs a fraction of a second instead of a fresh interpreter's start-up.

A kill point is ``(kind, k)``: the child ``SIGKILL`` s itself at the ``k``-th event of ``kind``
among every write ``miles`` makes through :func:`miles.fileio.atomic_write`:

- ``mid-write``: half of the ``k``-th chunk written to a temporary file, then killed (a partial
  temporary file is left behind, as after a crash in the middle of ``torch.save``);
- ``before-rename``: the ``k``-th temporary file complete and synced, not yet renamed;
- ``after-rename``: the ``k``-th rename done, the folder not yet synced.

Points are drawn with a seeded ``random.Random`` among the events an uninterrupted run makes
(:func:`count_events`), so the campaign is bounded and replayable; a ``delay`` kill (``SIGKILL``
from the parent after a seeded random delay) lands wherever the run happens to be.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.conftest import make_toy_splits

TOY = "faults-toy"
KINDS = ("mid-write", "before-rename", "after-rename")
#: the campaign's seed (``MILES_FAULTS_SEED`` draws other points)
SEED = int(os.environ.get("MILES_FAULTS_SEED", "12"))

TRAIN_YAML = (
    f"dataset: {TOY}\n"
    "latent_dim: 8\n"
    "strategy: miles\n"
    "strategy_params: {tau: 0.05}\n"
    "trainer: {epochs: 4, lr: 5e-2, batch_size: 32}\n"
)


def register_toy_dataset() -> None:
    """``faults-toy``: :func:`tests.conftest.make_toy_splits` as a registered dataset."""
    from miles.data.registry import available_datasets, register_dataset

    if TOY in available_datasets():
        return

    def toy(n: Sequence[int] = (120, 40, 40), seed: int = 0) -> Any:
        return make_toy_splits(n=(int(n[0]), int(n[1]), int(n[2])), seed=seed)

    register_dataset(TOY)(toy)


TEXT = "faults-text"


def register_text_preparer() -> None:
    """``miles prepare faults-text``: the prepare tests' text preparer (``raw/<label>_<id>.txt``
    holding 4 numbers each)."""
    from miles.data.prepare import available_preparers, register_preparer
    from tests.data.test_prepare import TextPreparer

    if TEXT in available_preparers():
        return

    class FaultsText(TextPreparer):
        pass

    register_preparer(TEXT)(FaultsText)


def text_raw(folder: Path, n: int = 40, bad: Sequence[int] = ()) -> Path:
    """A raw copy for :data:`TEXT` with ``n`` samples (those in ``bad`` unreadable)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        values = "1 2" if i in bad else f"{i} {i + 1} {i + 2} {i + 3}"
        (folder / f"{i % 3}_{i:03d}.txt").write_text(values)
    return folder


# -- forked children -------------------------------------------------------------------------------


@dataclass
class Child:
    """A forked child: its pid and where its stdout and stderr went."""

    pid: int
    log: Path

    def wait(self, timeout: float = 120) -> int:
        """Its exit status (``-9`` when killed by ``SIGKILL``)."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise TimeoutError(f"child {self.pid} ran over {timeout} s:\n{self.output()}")
            time.sleep(0.01)

    def kill(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


def fork(fn: Callable[[], int | None], log: Path) -> Child:
    """Run ``fn()`` in a forked child whose stdout/stderr go to ``log``; its return value (or
    ``SystemExit`` code) is the exit status, an exception exits 1 with the traceback logged."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Child(pid, log)
    code = 1
    try:  # pragma: no cover - runs in the child
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
        sys.stderr = sys.stdout
        torch.set_num_threads(1)
        result = fn()
        code = int(result or 0)
    except SystemExit as exc:  # pragma: no cover
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # pragma: no cover
        traceback.print_exc()
        code = 1
    finally:  # pragma: no cover
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(code)


# -- kill points -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _hooks(on_event: Callable[[str], None]) -> Iterator[None]:
    """Call ``on_event(kind)`` at every event of :data:`KINDS` (see the module docstring)."""
    import miles.fileio as fileio

    original_write = fileio._Recorder.write
    original_replace = os.replace

    def write(self: Any, data: Any) -> int:
        on_event("mid-write")
        return original_write(self, data)

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        on_event("before-rename")
        original_replace(src, dst, **kw)
        on_event("after-rename")

    fileio._Recorder.write = write  # type: ignore[method-assign]
    os.replace = replace
    try:
        yield
    finally:
        fileio._Recorder.write = original_write  # type: ignore[method-assign]
        os.replace = original_replace


def count_events(fn: Callable[[], Any]) -> dict[str, int]:
    """How many events of each kind ``fn()`` makes (run in this process)."""
    counts = dict.fromkeys(KINDS, 0)

    def seen(kind: str) -> None:
        counts[kind] += 1

    with _hooks(seen):
        fn()
    return counts


#: the hooks armed in this (child) process
_ARMED: list[Any] = []


def arm(kind: str, k: int) -> None:
    """In a forked child: ``SIGKILL`` this process at the ``k``-th event of ``kind``."""
    import miles.fileio as fileio

    seen = dict.fromkeys(KINDS, 0)
    if kind == "mid-write":
        original = fileio._Recorder.write

        def write(self: Any, data: Any) -> int:
            seen["mid-write"] += 1
            if seen["mid-write"] == k:
                original(self, bytes(data)[: max(1, len(data) // 2)])
                self.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, data)

        fileio._Recorder.write = write  # type: ignore[method-assign]
        return

    def on_event(event: str) -> None:
        if event == kind:
            seen[kind] += 1
            if seen[kind] == k:
                os.kill(os.getpid(), signal.SIGKILL)

    hooks = _hooks(on_event)
    hooks.__enter__()  # never left: the child dies or exits
    _ARMED.append(hooks)  # referenced, so it is not collected (which would undo the hooks)


def kill_points(
    name: str, counts: dict[str, int], n: int, seed: int = SEED
) -> list[tuple[str, int]]:
    """``n`` seeded kill points ``(kind, k)`` among the events of an uninterrupted run."""
    rng = random.Random(f"{seed}:{name}")
    kinds = [kind for kind in KINDS if counts[kind]]
    return [(kind, rng.randint(1, counts[kind])) for kind in (rng.choice(kinds) for _ in range(n))]


def interrupted(
    run: Callable[[bool], int | None],
    points: Sequence[tuple[str, int]],
    folder: Path,
    *,
    delays: Sequence[float] = (),
) -> list[int]:
    """Run ``run(resume)`` in forked children, killed at each of ``points`` in turn (then after
    each of ``delays`` seconds), each one resuming the last: the exit statuses (``-9``: killed;
    ``0``: it finished before the point was reached)."""
    statuses = []
    resume = False
    for i, (kind, k) in enumerate(points):

        def killed(kind: str = kind, k: int = k, resume: bool = resume) -> int | None:
            arm(kind, k)
            return run(resume)

        statuses.append(fork(killed, folder / f"child{i}.log").wait())
        resume = True
    for i, delay in enumerate(delays):
        child = fork(lambda resume=resume: run(resume), folder / f"delay{i}.log")
        time.sleep(delay)
        statuses.append(child.kill())
        resume = True
    return statuses


# -- comparing outputs -----------------------------------------------------------------------------

#: fields that measure time, which two runs never share
TIMES = {"time_s", "wall_time_s", "wall_s", "elapsed_s", "meta", "runs_trained"}


def timeless(value: Any) -> Any:
    """``value`` (nested JSON) without the fields in :data:`TIMES`."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def run_outputs(folder: Path) -> dict[str, Any]:
    """Everything a run folder holds that must be identical between an interrupted and an
    uninterrupted run: result, history, and the final and best weights (as tensors)."""
    out: dict[str, Any] = {
        "result": timeless(json.loads((folder / "result.json").read_text())),
        "history": timeless(json.loads((folder / "history.json").read_text())),
    }
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(folder / name, weights_only=True)
        out[name] = {"epoch": ckpt["epoch"], "model": ckpt["model"]}
    return out


def assert_same_outputs(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-for-bit equal (tensors with ``torch.equal``), with the first difference named."""
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".pt"):
            assert a[key]["epoch"] == b[key]["epoch"], key
            sa, sb = a[key]["model"], b[key]["model"]
            assert sa.keys() == sb.keys(), key
            for name in sa:
                assert torch.equal(sa[name], sb[name]), f"{key}: {name} differs"
        else:
            assert a[key] == b[key], key


def temp_files(folder: Path) -> list[Path]:
    """Temporary files of :func:`miles.fileio.atomic_write` (and of the old fixed ``.tmp``
    names) anywhere under ``folder``."""
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))
