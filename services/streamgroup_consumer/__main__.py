"""streamgroup-consumer: read own pending history, then new entries; handle; acknowledge successes.

A run goes through three phases, in this order:
  history   entries this consumer already holds (it died, or lost Redis, mid-batch): one at a time,
            each acknowledged before the next is read, so a message that kills the process is the
            only one whose delivery count grows with every restart;
  live      new entries, a batch at a time, reading ahead while batches are quick;
  draining  no more reads: what was read ahead is handled and acknowledged.
Before any of them, the process takes the lease on its consumer name (see streamgroup.naming).
With several shards (STREAMGROUP_SHARDS), each shard goes through these phases on its own, all
at once, under the one name.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable

from streamgroup import service as runtime
from streamgroup import streams
from streamgroup.logs import get_logger
from streamgroup.naming import NameLease
from streamgroup.processing import NO_REDELIVERIES, MessageWorker
from streamgroup.reading import GroupReader
from streamgroup.service import Service

log = get_logger("streamgroup.consumer")

# Reading ahead holds a second batch that no lease covers yet and that other consumers cannot
# get: only worth it, and only harmless, while batches are handled quickly.
READ_AHEAD_MAX_BATCH_SECONDS = 1.0
# Reads in flight while reading ahead: the one whose reply is taken next, and the one Redis fills
# while that batch is handled.
READ_AHEAD_DEPTH = 2


class Phase(enum.Enum):
    WAITING_FOR_NAME = "waiting for name"
    HISTORY = "history"
    LIVE = "live"
    DRAINING = "draining"
    STOPPED = "stopped"


class ShardConsumer:
    """The phases of one shard: its group, its reader, its worker. The name lease, the handler
    runner (so STREAMGROUP_CONCURRENCY bounds the whole process) and the stop are the process's."""

    def __init__(self, service: Service, worker: MessageWorker, keeps_going: Callable[[], bool]) -> None:
        self._service = service
        settings = service.settings
        self._name = settings.consumer_name
        self._worker = worker
        self.keys = worker.keys
        self._keeps_going = keeps_going
        self._reader = GroupReader(
            service.client, self.keys, self._name, settings.batch_size, worker.record_acked,
            timeout_seconds=settings.redis_timeout_ms / 1000.0,
        )  # fmt: skip
        self._read_ahead = settings.read_ahead
        self._quick_batch_seconds = min(READ_AHEAD_MAX_BATCH_SECONDS, worker.lease_seconds / 2)
        self._last_batch_seconds = float("inf")
        self._group_seen = False
        self._last_read_id: bytes | None = None  # of the newest entry read: where a vanished group resumes
        self.phase = Phase.STOPPED

    async def run(self) -> None:
        try:
            await self._ensure_group()
            self.phase = Phase.HISTORY
            await self._history()
            self.phase = Phase.LIVE
            await self._live()
            self.phase = Phase.DRAINING
            await self._drain()
        finally:
            self.phase = Phase.STOPPED

    async def _ensure_group(self) -> None:
        """Create the group if it does not exist. One that existed and vanished (XGROUP DESTROY under
        running services) is recreated where this consumer last read, never from STREAMGROUP_GROUP_START_ID:
        only what was in flight is delivered again, not the stream."""
        service, keys = self._service, self.keys
        if self._last_read_id is not None:
            resume_at = self._last_read_id.decode()
        else:
            resume_at = "0" if self._group_seen else service.settings.group_start_id
        created = await streams.ensure_group(service.client, keys, resume_at)
        if created and self._group_seen:
            log.error(
                "the consumer group vanished (XGROUP DESTROY?); recreated it after the last entry this consumer read",
                group=keys.group, stream=keys.stream, last_delivered_id=resume_at,
            )  # fmt: skip
        self._group_seen = True

    async def _history(self) -> None:
        """Entries this consumer holds, one at a time: reading one counts a delivery of that one
        only, and its acknowledgement goes out (with the next read) before the next one is handled."""
        service, reader = self._service, self._reader
        cursor = streams.HISTORY
        while self._keeps_going():
            await reader.send(cursor, block_ms=None, count=1)
            entries = await reader.receive()
            if not entries or service.grace_expired.done():
                break
            cursor = entries[0][0].decode()
            deliveries = await streams.delivery_counts(service.client, self.keys, self._name, entries)
            await self._worker.handle(entries, deliveries, service.grace_expired, acknowledge=reader.acknowledge)
        await reader.flush()

    async def _live(self) -> None:
        """New entries. After each batch one decision: read ahead (the next read goes out with the
        batch's acknowledgements), or not (the acknowledgements go out at once: with the blocking
        read that follows, or on their own if a batch read ahead is handled first)."""
        service, reader, worker = self._service, self._reader, self._worker
        block_ms, grace_expired = service.settings.block_ms, service.grace_expired
        while self._keeps_going():
            if not reader.reads_in_flight:
                await reader.send(streams.NEW, block_ms)
            entries = await reader.receive()
            if not entries:
                continue
            self._last_read_id = entries[-1][0]
            if grace_expired.done():
                continue  # left pending; close() hands them off
            began = time.perf_counter()
            await worker.handle(entries, NO_REDELIVERIES, grace_expired, acknowledge=reader.acknowledge)
            self._last_batch_seconds = time.perf_counter() - began
            if self._may_read_ahead(len(entries)):
                # Redis works on the next read while the reply in flight is parsed and handled.
                while reader.reads_in_flight < READ_AHEAD_DEPTH:
                    await reader.send(streams.NEW, block_ms=None)
            elif reader.reads_in_flight or not self._keeps_going():
                await reader.flush()  # a batch read ahead is handled next: the acknowledgements go now
            # else the read sent next, right away, carries them

    async def _drain(self) -> None:
        """Handle what was read ahead before the stop; read nothing more."""
        service, reader = self._service, self._reader
        while reader.reads_in_flight:
            entries = await reader.receive()
            if entries:
                self._last_read_id = entries[-1][0]
                if not service.grace_expired.done():
                    await self._worker.handle(
                        entries, NO_REDELIVERIES, service.grace_expired, acknowledge=reader.acknowledge
                    )
        await reader.flush()

    def _may_read_ahead(self, entries_read: int) -> bool:
        """A full batch, handled quickly, means more is waiting and reading it early is harmless."""
        return (
            self._read_ahead
            and entries_read >= self._service.settings.batch_size
            and self._last_batch_seconds < self._quick_batch_seconds
            and self._keeps_going()
        )

    async def acknowledge_the_rest(self) -> None:
        """Acknowledge what is done and was not acknowledged yet, and give the connection back."""
        await self._worker.acknowledge(await self._reader.close())

    async def hand_off(self) -> None:
        """Make what this consumer still holds in the shard claimable at once, or leave the
        shard's group when it holds nothing."""
        released, left = await self._worker.scripts.release_or_leave(
            self._name, self._service.settings.claim_min_idle_ms
        )
        if left:
            log.info("left the group; held nothing", stream=self.keys.stream)
        else:
            log.info(
                "handed pending entries to the reclaimer; staying in the group until taken",
                stream=self.keys.stream, entries=released,
            )  # fmt: skip


