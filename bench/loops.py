"""The comparison loops, each run as its own process (`python -m bench.loops NAME ...`) so it gets
the same treatment as streamgroup's consumer and producer processes: own interpreter, own core.

The harness times every approach the same way from outside (see bench.suite), so start-up and
import time count for none of them. Each loop exits by itself once it has handled --count messages.
"""

from __future__ import annotations

import argparse
import asyncio

import redis


def noop(_message: object) -> None:
    """The per-message work of every consumer loop: nothing, like streamgroup.handlers:noop."""


def original(client: redis.Redis, stream: str, group: str, consumer: str, count: int) -> None:
    """The original design's consumer loop (seed document): own history first, then '>';
    count=10, one XACK round trip per message."""
    last_id, check_backlog, handled = "0-0", True, 0
    while handled < count:
        my_id = last_id if check_backlog else ">"
        reply = client.xreadgroup(group, consumer, {stream: my_id}, block=2000, count=10)
        try:
            if len(reply[0][1]) == 0:
                check_backlog = False
        except (IndexError, TypeError):
            pass
        if len(reply) > 0:
            for entry_id, _fields in reply[0][1]:
                message_id = entry_id.decode("utf-8")
                noop(message_id)
                client.xack(stream, group, message_id)
                last_id = message_id
                handled += 1


def handtuned(client: redis.Redis, stream: str, group: str, consumer: str, count: int) -> None:
    """What a careful engineer writes with plain redis-py: count=1000, one XACK per batch."""
    handled = 0
    while handled < count:
        reply = client.xreadgroup(group, consumer, {stream: ">"}, block=2000, count=1000)
        if not reply:
            continue
        entries = reply[0][1]
        for _entry_id, fields in entries:
            noop(fields)
        client.xack(stream, group, *[entry_id for entry_id, _ in entries])
        handled += len(entries)


def faststream(url: str, stream: str, group: str, consumer: str, count: int, batch: bool) -> None:
    """FastStream 0.7's Redis stream subscriber in a consumer group, acking after the handler
    (its default policy). The group already exists at 0 (FastStream would create it at '$' and
    skip the pre-filled entries)."""
    from faststream import FastStream  # noqa: F401 - the application wrapper is not needed to consume
    from faststream.redis import RedisBroker, StreamSub

    async def main() -> None:
        broker = RedisBroker(url, logger=None)
        done = asyncio.Event()
        handled = 0
        sub = StreamSub(stream, group=group, consumer=consumer, batch=batch, max_records=1000 if batch else 10)

        if batch:

            @broker.subscriber(stream=sub)
            async def handle_batch(body: list) -> None:
                nonlocal handled
                for item in body:
                    noop(item)
                handled += len(body)
                if handled >= count:
                    done.set()

        else:

            @broker.subscriber(stream=sub)
            async def handle_one(body: object) -> None:
                nonlocal handled
                noop(body)
                handled += 1
                if handled >= count:
                    done.set()

        await broker.start()
        await done.wait()
        await asyncio.sleep(0.2)  # let the last acknowledgement go out before stopping
        await broker.stop()

    asyncio.run(main())


def produce_single(client: redis.Redis, stream: str, count: int) -> None:
    """One XADD round trip per message."""
    for serial in range(1, count + 1):
        client.xadd(stream, {"producer": 1, "serial": serial})


def produce_pipelined(client: redis.Redis, stream: str, count: int, batch: int = 500) -> None:
    """Hand-tuned: pipelined batches of 500 XADDs (no MULTI), the same fields as streamgroup's producer."""
    serial, sent = 1, 0
    while sent < count:
        size = min(batch, count - sent)
        pipe = client.pipeline(transaction=False)
        for producer in range(1, size + 1):
            pipe.xadd(stream, {"producer": producer, "serial": serial})
        pipe.execute()
        sent += size
        serial += 1


CONSUMERS = ("original", "handtuned", "faststream", "faststream-batch")
PRODUCERS = ("produce-single", "produce-pipelined")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loops")
    parser.add_argument("loop", choices=CONSUMERS + PRODUCERS)
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--group", default="")
    parser.add_argument("--consumer", default="bench")
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    if args.loop.startswith("faststream"):
        faststream(args.url, args.stream, args.group, args.consumer, args.count, batch=args.loop.endswith("batch"))
        return
    with redis.Redis.from_url(args.url) as client:
        if args.loop == "original":
            original(client, args.stream, args.group, args.consumer, args.count)
        elif args.loop == "handtuned":
            handtuned(client, args.stream, args.group, args.consumer, args.count)
        elif args.loop == "produce-single":
            produce_single(client, args.stream, args.count)
        else:
            produce_pipelined(client, args.stream, args.count)


if __name__ == "__main__":
    main()
