"""A run folder: which settings made it, and which process trains in it now.

A run folder (``out_dir`` of a :class:`~miles.training.trainer.Trainer`, of ``miles train``, or
one run of a study) holds one run. Two things keep it honest:

- **Its settings record** (``run_config.json``): the run's settings and their fingerprint
  (SHA-256 of the settings that change what the run measures), written before anything is trained.
  :meth:`RunFolder.open` compares a new invocation against it: resuming under other settings is
  refused with the keys that differ and their two values (``force=True`` resumes anyway and the
  change is recorded, in the record and in ``result.json``); a new run into a folder that already
  holds one is refused unless ``overwrite=True``, which deletes the old run's files first (so a
  killed new run never leaves the old ``result.json`` next to new checkpoints). Settings that do
  not change what a run measures (:data:`IGNORED_SETTINGS`: where the folder is, the device, the
  progress bar) may differ, so a moved or differently spelled folder is the same run.
- **A lock** (``.lock``, ``flock``): held while a process works in the folder, so a second process
  gets :class:`RunFolderBusyError` naming the holder's pid and host, instead of both writing the
  same checkpoints. The lock is re-entrant within one process and released by the OS when the
  process dies, so a ``kill -9`` never leaves a folder locked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from miles.fileio import (
    DamagedFileError,
    RunFolderBusyError,
    read_json,
    remove_stale_temp_files,
    write_json,
)

try:  # POSIX; elsewhere folders are not locked (documented in docs/reliability.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "IGNORED_SETTINGS",
    "LOCK",
    "RECORD",
    "RUN_FILES",
    "RunFolder",
    "RunFolderBusyError",
    "RunFolderError",
    "comparable",
    "describe_diff",
    "fingerprint",
    "settings_diff",
]

#: the settings record of a run folder
RECORD = "run_config.json"
#: the lock file of a run folder
LOCK = ".lock"
#: the files a run writes in its folder (what ``overwrite`` deletes; anything else is left alone)
RUN_FILES = (
    "last.pt",
    "best.pt",
    "history.json",
    "history.csv",
    "result.json",
    "config.json",
    "done.json",
    RECORD,
)
#: settings (dotted paths) that may differ between the invocations sharing a run folder: they do
#: not change what a run measures
IGNORED_SETTINGS = (
    "out_dir",
    "trainer.device",
    "trainer.progress",
    # how batches are loaded and where numbers are logged: the same numbers either way
    "trainer.num_workers",
    "trainer.pin_memory",
    "trainer.loader",
    "trainer.loggers",
    "trainer.backend",
    # DistributedDataParallel's search for parameters without a gradient: the same numbers
    "trainer.find_unused_parameters",
)
#: the flags of ``miles train`` (and the ``fit`` arguments) a refusal points to
_ADVICE = (
    "continue it with --resume (resume=True), replace it with --overwrite (overwrite=True), or "
    "choose another output folder"
)


class RunFolderError(ValueError):
    """A run folder that holds something else than what was asked for (another run, other
    settings, files that are not a run's)."""


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy through JSON (as stored), so tuples and lists compare equal."""
    return dict(json.loads(json.dumps(dict(settings), default=repr)))


def comparable(
    settings: Mapping[str, Any], ignore: Sequence[str] = IGNORED_SETTINGS
) -> dict[str, Any]:
    """``settings`` without the dotted paths in ``ignore``: what decides whether two invocations
    are the same run."""
    out = _plain(settings)
    for dotted in ignore:
        *parents, last = dotted.split(".")
        node: Any = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def fingerprint(settings: Mapping[str, Any], ignore: Sequence[str] = IGNORED_SETTINGS) -> str:
    """SHA-256 of the canonical JSON of the :func:`comparable` settings: equal for two
    invocations that are the same run, whatever folder, device or key order."""
    text = json.dumps(comparable(settings, ignore), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def settings_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested settings mappings."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += settings_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def _lookup(settings: Mapping[str, Any], dotted: str) -> Any:
    node: Any = settings
    for key in dotted.split("."):
        node = node.get(key, "<unset>") if isinstance(node, Mapping) else "<unset>"
    return node


def describe_diff(old: Mapping[str, Any], new: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``trainer.lr 0.001 -> 0.01, strategy_params.tau 0.05 -> 0.4``."""

    def short(value: Any) -> str:
        text = json.dumps(value) if not isinstance(value, str) or value == "<unset>" else value
        return text if len(text) <= 60 else text[:57] + "..."

    return ", ".join(
        f"{key} {short(_lookup(old, key))} -> {short(_lookup(new, key))}" for key in keys
    )


#: folders this process holds the lock of: resolved path -> (lock file descriptor, depth)
_HELD: dict[str, list[int]] = {}


class RunFolder:
    """One run folder (see the module docstring). Nothing is created until used."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- the lock ---------------------------------------------------------------------------------
    def _holder(self) -> str:
        try:
            text = (self.path / LOCK).read_text(encoding="utf-8").split()
        except OSError:
            text = []
        if len(text) >= 2:
            return f"process {text[0]} on {text[1]}"
        return f"process {text[0]}" if text else "another process"

    @contextlib.contextmanager
    def lock(
        self, *, wait: bool = False, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[RunFolder]:
        """Hold the folder's lock for the ``with`` block (re-entrant in one process).

        Another process holding it raises :class:`RunFolderBusyError` naming it, or with
        ``wait=True`` blocks until it is released (telling ``on_wait`` first). On entry, the
        temporary files a killed writer left are removed.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD or fcntl is None:
            if key in _HELD:
                _HELD[key][1] += 1
            try:
                yield self
            finally:
                if key in _HELD:
                    _HELD[key][1] -= 1
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder()
                if not wait:
                    raise RunFolderBusyError(
                        f"run folder {self.path} is in use by {holder} (it holds "
                        f"{self.path / LOCK}); wait for it to finish or stop it, or use another "
                        "output folder"
                    ) from None
                if on_wait is not None:
                    on_wait(f"{self.path} is in use by {holder}: waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        _HELD[key] = [fd, 1]
        try:
            remove_stale_temp_files(self.path)
            yield self
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- what the folder holds --------------------------------------------------------------------
    def record(self) -> dict[str, Any] | None:
        """The settings record (``None`` when there is none); a record written before fingerprints
        (the settings alone) is read as one."""
        path = self.path / RECORD
        if not path.is_file():
            return None
        advice = "delete it to check nothing, or use another output folder"
        data = read_json(path, what="the run's settings record", advice=advice)
        if "fingerprint" not in data:  # the settings alone, as written before fingerprints
            return {"settings": data, "fingerprint": fingerprint(data), "changes": []}
        if not isinstance(data.get("settings"), dict):
            raise DamagedFileError(path, "the run's settings record has no 'settings'", advice)
        return data

    def run_files(self) -> list[str]:
        """The run files present (but the settings record)."""
        return [name for name in RUN_FILES if name != RECORD and (self.path / name).is_file()]

    def foreign_files(self) -> list[str]:
        """What else the folder holds (not a run file, not the lock)."""
        if not self.path.is_dir():
            return []
        known = {*RUN_FILES, LOCK}
        return sorted(p.name for p in self.path.iterdir() if p.name not in known)

    def changes(self) -> list[dict[str, Any]]:
        """The settings changes forced on resume, oldest first (empty for an honest run)."""
        record = self.record()
        return list(record.get("changes", [])) if record else []

    def clear(self) -> None:
        """Delete the run files (only those: anything else in the folder is left alone)."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        remove_stale_temp_files(self.path)

    def run_id(self) -> str | None:
        """The id of the run in this folder (``None``: no record, or one from before ids), stamped
        into its checkpoints so that a file from another run is recognised."""
        record = self.record()
        return str(record["run_id"]) if record and record.get("run_id") else None

    def _write_record(
        self,
        settings: Mapping[str, Any],
        changes: Sequence[Mapping[str, Any]] = (),
        run_id: str | None = None,
    ) -> None:
        write_json(
            self.path / RECORD,
            {
                "fingerprint": fingerprint(settings),
                "run_id": run_id or uuid.uuid4().hex,  # os.urandom: no torch RNG is touched
                "ignored": list(IGNORED_SETTINGS),
                "settings": _plain(settings),
                "changes": list(changes),
            },
        )

    # -- one invocation ---------------------------------------------------------------------------
    def open(
        self,
        settings: Mapping[str, Any],
        *,
        resume: bool,
        overwrite: bool = False,
        force: bool = False,
    ) -> list[str]:
        """Check the folder for a run under ``settings`` (and record them when it is new).

        - ``overwrite``: the previous run's files are deleted and the new settings recorded;
        - ``resume``: the recorded settings must match (but :data:`IGNORED_SETTINGS`), else
          :class:`RunFolderError` lists the keys that differ; with ``force`` the resume goes
          ahead and the change is recorded;
        - neither: the folder must not hold a run (or anything else).

        Call it holding :meth:`lock`. Returns the keys a forced resume changed.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.clear()
            self._write_record(settings)
            return []
        record = self.record()
        present = self.run_files()
        if record is None:
            if not resume and present:
                raise RunFolderError(
                    f"{self.path} already holds a run ({', '.join(present)}); {_ADVICE}"
                )
            foreign = self.foreign_files()
            if not resume and foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise RunFolderError(
                    f"{self.path} is not empty (it holds {shown}); a run needs a folder of its "
                    "own: choose another output folder, or pass --overwrite (overwrite=True) to "
                    "train there anyway (only a run's files are ever deleted)"
                )
            if present:
                warnings.warn(
                    f"{self.path} holds a run from before settings were recorded: resuming "
                    "without checking that it was started under the same settings",
                    stacklevel=3,
                )
            self._write_record(settings)
            return []
        old = record["settings"]
        diff = settings_diff(comparable(old), comparable(settings))
        if diff and not present:  # nothing was trained under the old settings: nothing to mix
            self._write_record(settings)
            return []
        if diff:
            what = describe_diff(old, settings, diff)
            if not resume:
                raise RunFolderError(
                    f"{self.path} holds another run (differs in {diff}: {what}); {_ADVICE}"
                )
            if not force:
                raise RunFolderError(
                    f"{self.path} was started with different settings (differs "
                    f"in {diff}: "
                    f"{what}). Resuming would train the rest of it under the new settings "
                    "while result.json describes one run: use another output folder, start over "
                    "with --overwrite, or pass --force to resume anyway (the change is then "
                    "recorded in result.json)"
                )
            change = {"differs": diff, "previous": {k: _lookup(old, k) for k in diff}}
            changes = [*record.get("changes", []), change]
            self._write_record(settings, changes, run_id=record.get("run_id"))
            return diff
        if not resume and present:
            raise RunFolderError(
                f"{self.path} already holds a run ({', '.join(present)}); {_ADVICE}"
            )
        return []
