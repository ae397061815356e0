"""streamgroup-reclaimer: every interval, one full XAUTOCLAIM pass over the pending list, then the
group-level metrics."""

from __future__ import annotations

from streamgroup import groupstats, streams
from streamgroup import service as runtime
from streamgroup.logs import get_logger
from streamgroup.processing import MessageWorker
from streamgroup.service import Service

log = get_logger("streamgroup.reclaimer")

CURSOR_START = "0-0"


class Reclaimer:
    def __init__(self, service: Service) -> None:
        self._service = service
        self._name = service.settings.consumer_name
        self._worker = MessageWorker.for_service(service)

    async def run(self) -> None:
        service = self._service
        await streams.ensure_group(service.client, service.keys)
        while not service.stopping.is_set():
            await self.reclaim_pass()
            stats = await groupstats.collect(service.client, service.keys)
            changed = await self.remove_idle_consumers(stats)
            if service.settings.retention_enabled:
                changed += await self.trim()
            if changed:
                stats = await groupstats.collect(service.client, service.keys)
            self.export_group_metrics(stats)
            await service.sleep(service.settings.reclaim_interval_ms / 1000.0)

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
        metrics = self._service.metrics
        metrics.stream_length.set(stats.stream_length)
        metrics.dead_letter_length.set(stats.dead_letter_length)
        metrics.group_lag_known.set(0 if stats.lag is None else 1)
        metrics.group_lag.set(float("nan") if stats.lag is None else stats.lag)
        metrics.group_pending.set(stats.pending)
        metrics.oldest_pending_age.set(stats.oldest_pending_age_seconds)
        metrics.group_consumers.set(len(stats.consumers))
        metrics.group_consumers_active.set(
            stats.active_consumers(self._service.settings.active_consumer_idle_ms / 1000.0, besides=self._name)
        )
        metrics.set_consumers((c.name, c.pending, c.idle_seconds) for c in stats.consumers)

    async def close(self) -> None:
        self._worker.runner.close()


def main() -> None:
    runtime.run("streamgroup-reclaimer", Reclaimer, group_metrics=True)


if __name__ == "__main__":
    main()
