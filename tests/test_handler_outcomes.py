"""Every handler call ends as a success or a failure of its own message, whatever the handler does:
returns an awaitable, raises a BaseException, hangs. Real consumer and reclaimer processes."""

from __future__ import annotations

import json

import pytest

from support.accounting import GROUP, STREAM, all_acked
from support.processes import wait_for

FAST_RECLAIM = {"CLAIM_MIN_IDLE_MS": 600, "RECLAIM_INTERVAL_MS": 100}
LABELS = {"stream": STREAM, "group": GROUP}


def _add(r, count: int) -> list[str]:
    return [r.xadd(STREAM, {"producer": "1", "serial": str(n)}) for n in range(1, count + 1)]


def _calls(r, entry_id: str) -> int:
    return int(r.get(f"calls:{entry_id}") or 0)


def _done(r, entry_id: str) -> int:
    return int(r.get(f"done:{entry_id}") or 0)


def _dead_ids(r) -> list[str]:
    return [fields["x-streamgroup-original-id"] for _, fields in r.xrange(f"{STREAM}:dead")]


@pytest.mark.parametrize("handler", ["decorated_async", "lambda_async", "callable_async"])
def test_an_awaitable_result_is_awaited_before_the_entry_is_acknowledged(services, r, handler) -> None:
    """An async def behind functools.wraps, a lambda returning a coroutine, an object whose sync
    __call__ returns one: none is recognised as async, all run on worker threads."""
    ids = _add(r, 20)
    consumer = services.start("consumer", name="c1", HANDLER=f"support.handlers:{handler}", CONCURRENCY=4)
    wait_for(lambda: all_acked(r, 20), timeout=30, what="every entry acknowledged")
    assert [_done(r, entry_id) for entry_id in ids] == [1] * 20, "each coroutine ran to its end before the ack"
    assert consumer.alive()
    assert "never awaited" not in consumer.output


@pytest.mark.parametrize(
    ("handler", "raised"),
    [
        ("raise_base_exception", "SystemExit"),
        ("raise_base_exception", "KeyboardInterrupt"),
        ("raise_base_exception", "GeneratorExit"),
        ("raise_base_exception_async", "CancelledError"),
        ("raise_base_exception_deferred", "SystemExit"),
        ("raise_base_exception_deferred", "CancelledError"),
    ],
)
def test_a_base_exception_from_the_handler_fails_only_its_message(services, r, handler, raised) -> None:
    ids = _add(r, 10)
    settings = {
        "HANDLER": f"support.handlers:{handler}",
        "TESTHANDLER_RAISE": raised,
        "TESTHANDLER_FAIL_MOD": 5,
        "MAX_DELIVERIES": 2,
        **FAST_RECLAIM,
    }
    consumer = services.start("consumer", name="c1", **settings)
    services.start("reclaimer", name="reclaimer", **settings)
    wait_for(lambda: all_acked(r, 10), timeout=30, what="every entry settled")
    bad = {ids[4], ids[9]}
    for entry_id in ids:
        if entry_id in bad:
            assert _calls(r, entry_id) == 2, "failed, retried once, then dead-lettered"
        else:
            assert (_calls(r, entry_id), _done(r, entry_id)) == (1, 1), "its batch-mate's failure cost it nothing"
    dead = r.xrange(f"{STREAM}:dead")
    assert sorted(fields["x-streamgroup-original-id"] for _, fields in dead) == sorted(bad), "each exactly once"
    assert all(fields["x-streamgroup-error"].startswith(raised) for _, fields in dead)
    assert consumer.alive(), "the consumer kept running"


@pytest.mark.parametrize("handler", ["hang_some", "hang_some_async", "hang_some_deferred"])
def test_a_hanging_call_times_out_as_a_failure_and_its_batch_mates_are_acknowledged(services, r, handler) -> None:
    ids = _add(r, 10)
    settings = {
        "HANDLER": f"support.handlers:{handler}",
        "TESTHANDLER_FAIL_MOD": 5,
        "MAX_DELIVERIES": 2,
        "HANDLER_TIMEOUT_MS": 500,
        **FAST_RECLAIM,  # the consumer's lease is renewed at a third of the reclaimer's claim time
    }
    consumer = services.start("consumer", name="c1", metrics=True, **settings)
    services.start("reclaimer", name="reclaimer", **settings)
    wait_for(lambda: all_acked(r, 10), timeout=40, what="every entry settled")
    hung = {ids[4], ids[9]}
    assert sorted(_dead_ids(r)) == sorted(hung), "timed out on the consumer, again on the reclaimer: dead-lettered"
    assert all(fields["x-streamgroup-error"].startswith("HandlerTimeout") for _, fields in r.xrange(f"{STREAM}:dead"))
    assert [_done(r, entry_id) for entry_id in ids if entry_id not in hung] == [1] * 8
    assert consumer.metric("streamgroup_handler_timeouts_total", **LABELS) == 2
    assert consumer.alive()
    if handler == "hang_some":
        # Two threads still hang, abandoned, with CONCURRENCY=1: the process asks to be restarted.
        assert consumer.get("/healthz")[0] == 503
    else:
        assert consumer.get("/healthz")[0] == 200, "cancelled coroutines leave no thread behind"


