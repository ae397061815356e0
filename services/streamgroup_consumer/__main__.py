"""streamgroup-consumer: read own pending history, then new entries; handle; acknowledge successes.

A run goes through three phases, in this order:
  history   entries this consumer already holds (it died, or lost Redis, mid-batch): one at a time,
            each acknowledged before the next is read, so a message that kills the process is the
            only one whose delivery count grows with every restart;
  live      new entries, a batch at a time, reading ahead while batches are quick;
  draining  no more reads: what was read ahead is handled and acknowledged.
Before any of them, the process takes the lease on its consumer name (see streamgroup.naming).
"""

from __future__ import annotations

import asyncio
import enum
import time

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


class Consumer:
    def __init__(self, service: Service) -> None:
        self._service = service
        settings = service.settings
        self._name = settings.consumer_name
        self._worker = MessageWorker.for_service(service)
        self._reader = GroupReader(
            service.client, service.keys, self._name, settings.batch_size, self._worker.record_acked,
            timeout_seconds=settings.redis_timeout_ms / 1000.0,
        )  # fmt: skip
        self._lease = NameLease(service.client, service.keys, self._name, settings.consumer_name_lease_ms)
        self._keeping_name: asyncio.Future | None = None
        self._read_ahead = settings.read_ahead
        self._quick_batch_seconds = min(READ_AHEAD_MAX_BATCH_SECONDS, self._worker.lease_seconds / 2)
        self._last_batch_seconds = float("inf")
        self._group_seen = False
        self._last_read_id: bytes | None = None  # of the newest entry read: where a vanished group resumes
        self.phase = Phase.STOPPED

    async def run(self) -> None:
        if not await self._take_name():
            return
        self._keeping_name = asyncio.ensure_future(self._lease.keep())
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
            self._keeping_name.cancel()

    def _keeps_going(self) -> bool:
        """Whether to read more: not stopping, and the name is still ours for sure."""
        return not self._service.stopping.is_set() and not self._keeping_name.done() and self._lease.valid()

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

    async def _ensure_group(self) -> None:
        """Create the group if it does not exist. One that existed and vanished (XGROUP DESTROY under
        running services) is recreated where this consumer last read, never from STREAMGROUP_GROUP_START_ID:
        only what was in flight is delivered again, not the stream."""
        service = self._service
        if self._last_read_id is not None:
            resume_at = self._last_read_id.decode()
        else:
            resume_at = "0" if self._group_seen else service.settings.group_start_id
        created = await streams.ensure_group(service.client, service.keys, resume_at)
        if created and self._group_seen:
            log.error(
                "the consumer group vanished (XGROUP DESTROY?); recreated it after the last entry this consumer read",
                group=service.keys.group, stream=service.keys.stream, last_delivered_id=resume_at,
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
            deliveries = await streams.delivery_counts(service.client, service.keys, self._name, entries)
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

    async def close(self) -> None:
        """Scale-down hand-off: acknowledge what is done, make what is still held (failed or
        abandoned entries) claimable at once, leave the group only when holding nothing, and give
        the consumer name back."""
        self._worker.runner.close()
        await self._worker.acknowledge(await self._reader.close())
        if not self._lease.held or await self._lease.take() is not None:
            return  # another process holds this name (and so its pending entries): leave them alone
        released, left = await self._worker.scripts.release_or_leave(
            self._name, self._service.settings.claim_min_idle_ms
        )
        if left:
            log.info("left the group; held nothing")
        else:
            log.info("handed pending entries to the reclaimer; staying in the group until taken", entries=released)
        await self._lease.release()


def main() -> None:
    runtime.run("streamgroup-consumer", Consumer)


if __name__ == "__main__":
    main()
