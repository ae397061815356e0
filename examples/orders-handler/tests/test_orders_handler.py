"""The example handler counts each order once, however often it is delivered, and runs under a
real streamgroup consumer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import orders_handler.handler as orders
from orders_handler import handle
from streamgroup import Message, PoisonMessage

SOURCE = Path(orders.__file__).resolve().parents[1]


def _order(entry_id: str, **fields: str) -> Message:
    return Message(entry_id, fields, "orders")


def test_an_order_counts_once_whatever_its_entry_id(orders_redis) -> None:
    assert handle(_order("1-0", order_id="A-1", customer="acme", amount_cents="1250")) is True
    # Redelivered, or re-sent / replayed as a new entry: the same order is not counted again.
    assert handle(_order("1-0", order_id="A-1", customer="acme", amount_cents="1250")) is False
    assert handle(_order("9-0", order_id="A-1", customer="acme", amount_cents="1250")) is False
    assert handle(_order("2-0", order_id="A-2", customer="acme", amount_cents="50")) is True
    assert orders_redis.hgetall(orders.REVENUE_KEY) == {"acme": "1300"}
    ttl = orders_redis.ttl(orders.DONE_KEY + "A-1")
    assert 0 < ttl <= orders.ttl_seconds()


@pytest.mark.parametrize(
    "fields", [{"customer": "acme", "amount_cents": "1"}, {"order_id": "A-3", "customer": "acme", "amount_cents": "x"}]
)
def test_an_order_without_its_key_or_amount_is_poison(orders_redis, fields) -> None:
    with pytest.raises(PoisonMessage):
        handle(_order("3-0", **fields))
    assert orders_redis.hgetall(orders.REVENUE_KEY) == {}


def test_a_streamgroup_consumer_runs_it_from_pythonpath(orders_server, orders_redis, tmp_path) -> None:
    stream, group = "orders", "billing"
    for n, order_id in enumerate(["A-1", "A-2", "A-1"]):  # A-1 twice: a producer's re-send
        orders_redis.xadd(stream, {"order_id": order_id, "customer": "acme", "amount_cents": str(100 + n)})
    orders_redis.xadd(stream, {"customer": "acme"})  # no order_id: dead-lettered, not retried
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMGROUP_", "ORDERS_"))}
    env |= {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), env.get("PYTHONPATH")])),
        "STREAMGROUP_REDIS_URL": orders_server.url,
        "STREAMGROUP_STREAM": stream,
        "STREAMGROUP_GROUP": group,
        "STREAMGROUP_HANDLER": "orders_handler:handle",
        "STREAMGROUP_METRICS_PORT": "0",
    }
    log = tmp_path / "consumer.log"
    with log.open("wb") as out:
        consumer = subprocess.Popen([sys.executable, "-m", "streamgroup_consumer"], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and consumer.poll() is None:
            groups = orders_redis.xinfo_groups(stream)
            if groups and groups[0]["entries-read"] == 4 and groups[0]["pending"] == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"not all handled:\n{log.read_text()[-3000:]}")
    finally:
        consumer.terminate()
        consumer.wait(60)
    assert orders_redis.hgetall(orders.REVENUE_KEY) == {"acme": str(100 + 101)}, "A-1 counted once"
    assert orders_redis.xlen(f"{stream}:dead") == 1
