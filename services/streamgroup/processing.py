"""The one handler-invocation path, shared by consumer and reclaimer.

`MessageWorker.handle` runs a batch in four steps, in this order:

1. decode: entries become messages; malformed ones and those out of deliveries are rejected;
2. run: the handler is called for each message while a lease holds the whole batch (rejected
   entries included, so nobody else takes them meanwhile); every call ends as a success or a
   failure (an exception of any kind, a timeout, an awaitable that failed), never anything else;
3. settle: a frozen snapshot of the outcomes is taken and the successes are handed to the
   caller's `acknowledge` *first*, before anything that can fail;
4. dead-letter: poisoned entries, entries out of deliveries and rejected ones move to the
   dead-letter stream, but only while this consumer still owns them (see scripts.DEAD_LETTER).
   Retryable failures stay pending.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from streamgroup import streams
from streamgroup.errors import PoisonMessage
from streamgroup.handlers import Handler, is_async, load_handler
from streamgroup.keys import StreamKeys
from streamgroup.logs import get_logger
from streamgroup.message import Entry, Message, RawEntry, decode_batch
from streamgroup.metrics import Metrics
from streamgroup.scripts import Scripts
from streamgroup.settings import Settings

if TYPE_CHECKING:
    from streamgroup.service import Service

log = get_logger("streamgroup.processing")
NO_REDELIVERIES: Mapping[str, int] = {}
_first = itemgetter(0)
_isawaitable = inspect.isawaitable

Acknowledge = Callable[[Sequence[str]], "Awaitable[Any] | None"]


class HandlerTimeout(Exception):
    """The handler did not return within STREAMGROUP_HANDLER_TIMEOUT_MS."""


@dataclass(slots=True)
class Results:
    """Filled while the handler runs, so work finished before a shutdown deadline is not lost.
    Only `snapshot()` is read afterwards: calls abandoned still running may append later."""

    succeeded: list[str] = field(default_factory=list)
    failed: list[tuple[Message, BaseException]] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)

    def snapshot(self) -> Outcome:
        # list() copies in one C call, atomic under the GIL against a thread appending meanwhile.
        return Outcome(tuple(self.succeeded), tuple(self.failed), tuple(self.durations))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What settle sees: frozen, so a late call abandoned at a deadline cannot change it."""

    succeeded: tuple[str, ...]
    failed: tuple[tuple[Message, BaseException], ...]
    durations: tuple[float, ...]


class _Batch:
    """One batch on worker threads: its lanes still drawing from the shared queue, and `done`,
    resolved once none is left (lanes given up on at the timeout do not count)."""

    __slots__ = ("queue", "results", "done", "lanes", "error")

    def __init__(self, queue: Iterator[Message], results: Results, done: asyncio.Future) -> None:
        self.queue, self.results, self.done = queue, results, done
        self.lanes = 0
        self.error: BaseException | None = None


class _Lane:
    """One worker thread's draining of a batch. `slot` holds the message of the call in progress;
    whoever pops it first (the thread when the call returns, or the watchdog at the timeout)
    records the outcome: list.pop() is atomic, so exactly one of them does."""

    __slots__ = ("batch", "slot", "started", "awaiting_on_loop", "given_up")

    def __init__(self, batch: _Batch) -> None:
        self.batch = batch
        self.slot: list[Message] = []
        self.started = 0.0
        self.awaiting_on_loop = False  # the loop times the awaitable out (and cancels it) itself
        self.given_up = False


