"""A real PostgreSQL server for the tests: Debian's ``postgresql`` binaries, a fresh data directory and a
free port under a temporary directory, password authentication over TCP (the password reaches the
studio only through ``PGPASSWORD``, as in production). One server per test session; each test gets
its own database.

Where no server can start (no binaries, not root and not the postgres user), ``start`` raises
``Unavailable`` with the reason and the caller skips loudly."""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PASSWORD_ENV = "PGPASSWORD"


class Unavailable(RuntimeError):
    pass


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    if not found:
        raise Unavailable(f"PostgreSQL's {name} not found (Debian package postgresql; `make test` installs it as root)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="sft-pg-"))
        self.port = _free_port()
        self.password = secrets.token_hex(12)
        self.user = "postgres"
        self._as = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self.data = self.root / "data"

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self._as + argv, capture_output=True, text=True, **kw)

    def start(self) -> "PgServer":
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            shutil.chown(pwfile, "postgres")
        r = self._run([_bin("initdb"), "-D", str(self.data), "-U", self.user, "--auth-local=trust",
                       "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"], timeout=120)
        pwfile.unlink()
        if r.returncode:
            raise Unavailable(f"initdb failed: {r.stderr.strip()[-500:]}")
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c max_connections=200 -c shared_buffers=32MB")
        r = self._run([_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60",
                       "start"], timeout=90)
        if r.returncode:
            log = (self.root / "log").read_text()[-800:] if (self.root / "log").exists() else ""
            raise Unavailable(f"pg_ctl start failed: {r.stderr.strip()[-300:]} {log}")
        return self

    def url(self, db: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def create_database(self) -> str:
        """A new empty database; returns its URL (the password is in ``PGPASSWORD``, not the URL)."""
        import psycopg
        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                             dbname="postgres", autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self._run([_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"], timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise Unavailable(f"nothing listens on port {port} after {timeout}s")
