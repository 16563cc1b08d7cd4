"""A throw-away PostgreSQL server for tests, started from the Debian ``postgresql`` package.

``postgres_server`` (session scope) runs ``initdb`` into a fresh temporary folder and starts
the server on a free loopback port; ``postgres_url`` (per test) creates an empty database on
it and yields its SQLAlchemy URL. PostgreSQL refuses to run as root, so when the tests run as
root the folder is given to the ``postgres`` user and the binaries run through ``runuser``.

Missing binaries fail the test under CI (``CI=true``) and skip it elsewhere, with the
``apt-get`` line that installs them. ``MEDATTN_PG_BIN`` may point at another ``bin`` folder.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psycopg
import pytest

from tests.server_process import free_port

INSTALL_HINT = "apt-get update && apt-get install -y postgresql"
_database_numbers = itertools.count()


def find_postgres_bin() -> Optional[Path]:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding initdb and pg_ctl (or MEDATTN_PG_BIN)."""
    candidates = [os.environ["MEDATTN_PG_BIN"]] if os.environ.get("MEDATTN_PG_BIN") else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
        if Path(p).parent.name.isdigit() else 0, reverse=True)
    for folder in map(Path, candidates):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


@dataclass
class PostgresServer:
    bin_dir: Path
    base: Path
    port: int
    as_postgres_user: bool

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / tool), *args]
        if self.as_postgres_user:
            command = ["runuser", "-u", "postgres", "--", *command]
        # cwd inside the folder: the postgres user may not be allowed into the caller's cwd.
        return subprocess.run(command, cwd=self.base, capture_output=True, text=True, timeout=120)

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL (psycopg 3 driver)."""
        name = f"medattn_test_{next(_database_numbers)}"
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def log_tail(self) -> str:
        log = self.base / "server.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else "(no server log)"


def _start(bin_dir: Path) -> PostgresServer:
    as_root = os.geteuid() == 0
    # Directly under the system temp folder: pytest's tmp folders are 0700 root, closed to postgres.
    base = Path(tempfile.mkdtemp(prefix="medattn-pg-"))
    if as_root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.fail("running as root but there is no 'postgres' user to run PostgreSQL as "
                        f"(it comes with the package: {INSTALL_HINT})")
        os.chown(base, owner.pw_uid, owner.pw_gid)
    server = PostgresServer(bin_dir=bin_dir, base=base, port=free_port(), as_postgres_user=as_root)
    init = server.run("initdb", "-D", str(server.data_dir), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-locale", "--no-sync")
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    for _attempt in range(3):  # the free port may be taken between probing and binding
        # fsync off: a throw-away cluster; the store's SQL behaviour does not depend on it.
        options = f"-h 127.0.0.1 -p {server.port} -k {base} -c fsync=off -c full_page_writes=off"
        started = server.run("pg_ctl", "-D", str(server.data_dir), "-l", str(base / "server.log"),
                             "-w", "-t", "60", "-o", options, "start")
        if started.returncode == 0:
            return server
        server.port = free_port()
    log = server.log_tail()
    shutil.rmtree(base, ignore_errors=True)
    pytest.fail(f"pg_ctl start failed:\n{started.stdout}\n{started.stderr}\n{log}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        where = os.environ.get("MEDATTN_PG_BIN") or "/usr/lib/postgresql/*/bin"
        message = f"PostgreSQL binaries (initdb, pg_ctl) not found in {where} (install: {INSTALL_HINT})"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(message)
        pytest.skip(message + "; CI is unset, so this is a skip here and a failure under CI=true")
    server = _start(bin_dir)
    try:
        yield server
    finally:
        server.run("pg_ctl", "-D", str(server.data_dir), "-m", "fast", "-w", "stop")
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()