class HandlerRunner:
    """Calls the handler once per message with up to `concurrency` calls in flight.

    Sync handlers run on worker threads so the event loop stays free for health checks, signals
    and Redis; the hand-off happens once per batch, not once per message. Workers share one
    iterator over the batch (its next() is atomic under the GIL). Whatever a call returns that is
    awaitable (an `async def` behind a plain decorator, a lambda returning a coroutine, an object
    whose `__call__` returns one) is awaited on the event loop before the call counts as a success.

    With a timeout, an async call past it is cancelled and a sync call past it is abandoned (its
    thread keeps running; a fresh pool takes over the rest of the work); both count as failures.
    More abandoned threads still running than `concurrency` make the runner `wedged`: the process
    should then report not live and be restarted.
    """

    def __init__(
        self,
        handler: Handler,
        concurrency: int,
        timeout_seconds: float = 0.0,
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        self._handler = handler
        self._concurrency = concurrency
        self._timeout = timeout_seconds or None
        self._on_timeout = on_timeout or (lambda: None)
        self._async = is_async(handler)
        self._pool = None if self._async else self._new_pool()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._taking = True
        self._lanes: set[_Lane] = set()  # of the batches running now
        self._watchdog: asyncio.Future | None = None
        self._abandoned: set[_Lane] = set()
        self._abandoned_lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None  # async handlers: calls in flight, over all batches

    @property
    def abandoned_threads(self) -> int:
        """Threads given up on at the timeout whose call has still not returned."""
        return len(self._abandoned)

    @property
    def wedged(self) -> bool:
        """More calls hang on abandoned threads than the concurrency: restart the process."""
        return len(self._abandoned) > self._concurrency

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self._concurrency, thread_name_prefix="handler")

    def stop_taking(self) -> None:
        """Let calls in flight finish but start no new ones (shutdown grace has run out)."""
        self._taking = False

    async def run(self, messages: Sequence[Message], results: Results) -> None:
        if not messages:
            return
        self._loop = asyncio.get_running_loop()
        workers = min(self._concurrency, len(messages))
        queue = iter(messages)
        if self._async:
            await asyncio.gather(*(self._drain_async(queue, results) for _ in range(workers)))
        else:
            await self._run_threads(queue, results, workers)

    async def _run_threads(self, queue: Iterator[Message], results: Results, workers: int) -> None:
        batch = _Batch(queue, results, self._loop.create_future())
        for _ in range(workers):
            self._start_lane(batch)
        if self._timeout is not None and self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())
        await batch.done
        if batch.error is not None:
            raise batch.error

    def _start_lane(self, batch: _Batch) -> None:
        lane = _Lane(batch)
        batch.lanes += 1
        self._lanes.add(lane)
        # Each thread runs in a copy of the caller's context, so handler logs keep the bound fields.
        future = self._loop.run_in_executor(
            self._pool, contextvars.copy_context().run, self._drain_sync, lane, batch.queue, batch.results
        )
        future.add_done_callback(functools.partial(self._lane_ended, lane))

    def _lane_ended(self, lane: _Lane, future: asyncio.Future) -> None:
        self._lanes.discard(lane)
        batch = lane.batch
        if not future.cancelled() and future.exception() is not None:
            batch.error = future.exception()
        if not lane.given_up:
            self._lane_left(batch)

    def _lane_left(self, batch: _Batch) -> None:
        batch.lanes -= 1
        if batch.lanes == 0 and not batch.done.done():
            batch.done.set_result(None)

    async def _watch(self) -> None:
        """Every quarter of the timeout (at most every second): give up on calls running past it.
        Each lane given up on is replaced, so the rest of its batch goes on being handled."""
        while True:
            await asyncio.sleep(min(self._timeout / 4, 1.0))
            for lane in list(self._lanes):
                if self._abandon_if_overdue(lane):
                    lane.given_up = True
                    self._lanes.discard(lane)
                    self._start_lane(lane.batch)  # before the lane leaves: the batch is not done
                    self._lane_left(lane.batch)

    def _abandon_if_overdue(self, lane: _Lane) -> bool:
        """Fail the call running past the timeout and give up on its thread; True if it did."""
        now = time.perf_counter()
        if now - lane.started < self._timeout * (2 if lane.awaiting_on_loop else 1):
            return False
        try:
            message = lane.slot.pop()
        except IndexError:  # between calls, or the call returned just now
            return False
        with self._abandoned_lock:
            self._abandoned.add(lane)
        lane.batch.results.failed.append((message, self._timeout_error()))
        lane.batch.results.durations.append(now - lane.started)
        log.error(
            "handler call timed out; its thread is abandoned and left running",
            message_id=message.id,
            abandoned_threads=len(self._abandoned),
        )
        # The old pool keeps the abandoned thread; the lane replacing it gets a thread of its own.
        self._pool.shutdown(wait=False)
        self._pool = self._new_pool()
        return True

    def _timeout_error(self) -> HandlerTimeout:
        self._on_timeout()
        return HandlerTimeout(f"handler did not return within {self._timeout * 1000:.0f} ms")

    def _drain_sync(self, lane: _Lane, queue: Iterator[Message], results: Results) -> None:
        handler, clock, slot = self._handler, time.perf_counter, lane.slot
        succeeded, failed, durations = results.succeeded, results.failed, results.durations
        for message in queue:
            if not self._taking:
                return
            lane.started = started = clock()  # before the slot is filled: the watchdog reads both
            slot.append(message)
            try:
                result = handler(message)
                if result is not None and _isawaitable(result):
                    lane.awaiting_on_loop = True
                    try:
                        self._await_on_loop(result)
                    finally:
                        lane.awaiting_on_loop = False
            except BaseException as exc:  # noqa: BLE001 - SystemExit & co. from a handler fail its message only
                outcome: BaseException | None = exc
            else:
                outcome = None
            try:
                slot.pop()
            except IndexError:  # given up on at the timeout: the watchdog recorded the failure
                with self._abandoned_lock:
                    self._abandoned.discard(lane)
                return
            if outcome is None:
                succeeded.append(message.id)
            else:
                failed.append((message, outcome))
            durations.append(clock() - started)

    def _await_on_loop(self, awaitable: Awaitable[Any]) -> None:
        """From a worker thread: await what a sync call returned on the event loop, and wait for it."""
        error = asyncio.run_coroutine_threadsafe(self._await_capturing(awaitable), self._loop).result()
        if error is not None:
            raise error

    async def _await_capturing(self, awaitable: Awaitable[Any]) -> BaseException | None:
        # A SystemExit or KeyboardInterrupt escaping a task would stop the event loop itself:
        # hand every exception back to the worker thread as a value instead.
        try:
            await self._await(awaitable)
        except BaseException as exc:  # noqa: BLE001 - the handler's, whatever it is
            return exc
        return None

    async def _await(self, awaitable: Awaitable[Any]) -> Any:
        if self._timeout is None:
            return await awaitable
        try:
            async with asyncio.timeout(self._timeout) as deadline:
                return await awaitable
        except TimeoutError:
            if deadline.expired():
                raise self._timeout_error() from None
            raise

    async def _drain_async(self, queue: Iterator[Message], results: Results) -> None:
        # Several batches may run at once (one per shard, streamgroup.keys.read_shards): each drainer
        # holds one of `concurrency` slots while it works through its batch, so the calls in flight
        # stay within STREAMGROUP_CONCURRENCY for the process. (Sync handlers share the pool's threads.)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._concurrency)
        async with self._slots:
            await self._drain_async_holding_a_slot(queue, results)

    async def _drain_async_holding_a_slot(self, queue: Iterator[Message], results: Results) -> None:
        handler, clock = self._handler, time.perf_counter
        for message in queue:
            if not self._taking:
                return
            started = clock()
            try:
                result = handler(message)
                if result is not None and _isawaitable(result):
                    await self._await(result)
            except asyncio.CancelledError as exc:
                if asyncio.current_task().cancelling():
                    raise  # our own cancellation (shutdown deadline), not the handler's doing
                results.failed.append((message, exc))
            except BaseException as exc:  # noqa: BLE001 - SystemExit & co. from a handler fail its message only
                results.failed.append((message, exc))
            else:
                results.succeeded.append(message.id)
            results.durations.append(clock() - started)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class MessageWorker:
    """Runs a batch through the handler, holds the lease on it meanwhile, and settles every entry."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: StreamKeys,
        consumer: str,
        runner: HandlerRunner,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self._client, self._keys, self._consumer = client, keys, consumer
        self.keys = keys
        self.runner = runner
        self.scripts = Scripts(client, keys)
        self._max_deliveries = settings.max_deliveries
        # Renewed three times per claim window: two renewals may be late before the reclaimer may act.
        self.lease_seconds = settings.claim_min_idle_ms / 1000.0 / 3
        self._metrics = metrics
        self.work = metrics.work[keys.shard]
        self._failure_log = FailureLog()

    @classmethod
    def for_service(cls, service: Service) -> MessageWorker:
        """The worker of the first (with one shard: the only) shard."""
        return cls.for_shards(service)[0]

    @classmethod
    def for_shards(cls, service: Service) -> list[MessageWorker]:
        """One worker per shard the service reads, all calling the handler through one runner, so
        STREAMGROUP_CONCURRENCY bounds the whole process."""
        settings = service.settings
        metrics = service.metrics
        runner = HandlerRunner(
            load_handler(settings.handler),
            settings.concurrency,
            timeout_seconds=settings.handler_timeout_ms / 1000.0,
            on_timeout=metrics.handler_timeouts.inc,
        )
        service.add_liveness_check(lambda: not runner.wedged)
        return [
            cls(service.client, keys, settings.consumer_name, runner, settings, metrics)
            for keys in service.shards or [service.keys]
        ]

    async def handle(
        self,
        entries: Sequence[Entry],
        deliveries: Mapping[str, int] = NO_REDELIVERIES,
        deadline: asyncio.Future | None = None,
        acknowledge: Acknowledge | None = None,
    ) -> tuple[str, ...]:
        """Process entries (as Redis sent them; `deliveries` maps ids delivered more than once to
        their count) and return the ids that succeeded.

        `acknowledge(ids)` is called once with the successes (possibly none) as soon as the
        handler calls are over, before dead-lettering or anything else that can fail; if it
        returns an awaitable, that is awaited first. So when dead-lettering raises (OOM, NOPERM, a
        dropped connection) the successes have been handed over already. Without `acknowledge`
        the caller must acknowledge the returned ids itself (and loses them if this raises).

        If `deadline` completes first (shutdown grace ran out), calls in flight are abandoned:
        their entries stay pending and the reclaimer takes them over.
        """
        messages, rejected = decode_batch(self._keys.stream, entries, deliveries, self._max_deliveries)
        outcome = await self._run(messages, rejected, deadline)
        if acknowledge is not None:
            handed = acknowledge(outcome.succeeded)
            if handed is not None and _isawaitable(handed):
                await handed
        rejected += self._settle_failures(entries, outcome.failed)
        if rejected:
            await self._dead_letter(rejected)
        return outcome.succeeded

    async def _run(
        self, messages: Sequence[Message], rejected: Sequence[tuple[RawEntry, str]], deadline: asyncio.Future | None
    ) -> Outcome:
        results = Results()
        run = asyncio.ensure_future(self.runner.run(messages, results))
        lease = asyncio.ensure_future(self._hold_lease(messages, [entry.id for entry, _ in rejected], results))
        try:
            await asyncio.wait({run} if deadline is None else {run, deadline}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lease.cancel()
        if not run.done():
            self.runner.stop_taking()
            run.cancel()
            outcome = results.snapshot()
            log.warning(
                "shutdown grace ran out; leaving unfinished messages pending",
                finished=len(outcome.succeeded) + len(outcome.failed),
                unfinished=len(messages) - len(outcome.succeeded) - len(outcome.failed),
            )
        else:
            if run.exception() is not None:
                raise run.exception()
            outcome = results.snapshot()
        self._metrics.processing_seconds.observe_many(outcome.durations)
        return outcome

    def _dead_letter_bound(self, message: Message, exc: BaseException) -> bool:
        return isinstance(exc, PoisonMessage) or message.deliveries >= self._max_deliveries

    async def _hold_lease(self, messages: Sequence[Message], rejected_ids: list[str], results: Results) -> None:
        """Keep the batch's entries from looking idle while the handler works on them (and the
        rejected ones until they are dead-lettered); failures to be retried are let go so the
        reclaimer can retry them."""
        while True:
            await asyncio.sleep(self.lease_seconds)
            retry = {message.id for message, exc in list(results.failed) if not self._dead_letter_bound(message, exc)}
            held = [message.id for message in messages if message.id not in retry] + rejected_ids
            try:
                renewed = await self.scripts.renew_lease(self._consumer, held)
            except Exception as exc:  # a missed renewal costs a possible duplicate, not a message
                log.warning("could not renew the lease on entries in progress", error=str(exc))
                continue
            log.debug("lease renewed", entries=renewed)

    def _settle_failures(
        self, entries: Sequence[Entry], failed: Sequence[tuple[Message, BaseException]]
    ) -> list[tuple[RawEntry, str]]:
        if not failed:
            return []
        # The dead-letter copy takes the fields as Redis sent them: the handler may have changed its dict.
        sent = {raw_id.decode(): flat for raw_id, flat in entries}
        rejected = []
        for message, exc in failed:
            if not isinstance(exc, PoisonMessage):
                self._failure_log.failed(message, exc, retry=message.deliveries < self._max_deliveries)
            if self._dead_letter_bound(message, exc):
                reason = f"{type(exc).__name__}: {exc}"
                rejected.append((RawEntry(message.id, sent[message.id], message.deliveries), reason))
            else:
                self.work.processed["failed"].inc()
        return rejected

    async def _dead_letter(self, rejected: list[tuple[RawEntry, str]]) -> None:
        moved = await self.scripts.dead_letter(
            self._consumer,
            [
                (entry.id, streams.dead_letter_fields(entry, self._keys, self._consumer, reason))
                for entry, reason in rejected
            ],
        )
        self.work.dead_lettered.inc(len(moved))
        self.work.processed["dead_lettered"].inc(len(moved))
        for entry, reason in rejected:
            if entry.id in moved:
                log.warning(
                    "message moved to the dead-letter stream",
                    message_id=entry.id,
                    deliveries=entry.deliveries,
                    dead_letter_stream=self._keys.dead_letter,
                    reason=reason,
                )
            else:
                log.warning(
                    "not dead-lettered here: another consumer owns the entry now (or it was acknowledged)",
                    message_id=entry.id,
                    reason=reason,
                )

    def record_acked(self, ids: Sequence[str], sent_at: float | None = None, acknowledged: int | None = None) -> None:
        """Count what Redis acknowledged (`acknowledged`, XACK's reply: ids acknowledged before do
        not count again); the end-to-end latency of `ids` runs to `sent_at`, when the XACK left."""
        if not ids:
            return
        self.work.processed["acked"].inc(len(ids) if acknowledged is None else acknowledged)
        now = time.time() if sent_at is None else sent_at
        # One observation per distinct millisecond, not per entry: the IDs are split and counted
        # in C (map/Counter), which takes a quarter of the time of parsing every ID in Python.
        per_ms = Counter(map(_first, map(str.partition, ids, repeat("-"))))
        self._metrics.end_to_end_seconds.observe_counts((now - int(ms) / 1000.0, n) for ms, n in per_ms.items())

    async def acknowledge(self, ids: Sequence[str]) -> None:
        self.record_acked(ids, acknowledged=await streams.ack(self._client, self._keys, ids))


class FailureLog:
    """Logs each handler failure as one event; the first `per_interval` failures of every
    `interval_seconds` carry the traceback, the rest are counted and summed up once the interval
    is over, so a flood of failing messages does not drown the log."""

    def __init__(self, per_interval: int = 10, interval_seconds: float = 60.0) -> None:
        self._per_interval, self._interval = per_interval, interval_seconds
        self._window_start = float("-inf")
        self._with_traceback = 0
        self._suppressed = 0

    def failed(self, message: Message, exc: BaseException, retry: bool) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._interval:
            if self._suppressed:
                log.warning(
                    "handler failure tracebacks left out of the log",
                    failures=self._suppressed,
                    interval_seconds=self._interval,
                )
            self._window_start, self._with_traceback, self._suppressed = now, 0, 0
        event = "handler failed; message stays pending for a retry" if retry else "handler failed; out of deliveries"
        fields = {"message_id": message.id, "deliveries": message.deliveries, "error": f"{type(exc).__name__}: {exc}"}
        if self._with_traceback < self._per_interval and exc.__traceback__ is not None:
            self._with_traceback += 1
            log.warning(event, exc_info=exc, **fields)
        else:
            self._suppressed += 1
            log.warning(event, **fields)
