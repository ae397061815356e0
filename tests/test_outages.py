"""Error replies a later retry can fix are outages: every service waits them out and carries on.

Each test provokes the reply for real on a server of its own (BUSY, MASTERDOWN, OOM, UNBLOCKED),
with the services running, and then checks that none of them exited and that every message added
before, during and after was handled.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamgroup.devserver import KINDS, DevServer, free_port
from support.accounting import STREAM, all_acked, ledger
from support.processes import Services, wait_for


@pytest.fixture
def started(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Services]]:
    """Service sets of the test, stopped at its end (their logs printed if it failed)."""
    sets: list[Services] = []
    yield sets
    for services in sets:
        services.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print("\n".join(services.logs() for services in sets))


def _stack(services: Services, **producer: object) -> dict:
    """Producer, two consumers, reclaimer: the four services of the issue's reproductions."""
    common = {"HANDLER": "support.handlers:record", "BLOCK_MS": 500, "CLAIM_MIN_IDLE_MS": 2000}
    return {
        "producer": services.start(
            "producer", name="producer", metrics=True, PRODUCERS=3, PRODUCER_INTERVAL_MS=100, **producer
        ),
        "consumer-a": services.start("consumer", name="consumer-a", **common),
        "consumer-b": services.start("consumer", name="consumer-b", **common),
        "reclaimer": services.start("reclaimer", name="reclaimer", metrics=True, RECLAIM_INTERVAL_MS=200, **common),
    }


def _errors(proc, kind: str) -> float:
    return proc.metric("streamgroup_redis_errors_total", kind=kind) or 0.0


def _assert_alive(procs: dict) -> None:
    dead = {name: proc.process.returncode for name, proc in procs.items() if not proc.alive()}
    assert dead == {}, f"services exited: {dead}"


def _finish(procs: dict, r: redis.Redis) -> None:
    """Stop the producer cleanly; every message it added must be handled and acknowledged."""
    _assert_alive(procs)
    assert procs["producer"].stop() == 0
    produced = r.xlen(STREAM)
    wait_for(lambda: all_acked(r, produced), timeout=60, what=f"all {produced} messages acknowledged")
    assert ledger(r).unprocessed() == set()
    _assert_alive({name: proc for name, proc in procs.items() if name != "producer"})


@pytest.mark.parametrize("kind", KINDS)
def test_busy_script_elsewhere_is_an_outage(kind: str, tmp_path: Path, started: list) -> None:
    with DevServer(kind, extra_args=["--busy-reply-threshold", "100"]) as server:
        r = redis.Redis(port=server.port, decode_responses=True)
        services = Services(server.url, tmp_path)
        started.append(services)
        procs = _stack(services)
        wait_for(lambda: len(ledger(r).done) >= 30, timeout=30, what="the stack at work")

        def long_script() -> None:
            with redis.Redis(port=server.port) as other:
                other.eval(
                    "local t = tonumber(redis.call('TIME')[1]) "
                    "while tonumber(redis.call('TIME')[1]) < t + 3 do end return 1",
                    0,
                )

        script = threading.Thread(target=long_script)
        script.start()
        script.join(30)
        wait_for(lambda: _errors(procs["producer"], "busy") >= 1, timeout=15, what="producer saw BUSY")
        assert _errors(procs["reclaimer"], "busy") >= 1
        assert procs["producer"].metric("streamgroup_redis_errors_total", kind="unexpected") == 0
        _finish(procs, r)


@pytest.mark.parametrize("kind", KINDS)
def test_masterdown_during_a_failover_is_an_outage(kind: str, tmp_path: Path, started: list) -> None:
    with DevServer(kind) as server:
        r = redis.Redis(port=server.port, decode_responses=True)
        services = Services(server.url, tmp_path)
        started.append(services)
        procs = _stack(services)
        wait_for(lambda: len(ledger(r).done) >= 30, timeout=30, what="the stack at work")

        # Demoted to a replica of a primary that does not answer, refusing to serve stale data
        # (writable, so that writes too meet MASTERDOWN rather than READONLY).
        r.config_set("replica-serve-stale-data", "no")
        r.config_set("replica-read-only", "no")
        r.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        wait_for(lambda: _errors(procs["producer"], "masterdown") >= 1, timeout=15, what="producer saw MASTERDOWN")
        wait_for(lambda: _errors(procs["reclaimer"], "masterdown") >= 1, timeout=15, what="reclaimer saw it")
        _assert_alive(procs)
        assert procs["reclaimer"].get("/readyz")[0] == 503
        r.execute_command("REPLICAOF", "NO", "ONE")
        wait_for(lambda: procs["reclaimer"].get("/readyz")[0] == 200, timeout=30, what="reclaimer ready again")
        _finish(procs, r)


