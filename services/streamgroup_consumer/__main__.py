"""streamgroup-consumer: read own pending history, then new entries; handle; acknowledge successes."""

from __future__ import annotations

import time

from streamgroup import service as runtime
from streamgroup import streams
from streamgroup.logs import get_logger
from streamgroup.processing import MessageWorker
from streamgroup.service import Service

log = get_logger("streamgroup.consumer")


class Consumer:
    def __init__(self, service: Service) -> None:
        self._service = service
        self._name = service.settings.consumer_name
        self._worker = MessageWorker.for_service(service)
        self._unacked: list[str] = []

    async def run(self) -> None:
        service, keys, settings = self._service, self._service.keys, self._service.settings
        client, worker = service.client, self._worker
        await streams.ensure_group(client, keys)
        # After a (re)start, finish what this consumer already holds: it may have died mid-batch.
        start = streams.HISTORY
        while not service.stopping.is_set():
            reading_history = start != streams.NEW
            # The acknowledgements travel ahead of a read that may block for BLOCK_MS: they take
            # effect now, so that is when their latency ends.
            acks_sent_at = time.time()
            entries = await streams.read_group(
                client, keys, self._name, start, settings.batch_size,
                None if reading_history else settings.block_ms, self._unacked,
            )  # fmt: skip
            worker.record_acked(self._unacked, acks_sent_at)
            self._unacked = []
            if reading_history:
                if not entries:
                    start = streams.NEW
                    continue
                start = entries[-1].id
                await streams.fill_delivery_counts(client, keys, self._name, entries)
            if entries:
                self._unacked = await worker.handle(entries, service.grace_expired)

    async def close(self) -> None:
        """Scale-down hand-off: acknowledge what is done, make what is still held (failed or
        abandoned entries) claimable at once, and leave the group only when holding nothing."""
        self._worker.runner.close()
        await self._worker.acknowledge(self._unacked)
        self._unacked = []
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
