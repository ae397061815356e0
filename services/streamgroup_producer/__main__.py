"""streamgroup-producer: N virtual producers add {producer, serial} entries, one pipelined batch per tick."""

from __future__ import annotations

import asyncio
import time

from redis.exceptions import ResponseError

from streamgroup import service as runtime
from streamgroup import streams
from streamgroup.logs import get_logger
from streamgroup.scripts import Scripts
from streamgroup.service import Service

log = get_logger("streamgroup.producer")

FIELDS = ("producer", "serial")
CHUNK = 1000  # entries per command: each is atomic and holds the server for well under a millisecond


class Producer:
    """Each tick adds one message per virtual producer, in one command per 1,000 messages (a
    script, so that Redis sends one reply rather than one per entry). Serials survive reconnects:
    a batch whose fate is unknown after a connection loss is sent again with the same serials, so
    consumers can recognise a duplicate by (producer, serial)."""

    def __init__(self, service: Service) -> None:
        self._service = service
        settings = service.settings
        self._producers = settings.producers
        self._interval = settings.producer_interval_ms / 1000.0
        self._limit = settings.max_messages
        self._next_serial = 1  # every producer is at the same serial after each whole tick
        self._sent = 0
        self._scripts = Scripts(service.client, service.keys)

    def _batch(self) -> list[tuple[int, int]]:
        count = self._producers
        if self._limit:
            count = min(count, self._limit - self._sent)
        return [(producer, self._next_serial) for producer in range(1, count + 1)]

    async def run(self) -> None:
        service = self._service
        stream = service.keys.stream
        next_tick = time.monotonic()
        while not service.stopping.is_set():
            batch = self._batch()
            if not batch:
                log.info("max messages reached", sent=self._sent)
                service.request_stop("max-messages")
                return
            try:
                for start in range(0, len(batch), CHUNK):
                    await self._scripts.add_batch(FIELDS, batch[start : start + CHUNK])
            except ResponseError as exc:
                streams.raise_if_wrong_type(exc, stream)
                raise
            self._sent += len(batch)
            self._next_serial += 1
            service.metrics.produced.inc(len(batch))
            next_tick += self._interval
            delay = next_tick - time.monotonic()
            if delay > 0:
                await service.sleep(delay)
            else:
                next_tick = time.monotonic()  # behind schedule: do not try to catch up in a burst
                await asyncio.sleep(0)

    async def close(self) -> None:
        log.info("producer stopped", sent=self._sent)


def main() -> None:
    runtime.run("streamgroup-producer", Producer)


if __name__ == "__main__":
    main()
