"""streamgroup-reclaimer: every interval, one full XAUTOCLAIM pass over the pending list of every
shard; and, in a task of its own so a slow pass never freezes them, the group-level metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from streamgroup import groupstats, streams
from streamgroup import service as runtime
from streamgroup.logs import get_logger
from streamgroup.message import RawEntry
from streamgroup.processing import MessageWorker
from streamgroup.redis_errors import is_outage
from streamgroup.service import Service

log = get_logger("streamgroup.reclaimer")

CURSOR_START = "0-0"


class ShardReclaimer:
    """One shard's reclaiming: its own XAUTOCLAIM cursor, ghost cleanup and retention."""

    def __init__(self, service: Service, worker: MessageWorker) -> None:
        self._service = service
        self._name = service.settings.consumer_name
        self._worker = worker
        self.keys = worker.keys
        self._work = worker.work
        self._group_seen = False

    async def collect(self) -> groupstats.GroupStats:
        service = self._service
        return await groupstats.collect(service.client, self.keys, service.settings.claim_min_idle_ms)

    async def pass_once(self) -> None:
        """A full reclaim pass, then ghost cleanup and retention when enabled."""
        settings = self._service.settings
        await self.reclaim_pass()
        if settings.consumer_delete_idle_ms:
            await self.remove_idle_consumers(await self.collect())
        if settings.retention_enabled:
            await self.trim()

    async def ensure_group(self) -> None:
        """Create the group if it never existed. One that vanished under running services (XGROUP
        DESTROY, a Redis restart without persistence) is left to the consumers for a while: each
        recreates it after the last entry it read, while the reclaimer, which reads nothing, could
        only start it over at 0. If none does within ACTIVE_CONSUMER_IDLE_MS (consumers scaled to
        zero wait for a lag that a missing group cannot show), the reclaimer recreates it at 0:
        replaying beats losing."""
        service, settings, keys = self._service, self._service.settings, self.keys
        if not self._group_seen:
            await streams.ensure_group(service.client, keys, settings.group_start_id)
            self._group_seen = True
            return
        loop = asyncio.get_running_loop()
        # A consumer that has not read for that long would not count as active (or is stuck in a batch).
        wait_ms = max(settings.active_consumer_idle_ms, settings.claim_min_idle_ms)
        give_up_at = loop.time() + wait_ms / 1000.0
        while not service.stopping.is_set() and not await streams.group_exists(service.client, keys):
            if loop.time() >= give_up_at:
                if await streams.ensure_group(service.client, keys, "0"):
                    log.error(
                        "the consumer group vanished and no consumer recreated it; recreated it at 0",
                        group=keys.group, stream=keys.stream,
                    )  # fmt: skip
                return
            log.error(
                "the consumer group vanished (XGROUP DESTROY?); waiting for a consumer to recreate it",
                group=keys.group, stream=keys.stream,
            )  # fmt: skip
            await service.sleep(settings.reclaim_interval_ms / 1000.0)

    async def reclaim_pass(self) -> int:
        """Claim idle entries from the start of the pending list to its end, and handle them one at
        a time. Claiming counts no delivery (JUSTID); each entry's delivery is counted as it is
        handed to the handler, and it is acknowledged before the next one is. So if a message kills
        the process, it is the only one whose delivery count grows with every attempt, and the only
        one to reach the dead-letter stream."""
        service, settings, keys = self._service, self._service.settings, self.keys
        cursor, total = CURSOR_START, 0
        while not service.stopping.is_set():
            cursor, ids, deleted = await streams.autoclaim(
                service.client, keys, self._name, settings.claim_min_idle_ms, cursor, settings.batch_size
            )
            if deleted:
                await self._dead_letter_deleted(deleted)
            if ids:
                total += len(ids)
                self._work.reclaimed.inc(len(ids))
                log.info("reclaimed idle entries", count=len(ids), first_id=ids[0], stream=keys.stream)
                await self._handle_one_at_a_time(ids)
            if cursor == CURSOR_START:
                break
        return total

    async def _handle_one_at_a_time(self, ids: list[str]) -> None:
        """Entries left over when the service stops stay with this consumer, idle: the next pass
        (of this reclaimer or another) takes them again."""
        service, worker = self._service, self._worker
        succeeded: list[str] = []
        for entry_id in ids:
            if service.stopping.is_set():
                break
            entry, deliveries, acknowledged = await streams.claim_one(
                service.client, self.keys, self._name, entry_id, acks=succeeded
            )
            worker.record_acked(succeeded, acknowledged=acknowledged)
            succeeded = []
            if entry is not None:  # else acknowledged or deleted meanwhile
                succeeded = await worker.handle([entry], {entry_id: deliveries}, service.grace_expired)
        await worker.acknowledge(succeeded)

    async def _dead_letter_deleted(self, ids: list[str]) -> None:
        """Entries deleted from the stream while pending (XAUTOCLAIM reports them and drops them
        from the pending list): their fields are gone, so the dead-letter copy holds the metadata
        only, for an operator to see what was lost."""
        service, keys = self._service, self.keys
        for entry_id in ids:
            reason = "deleted while pending"
            fields = streams.dead_letter_fields(RawEntry(entry_id, None, 0), keys, self._name, reason)
            await service.client.execute_command("XADD", keys.dead_letter, "*", *fields)
            self._work.dead_lettered.inc()
            self._work.processed["dead_lettered"].inc()
        log.warning(
            "pending entries were deleted from the stream before being handled; noted in the dead-letter stream",
            ids=ids, dead_letter_stream=keys.dead_letter,
        )  # fmt: skip

    async def remove_idle_consumers(self, stats: groupstats.GroupStats) -> int:
        """Remove consumers of pods that are gone: idle long enough and holding nothing (checked
        again atomically by the script, since a consumer may read between the snapshot and now)."""
        idle_ms = self._service.settings.consumer_delete_idle_ms
        if not idle_ms:
            return 0
        removed = 0
        for consumer in stats.consumers:
            if consumer.name == self._name or consumer.pending or consumer.idle_seconds * 1000 < idle_ms:
                continue
            if await self._worker.scripts.delete_if_idle(consumer.name, idle_ms):
                removed += 1
                log.info("removed idle consumer holding nothing", removed_consumer=consumer.name, key=self.keys.stream)
        self._work.consumers_deleted.inc(removed)
        return removed

    async def trim(self) -> int:
        trimmed = await self._worker.scripts.trim_safely(self._service.settings.retention_min_entries)
        if trimmed:
            self._work.trimmed.inc(trimmed)
            log.info("trimmed entries every group has acknowledged", entries=trimmed, stream=self.keys.stream)
        return trimmed


