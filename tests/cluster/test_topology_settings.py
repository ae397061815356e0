"""The connection-mode settings and the checks that need no cluster: each problem names the
variables at fault and exits 2; auto mode on one server gives the plain client."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from streamgroup import topology
from streamgroup.errors import EXIT_CONFIG, ConfigError
from streamgroup.keys import StreamKeys
from streamgroup.settings import Settings, load_settings


def _problems(monkeypatch: pytest.MonkeyPatch, **variables: str) -> list[str]:
    for name, value in variables.items():
        monkeypatch.setenv(f"STREAMGROUP_{name.upper()}", value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert refused.value.exit_code == EXIT_CONFIG
    return refused.value.problems


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"redis_mode": "sentinel"}, "Sentinel needs both STREAMGROUP_REDIS_SENTINELS (host:port,...) and "),
        ({"redis_sentinels": "127.0.0.1:26379"}, "and STREAMGROUP_REDIS_SENTINEL_MASTER (the name the sentinels"),
        ({"redis_sentinel_master": "main"}, "Sentinel needs both STREAMGROUP_REDIS_SENTINELS"),
        (
            {"redis_mode": "cluster", "redis_sentinels": "h:1", "redis_sentinel_master": "m"},
            "apply only with STREAMGROUP_REDIS_MODE=sentinel or auto, not cluster",
        ),
        (
            {"redis_sentinels": "h:1,h2", "redis_sentinel_master": "m"},
            "STREAMGROUP_REDIS_SENTINELS: expected host:port",
        ),
        (
            {"redis_sentinels": "h:99999", "redis_sentinel_master": "m"},
            "STREAMGROUP_REDIS_SENTINELS: expected host:port",
        ),
        ({"redis_mode": "replicated"}, "STREAMGROUP_REDIS_MODE: Input should be 'auto', 'standalone', 'cluster' or"),
        (
            {"redis_mode": "cluster", "redis_url": "unix:///run/redis.sock"},
            "STREAMGROUP_REDIS_MODE=cluster needs a redis:// or rediss:// STREAMGROUP_REDIS_URL",
        ),
        ({"redis_mode": "cluster", "redis_url": "redis://h:6379/3"}, "a Redis Cluster has only database 0"),
    ],
)
def test_a_wrong_connection_mode_names_its_variables(monkeypatch, variables, expected) -> None:
    problems = _problems(monkeypatch, **variables)
    assert any(expected in problem for problem in problems), problems


def test_sentinel_addresses_are_parsed_ipv6_included() -> None:
    settings = Settings(redis_sentinels="s1:26379, [::1]:26380", redis_sentinel_master="main")
    assert settings.sentinel_addresses == [("s1", 26379), ("::1", 26380)]


@pytest.mark.parametrize(
    ("stream", "dead_letter", "fits"),
    [("orders", "orders:dead", False), ("{orders}", "{orders}:dead", True), ("a{t}", "b{t}", True)],
)
def test_the_dead_letter_stream_must_share_the_streams_slot(stream, dead_letter, fits) -> None:
    keys = StreamKeys(stream, "g", dead_letter)
    if fits:
        topology.check_slots(keys)
        return
    with pytest.raises(ConfigError) as refused:
        topology.check_slots(keys)
    assert "STREAMGROUP_STREAM={orders} (dead letters then go to {orders}:dead)" in refused.value.problems[0]


def test_auto_mode_on_one_server_gives_the_plain_client(redis_url) -> None:
    async def main() -> None:
        client = await topology.create_client(Settings(redis_url=redis_url, stream="orders"))
        try:
            assert isinstance(client, aioredis.Redis) and not isinstance(client, RedisCluster)
            assert await client.ping()
            connections = topology.KeyConnections(client)
            lease = await connections.acquire("orders")
            await lease.connection.send_packed_command(lease.connection.pack_command("PING"))
            assert await lease.connection.read_response() == b"PONG"
            await connections.release(lease)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_auto_mode_with_the_server_unreachable_is_an_outage_not_a_crash() -> None:
    async def main() -> None:
        with pytest.raises(RedisConnectionError):
            await topology.create_client(Settings(redis_url="redis://127.0.0.1:1/0"))

    asyncio.run(main())


def test_cluster_and_sentinel_clients_get_the_options_of_a_plain_client(tmp_path) -> None:
    """Password file over the URL's password, TLS files, timeouts and hiredis packing: the same
    as connection.create_client gives, in every mode (built without connecting)."""
    password_file = tmp_path / "password"
    password_file.write_text("from-file\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")
    common = {
        "redis_url": "rediss://app:from-url@127.0.0.1:7000/0",
        "redis_password_file": password_file,
        "redis_ca_file": ca,
        "redis_timeout_ms": 1234,
        "stream": "{orders}",
    }

    async def main() -> None:
        cluster = topology.build_client(Settings(**common), "cluster")
        options = cluster.get_connection_kwargs()
        assert (options["password"], options["username"], options["socket_timeout"]) == ("from-file", "app", 1.234)
        assert options["ssl_ca_certs"] == str(ca)
        assert options["connection_class"].__name__ == "HiredisPackingSSLConnection"
        assert all(node.connection_class is options["connection_class"] for node in cluster.startup_nodes)
        await cluster.aclose()

        sentinel = await topology.create_client(
            Settings(**common, redis_sentinels="127.0.0.1:1", redis_sentinel_master="main")
        )
        pool = sentinel.connection_pool
        assert (pool.connection_kwargs["password"], pool.connection_kwargs["username"]) == ("from-file", "app")
        assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)
        assert pool.connection_class.__name__ == "HiredisPackingSentinelManagedSSLConnection"
        [sentinel_client] = pool.sentinel_manager.sentinels
        sentinel_options = sentinel_client.connection_pool.connection_kwargs
        assert "password" not in sentinel_options or sentinel_options["password"] is None
        assert sentinel_options["socket_timeout"] == 1.234
        await sentinel.aclose()

    asyncio.run(main())
