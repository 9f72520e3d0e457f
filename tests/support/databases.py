"""Real PostgreSQL and Redis servers for the tests (and Redis for the benchmarks), on unix sockets in
temporary folders."""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _pg_bin(name):
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        pytest.fail(f"PostgreSQL's {name} is missing: `make test` installs Debian's postgresql as root")
    return found


class Postgres:
    """initdb + postgres on a private socket; postgres refuses root, so it runs as the postgres user."""

    def __init__(self):
        # Not under pytest's tmp folder: the postgres user cannot enter root's 0700 folders.
        self.base = Path(tempfile.mkdtemp(prefix="vibethinker-pg-"))
        self.data, self.sock = self.base / "data", self.base / "sock"
        self.user = "postgres" if os.geteuid() == 0 else None
        self.proc = None

    def _cmd(self, *args):
        return (["runuser", "-u", self.user, "--"] if self.user else []) + list(args)

    def start(self):
        self.sock.mkdir(parents=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in (self.base, self.sock):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run(self._cmd(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                                 "--no-sync"), check=True, capture_output=True)
        self.proc = subprocess.Popen(
            self._cmd(_pg_bin("postgres"), "-D", str(self.data), "-k", str(self.sock), "-c", "listen_addresses=",
                      "-c", "fsync=off"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (self.sock / ".s.PGSQL.5432").exists():
            assert self.proc.poll() is None, "postgres exited at start"
            assert time.monotonic() < deadline, "postgres did not start"
            time.sleep(0.1)
        time.sleep(0.3)
        return self

    def create_db(self, name):
        subprocess.run(self._cmd(_pg_bin("createdb"), "-h", str(self.sock), "-U", "postgres", name),
                       check=True, capture_output=True)
        return f"postgresql+psycopg://postgres@/{name}?host={self.sock}"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)


def start_redis(work, *options):
    """A redis-server on a unix socket under `work`, as production runs it: (process, storage URI).
    `options`: more of redis-server's arguments (["--maxmemory", "2mb"])."""
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is missing: install Debian's redis-server (make test does, as root)")
    sock = Path(work) / "redis.sock"
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(work), *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    return proc, f"redis+unix://{sock}"


class Redis:
    """A real redis-server on a unix socket only (no TCP), stoppable and restartable on the same socket."""

    def __init__(self, base, *options):
        self.base = Path(base)
        self.sock = self.base / "redis.sock"
        self.proc, self.options = None, options

    @property
    def uri(self):
        return f"redis+unix://{self.sock}"

    def start(self):
        if not shutil.which("redis-server"):
            pytest.fail("redis-server is missing: `make test` installs Debian's redis-server as root")
        self.proc, _ = start_redis(self.base, *self.options)  # the benchmarks' too: one redis-server command line
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.sock.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