class Reclaimer:
    """Every shard (STREAMGROUP_SHARDS) is reclaimed by its own ShardReclaimer, all at once; the
    handler runner, and so STREAMGROUP_CONCURRENCY, is shared."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._name = service.settings.consumer_name
        workers = MessageWorker.for_shards(service)
        self._runner = workers[0].runner
        self._shards = [ShardReclaimer(service, worker) for worker in workers]
        self._refresh = asyncio.Event()  # set after each pass: collect the group metrics now
        service.metrics.hide_group()  # until the first collection: nothing known yet

    async def run(self) -> None:
        service = self._service
        run_over = asyncio.Event()
        # Collecting starts first: while the reclaimer waits for a vanished group to be recreated,
        # the gauges must show it (the stream grows, the group is missing).
        collector = asyncio.create_task(self.collect_group_metrics(run_over), name="group-metrics")
        try:
            await self._each(ShardReclaimer.ensure_group)
            while not service.stopping.is_set():
                await self._each(ShardReclaimer.pass_once)
                if collector.done():
                    collector.result()  # it only ends by raising what is not an outage: a bug
                self._refresh.set()  # show what the pass changed without waiting for the interval
                await service.sleep(service.settings.reclaim_interval_ms / 1000.0)
        finally:
            # Cancelling alone is not enough: with Redis killed, the collector was seen to lose the
            # cancellation somewhere inside redis-py and go on collecting (not reproduced outside a
            # service process), so it also stops at its next turn when the run is over.
            run_over.set()
            self._refresh.set()
            collector.cancel()
            await asyncio.wait({collector}, timeout=service.settings.redis_timeout_ms / 1000.0)
            # Disconnected or stopping: export nothing rather than values nobody refreshes.
            service.metrics.hide_group()

    async def _each(self, step: Callable[[ShardReclaimer], Awaitable[object]]) -> list[object]:
        """Run a step on every shard at once; the first failure goes up once all are over."""
        if len(self._shards) == 1:
            return [await step(self._shards[0])]
        outcomes = await asyncio.gather(*(step(shard) for shard in self._shards), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    async def collect(self) -> dict[str, groupstats.GroupStats]:
        """A snapshot of every shard, by shard label."""
        stats = await self._each(ShardReclaimer.collect)
        return {shard.keys.shard: stat for shard, stat in zip(self._shards, stats, strict=True)}

    async def collect_group_metrics(self, run_over: asyncio.Event) -> None:
        """Export the group gauges every GROUP_METRICS_INTERVAL_MS, whatever the reclaim pass is doing."""
        service = self._service
        while not (service.stopping.is_set() or run_over.is_set()):
            try:
                stats = await self.collect()
                if not run_over.is_set():
                    self.export_group_metrics(stats)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                service.metrics.hide_group()
                log.warning("could not collect group metrics; not exporting them", error=str(exc) or type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), service.settings.group_metrics_interval_seconds)
            self._refresh.clear()

    def export_group_metrics(self, stats: dict[str, groupstats.GroupStats]) -> None:
        active_within = self._service.settings.active_consumer_idle_ms / 1000.0
        self._service.metrics.export_group(stats, active_within, besides=self._name)

    async def close(self) -> None:
        self._runner.close()


def main() -> None:
    runtime.run("streamgroup-reclaimer", Reclaimer, group_metrics=True, handles_messages=True)


if __name__ == "__main__":
    main()
