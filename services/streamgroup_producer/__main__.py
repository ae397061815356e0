"""streamgroup-producer: N virtual producers add {run, producer, serial} entries, one batch per tick."""

from __future__ import annotations

import asyncio
import math
import secrets
import time

from redis.exceptions import ResponseError

from streamgroup import keys as keys_of
from streamgroup import service as runtime
from streamgroup import streams
from streamgroup.errors import ConfigError
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
    stream already has it.

    With several shards, each message goes to the shard its STREAMGROUP_PARTITION_FIELD value
    picks (keys.shard_of), or round-robin without one; each tick sends every shard its part at
    once, each with its own batch numbers and run marker in the shard's slot."""

    def __init__(self, service: Service) -> None:
        self._service = service
        settings = service.settings
        self._producers = settings.producers
        self._interval = settings.producer_interval_ms / 1000.0
        self._limit = settings.max_messages
        self._run = new_run_id()
        self._next_serial = 1  # every producer is at the same serial after each whole tick
        # An upper bound on any shard's chunks per tick, so batch numbers only grow in every shard.
        self._chunks_per_tick = math.ceil(self._producers / CHUNK)
        self._sent = 0
        self._shards = [Scripts(service.client, keys) for keys in keys_of.written_shards(settings)]
        self._partition = _partition_column(settings.partition_field)
        self._round_robin_next = 0  # moves only after a whole tick, so a resent tick splits the same way

    def _batch(self) -> list[tuple[str, int, int]]:
        count = self._producers
        if self._limit:
            count = min(count, self._limit - self._sent)
        return [(self._run, producer, self._next_serial) for producer in range(1, count + 1)]

    def _split(self, batch: list[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
        """Each shard's part of the batch, in the batch's order."""
        shards = len(self._shards)
        if shards == 1:
            return [batch]
        parts: list[list[tuple[str, int, int]]] = [[] for _ in range(shards)]
        if self._partition is None:
            for i, row in enumerate(batch, self._round_robin_next):
                parts[i % shards].append(row)
        else:
            column = self._partition
            for row in batch:
                parts[keys_of.shard_of(str(row[column]), shards)].append(row)
        return parts

    def _batch_number(self, chunk: int) -> int:
        """The same for a chunk sent again after a failure: it depends only on serial and chunk."""
        return (self._next_serial - 1) * self._chunks_per_tick + chunk + 1

    async def _send(self, scripts: Scripts, rows: list[tuple[str, int, int]]) -> None:
        try:
            for chunk, start in enumerate(range(0, len(rows), CHUNK)):
                number = self._batch_number(chunk)
                added = await scripts.add_batch(self._run, number, FIELDS, rows[start : start + CHUNK])
                self._service.metrics.produced.inc(added)
        except ResponseError as exc:
            streams.raise_if_wrong_type(exc, scripts.keys.stream)
            raise

    async def _send_tick(self, batch: list[tuple[str, int, int]]) -> None:
        parts = self._split(batch)
        if len(parts) == 1:
            await self._send(self._shards[0], batch)
            return
        # Every shard's part goes, even when another fails: what arrived counts, and a resent
        # tick adds nothing twice.
        outcomes = await asyncio.gather(
            *(self._send(scripts, rows) for scripts, rows in zip(self._shards, parts, strict=True) if rows),
            return_exceptions=True,
        )
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            raise failures[0]

    async def run(self) -> None:
        service = self._service
        next_tick = time.monotonic()
        log.info("producing", run=self._run, next_serial=self._next_serial)
        while not service.stopping.is_set():
            batch = self._batch()
            if not batch:
                log.info("max messages reached", sent=self._sent)
                service.request_stop("max-messages")
                return
            await self._send_tick(batch)
            self._sent += len(batch)
            self._next_serial += 1
            self._round_robin_next = (self._round_robin_next + len(batch)) % len(self._shards)
            next_tick += self._interval
            delay = next_tick - time.monotonic()
            if delay > 0:
                await service.sleep(delay)
            else:
                next_tick = time.monotonic()  # behind schedule: do not try to catch up in a burst
                await asyncio.sleep(0)

    async def close(self) -> None:
        log.info("producer stopped", sent=self._sent, run=self._run)


def _partition_column(field: str | None) -> int | None:
    """Which of the producer's fields picks the shard; a field its messages lack is a configuration error."""
    if field is None:
        return None
    if field not in FIELDS:
        raise ConfigError(
            [f"STREAMGROUP_PARTITION_FIELD: the producer's messages have the fields {', '.join(FIELDS)}, not {field!r}"]
        )
    return FIELDS.index(field)


def main() -> None:
    runtime.run("streamgroup-producer", Producer)


if __name__ == "__main__":
    main()
