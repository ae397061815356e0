"""Count each order's amount towards its customer's revenue, exactly once per order.

Messages carry `order_id`, `customer` and `amount_cents`. streamgroup delivers at least once: a
message is handled again when a consumer died before acknowledging it, and a replayed dead letter
(`streamgroup dead-letters replay`) or a producer re-sending after a lost reply arrives as a new
stream entry with a new id. So the idempotency key is the business key, `order_id`, never the
entry id.

The effect and the record that the order is done happen in one Redis script: either both or
neither. Marking "done" before the effect would lose the order if the process died in between;
marking it after would count it twice. (With your own database, write the effect and the order
id into it in one transaction, for example with a unique constraint on the order id.) The
record expires after ORDERS_DEDUP_TTL_SECONDS (default 7 days): keep that longer than a message
can wait in the stream or the dead-letter stream before it is handled or replayed.

Configuration (plain variables: STREAMGROUP_* names are reserved for streamgroup, which rejects
names it does not know):
  ORDERS_REDIS_URL          where the revenue is kept; default: STREAMGROUP_REDIS_URL, with the
                            password from STREAMGROUP_REDIS_PASSWORD_FILE when that is set (as
                            the Helm chart does)
  ORDERS_DEDUP_TTL_SECONDS  how long an order id is remembered; default 604800
"""

from __future__ import annotations

import os
import threading

import redis

from streamgroup import Message, PoisonMessage

REVENUE_KEY = "{orders}:revenue_cents"  # hash: customer -> cents
DONE_KEY = "{orders}:done:"  # + order_id; the {orders} hash tag keeps both in one cluster slot

# KEYS[1] the order's done-marker, KEYS[2] the revenue hash; ARGV: entry id, ttl, customer, cents.
APPLY_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""

_lock = threading.Lock()
_script: redis.commands.core.Script | None = None


def _apply_once() -> redis.commands.core.Script:
    """One client per process, made on first use (sync handlers run on worker threads)."""
    global _script
    with _lock:
        if _script is None:
            url = os.environ.get("ORDERS_REDIS_URL") or os.environ.get("STREAMGROUP_REDIS_URL")
            if not url:
                raise RuntimeError("set ORDERS_REDIS_URL (or STREAMGROUP_REDIS_URL)")
            options: dict = {"socket_timeout": 10, "socket_connect_timeout": 5}
            password_file = os.environ.get("STREAMGROUP_REDIS_PASSWORD_FILE")
            if password_file and not os.environ.get("ORDERS_REDIS_URL"):
                with open(password_file, encoding="utf-8") as secret:
                    options["password"] = secret.read().rstrip("\r\n")
            client = redis.Redis.from_url(url, **options)
            _script = client.register_script(APPLY_ONCE)
        return _script


def ttl_seconds() -> int:
    return int(os.environ.get("ORDERS_DEDUP_TTL_SECONDS", 7 * 86_400))


def handle(message: Message) -> bool:
    """Returns whether this delivery counted the order (False: it was counted before)."""
    fields = message.fields
    order_id, customer, amount = fields.get("order_id"), fields.get("customer"), fields.get("amount_cents")
    if not order_id or not customer:
        # Retrying cannot fix a message without its key: straight to the dead-letter stream.
        raise PoisonMessage("order_id and customer are required")
    if amount is None or not amount.lstrip("-").isdigit():
        raise PoisonMessage(f"amount_cents must be an integer, got {amount!r}")
    # Any Redis error here propagates: the message stays pending and is retried later.
    counted = _apply_once()(
        keys=[DONE_KEY + order_id, REVENUE_KEY], args=[message.id, ttl_seconds(), customer, int(amount)]
    )
    return bool(counted)