def test_abandoned_threads_up_to_the_concurrency_keep_the_consumer_live(services, r) -> None:
    _add(r, 10)
    settings = {"HANDLER": "support.handlers:hang_some", "TESTHANDLER_FAIL_MOD": 5, "HANDLER_TIMEOUT_MS": 300}
    consumer = services.start("consumer", name="c1", metrics=True, CONCURRENCY=2, **settings)
    wait_for(lambda: consumer.metric("streamgroup_handler_timeouts_total", **LABELS) == 2, timeout=30, what="timeouts")
    wait_for(lambda: r.xpending(STREAM, GROUP)["pending"] == 2, timeout=15, what="the others acknowledged")
    assert consumer.get("/healthz")[0] == 200, "two hanging threads, concurrency two: still live"


def test_a_reclaimer_with_a_hanging_handler_still_reclaims_the_other_entries(services, r) -> None:
    ids = _add(r, 10)
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "dead-pod", {STREAM: ">"}, count=10)  # a consumer that died holding them
    services.start(
        "reclaimer", name="reclaimer", HANDLER="support.handlers:hang_some", TESTHANDLER_FAIL_MOD=3,
        HANDLER_TIMEOUT_MS=400, BATCH_SIZE=4, MAX_DELIVERIES=100, **FAST_RECLAIM,
    )  # fmt: skip
    others = [entry_id for n, entry_id in enumerate(ids, start=1) if n % 3]
    wait_for(lambda: all(_done(r, entry_id) == 1 for entry_id in others), timeout=40, what="the others handled")
    wait_for(lambda: r.xpending(STREAM, GROUP)["pending"] == 3, timeout=15, what="only the hanging ones pending")


def test_a_failing_handler_logs_its_traceback_in_one_event_and_a_flood_is_rate_limited(services, r) -> None:
    _add(r, 30)
    consumer = services.start("consumer", name="c1", HANDLER="support.handlers:fail_some", TESTHANDLER_FAIL_MOD=1)
    wait_for(lambda: _calls(r, r.xrevrange(STREAM, count=1)[0][0]) == 1, timeout=30, what="all 30 called")
    failures = wait_for(
        lambda: (
            [
                event
                for event in map(json.loads, filter(lambda line: line.startswith("{"), consumer.output.splitlines()))
                if event["event"].startswith("handler failed")
            ]
            if consumer.output.count("handler failed") >= 30
            else None
        ),
        timeout=15,
        what="30 failure events",
    )
    with_traceback = [event for event in failures if "exception" in event]
    assert len(with_traceback) == 10, "the first ten of the minute carry the traceback"
    first = with_traceback[0]
    assert "Traceback (most recent call last)" in first["exception"]
    assert "support/handlers.py" in first["exception"] and "always fails" in first["exception"]
    assert first["error"].startswith("RuntimeError: serial") and first["message_id"]
    assert all(event["message_id"] and event["error"] for event in failures)


def test_the_default_handler_does_not_log_message_bodies_at_info(services, r) -> None:
    [entry_id] = [r.xadd(STREAM, {"card": "4111-1111-1111-1111"})]
    consumer = services.start("consumer", name="c1")
    wait_for(lambda: all_acked(r, 1), timeout=20, what="acknowledged")
    wait_for(lambda: entry_id in consumer.output, timeout=10, what="the message's id logged")
    assert "4111-1111" not in consumer.output


def test_a_handler_module_failing_to_import_is_one_configuration_line(services, r) -> None:
    consumer = services.start("consumer", name="c1", HANDLER="support.broken_handlers:handle")
    assert consumer.wait(30) == 2
    assert consumer.output.strip().splitlines() == [
        "streamgroup-consumer: configuration error: STREAMGROUP_HANDLER: cannot load "
        "'support.broken_handlers:handle': support.broken_handlers imports missing module "
        "'streamgroup_test_missing_dependency'"
    ]
