"""Start, outage, shutdown and refusal: the process reports, retries or exits with the right code."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from streamgroup.connection import judge_server
from streamgroup.devserver import DevServer, free_port
from streamgroup.errors import EXIT_REDIS_REFUSED
from support.accounting import GROUP, STREAM, all_acked, group_info, ledger
from support.processes import Services, wait_for


@pytest.fixture
def idle_port_services(tmp_path, server):
    """Services pointed at a port where no server runs yet, and a server of the session's kind for it."""
    port = free_port()
    started = Services(f"redis://127.0.0.1:{port}/0", tmp_path)
    later = DevServer(server.kind, port=port)
    yield started, later
    started.stop_all()
    later.close()


def test_unreachable_redis_is_retried_and_reported_not_crash_looped(idle_port_services) -> None:
    services, later = idle_port_services
    consumer = services.start("consumer", name="patient", metrics=True, HANDLER="support.handlers:record")
    time.sleep(3)
    assert consumer.alive(), consumer.output
    assert consumer.get("/healthz")[0] == 200, "alive: Kubernetes must not restart it"
    assert consumer.get("/readyz")[0] == 503, "not ready while Redis is away"
    assert consumer.metric("streamgroup_redis_connected") == 0
    assert consumer.output.count("redis unavailable; retrying") >= 3
    later.start()
    wait_for(lambda: consumer.get("/readyz")[0] == 200, timeout=20, what="ready after Redis came up")
    with redis.Redis(port=later.port, decode_responses=True) as r:
        r.xadd(STREAM, {"producer": "1", "serial": "1"})
        wait_for(lambda: all_acked(r, 1), timeout=15, what="the message handled")
    assert consumer.stop() == 0


def test_sigterm_finishes_and_acknowledges_in_flight_work(services, r) -> None:
    consumer = services.start(
        "consumer",
        name="draining",
        HANDLER="support.handlers:record",
        TESTHANDLER_SLEEP_S=0.2,
        BATCH_SIZE=10,
    )
    for n in range(10):
        r.xadd(STREAM, {"producer": "1", "serial": str(n)})
    wait_for(lambda: r.llen("done-by") >= 2, timeout=15, what="handling under way")
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(15) == 0, consumer.output
    assert len(ledger(r).done) == 10, "the whole batch in flight was finished"
    assert group_info(r)["pending"] == 0, "and acknowledged before exit"


def test_grace_period_is_bounded_and_unfinished_work_stays_pending(services, r) -> None:
    consumer = services.start(
        "consumer",
        name="slowpoke",
        HANDLER="support.handlers:record",
        TESTHANDLER_SLEEP_S=30,
        SHUTDOWN_GRACE_SECONDS=1,
    )
    r.xadd(STREAM, {"producer": "1", "serial": "1"})
    wait_for(lambda: r.exists(f"calls:{r.xrange(STREAM)[0][0]}"), timeout=15, what="the handler to start")
    started = time.monotonic()
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(15) == 0, consumer.output
    assert time.monotonic() - started < 5
    assert group_info(r)["pending"] == 1, "never acknowledged: the reclaimer will take it over"
    assert "shutdown grace ran out" in consumer.output


def test_wrong_password_exits_with_a_clear_error(tmp_path, server) -> None:
    with DevServer(server.kind, extra_args=["--requirepass", "right-one"]) as guarded:
        services = Services(f"redis://:wrong-one@127.0.0.1:{guarded.port}/0", tmp_path)
        try:
            consumer = services.start("consumer", name="intruder")
            assert consumer.wait(15) == EXIT_REDIS_REFUSED
            assert "redis refused; not retrying" in consumer.output
            assert "wrong-one" not in consumer.output
        finally:
            services.stop_all()


def test_key_of_the_wrong_type_is_a_clear_error(services, r) -> None:
    r.set(STREAM, "not a stream")
    for kind in ("consumer", "producer", "reclaimer"):
        proc = services.start(kind, name=f"{kind}-wrongtype")
        assert proc.wait(15) == EXIT_REDIS_REFUSED, proc.output
        assert f"key '{STREAM}' exists and is not a stream" in proc.output


def test_malformed_entry_goes_to_dead_letter_and_the_consumer_carries_on(services, r) -> None:
    raw = redis.Redis.from_url(services.redis_url)
    bad_id = raw.xadd(STREAM, {b"payload": b"\xff\xfe not utf-8"}).decode()
    good_id = r.xadd(STREAM, {"producer": "1", "serial": "2"})
    consumer = services.start("consumer", name="sturdy", HANDLER="support.handlers:record")
    wait_for(lambda: all_acked(r, 2), timeout=15, what="both entries settled")
    assert consumer.alive()
    assert [row.split()[1] for row in r.lrange("done-by", 0, -1)] == [good_id]
    [(_, dead)] = raw.xrange(f"{STREAM}:dead")
    assert dead[b"payload"] == b"\xff\xfe not utf-8", "original bytes kept"
    assert dead[b"x-streamgroup-original-id"].decode() == bad_id
    assert dead[b"x-streamgroup-group"].decode() == GROUP
    assert dead[b"x-streamgroup-consumer"] == b"sturdy"
    assert b"malformed" in dead[b"x-streamgroup-error"]


def test_an_entry_too_wide_for_a_lua_call_is_dead_lettered_whole(services, r) -> None:
    # Lua's unpack() stops near 8,000 values, so a 5,000-field entry cannot go through the script.
    raw = redis.Redis.from_url(services.redis_url)
    fields = {f"f{n}".encode(): str(n).encode() for n in range(5000)} | {b"payload": b"\xff not utf-8"}
    wide_id = raw.xadd(STREAM, fields).decode()
    good_id = r.xadd(STREAM, {"producer": "1", "serial": "2"})
    consumer = services.start("consumer", name="wide", HANDLER="support.handlers:record")
    wait_for(lambda: all_acked(r, 2), timeout=15, what="both entries settled")
    assert consumer.alive(), consumer.output
    assert [row.split()[1] for row in r.lrange("done-by", 0, -1)] == [good_id]
    [(_, dead)] = raw.xrange(f"{STREAM}:dead")
    assert dead[b"x-streamgroup-original-id"].decode() == wide_id
    assert {k: v for k, v in dead.items() if not k.startswith(b"x-streamgroup-")} == fields, "every field kept"


@pytest.mark.parametrize(
    ("info", "accepted"),
    [
        ({"redis_version": "6.2.14"}, False),
        ({"redis_version": "7.0.0"}, True),
        ({"redis_version": "7.2.4", "valkey_version": "7.0.2"}, False),
        ({"redis_version": "7.2.4", "valkey_version": "7.2.5"}, True),
        ({"redis_version": "8.4.0"}, True),
    ],
)
def test_server_version_gate(info: dict, accepted: bool) -> None:
    _, _, problem = judge_server(info)
    assert (problem is None) == accepted
    if not accepted:
        assert "too old" in problem


def test_real_servers_pass_the_gate(r) -> None:
    assert judge_server(r.info("server"))[2] is None


def test_dead_letter_key_of_the_wrong_type_is_a_clear_error(services, r) -> None:
    r.set(f"{STREAM}:dead", "not a stream")
    redis.Redis.from_url(services.redis_url).xadd(STREAM, {b"payload": b"\xff"})
    consumer = services.start("consumer", name="dead-end")
    assert consumer.wait(15) == EXIT_REDIS_REFUSED, consumer.output
    assert f"'{STREAM}:dead' exists and is not a stream" in consumer.output
    assert group_info(r)["pending"] == 1, "the entry is neither dead-lettered nor acknowledged: still pending"