def test_out_of_memory_is_an_outage_and_start_up_tolerates_an_existing_group(
    tmp_path: Path, started: list, r: redis.Redis, redis_url: str, server: DevServer
) -> None:
    # The handlers record in the session's server (`r`), so that OOM here only hits the services'.
    with DevServer(server.kind) as server:
        target = redis.Redis(port=server.port, decode_responses=True)
        services = Services(server.url, tmp_path)
        started.append(services)
        record = {"TESTHANDLER_REDIS_URL": redis_url, "HANDLER": "support.handlers:record", "BLOCK_MS": 500}
        producer = services.start(
            "producer", name="producer", metrics=True, PRODUCERS=3, PRODUCER_INTERVAL_MS=100, MAX_MESSAGES=300
        )
        consumer = services.start("consumer", name="consumer-a", **record)
        wait_for(lambda: len(r.lrange("done-by", 0, -1)) >= 30, timeout=30, what="the group at work")

        target.config_set("maxmemory-policy", "noeviction")
        target.config_set("maxmemory", "1")
        wait_for(lambda: _errors(producer, "oom") >= 1, timeout=15, what="producer refused with OOM")
        stuck_at = target.xlen(STREAM)
        # Restarting under OOM: XGROUP CREATE is refused although the group exists.
        late = services.start("consumer", name="consumer-late", metrics=True, **record)
        reclaimer = services.start("reclaimer", name="reclaimer", metrics=True, RECLAIM_INTERVAL_MS=200, **record)
        for proc in (late, reclaimer):
            wait_for(lambda proc=proc: proc.get("/readyz")[0] == 200, timeout=30, what=f"{proc.kind} ready under OOM")
        assert producer.alive() and consumer.alive()
        assert target.xlen(STREAM) == stuck_at, "nothing added while Redis is full"

        target.config_set("maxmemory", "0")
        assert producer.wait(60) == 0, "the producer finished its messages once Redis had room"
        assert target.xlen(STREAM) == 300
        triples = Counter((f["run"], f["producer"], f["serial"]) for _, f in target.xrange(STREAM))
        assert len(triples) == 300 and max(triples.values()) == 1
        wait_for(lambda: all_acked(target, 300), timeout=60, what="all 300 acknowledged")
        done = {row.split(" ")[1] for row in r.lrange("done-by", 0, -1)}
        assert {entry_id for entry_id, _ in target.xrange(STREAM)} <= done
        assert consumer.alive() and late.alive() and reclaimer.alive()


def test_stream_deleted_under_a_blocked_read_is_an_outage(tmp_path: Path, started: list) -> None:
    """Redis 7.0 answers the blocked XREADGROUP `-UNBLOCKED the stream key no longer exists`."""
    with DevServer("redis") as server:
        r = redis.Redis(port=server.port, decode_responses=True)
        services = Services(server.url, tmp_path)
        started.append(services)
        common = {"HANDLER": "support.handlers:record", "BLOCK_MS": 8000}
        consumers = [services.start("consumer", name=f"consumer-{n}", metrics=True, **common) for n in "ab"]
        reclaimer = services.start("reclaimer", name="reclaimer", RECLAIM_INTERVAL_MS=200, **common)
        for n in range(10):
            r.xadd(STREAM, {"n": str(n)})
        wait_for(lambda: all_acked(r, 10), timeout=30, what="first messages handled")

        def both_blocked() -> bool:
            return sum(1 for c in r.client_list() if c["cmd"] == "xreadgroup" and "b" in c["flags"]) == 2

        wait_for(both_blocked, timeout=30, what="both consumers blocked in XREADGROUP")
        r.delete(STREAM)
        wait_for(
            lambda: all(_errors(c, "unblocked") >= 1 for c in consumers), timeout=15, what="both answered UNBLOCKED"
        )
        ids = {r.xadd(STREAM, {"n": str(n)}) for n in range(2000)}
        wait_for(lambda: ids <= set(ledger(r).done), timeout=90, what="the 2,000 messages added afterwards handled")
        assert all(c.alive() for c in [*consumers, reclaimer])
