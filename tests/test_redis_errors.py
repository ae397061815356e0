"""How the services meet Redis: what counts as an outage, what ends a process (and in what words),
no blind re-sends, Unix sockets, Kubernetes' service-link variables, liveness."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis import exceptions as rx

from streamgroup.devserver import DevServer
from streamgroup.errors import RedisRefusedError
from streamgroup.health import start_http_server
from streamgroup.redis_errors import OUTAGE_KINDS, classify
from support.accounting import STREAM, all_acked
from support.processes import ServiceProcess, Services, service_env, wait_for
from support.proxy import SilentProxy

OUTAGES = [
    (rx.ClusterDownError("The cluster is down"), "clusterdown"),
    (rx.TryAgainError("Multiple keys request during rehashing of slot"), "tryagain"),
    (rx.MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."), "masterdown"),
    (rx.BusyLoadingError("Redis is loading the dataset in memory"), "loading"),
    (rx.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "oom"),
    (rx.ReadOnlyError("You can't write against a read only replica."), "readonly"),
    (rx.ResponseError("BUSY Redis is busy running a script."), "busy"),
    (rx.ResponseError("UNBLOCKED the stream key no longer exists"), "unblocked"),
    (rx.ResponseError("NOGROUP No such key 'messageStream' or consumer group 'messageGroup'"), "nogroup"),
    (rx.ConnectionError("Connection reset by peer"), "connection"),
    (rx.TimeoutError("Timeout reading from socket"), "timeout"),
    (ConnectionRefusedError(111, "refused"), "connection"),
    (rx.ResponseError("SOMETHINGNEW nobody foresaw this"), "unexpected"),
]
REFUSALS = [
    rx.AuthenticationError("Authentication required.", status_code="NOAUTH"),
    rx.AuthenticationError("invalid username-password pair", status_code="WRONGPASS"),
    rx.NoPermissionError("this user has no permissions to run the 'xadd' command"),
    rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    RedisRefusedError("redis 6.2.0 is too old"),
]


@pytest.mark.parametrize(("exc", "kind"), OUTAGES, ids=[kind for _, kind in OUTAGES])
def test_replies_a_retry_can_fix_are_outages(exc: Exception, kind: str) -> None:
    verdict = classify(exc)
    assert verdict is not None and not verdict.refused and verdict.kind == kind
    assert kind in OUTAGE_KINDS


@pytest.mark.parametrize("exc", REFUSALS, ids=lambda exc: type(exc).__name__)
def test_only_what_retrying_cannot_fix_is_a_refusal(exc: Exception) -> None:
    verdict = classify(exc)
    assert verdict is not None and verdict.refused


def test_a_bug_is_not_mistaken_for_an_outage() -> None:
    assert classify(TypeError("bad argument")) is None
    assert classify(rx.DataError("Invalid input of type: 'dict'")) is None


def test_a_slow_reply_does_not_add_the_producers_batch_twice(services: Services, r: redis.Redis, server) -> None:
    """The reply to the batch script arrives after REDIS_TIMEOUT_MS: the script ran, the producer
    does not know. Neither redis-py nor the producer may add that batch a second time."""
    proxy = SilentProxy(server.port)
    try:
        producer = services.start(
            "producer",
            REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0",
            REDIS_TIMEOUT_MS=300,
            PRODUCERS=3,
            PRODUCER_INTERVAL_MS=100,
            MAX_MESSAGES=60,
        )
        wait_for(lambda: r.xlen(STREAM) >= 6, timeout=30, what="first batches")
        proxy.reply_delay = 1.0
        wait_for(lambda: "redis unavailable" in producer.output, timeout=30, what="a reply too late")
        proxy.reply_delay = 0.0
        assert producer.wait(60) == 0
    finally:
        proxy.close()
    entries = r.xrange(STREAM)
    triples = Counter((f.get("run"), f["producer"], f["serial"]) for _, f in entries)
    assert [t for t, n in triples.items() if n > 1] == [], "a batch was added twice"
    (run,) = {f.get("run") for _, f in entries}
    assert run, "every message names its producer run"
    assert set(triples) == {(run, str(p), str(s)) for p in (1, 2, 3) for s in range(1, 21)}


def test_a_reply_nobody_foresaw_is_waited_out_loudly_not_a_crash(services: Services, r: redis.Redis, server) -> None:
    proxy = SilentProxy(server.port)
    try:
        proxy.inject_reply = b"-WEIRDERR a reply streamgroup has never heard of\r\n"
        producer = services.start(
            "producer",
            metrics=True,
            REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0",
            PRODUCER_INTERVAL_MS=0,
            MAX_MESSAGES=5,
        )
        wait_for(lambda: "WEIRDERR" in producer.output and "Traceback" in producer.output, what="logged loudly")
        assert producer.alive()
        assert producer.get("/readyz")[0] == 503
        assert producer.metric("streamgroup_redis_errors_total", kind="unexpected") >= 1
        proxy.inject_reply = None
        assert producer.wait(60) == 0
    finally:
        proxy.close()
    assert r.xlen(STREAM) == 5


def test_every_producer_run_has_its_own_identity(services: Services, r: redis.Redis) -> None:
    for _ in range(2):
        assert services.start("producer", PRODUCERS=2, PRODUCER_INTERVAL_MS=0, MAX_MESSAGES=4).wait(30) == 0
    entries = [fields for _, fields in r.xrange(STREAM)]
    assert len(entries) == 8
    runs = {fields["run"] for fields in entries}
    assert len(runs) == 2, "a restarted producer starts serials at 1 again, but not its run"
    assert len({(f["run"], f["producer"], f["serial"]) for f in entries}) == 8


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_unix_socket_url(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    with DevServer(kind, extra_args=["--unixsocket", str(path), "--unixsocketperm", "700"]) as server:
        r = redis.Redis(port=server.port, decode_responses=True)
        services = Services(f"unix://{path}?db=0", tmp_path)
        try:
            consumer = services.start("consumer", HANDLER="support.handlers:record", BLOCK_MS=200)
            producer = services.start("producer", PRODUCERS=5, PRODUCER_INTERVAL_MS=0, MAX_MESSAGES=50)
            assert producer.wait(30) == 0, producer.output
            wait_for(lambda: all_acked(r, 50), timeout=30, what="50 messages over the Unix socket")
            assert consumer.alive()
        finally:
            services.stop_all()


KUBERNETES_SERVICE_LINKS = {
    "STREAMGROUP_REDIS_PORT": "tcp://10.0.0.1:6379",
    "STREAMGROUP_REDIS_SERVICE_HOST": "10.0.0.1",
    "STREAMGROUP_REDIS_SERVICE_PORT": "6379",
    "STREAMGROUP_REDIS_SERVICE_PORT_REDIS": "6379",
    "STREAMGROUP_REDIS_PORT_6379_TCP": "tcp://10.0.0.1:6379",
    "STREAMGROUP_REDIS_PORT_6379_TCP_PROTO": "tcp",
    "STREAMGROUP_REDIS_PORT_6379_TCP_PORT": "6379",
    "STREAMGROUP_REDIS_PORT_6379_TCP_ADDR": "10.0.0.1",
}


def test_kubernetes_service_link_variables_are_not_configuration_errors(services: Services) -> None:
    consumer = services.start("consumer", metrics=True, BLOCK_MS=200, **KUBERNETES_SERVICE_LINKS)
    wait_for(lambda: consumer.get("/readyz")[0] == 200, timeout=30, what="the consumer ready")
    assert "unknown variable" not in consumer.output


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STREAMGROUP_REDIS_PROT", "x"),  # a typo, not a service link
        ("STREAMGROUP_REDIS_PORT", "6379"),  # service-link name, but not the value Kubernetes gives
        ("STREAMGROUP_REDIS_SERVICE_HOST", "redis.example"),
        ("STREAMGROUP_METRICS_PORT", "tcp://10.0.0.1:9180"),  # a real setting: always validated
    ],
)
def test_typos_are_still_refused_beside_service_links(name: str, value: str, redis_url: str, tmp_path: Path) -> None:
    env = service_env(redis_url, **KUBERNETES_SERVICE_LINKS)
    env[name] = value
    proc = ServiceProcess("consumer", env, tmp_path / "consumer.log").start()
    assert proc.wait(30) == 2
    problems = [line for line in proc.output.splitlines() if "configuration error" in line]
    assert len(problems) == 1 and name in problems[0], proc.output


def test_metrics_port_in_use_is_one_clear_line_and_exit_2(redis_url: str, tmp_path: Path) -> None:
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        proc = ServiceProcess("consumer", service_env(redis_url, METRICS_PORT=port), tmp_path / "c.log").start()
        assert proc.wait(30) == 2
    assert "Traceback" not in proc.output
    lines = [line for line in proc.output.splitlines() if "STREAMGROUP_METRICS_PORT" in line]
    assert len(lines) == 1 and "already in use" in lines[0], proc.output


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_missing_password_says_what_to_set(kind: str, tmp_path: Path) -> None:
    with DevServer(kind, extra_args=["--requirepass", "s3cret"]) as server:
        for service in ("consumer", "producer", "reclaimer"):
            proc = ServiceProcess(service, service_env(server.url, METRICS_PORT=0), tmp_path / f"{service}.log")
            assert proc.start().wait(30) == 3
            assert "NOAUTH: set STREAMGROUP_REDIS_PASSWORD_FILE or a password in the URL" in proc.output
            assert "HELLO must be called" not in proc.output


def test_healthz_follows_the_liveness_check() -> None:
    live = {"value": True}

    async def probe() -> list[int]:
        server = await start_http_server(0, CollectorRegistry(), lambda: True, "127.0.0.1", lambda: live["value"])
        port = server.sockets[0].getsockname()[1]

        def status() -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
                    return reply.status
            except urllib.error.HTTPError as exc:
                return exc.code

        codes = [await asyncio.to_thread(status)]
        live["value"] = False
        codes.append(await asyncio.to_thread(status))
        server.close()
        return codes

    assert asyncio.run(probe()) == [200, 503]


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_a_pooled_connection_the_server_closed_while_idle_is_replaced_quietly(kind: str, tmp_path: Path) -> None:
    """Without redis-py's blind retry, a connection Redis closed while idle (`timeout 1`) must
    still be replaced before anything is written to it, not reported as an outage."""
    with DevServer(kind, extra_args=["--timeout", "1"]) as server:
        r = redis.Redis(port=server.port, decode_responses=True)
        services = Services(server.url, tmp_path)
        try:
            producer = services.start("producer", PRODUCERS=2, PRODUCER_INTERVAL_MS=2500, MAX_MESSAGES=6)
            assert producer.wait(60) == 0, producer.output
            assert r.xlen(STREAM) == 6
            assert "redis unavailable" not in producer.output
        finally:
            services.stop_all()
