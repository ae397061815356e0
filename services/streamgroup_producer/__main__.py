"""streamgroup-producer: N virtual producers add {run, producer, serial} entries, one batch per tick."""

from __future__ import annotations

import asyncio
import math
import secrets
import time

from redis.exceptions import ResponseError

from streamgroup import service as runtime
from streamgroup import streams
from streamgroup.logs import get_logger
from streamgroup.scripts import Scripts
from streamgroup.service import Service

log = get_logger("streamgroup.producer")

FIELDS = ("run", "producer", "serial")
CHUNK = 1000  # entries per command: each holds the server for well under a millisecond


def new_run_id() -> str:
    """Unique per process start: serials begin at 1 again after a restart, the run does not."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


class Producer:
    """Each tick adds one message per virtual producer, in one command per 1,000 messages (a
    script, so that Redis sends one reply rather than one per entry). A message is identified by
    (run, producer, serial). Serials survive reconnects: a batch whose fate is unknown after a
    lost or late reply is sent again with the same batch number, and the script skips it if the
    stream already has it."""

    def __init__(self, service: Service) -> None:
        self._service = service
        settings = service.settings
        self._producers = settings.producers
        self._interval = settings.producer_interval_ms / 1000.0
        self._limit = settings.max_messages
        self._run = new_run_id()
        self._next_serial = 1  # every producer is at the same serial after each whole tick
        self._chunks_per_tick = math.ceil(self._producers / CHUNK)
        self._sent = 0
        self._scripts = Scripts(service.client, service.keys)

    def _batch(self) -> list[tuple[str, int, int]]:
        count = self._producers
        if self._limit:
            count = min(count, self._limit - self._sent)
        return [(self._run, producer, self._next_serial) for producer in range(1, count + 1)]

    def _batch_number(self, chunk: int) -> int:
        """The same for a chunk sent again after a failure: it depends only on serial and chunk."""
        return (self._next_serial - 1) * self._chunks_per_tick + chunk + 1

    async def run(self) -> None:
        service = self._service
        stream = service.keys.stream
        next_tick = time.monotonic()
        log.info("producing", run=self._run, next_serial=self._next_serial)
        while not service.stopping.is_set():
            batch = self._batch()
            if not batch:
                log.info("max messages reached", sent=self._sent)
                service.request_stop("max-messages")
                return
            try:
                for chunk, start in enumerate(range(0, len(batch), CHUNK)):
                    number = self._batch_number(chunk)
                    added = await self._scripts.add_batch(self._run, number, FIELDS, batch[start : start + CHUNK])
                    service.metrics.produced.inc(added)
            except ResponseError as exc:
                streams.raise_if_wrong_type(exc, stream)
                raise
            self._sent += len(batch)
            self._next_serial += 1
            next_tick += self._interval
            delay = next_tick - time.monotonic()
            if delay > 0:
                await service.sleep(delay)
            else:
                next_tick = time.monotonic()  # behind schedule: do not try to catch up in a burst
                await asyncio.sleep(0)

    async def close(self) -> None:
        log.info("producer stopped", sent=self._sent, run=self._run)


def main() -> None:
    runtime.run("streamgroup-producer", Producer)


if __name__ == "__main__":
    main()