class Consumer:
    """Takes the consumer name, then reads every shard at once (one ShardConsumer each: a
    cluster refuses one XREADGROUP over keys in several slots) under that one name."""

    def __init__(self, service: Service) -> None:
        self._service = service
        settings = service.settings
        self._name = settings.consumer_name
        workers = MessageWorker.for_shards(service)
        self._runner = workers[0].runner
        self._shards = [ShardConsumer(service, worker, self._keeps_going) for worker in workers]
        # One lease for the process, on the logical stream's key (the same whatever the number of
        # shards, so it still guards the name while that number changes); its script touches only it.
        self._lease = NameLease(service.client, service.keys, self._name, settings.consumer_name_lease_ms)
        self._keeping_name: asyncio.Future | None = None
        self._shard_failed = asyncio.Event()
        self.phase = Phase.STOPPED

    @property
    def phases(self) -> dict[str, Phase]:
        return {shard.keys.stream: shard.phase for shard in self._shards}

    async def run(self) -> None:
        if not await self._take_name():
            return
        self._keeping_name = asyncio.ensure_future(self._lease.keep())
        self._shard_failed.clear()
        self.phase = Phase.LIVE
        try:
            if len(self._shards) == 1:
                await self._shards[0].run()
                return
            # A shard that fails (an outage) stops the others' reads: each finishes its batch and
            # drains, then the failure goes up to the service, which reconnects and runs again.
            outcomes = await asyncio.gather(*(self._run_shard(shard) for shard in self._shards), return_exceptions=True)
            failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            if failures:
                raise failures[0]
        finally:
            self.phase = Phase.STOPPED
            self._keeping_name.cancel()

    async def _run_shard(self, shard: ShardConsumer) -> None:
        try:
            await shard.run()
        except BaseException:
            self._shard_failed.set()
            raise

    def _keeps_going(self) -> bool:
        """Whether to read more: not stopping, no shard failed, and the name is still ours for sure."""
        return (
            not self._service.stopping.is_set()
            and not self._shard_failed.is_set()
            and not self._keeping_name.done()
            and self._lease.valid()
        )

    async def _take_name(self) -> bool:
        """Wait, not ready, while another live process uses this consumer name."""
        service, lease = self._service, self._lease

        def conflict(holder: str) -> None:
            service.ready = False
            log.error(
                "another process is using this consumer name; waiting, not ready, until it is free",
                consumer=self._name, lease_key=lease.key, holder=holder, this_instance=lease.instance,
            )  # fmt: skip

        self.phase = Phase.WAITING_FOR_NAME
        holder = await lease.take()  # also after a reconnect: the lease may have run out meanwhile
        if holder is None:
            return True
        conflict(holder)
        if not await lease.wait_until_taken(service.stopping, conflict):
            return False
        service.ready = True
        log.info("consumer name is free; taking it over, history included", consumer=self._name)
        return True

    async def close(self) -> None:
        """Scale-down hand-off: acknowledge what is done, make what is still held (failed or
        abandoned entries) claimable at once, leave each shard's group only when holding nothing
        there, and give the consumer name back."""
        self._runner.close()
        await self._each(ShardConsumer.acknowledge_the_rest)
        if not self._lease.held or await self._lease.take() is not None:
            return  # another process holds this name (and so its pending entries): leave them alone
        await self._each(ShardConsumer.hand_off)
        await self._lease.release()

    async def _each(self, step: Callable[[ShardConsumer], Awaitable[None]]) -> None:
        if len(self._shards) == 1:
            await step(self._shards[0])
            return
        outcomes = await asyncio.gather(*(step(shard) for shard in self._shards), return_exceptions=True)
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            raise failures[0]


def main() -> None:
    runtime.run("streamgroup-consumer", Consumer, handles_messages=True)


if __name__ == "__main__":
    main()
