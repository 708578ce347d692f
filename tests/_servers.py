"""Throwaway PostgreSQL clusters and ``tiled serve config`` servers for tests.

``start_postgres()`` finds PostgreSQL (``/usr/lib/postgresql/*/bin``, the Debian layout) or
installs the Debian package ``postgresql`` with apt when running as root, initdb's a
cluster in a temporary folder (as the ``postgres`` user when we are root: the server
refuses to run as root), and starts it on a free loopback port with trust
authentication. ``start_tiled()`` serves ``deploy/tiled-postgres.yml`` on a free (or
given) loopback port and waits until ``/healthz`` answers.

The fixtures ``postgres`` (module scope) and ``facility_server`` use them and stop and
delete everything afterwards. When PostgreSQL is missing and cannot be installed they
fail with the command that fixes it; they never skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "deploy" / "tiled-postgres.yml"
INSTALL_HINT = (
    "PostgreSQL is needed by the tests marked 'postgres'. Install it with "
    "`apt-get update && apt-get install -y postgresql` (Debian/Ubuntu, as root), or put "
    "pg_ctl/initdb on PATH."
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin_dirs() -> list[Path]:
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    on_path = shutil.which("pg_ctl")
    if not found and on_path:
        found.append(Path(on_path).resolve().parent)
    return found


def find_or_install_postgres() -> Path:
    """Folder holding ``initdb`` and ``pg_ctl``; installs Debian's package if missing."""
    dirs = _pg_bin_dirs()
    if dirs:
        return dirs[-1]
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise RuntimeError(f"PostgreSQL not found and cannot be installed here. {INSTALL_HINT}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", "postgresql"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr[-2000:]}\n"
                f"{INSTALL_HINT}"
            )
    dirs = _pg_bin_dirs()
    if not dirs:
        raise RuntimeError(f"apt installed postgresql but no pg_ctl was found. {INSTALL_HINT}")
    return dirs[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` user when root."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    user: str = "postgres"
    databases: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def uri(self, database: str, driver: str | None = None) -> str:
        scheme = "postgresql" if driver is None else f"postgresql+{driver}"
        return f"{scheme}://{self.user}@127.0.0.1:{self.port}/{database}"

    def createdb(self, name: str) -> str:
        _run(
            _as_postgres(
                [str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), name]
            )
        )
        self.databases.append(name)
        return name

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(
                _as_postgres(
                    [
                        *(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir)),
                        *("-m", "immediate", "-w", "stop"),
                    ]
                ),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb + start a cluster on a free loopback port (trust auth, no fsync)."""
    bin_dir = find_or_install_postgres()
    root = Path(tempfile.mkdtemp(prefix="deepfocus-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres")
    port = free_port()
    server = PostgresServer(bin_dir=bin_dir, root=root, port=port)
    try:
        _run(
            _as_postgres(
                [
                    *(str(bin_dir / "initdb"), "-D", str(server.data_dir), "-A", "trust"),
                    *("-U", "postgres", "-E", "UTF8", "--no-sync"),
                ]
            )
        )
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        _run(
            _as_postgres(
                [
                    *(str(bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-o", options),
                    *("-l", str(root / "postgres.log"), "-w", "-t", "60", "start"),
                ]
            )
        )
    except BaseException:
        log = root / "postgres.log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        server.stop()
        if detail:
            raise RuntimeError(f"PostgreSQL did not start:\n{detail}") from None
        raise
    return server


@dataclass
class TiledServer:
    process: subprocess.Popen
    port: int
    api_key: str
    root: Path  # holds data/ (arrays) and tiled.log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/metadata/"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        shutil.rmtree(self.root, ignore_errors=True)


def start_tiled(
    postgres: PostgresServer,
    *,
    port: int | None = None,
    database: str | None = None,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> TiledServer:
    """``tiled serve config deploy/tiled-postgres.yml`` on a loopback port; wait for health."""
    import httpx

    database = database or postgres.createdb(f"deepfocus_{secrets.token_hex(4)}")
    tables = postgres.createdb(f"{database}_tables")
    port = port or free_port()
    api_key = api_key or secrets.token_hex(16)
    root = Path(tempfile.mkdtemp(prefix="deepfocus-tiled-"))
    data_dir = root / "data"
    data_dir.mkdir()
    log = root / "tiled.log"
    env = {
        **os.environ,
        "TILED_SINGLE_USER_API_KEY": api_key,
        "DEEPFOCUS_CATALOG_URI": postgres.uri(database, driver="asyncpg"),
        "DEEPFOCUS_TABLES_URI": postgres.uri(tables),
        "DEEPFOCUS_DATA_DIR": str(data_dir),
    }
    tiled = [sys.executable, "-m", "tiled"]
    cmd = [*tiled, "serve", "config", str(CONFIG), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = TiledServer(process=process, port=port, api_key=api_key, root=root)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    detail = log.read_text()[-3000:]
    server.stop()
    raise RuntimeError(
        f"`{' '.join(cmd)}` did not become healthy within {timeout} s "
        f"(exit code {process.poll()}). Log:\n{detail}"
    )


@pytest.fixture(scope="module")
def postgres():
    """A running throwaway PostgreSQL cluster (module scope); fails if none can be had."""
    try:
        server = start_postgres()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def facility_server(postgres):
    """``tiled serve config deploy/tiled-postgres.yml`` on PostgreSQL (module scope)."""
    server = start_tiled(postgres)
    yield server
    server.stop()
