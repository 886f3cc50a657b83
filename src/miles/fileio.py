"""Files that survive crashes, full disks and power loss, and that name themselves when damaged.

Every file ``miles`` writes (checkpoints, histories, results, study files, caches' records) goes
through :func:`atomic_write`:

1. the bytes go to a temporary file *in the same folder*, with a unique name
   (``.NAME.<host>.<pid>.<random>.tmp``), so two writers never share a temporary file;
2. the temporary file is flushed and ``fsync``-ed, then renamed over ``NAME`` (``os.replace``,
   atomic on POSIX), then the folder is ``fsync``-ed so the rename itself is durable.

A reader therefore sees either the old file or the new one, never half of one, even after
``kill -9`` or a power cut (on a filesystem that honours ``fsync``). When the disk fills up, the
write fails with :class:`DiskFullError` ("no space left on device ...") and the temporary file is
removed; the previous ``NAME`` is untouched. Temporary files left by a killed process are removed by
:func:`remove_stale_temp_files` once their process is gone (only this host's: on a folder shared
between machines, another machine's process cannot be checked).

Every file ``miles`` reads back goes through a reader that names the file when it is damaged
(:class:`DamagedFileError`, a ``ValueError``): :func:`read_json` here, the checkpoint loader in
:mod:`miles.training.checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DamagedFileError",
    "DiskFullError",
    "RunFolderBusyError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_sqlite_database",
    "fsync_dir",
    "read_json",
    "remove_stale_temp_files",
    "stale_temp_files",
    "write_json",
]

#: errno values that mean "the disk (or the user's quota) is full"
_FULL = {errno.ENOSPC, errno.EDQUOT}
#: ``.NAME.<host>.<pid>.<random>.tmp``: what :func:`atomic_write` names its temporary files
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _host() -> str:
    """This machine's name as one dot-free part of a file name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing ``path``; the previous file is intact."""

    def __init__(self, path: Path | str, cause: BaseException | None = None) -> None:
        detail = f" ({cause})" if cause is not None else ""
        super().__init__(
            errno.ENOSPC,
            f"no space left on device while writing {path}{detail}; the previous version of "
            "the file is intact and no partial file was left: free some space and run the same "
            "command again (with --resume for miles train)",
        )
        self.filename = str(path)

    def __str__(self) -> str:
        return str(self.strerror)


class RunFolderBusyError(RuntimeError):
    """Another process works in this folder now (see :mod:`miles.training.run_folder`)."""


class DamagedFileError(ValueError):
    """A file ``miles`` reads back is truncated, not what it should hold, or lacks a key; the
    message names the file, says what is wrong and what to do."""

    def __init__(self, path: Path | str, why: str, advice: str = "") -> None:
        text = f"{path} is damaged: {why}"
        super().__init__(f"{text}; {advice}" if advice else text)
        self.path = str(path)
        self.why = why


class _Recorder:
    """A file object that remembers the ``OSError`` its writes raised: some writers (``torch.save``)
    turn it into an error of their own that no longer says the disk is full."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._fh.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _disk_full(exc: BaseException, recorder: _Recorder | None) -> OSError | None:
    """The "disk full" ``OSError`` behind ``exc`` (itself, its causes, or what ``recorder`` saw)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return seen
        seen = seen.__cause__ or seen.__context__
    if recorder is not None and recorder.error is not None and recorder.error.errno in _FULL:
        return recorder.error
    return None


def fsync_dir(folder: Path | str) -> None:
    """Make the entries of ``folder`` (a rename into it) durable; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in _FULL:
            raise DiskFullError(folder, exc) from exc
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # folders that cannot be synced
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(file)`` all or nothing (see the module docstring).

    Raises:
        DiskFullError: the disk filled up; no temporary file is left, ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp"
    )
    tmp = Path(tmp_name)
    recorder: _Recorder | None = None
    try:
        with os.fdopen(fd, "wb") as fh:
            recorder = _Recorder(fh)
            write(recorder)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        full = _disk_full(exc, recorder) if isinstance(exc, Exception) else None
        if full is not None:
            raise DiskFullError(path, full) from exc
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """``data`` into ``path``, all or nothing."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    """``text`` (UTF-8) into ``path``, all or nothing."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, payload: Any) -> None:
    """``payload`` as indented JSON, all or nothing."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(
    path: Path | str,
    *,
    what: str = "JSON file",
    advice: str = "",
    expect: type | tuple[type, ...] | None = dict,
) -> Any:
    """The JSON in ``path``; a file that is not JSON (truncated, garbage, empty) or not of type
    ``expect`` (default: an object) raises :class:`DamagedFileError` naming it, ``what`` it is
    and ``advice`` (what to do about it).

    Raises:
        FileNotFoundError: no such file.
        DamagedFileError: see above.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = "the file is empty" if not path.stat().st_size else f"not valid JSON ({exc})"
        raise DamagedFileError(path, f"{what}: {why}", advice) from None
    if expect is not None and not isinstance(data, expect):
        names = expect if isinstance(expect, tuple) else (expect,)
        wanted = " or ".join("an object" if t is dict else t.__name__ for t in names)
        raise DamagedFileError(
            path, f"{what}: expected {wanted}, found {type(data).__name__}", advice
        )
    return data


#: the first 16 bytes of every SQLite 3 database file
_SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_database(path: Path | str, *, advice: str = "") -> None:
    """Refuse a file at ``path`` that is not a readable SQLite database (an absent or empty file
    is fine: SQLite makes a new database there), naming it.

    Raises:
        DamagedFileError: garbage, a truncated header, or a database SQLite cannot read.
    """
    import sqlite3

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as fh:
        head = fh.read(len(_SQLITE_HEADER))
    if head != _SQLITE_HEADER:
        raise DamagedFileError(path, "not an SQLite database (it lacks SQLite's header)", advice)
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            con.execute("PRAGMA schema_version").fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:  # busy, locked: another process is using it, not damage
        return
    except sqlite3.DatabaseError as exc:
        raise DamagedFileError(path, f"not a readable SQLite database ({exc})", advice) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temp_files(folder: Path | str) -> Iterator[Path]:
    """The temporary files of :func:`atomic_write` in ``folder`` whose process (on this host)
    is gone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    host = _host()
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match and match["host"] == host and entry.is_file() and not _alive(int(match["pid"])):
            yield entry


def remove_stale_temp_files(folder: Path | str) -> list[Path]:
    """Delete the temporary files a killed process left in ``folder`` (never those of a process
    still running); returns what was removed."""
    removed = []
    for entry in list(stale_temp_files(folder)):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed
