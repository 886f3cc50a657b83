"""A throw-away PostgreSQL server for tests: a new cluster in a temporary folder, reached over a
Unix socket in that folder only (no TCP port, so nothing else on the machine is touched).

The server binaries come from the Debian package ``postgresql`` (``/usr/lib/postgresql/<v>/bin``)
or from ``PATH``. PostgreSQL refuses to run as root: as root the cluster belongs to the
``postgres`` user the package creates, and ``initdb``/``pg_ctl`` run through ``runuser``.
Where the binaries are missing the fixture skips with the reason, except in CI (``CI`` or
``MILES_REQUIRE_POSTGRES`` set), where a missing server is a failure: ``.ci/run`` installs it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_USER = "postgres"  #: the system user of the Debian package, used when we are root
DATABASE = "miles_test"
ROLE = "miles"


def server_binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (``PATH`` first, else the
    newest Debian version), or None."""
    found = shutil.which("initdb")
    if found:  # often a link into the versioned folder that holds pg_ctl and postgres too
        folder = Path(found).resolve().parent
        if all((folder / name).is_file() for name in ("pg_ctl", "postgres")):
            return folder
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


def required() -> bool:
    """Whether a missing server must fail the test run instead of skipping (in CI)."""
    return bool(os.environ.get("CI") or os.environ.get("MILES_REQUIRE_POSTGRES"))


def unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail with it in CI."""
    if required():
        pytest.fail(f"PostgreSQL is required in CI but {reason}", pytrace=False)
    pytest.skip(reason)


def create_database(url: str, name: str) -> str:
    """Create the empty database ``name`` on the server of ``url``; return its URL."""
    import psycopg2
    from sqlalchemy.engine import make_url

    server = make_url(url)
    admin = psycopg2.connect(
        host=server.query["host"], user=server.username, dbname=server.database
    )
    try:
        admin.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    return server.set(database=name).render_as_string(hide_password=False)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a PostgreSQL server with one empty database; yield its SQLAlchemy URL; stop it and
    delete its files. Skips (or fails in CI) with the reason when it cannot be started."""
    try:
        import psycopg2  # noqa: F401  (the driver behind postgresql:// URLs)
    except ImportError:
        unavailable("psycopg2 is not installed (pip install 'miles-lr[sweep-pg]')")
    bindir = server_binaries()
    if bindir is None:
        unavailable(
            "the PostgreSQL server binaries (initdb, pg_ctl) are not installed; on Debian or "
            "Ubuntu: apt-get install postgresql"
        )
        return
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # postgres will not run as root
        try:
            owner = pwd.getpwnam(SERVER_USER)
        except KeyError:
            unavailable(f"running as root and there is no {SERVER_USER!r} user to run the server")
            return
        as_user = ["runuser", "-u", SERVER_USER, "--"]
    # under /tmp, not pytest's tmp_path: the server user must be able to reach the folder, and a
    # Unix socket path must stay under ~100 characters
    root = Path(tempfile.mkdtemp(prefix="miles-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if owner is not None:
        for path in (root, sock):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def server(*args: str | Path) -> None:
        cmd = [*as_user, str(bindir / str(args[0])), *map(str, args[1:])]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            log = root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}{tail}")

    started = False
    try:
        server("initdb", "-D", data, "-U", ROLE, "-A", "trust", "-E", "UTF8", "--no-sync")
        options = f"-k {sock} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
        server("pg_ctl", "-D", data, "-l", root / "server.log", "-o", options, "-w", "start")
        started = True
        yield create_database(f"postgresql+psycopg2://{ROLE}@/postgres?host={sock}", DATABASE)
    finally:
        if started:
            with contextlib.suppress(Exception):
                server("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
