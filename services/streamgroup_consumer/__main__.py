"""streamgroup-consumer: read own pending history, then new entries; handle; acknowledge successes."""

from __future__ import annotations

import time

from streamgroup import service as runtime
from streamgroup import streams
from streamgroup.logs import get_logger
from streamgroup.message import Entry
from streamgroup.processing import NO_REDELIVERIES, MessageWorker
from streamgroup.reading import GroupReader
from streamgroup.service import Service

log = get_logger("streamgroup.consumer")

# Reading ahead holds a second batch that no lease covers yet and that other consumers cannot
# get: only worth it, and only harmless, while batches are handled quickly.
READ_AHEAD_MAX_BATCH_SECONDS = 1.0


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
        self._read_ahead = settings.read_ahead
        self._quick_batch_seconds = min(READ_AHEAD_MAX_BATCH_SECONDS, self._worker.lease_seconds / 2)
        self._last_batch_seconds = float("inf")

    async def run(self) -> None:
        service, settings, reader = self._service, self._service.settings, self._reader
        await streams.ensure_group(service.client, service.keys)
        # After a (re)start, finish what this consumer already holds: it may have died mid-batch.
        start = streams.HISTORY
        while True:
            deliveries = NO_REDELIVERIES
            if reader.reads_in_flight:  # read ahead while the last batch was handled
                entries = await reader.receive()
            elif service.stopping.is_set():
                return
            elif start != streams.NEW:
                entries, deliveries = await self._read_history(start)
                if not entries:
                    start = streams.NEW
                    continue
                start = entries[-1][0].decode()
            else:
                await reader.send(start, settings.block_ms)
                entries = await reader.receive()
            if not entries or service.grace_expired.done():
                continue  # (entries read ahead but not started stay pending; close() hands them off)
            read_ahead = start == streams.NEW and self._may_read_ahead(len(entries))
            if read_ahead and not reader.reads_in_flight:
                await reader.send(streams.NEW, block_ms=None)  # Redis fills it while this batch is handled
            began = time.perf_counter()
            await self._worker.handle(entries, deliveries, service.grace_expired, acknowledge=reader.acknowledge)
            self._last_batch_seconds = time.perf_counter() - began
            if read_ahead and self._may_read_ahead(len(entries)):
                # The next read goes out (with these acknowledgements) before the reply to the one
                # in flight is taken, so Redis goes on working while that reply is parsed.
                await reader.send(streams.NEW, block_ms=None)

    async def _read_history(self, start: str) -> tuple[list[Entry], dict[str, int]]:
        """This consumer's own pending entries after `start`, and how often each was delivered."""
        await self._reader.send(start, block_ms=None)
        entries = await self._reader.receive()
        return entries, await streams.delivery_counts(self._service.client, self._service.keys, self._name, entries)

    def _may_read_ahead(self, entries_read: int) -> bool:
        """A full batch means more is waiting; read it while this one is handled. At most one batch
        is held besides the one in the handler."""
        return (
            self._read_ahead
            and entries_read >= self._service.settings.batch_size
            and self._last_batch_seconds < self._quick_batch_seconds
            and self._reader.reads_in_flight < 2
            and not self._service.stopping.is_set()
        )

    async def close(self) -> None:
        """Scale-down hand-off: acknowledge what is done, make what is still held (failed or
        abandoned entries) claimable at once, and leave the group only when holding nothing."""
        self._worker.runner.close()
        await self._worker.acknowledge(await self._reader.close())
        released, left = await self._worker.scripts.release_or_leave(
            self._name, self._service.settings.claim_min_idle_ms
        )
        if left:
            log.info("left the group; held nothing")
        else:
            log.info("handed pending entries to the reclaimer; staying in the group until taken", entries=released)


def main() -> None:
    runtime.run("streamgroup-consumer", Consumer)


if __name__ == "__main__":
    main()
