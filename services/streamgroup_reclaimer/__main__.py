"""streamgroup-reclaimer: every interval, one full XAUTOCLAIM pass over the pending list, then the
group-level metrics."""

from __future__ import annotations

from streamgroup import groupstats, streams
from streamgroup import service as runtime
from streamgroup.handlers import load_handler
from streamgroup.logs import get_logger
from streamgroup.processing import HandlerRunner, MessageWorker
from streamgroup.service import Service

log = get_logger("streamgroup.reclaimer")

CURSOR_START = "0-0"


class Reclaimer:
    def __init__(self, service: Service) -> None:
        settings = service.settings
        self._service = service
        self._name = settings.consumer_name
        self._runner = HandlerRunner(load_handler(settings.handler), settings.concurrency)
        self._worker = MessageWorker(
            service.client,
            service.keys,
            self._name,
            self._runner,
            settings.max_deliveries,
            service.metrics,
        )

    async def run(self) -> None:
        service = self._service
        await streams.ensure_group(service.client, service.keys)
        while not service.stopping.is_set():
            await self.reclaim_pass()
            await self.export_group_metrics()
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
                counts = await streams.delivery_counts(client, keys, self._name, [e.id for e in entries])
                for entry in entries:
                    entry.deliveries = counts.get(entry.id, entry.deliveries)
                log.info("reclaimed idle entries", count=len(entries), first_id=entries[0].id)
                await self._worker.acknowledge(await self._worker.handle(entries, service.grace_expired))
            if cursor == CURSOR_START:
                break
        return total

    async def export_group_metrics(self) -> groupstats.GroupStats:
        service, metrics = self._service, self._service.metrics
        stats = await groupstats.collect(service.client, service.keys)
        metrics.stream_length.set(stats.stream_length)
        metrics.dead_letter_length.set(stats.dead_letter_length)
        metrics.group_lag_known.set(0 if stats.lag is None else 1)
        metrics.group_lag.set(float("nan") if stats.lag is None else stats.lag)
        metrics.group_pending.set(stats.pending)
        metrics.oldest_pending_age.set(stats.oldest_pending_age_seconds)
        metrics.group_consumers.set(len(stats.consumers))
        metrics.group_consumers_active.set(stats.active_consumers(service.settings.active_consumer_idle_ms / 1000.0))
        metrics.set_consumers((c.name, c.pending, c.idle_seconds) for c in stats.consumers)
        return stats

    async def close(self) -> None:
        self._runner.close()


def main() -> None:
    runtime.run("streamgroup-reclaimer", Reclaimer)


if __name__ == "__main__":
    main()
