"""Replicated setups started by fixtures: a Redis Cluster of 3 primaries with a replica each and a
Sentinel group (1 primary, 1 replica, 3 sentinels), on Debian's redis-server 7.0 and on the
embedded Valkey 9. A setup that cannot start fails the test; nothing is skipped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streamgroup.devserver import KINDS
from support.cluster import DevCluster, DevSentinel


@pytest.fixture(scope="session", params=KINDS)
def cluster(request: pytest.FixtureRequest) -> Iterator[DevCluster]:
    """One cluster of each kind for the session, for tests that leave it whole (slots may move)."""
    with DevCluster(request.param) as running:
        yield running


@pytest.fixture
def cluster_url(cluster: DevCluster) -> str:
    """The session cluster, healthy and empty."""
    cluster.wait_healthy()
    for port in cluster.primary_ports():
        with cluster.client(port) as client:
            client.flushall()
    return cluster.url


@pytest.fixture(params=KINDS)
def fresh_cluster(request: pytest.FixtureRequest) -> Iterator[DevCluster]:
    """A cluster of its own, for a test that kills a node."""
    with DevCluster(request.param) as running:
        yield running


@pytest.fixture(params=KINDS)
def sentinel_group(request: pytest.FixtureRequest) -> Iterator[DevSentinel]:
    """A Sentinel group of its own (a failover changes which server is the primary)."""
    with DevSentinel(request.param) as running:
        yield running
