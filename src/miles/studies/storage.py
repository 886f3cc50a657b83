"""The sweep's Optuna storage, opened safely by many processes at the same instant.

Workers of one sweep share an Optuna RDB storage. Two things they do must not interleave:

- **creating the storage**: Optuna creates its tables and stamps the schema version on first use,
  so two processes opening a fresh database together can both try, and one fails
  (``table studies already exists``, ``IntegrityError ... alembic_version``);
- **claiming a trial**: "are fewer than ``--trials`` finished or running? then start one" and
  "re-queue this interrupted trial" are read-then-write decisions, so two workers deciding
  together could start one trial too many or re-queue a trial twice.

:func:`storage_lock` gives the lock that serialises them, chosen by the database backend
(:data:`LOCKS`): a lock file next to a SQLite database (one machine), a PostgreSQL advisory lock
held on its own connection (any number of machines). Both are released by the operating system or
the server when the process holding them dies, so a killed worker never leaves the study locked.
Other backends (e.g. MySQL) get no lock: their storage creation is retried instead, and the two
decisions keep a small race (documented in ``docs/sweep.md``).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from sqlalchemy.engine import URL

__all__ = [
    "LOCKS",
    "LOCK_TIMEOUT_S",
    "heartbeat_interval",
    "open_storage",
    "shown",
    "storage_lock",
]

#: how long a worker waits for the lock before giving up: claims take milliseconds and storage
#: creation about a second, so waiting this long means the holder is stuck, not busy
LOCK_TIMEOUT_S = 600
#: storage creation attempts on a backend without a lock (another worker may be creating it)
CREATE_ATTEMPTS = 8
#: the PostgreSQL advisory-lock key of miles sweeps: a fixed signed 64-bit number
ADVISORY_KEY = int.from_bytes(hashlib.sha256(b"miles.sweep").digest()[:8], "big", signed=True)


def shown(url: str) -> str:
    """``url`` as it may be printed and written into reports: its password, if any, masked."""
    from sqlalchemy.engine import make_url

    try:
        return str(make_url(url).render_as_string(hide_password=True))
    except Exception:  # not a URL SQLAlchemy can parse: Optuna will say so; hide nothing here
        return url


class _FileLock:
    """A lock file ``<database>.lock`` beside a SQLite database; its time-out says what was
    waited for. Reusable; not re-entrant."""

    def __init__(self, url: URL) -> None:
        from filelock import FileLock

        self._path = f"{url.database}.lock"
        self._lock = FileLock(self._path, timeout=LOCK_TIMEOUT_S)

    def __enter__(self) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise TimeoutError(
                f"waited {LOCK_TIMEOUT_S} s for the sweep lock {self._path}: another process "
                "holds it (a SQLite database on a network file system cannot be shared: use "
                "PostgreSQL)"
            ) from None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _sqlite_lock(url: URL) -> AbstractContextManager[Any]:
    """A lock file beside the database; an in-memory database (one process) needs none."""
    if not url.database or url.database == ":memory:":
        return contextlib.nullcontext()
    return _FileLock(url)


class _AdvisoryLock:
    """A PostgreSQL session-level advisory lock on a connection of its own.

    The lock belongs to the connection: a worker that dies while holding it loses the
    connection, and the server releases the lock. Reusable; not re-entrant.
    """

    def __init__(self, url: URL) -> None:
        self._url = url
        self._engine: Any = None
        self._connection: Any = None

    def __enter__(self) -> None:
        import sqlalchemy

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self._url, poolclass=sqlalchemy.pool.NullPool)
        connection = self._engine.connect()
        try:
            # a utility statement takes no bound parameters; the value is our own constant
            connection.execute(sqlalchemy.text(f"SET lock_timeout = {LOCK_TIMEOUT_S * 1000}"))
            lock = sqlalchemy.text("SELECT pg_advisory_lock(:key)")
            connection.execute(lock, {"key": ADVISORY_KEY})
            connection.commit()  # the lock outlives the transaction: it is held by the session
        except sqlalchemy.exc.OperationalError as exc:
            connection.close()
            if "lock timeout" not in str(exc):
                raise
            raise TimeoutError(
                f"waited {LOCK_TIMEOUT_S} s for the sweep's advisory lock in "
                f"{self._url.render_as_string(hide_password=True)}: another "
                "process holds it"
            ) from exc
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def __exit__(self, *exc: object) -> None:
        import sqlalchemy

        connection, self._connection = self._connection, None
        try:
            connection.execute(
                sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY}
            )
            connection.commit()
        finally:
            connection.close()  # closing the session releases the lock in any case


#: backend name -> the lock serialising storage creation and trial claims for one database
LOCKS: dict[str, Callable[[URL], AbstractContextManager[Any]]] = {
    "sqlite": _sqlite_lock,
    "postgresql": _AdvisoryLock,
}


def storage_lock(url: str) -> AbstractContextManager[Any] | None:
    """The lock that serialises storage creation and trial claims of the database at ``url``
    (reusable), or ``None`` for a backend without one (:data:`LOCKS`)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    make = LOCKS.get(parsed.get_backend_name())
    return None if make is None else make(parsed)


def _retrying(create: Callable[[], Any]) -> Any:
    """``create()``, tried again after a short, growing random pause when the database refuses
    it; the last refusal is raised."""
    import sqlalchemy.exc

    for attempt in range(CREATE_ATTEMPTS):
        try:
            return create()
        except sqlalchemy.exc.DBAPIError:
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0.05, 0.5) * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


#: what to do about a sweep database that is not one
DAMAGED_DB = (
    "move it away (the trials it held are lost) or pass another --storage, or another --out"
)


def open_storage(url: str, stale_after: int, *, retry: bool) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage at ``url``, with Optuna's heartbeat (a trial silent for
    ``stale_after`` seconds counts as killed).

    Call it holding :func:`storage_lock`; on a backend without one pass ``retry=True``: a
    creation refused by the database (likely another worker creating the same tables) is then
    tried again after a short random pause.
    """
    import optuna
    from sqlalchemy.engine import make_url

    from miles.extras import require

    parsed = make_url(url)
    if parsed.get_driver_name() == "psycopg2":  # postgresql:// (SQLAlchemy's default driver)
        require("psycopg2", what=f"the storage {shown(url)}")
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            from miles.fileio import check_sqlite_database

            check_sqlite_database(database, advice=DAMAGED_DB)
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # several local processes may share the file: wait for its lock instead of failing
        engine_kwargs = {"connect_args": {"timeout": 60}}

    def create() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval(stale_after),
                grace_period=stale_after,
            )

    return _retrying(create) if retry else create()


def heartbeat_interval(stale_after: int) -> int:
    """Seconds between a running trial's heartbeats: four per ``stale_after``, at least one."""
    return max(1, stale_after // 4)
