"""A real server for the example's tests: the embedded Valkey that streamgroup's dev tools bring."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamgroup.devserver import DevServer

SOURCE = Path(__file__).resolve().parents[1] / "src"
if str(SOURCE) not in sys.path:  # run from streamgroup's own suite too, without an install
    sys.path.insert(0, str(SOURCE))


@pytest.fixture(scope="module")
def orders_server() -> Iterator[DevServer]:
    with DevServer("valkey") as server:
        yield server


@pytest.fixture
def orders_redis(orders_server: DevServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv("ORDERS_REDIS_URL", orders_server.url)
    with redis.Redis.from_url(orders_server.url, decode_responses=True) as client:
        client.flushall()
        yield client
