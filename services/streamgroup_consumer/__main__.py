"""streamgroup-consumer: read own pending history, then new entries; handle; acknowledge successes."""

from __future__ import annotations

from streamgroup import service as runtime
from streamgroup import streams
from streamgroup.handlers import load_handler
from streamgroup.processing import HandlerRunner, MessageWorker
from streamgroup.service import Service


class Consumer:
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
        self._unacked: list[str] = []

    async def run(self) -> None:
        service, keys, settings = self._service, self._service.keys, self._service.settings
        client, worker = service.client, self._worker
        await streams.ensure_group(client, keys)
        # After a (re)start, finish what this consumer already holds: it may have died mid-batch.
        start = streams.HISTORY
        while not service.stopping.is_set():
            reading_history = start != streams.NEW
            entries = await streams.read_group(
                client, keys, self._name, start, settings.batch_size,
                None if reading_history else settings.block_ms, self._unacked,
            )  # fmt: skip
            worker.record_acked(self._unacked)
            self._unacked = []
            if reading_history:
                if not entries:
                    start = streams.NEW
                    continue
                start = entries[-1].id
                counts = await streams.delivery_counts(client, keys, self._name, [e.id for e in entries])
                for entry in entries:
                    entry.deliveries = counts.get(entry.id, entry.deliveries)
            if entries:
                self._unacked = await worker.handle(entries, service.grace_expired)

    async def close(self) -> None:
        await self._worker.acknowledge(self._unacked)
        self._unacked = []
        self._runner.close()


def main() -> None:
    runtime.run("streamgroup-consumer", Consumer)


if __name__ == "__main__":
    main()
