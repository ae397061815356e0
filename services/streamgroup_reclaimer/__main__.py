"""streamgroup-reclaimer: every interval, one full XAUTOCLAIM pass over the pending list; and, in a
task of its own so a slow pass never freezes them, the group-level metrics."""

from __future__ import annotations

import asyncio
import contextlib

from streamgroup import groupstats, streams
from streamgroup import service as runtime
from streamgroup.logs import get_logger
from streamgroup.processing import MessageWorker
from streamgroup.redis_errors import is_outage
from streamgroup.service import Service

log = get_logger("streamgroup.reclaimer")

CURSOR_START = "0-0"


class Reclaimer:
    def __init__(self, service: Service) -> None:
        self._service = service
        self._name = service.settings.consumer_name
        self._worker = MessageWorker.for_service(service)
        self._refresh = asyncio.Event()  # set after each pass: collect the group metrics now
        service.metrics.hide_group()  # until the first collection: nothing known yet

    async def run(self) -> None:
        service = self._service
        await streams.ensure_group(service.client, service.keys)
        run_over = asyncio.Event()
        collector = asyncio.create_task(self.collect_group_metrics(run_over), name="group-metrics")
        try:
            while not service.stopping.is_set():
                await self.reclaim_pass()
                if service.settings.consumer_delete_idle_ms:
                    await self.remove_idle_consumers(await self.collect())
                if service.settings.retention_enabled:
                    await self.trim()
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

    async def collect(self) -> groupstats.GroupStats:
        service = self._service
        return await groupstats.collect(service.client, service.keys, service.settings.claim_min_idle_ms)

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

    async def reclaim_pass(self) -> int:
        """Claim and handle idle entries from the start of the pending list to its end."""
        service, settings = self._service, self._service.settings
        client, keys = service.client, service.keys
        cursor, total = CURSOR_START, 0
        while not service.stopping.is_set():
            cursor, entries, deleted = await streams.autoclaim(
                client, keys, self._name, settings.claim_min_idle_ms, cursor, settings.batch_size
            )
            if deleted:
                log.warning(
                    "pending entries were deleted from the stream before anyone handled them",
                    ids=deleted,
                )
            if entries:
                total += len(entries)
                service.metrics.reclaimed.inc(len(entries))
                deliveries = await streams.delivery_counts(client, keys, self._name, entries)
                log.info("reclaimed idle entries", count=len(entries), first_id=entries[0][0].decode())
                await self._worker.handle(
                    entries, deliveries, service.grace_expired, acknowledge=self._worker.acknowledge
                )
            if cursor == CURSOR_START:
                break
        return total

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
                log.info("removed idle consumer holding nothing", removed_consumer=consumer.name)
        self._service.metrics.consumers_deleted.inc(removed)
        return removed

    async def trim(self) -> int:
        trimmed = await self._worker.scripts.trim_safely(self._service.settings.retention_min_entries)
        if trimmed:
            self._service.metrics.trimmed.inc(trimmed)
            log.info("trimmed entries every group has acknowledged", entries=trimmed)
        return trimmed

    def export_group_metrics(self, stats: groupstats.GroupStats) -> None:
        active_within = self._service.settings.active_consumer_idle_ms / 1000.0
        self._service.metrics.export_group(stats, active_within, besides=self._name)

    async def close(self) -> None:
        self._worker.runner.close()


def main() -> None:
    runtime.run("streamgroup-reclaimer", Reclaimer, group_metrics=True)


if __name__ == "__main__":
    main()
