"""Real service processes for the tests: started with an environment, stopped by signal, and
their output kept in a file for assertions and for the failure report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from streamgroup.devserver import free_port

TESTS_DIR = Path(__file__).resolve().parent.parent
MODULES = {
    "producer": "streamgroup_producer",
    "consumer": "streamgroup_consumer",
    "reclaimer": "streamgroup_reclaimer",
}


def service_env(redis_url: str, **settings: object) -> dict[str, str]:
    """A clean environment: no STREAMGROUP_* from the caller's shell, test handlers importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMGROUP_", "TESTHANDLER_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["STREAMGROUP_REDIS_URL"] = redis_url
    env["STREAMGROUP_LOG_FORMAT"] = "json"
    for key, value in settings.items():
        env[key if key.startswith(("STREAMGROUP_", "TESTHANDLER_")) else f"STREAMGROUP_{key.upper()}"] = str(value)
    return env


@dataclass
class ServiceProcess:
    kind: str
    env: dict[str, str]
    log_path: Path
    metrics_port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> ServiceProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", MODULES[self.kind]],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample on /metrics, or None when absent."""
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            sample, _, value = line.rpartition(" ")
            sample_name, _, label_text = sample.partition("{")
            if sample_name != name:
                continue
            found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
            if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
                return float(value)
        return None


class Services:
    """Starts processes for one test and makes sure none outlives it."""

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.started: list[ServiceProcess] = []

    def start(self, kind: str, name: str | None = None, metrics: bool = False, **settings: object) -> ServiceProcess:
        name = name or f"{kind}-{len(self.started) + 1}"
        port = free_port() if metrics else 0
        env = service_env(self.redis_url, CONSUMER_NAME=name, METRICS_PORT=port, **settings)
        proc = ServiceProcess(kind, env, self.log_dir / f"{name}.log", port).start()
        self.started.append(proc)
        if metrics:
            wait_for(lambda: _answers(proc), timeout=15, what=f"{name} /healthz")
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.alive():
                proc.signal(signal.SIGKILL)
                proc.process.wait(10)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.output[-4000:]}" for p in self.started)


def _answers(proc: ServiceProcess) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.kind} exited early:\n{proc.output}")
    try:
        return proc.get("/healthz")[0] == 200
    except OSError:
        return False


def wait_for(
    condition: Callable[[], object],
    timeout: float = 30,
    interval: float = 0.1,
    what: str = "condition",
):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
